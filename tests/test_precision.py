"""--precision: auto's choice by the device, and fp16's dynamic loss scale (against torch.amp.GradScaler), its skipped
steps, its place in a checkpoint and a resume."""
import copy
import functools

import pytest
import torch
import torch.nn as nn

import train_utils
from checkpoint import check_state_is_finite
from checkpoint_file import load_checkpoint
from conftest import assert_same_weights, tiny_run_args
from device_utils import describe_precision, precision_choice
from optimization import make_optimizer
from test_cli import straight_and_resumed
from test_train_utils import CPU, tiny_run
from train_step import LossScale, NonFiniteLossError, SharpnessAware, StepParts, make_train_step
from train_utils import make_criterion

CUDA = torch.device("cuda")


@pytest.mark.parametrize("name, capability, chosen", [
    ("NVIDIA H100 80GB HBM3", (9, 0), "bf16"), ("NVIDIA A100-SXM4-40GB", (8, 0), "bf16"),
    ("NVIDIA GeForce RTX 3090", (8, 6), "bf16"), ("Tesla T4", (7, 5), "fp16"),
    ("Tesla V100-SXM2-16GB", (7, 0), "fp16"), ("NVIDIA GeForce RTX 2080 Ti", (7, 5), "fp16"),
    ("Tesla P100-PCIE-16GB", (6, 0), "fp16"),
])
def test_auto_is_bf16_where_the_gpu_computes_it_natively_and_fp16_with_loss_scaling_before(monkeypatch, name,
                                                                                         capability, chosen):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    words = {"bf16": f"bf16 autocast ({name} computes bf16 natively)",
             "fp16": f"fp16 autocast with loss scaling ({name} has no native bf16)"}
    assert precision_choice(CUDA) == (chosen, words[chosen].split("(")[1][:-1])
    assert describe_precision(CUDA) == words[chosen]
    for asked in ("bf16", "fp16", "fp32"):  # asked for, a precision is kept whatever the GPU
        assert precision_choice(CUDA, asked) == (asked, None)


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_auto_is_fp32_on_the_cpu_and_on_mps(device):
    assert precision_choice(torch.device(device)) == ("fp32", None)
    assert describe_precision(torch.device(device)) == "fp32"


def test_fp16_alone_gets_a_loss_scale_and_the_header_names_it(train_main, cifar_dir, tmp_path, capsys):
    assert tiny_run(cifar_dir).loss_scale is None
    assert tiny_run(cifar_dir, "--precision", "bf16").loss_scale is None
    run = tiny_run(cifar_dir, "--precision", "fp16")
    assert isinstance(run.loss_scale, LossScale) and run.train_step.loss_scale is run.loss_scale
    assert train_main(tiny_run_args(cifar_dir, tmp_path / "ckpt", "--epochs", "1", "--precision", "fp16")) == 0
    out = capsys.readouterr().out
    assert "on cpu x1, fp16 autocast with loss scaling, channels_last" in out.splitlines()[0]
    assert "fp16 loss scale 65536, 0 steps skipped for gradients that overflowed" in out


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))


def with_planted_overflow(model, planted):
    """`model`, whose last layer's gradient is made infinite while planted[0] is true."""
    model[-1].weight.register_hook(lambda gradient: gradient * float("inf") if planted[0] else gradient)
    return model


def sgd(model, fused):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True, fused=fused)


@pytest.mark.parametrize("fused", [False, True], ids=["sgd", "fused-sgd"])
def test_the_loss_scale_skips_and_scales_as_torchs_grad_scaler_does(fused):
    """Overflows at the very first step (before SGD has its momentum), twice in a row, and after the scale grew."""
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 8, 8, generator=generator), torch.randint(0, 10, (8,), generator=generator))
               for _ in range(10)]
    overflowing = {0, 4, 5, 9}
    planted = [False]
    ours, reference = (with_planted_overflow(small_model(), planted) for _ in range(2))
    ours_sgd, reference_sgd = sgd(ours, fused), sgd(reference, fused=False)
    loss_scale = LossScale(CPU.device, growth_interval=3)
    step = make_train_step(StepParts(ours, ours_sgd, make_criterion(), loss_scale=loss_scale), CPU, "fp32")
    step.start_epoch(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, growth_interval=3)
    criterion = make_criterion()
    for index, (images, labels) in enumerate(batches):
        planted[0] = index in overflowing
        before = copy.deepcopy(ours.state_dict()), copy.deepcopy(ours_sgd.state_dict()["state"])
        step(images, labels)
        reference_sgd.zero_grad(set_to_none=True)
        scaler.scale(criterion(reference(images), labels)).backward()
        scaler.step(reference_sgd)
        scaler.update()
        assert float(loss_scale.scale) == scaler.get_scale(), index
        assert int(loss_scale.growth_tracker) == int(scaler._growth_tracker), index
        mine, theirs = ours.state_dict(), reference.state_dict()
        for key in mine:
            torch.testing.assert_close(mine[key], theirs[key], rtol=0 if not fused else 1e-6, atol=0 if not fused
                                       else 1e-7, msg=f"{key} after step {index}")
        if planted[0]:  # a skipped step leaves the weights and the momentum as they were
            weights, momenta = before
            assert all(torch.equal(ours.state_dict()[key], value) for key, value in weights.items()
                       if "running" not in key and "num_batches" not in key)
            assert all(torch.equal(ours_sgd.state_dict()["state"][key]["momentum_buffer"], value["momentum_buffer"])
                       for key, value in momenta.items())
    assert int(loss_scale.skipped_steps) == len(overflowing)
    assert float(loss_scale.scale) == 2.0 ** 14  # 16, down to 15, up to 16, down to 14, up to 15, down to 14


@pytest.mark.parametrize("sam", [False, True], ids=["plain", "sam"])
def test_a_scaled_step_is_the_unscaled_step_to_the_bit_with_both_passes_of_sam(cifar_dir, sam):
    """In fp32 a power-of-two scale is exact: any pass left scaled, or unscaled twice, would show."""
    run = tiny_run(cifar_dir)
    batches = list(run.train_loader.batches(0))[:3]
    models = [copy.deepcopy(run.model) for _ in range(2)]
    steps = []
    for model, loss_scale in zip(models, [None, LossScale(CPU.device, scale=2.0 ** 10)]):
        optimizer = make_optimizer(model, 0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
        sharpness = SharpnessAware(model, 0.05) if sam else None
        steps.append(make_train_step(StepParts(model, optimizer, make_criterion(), sharpness=sharpness,
                                               loss_scale=loss_scale), CPU, "fp32"))
        steps[-1].start_epoch(0)
    for images, labels in batches:
        for step in steps:
            step(images, labels)
    assert_same_weights(models[0].state_dict(), models[1].state_dict())
    assert torch.equal(steps[0].sums, steps[1].sums)  # the recorded loss is the loss, not the scaled one


def test_an_fp16_run_resumes_exactly_with_its_loss_scale(train_main, cifar_dir, tmp_path, monkeypatch):
    # A scale that doubles after every finite step until the gradients overflow: a resume that restarted it differs.
    monkeypatch.setattr(train_utils, "LossScale", functools.partial(LossScale, growth_interval=1))
    straight, resumed = straight_and_resumed(train_main, cifar_dir, tmp_path, "--precision", "fp16")
    assert_same_weights(straight["model"], resumed["model"])
    assert straight["loss_scale"].keys() == resumed["loss_scale"].keys() == {"scale", "growth_tracker",
                                                                             "skipped_steps"}
    assert_same_weights(straight["loss_scale"], resumed["loss_scale"])
    assert straight["loss_scale"]["skipped_steps"] > 0 and straight["loss_scale"]["scale"] > 2.0 ** 16
    assert load_checkpoint(tmp_path / "straight" / "last.pt")["args"]["precision"] == "fp16"


DAMAGED_SCALES = {  # each kind of damage, and the words that name it
    "its scale is nan, not a finite number above 0": lambda scale: {**scale, "scale": torch.tensor(float("nan"))},
    "its scale is 0.0, not a finite number above 0": lambda scale: {**scale, "scale": torch.tensor(0.0)},
    "counts of steps are negative": lambda scale: {**scale, "growth_tracker": torch.tensor(-1, dtype=torch.int32)},
    "its scale is not a single torch.float32 number":
        lambda scale: {**scale, "scale": torch.tensor(2.0 ** 16, dtype=torch.float64)},
    "not a loss scale's": lambda scale: {"scale": scale["scale"]},
}


def test_a_damaged_loss_scale_is_one_line_and_the_checkpoint_is_kept(train_main, cifar_dir, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    assert train_main(tiny_run_args(cifar_dir, folder, "--epochs", "1", "--precision", "fp16")) == 0
    checkpoint = load_checkpoint(folder / "last.pt")
    for words, damage in DAMAGED_SCALES.items():
        torch.save({**checkpoint, "loss_scale": damage(checkpoint["loss_scale"])}, folder / "last.pt")
        damaged = (folder / "last.pt").read_bytes()
        capsys.readouterr()
        assert train_main(tiny_run_args(cifar_dir, folder, "--resume", "--epochs", "2")) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "is damaged: its fp16 loss scale does not fit this run" in lines[0], lines
        assert words in lines[0], lines[0]
        assert (folder / "last.pt").read_bytes() == damaged


def test_a_run_resumed_in_another_precision_takes_up_or_drops_the_loss_scale(train_main, cifar_dir, tmp_path):
    folder = tmp_path / "ckpt"
    assert train_main(tiny_run_args(cifar_dir, folder, "--epochs", "1")) == 0
    assert load_checkpoint(folder / "last.pt").get("loss_scale") is None
    assert train_main(tiny_run_args(cifar_dir, folder, "--resume", "--epochs", "2", "--precision", "fp16")) == 0
    assert float(load_checkpoint(folder / "last.pt")["loss_scale"]["scale"]) == 2.0 ** 16  # a fresh one
    assert train_main(tiny_run_args(cifar_dir, folder, "--resume", "--epochs", "3", "--precision", "fp32")) == 0
    assert load_checkpoint(folder / "last.pt")["loss_scale"] is None


def test_a_loss_scale_that_fell_to_zero_is_never_saved(cifar_dir):
    run = tiny_run(cifar_dir, "--precision", "fp16")
    run.loss_scale.scale.fill_(0.0)
    with pytest.raises(NonFiniteLossError, match="the fp16 loss scale became 0: the gradients overflowed"):
        check_state_is_finite(run)


def test_a_loss_that_is_not_finite_under_fp16_stops_the_run_and_says_it_was_the_loss(train_main, cifar_dir,
                                                                                       tmp_path, capsys, monkeypatch):
    real_criterion, calls = make_criterion(), []

    def poisoned(logits, labels):  # finite for epoch 1 (4 steps), NaN from epoch 2, step 2
        calls.append(1)
        loss = real_criterion(logits, labels)
        return loss * float("nan") if len(calls) >= 6 else loss

    monkeypatch.setattr(train_utils, "make_criterion", lambda label_smoothing: poisoned)
    assert train_main(tiny_run_args(cifar_dir, tmp_path / "ckpt", "--epochs", "3", "--precision", "fp16")) == 1
    err = capsys.readouterr().err
    assert "the training loss became NaN or infinite at epoch 2, step 2 (the loss itself, not only its gradients; " \
           "fp16 loss scale 32768, 1 step skipped for gradients that overflowed)" in err, err
