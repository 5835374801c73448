import contextlib
import errno
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import device_utils
import report
import train_step
import train_utils
from checkpoint import capture_rng_state, restore_rng_state, snapshot_to_host
from config import Config, parse_args
from conftest import assert_same_weights, tiny_run_args
from dataset_utils import load_cifar100
from device_utils import Runtime
from evaluation import evaluate, view_logits
from optimization import OneCycle
from checkpoint_file import CheckpointError, load_checkpoint
from run_dir import atomic_write
from train_step import NonFiniteLossError, StepParts, WeightAverage, make_train_step, uses_cuda_graphs
from train_utils import EarlyStopping, build_run, make_criterion, train_one_epoch

CPU = Runtime(torch.device("cpu"))


def tiny_run(cifar_dir, *flags):
    """The run train.py would build from these flags, on the CPU, with no run folder: nothing is written."""
    args, _ = parse_args(tiny_run_args(cifar_dir, "unused", "--lr", 0.05, "--epochs", 3, *flags))
    torch.manual_seed(0)
    config = Config.from_flags(args)
    return build_run(config, CPU, load_cifar100(config, CPU))


def test_a_few_epochs_on_learnable_data_reduce_the_loss(cifar_dir):
    run = tiny_run(cifar_dir)
    before = evaluate(run.model, run.test_loader, CPU, "fp32")
    for epoch in range(3):
        run.state.epoch = epoch
        train_one_epoch(run, show_progress=False)
    after = evaluate(run.model, run.test_loader, CPU, "fp32")
    assert after.loss < before.loss - 1.0
    assert after.top1 > 0.5 > before.top1


def test_train_one_epoch_counts_every_image_it_trains_on(cifar_dir):
    totals, stopped = train_one_epoch(tiny_run(cifar_dir), show_progress=False)
    assert stopped is None and totals.images == 64 and totals.seconds > 0
    assert 0 <= totals.correct.item() <= 64 and torch.isfinite(totals.loss_sum)


def test_preparing_each_next_epoch_ahead_trains_exactly_as_on_demand(cifar_dir, monkeypatch):
    weights, prepared = {}, {}
    for ahead in (False, True):
        run = tiny_run(cifar_dir)  # 3 epochs
        loader, prepared[ahead] = run.train_loader, []
        loader.prepares_ahead = ahead  # as on CUDA, where it runs on a side stream
        monkeypatch.setattr(loader, "prepare", lambda epoch, prepare=loader.prepare, log=prepared[ahead]: (
            log.append(epoch), prepare(epoch)))
        for epoch in range(3):
            run.state.epoch = epoch
            train_one_epoch(run, show_progress=False)
        weights[ahead] = run.model.state_dict()
    assert prepared == {False: [], True: [1, 2]}  # each next epoch, and none after the last
    assert_same_weights(weights[False], weights[True])


def test_a_nan_loss_names_the_epoch_and_step(cifar_dir, monkeypatch):
    calls = []

    def poisoned(logits, labels):
        calls.append(1)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(train_utils, "make_criterion", lambda label_smoothing: poisoned)
    run = tiny_run(cifar_dir)
    run.state.epoch = 4
    with pytest.raises(NonFiniteLossError, match="epoch 5, step 3"):
        train_one_epoch(run, show_progress=False)


def test_early_stopping_waits_for_patience_consecutive_epochs():
    stopper = EarlyStopping(target=0.5, patience=2)
    assert [stopper.update(top1) for top1 in (0.6, 0.4, 0.5, 0.7)] == [False, False, False, True]


def test_early_stopping_without_target_never_stops_and_survives_a_new_target():
    stopper = EarlyStopping(target=None, patience=1)
    assert not any(stopper.update(top1) for top1 in (0.9, 1.0, 1.0))
    resumed = EarlyStopping(target=0.95, patience=2)
    resumed.load_state_dict(stopper.state_dict())
    assert resumed.should_stop  # judged on the stored top-1 values against the new target


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = capture_rng_state()
    path = tmp_path / "rng.pt"
    torch.save(state, path)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    restore_rng_state(torch.load(path, weights_only=True))
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def test_atomic_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "last.pt"
    atomic_write(path, b"old")
    atomic_write(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_full_disk_keeps_the_previous_file_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_write(path, b"previous checkpoint")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(CheckpointError, match="could not write .*last.pt: No space left on device; the previous"):
        atomic_write(path, b"x" * 1000)
    assert path.read_bytes() == b"previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_a_kill_during_a_checkpoint_write_leaves_the_old_file_loadable(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"generation": 1}, path)
    writer = ("import sys, torch; sys.path.insert(0, sys.argv[2]); from run_dir import atomic_write; "
              "from checkpoint_file import checkpoint_bytes; atomic_write(sys.argv[1], checkpoint_bytes({'big': torch.ones(400_000_000, "
              "dtype=torch.uint8)}))")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    process = subprocess.Popen([sys.executable, "-c", writer, str(path), repo])
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".last.pt.tmp") for p in tmp_path.iterdir()):
        assert process.poll() is None and time.monotonic() < deadline, "the writer never started writing"
        time.sleep(0.005)
    process.kill()
    process.wait()
    assert torch.load(path, weights_only=True) == {"generation": 1}


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "pickled code", "foreign"])
def test_untrusted_checkpoints_are_refused_in_one_line(tmp_path, damage):
    path = tmp_path / "last.pt"
    if damage == "pickled code":
        path.write_bytes(subprocess.run(
            [sys.executable, "-c", "import io, os, torch\nclass Payload:\n def __reduce__(self): "
             "return (os.system, ('touch PWNED',))\nb = io.BytesIO(); torch.save({'model': Payload()}, b); "
             "import sys; sys.stdout.buffer.write(b.getvalue())"], capture_output=True, check=True,
            cwd=tmp_path).stdout)
    elif damage == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    else:
        torch.save({"w": torch.zeros(1000)}, path)
        data = path.read_bytes()
        path.write_bytes({"truncated": data[:300], "empty": b"", "garbage": os.urandom(2000)}[damage])
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    assert "\n" not in str(refused.value) and str(path) in str(refused.value)
    assert not (tmp_path / "PWNED").exists()


def test_evaluate_leaves_the_model_in_the_mode_it_found(cifar_dir):
    run = tiny_run(cifar_dir)
    for training in (True, False):
        run.model.train(training)
        evaluate(run.model, run.test_loader, CPU, "fp32")
        assert run.model.training == training


def test_momentum_stays_what_the_flag_says_through_the_one_cycle(cifar_dir):
    run = tiny_run(cifar_dir, "--momentum", 0.5, "--epochs", 2)
    lrs = []
    for epoch in range(2):
        run.state.epoch = epoch
        train_one_epoch(run, show_progress=False)
        lrs.append(run.optimizer.param_groups[0]["lr"])
        assert run.optimizer.param_groups[0]["momentum"] == 0.5
    assert lrs[0] > lrs[1]  # the lr did cycle


@pytest.mark.parametrize("total_steps, momenta", [(390 * 100, None), (24 * 97, (0.85, 0.95)), (7, None), (2, None)])
def test_the_schedule_is_torchs_one_cycle_to_the_bit_as_a_function_of_the_step(total_steps, momenta):
    """OneCycleLR stepped along beside the function of the step, over two groups (the second a BatchNorm bias
    group at 8 times the lr), from the first step to the last."""
    groups = [{"params": [torch.zeros(1, requires_grad=True)], "lr": 0.1},
              {"params": [torch.zeros(1, requires_grad=True)], "lr": 0.8}]
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    ours = OneCycle.for_optimizer(optimizer, total_steps, momenta)
    options = {"cycle_momentum": False} if momenta is None else dict(zip(("base_momentum", "max_momentum"), momenta))
    reference = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[0.1, 0.8], total_steps=total_steps, **options)
    for step in range(total_steps):
        assert ours.lrs(step) == [group["lr"] for group in optimizer.param_groups], step  # equal, not approximately
        if momenta is not None:
            assert ours.momentum(step) == optimizer.param_groups[0]["momentum"], step
        optimizer.step()
        reference.step()


def test_with_min_momentum_the_momentum_cycles_against_the_lr_between_the_bounds(cifar_dir):
    run = tiny_run(cifar_dir, "--momentum", 0.9, "--min-momentum", 0.8, "--epochs", 25)
    momenta, lrs = [], []
    for step in range(25 * run.train_loader.steps_per_epoch):
        run.schedule.apply_to(run.optimizer, step)
        momenta.append(run.optimizer.param_groups[0]["momentum"])
        lrs.append(run.optimizer.param_groups[0]["lr"])
    peak = lrs.index(max(lrs))
    assert momenta[0] == pytest.approx(0.9) and momenta[peak] == pytest.approx(0.8)
    assert all(0.8 - 1e-9 <= momentum <= 0.9 + 1e-9 for momentum in momenta)
    assert momenta[-1] > momenta[peak]


def test_cuda_graphs_only_for_one_cuda_process_and_only_when_wanted():
    cuda = torch.device("cuda")
    assert uses_cuda_graphs(Runtime(cuda))
    assert not uses_cuda_graphs(Runtime(cuda), cuda_graphs=False)
    assert not uses_cuda_graphs(Runtime(cuda, rank=0, world_size=2))  # torchrun: the eager step, under DDP
    assert not uses_cuda_graphs(CPU) and not uses_cuda_graphs(Runtime(torch.device("mps")))


@pytest.mark.parametrize("version, graphs", [("2.3.1+cu121", False), ("2.4.0", True), ("2.11.0+cu130", True),
                                             ("10.0.0a0", True)])
def test_cuda_graphs_are_refused_in_one_line_below_the_first_torch_that_keeps_the_lr_on_the_gpu(
        monkeypatch, capsys, version, graphs):
    monkeypatch.setattr(torch, "__version__", version)
    assert uses_cuda_graphs(Runtime(torch.device("cuda"))) == graphs
    assert device_utils.fused_sgd_available(torch.device("cuda")) == graphs
    note = capsys.readouterr().err
    assert note == ("" if graphs else f"note: CUDA graphs need torch 2.4 or newer, whose fused SGD and schedule keep "
                                      f"the lr on the GPU; torch {version} trains eagerly\n")


def test_a_snapshot_keeps_the_values_of_the_moment_it_was_taken(cifar_dir):
    run = tiny_run(cifar_dir)
    snapshot = snapshot_to_host({"model": run.model.state_dict(), "nested": [run.optimizer.state_dict()]})
    before = {key: value.clone() for key, value in run.model.state_dict().items()}
    train_one_epoch(run, show_progress=False)
    assert any(not torch.equal(before[key], run.model.state_dict()[key]) for key in before)
    assert all(torch.equal(before[key], snapshot["model"][key]) for key in before)


def test_the_step_updates_the_weight_average_by_its_formula_and_copies_the_counters(cifar_dir):
    run = tiny_run(cifar_dir)
    model = run.model
    average = WeightAverage(model, decay=0.9)
    step = make_train_step(StepParts(model, run.optimizer, make_criterion(), average=average), CPU, "fp32")
    step.start_epoch(0)
    for n, (images, labels) in enumerate(run.train_loader.batches(0)):
        before = {key: value.clone() for key, value in average.model.state_dict().items()}
        step(images, labels)
        decay = min(0.9, 1 - (1 + n) ** (-2 / 3))  # 0, 0.37, 0.48, 0.56: the first update copies the weights
        after, current = average.model.state_dict(), model.state_dict()
        for key, value in after.items():
            if value.is_floating_point():
                assert torch.allclose(value, decay * before[key] + (1 - decay) * current[key], atol=1e-6), key
            else:
                assert torch.equal(value, current[key]), key  # counters are copied, not averaged
        assert (after["conv1.weight"] - current["conv1.weight"]).abs().max() < 1e-6 if n == 0 else \
            not torch.equal(after["conv1.weight"], current["conv1.weight"])
    assert average.updates.item() == run.train_loader.steps_per_epoch


def test_a_single_process_on_cuda_n_makes_gpu_n_its_current_device(monkeypatch):
    from device_utils import setup_runtime
    made_current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    # Graph capture, side streams and synchronisation act on the current GPU: it must be the run's own.
    assert setup_runtime("cuda:1").device == torch.device("cuda", 1)
    assert setup_runtime("cuda").device == torch.device("cuda", 0)
    assert made_current == [torch.device("cuda", 1), torch.device("cuda", 0)]


class RecordedCapture:
    """torch.cuda's capture calls, recorded: a CPU stand-in for a GPU whose capture ends as `capture_end` does."""

    def __init__(self, monkeypatch, capture_end, capturing):
        self.calls = []
        graph = type("Graph", (), {"capture_begin": lambda _, pool: self.calls.append(("begin", pool)),
                                   "capture_end": lambda _: capture_end()})
        stream = type("Stream", (), {"__init__": lambda *_: None, "wait_stream": lambda *_: None})
        for name, value in {"CUDAGraph": graph, "graph_pool_handle": lambda: (7, 1), "Stream": stream,
                            "current_stream": lambda _: stream(), "stream": lambda _: contextlib.nullcontext(),
                            "is_current_stream_capturing": lambda: capturing, "current_device": lambda: 3}.items():
            monkeypatch.setattr(torch.cuda, name, value)
        for name in ("_cuda_endAllocateToPool", "_cuda_releasePool"):
            monkeypatch.setattr(torch._C, name, lambda device, pool, name=name: self.calls.append((name, device, pool)),
                                raising=False)


def test_a_refused_capture_ends_the_allocation_to_its_own_pool_and_gives_the_pool_back(monkeypatch):
    """capture_end raises before it ends the allocation to the pool where the driver invalidated the capture (a host
    sync): unless that is undone, the allocator counts a capture as under way for the rest of the process."""
    def invalidated():
        raise RuntimeError("operation not permitted when stream is capturing")

    capture = RecordedCapture(monkeypatch, invalidated, capturing=False)
    with pytest.raises(RuntimeError, match="not permitted"):  # the cause, not an error of the clean-up
        train_step.capture_graph(lambda: None, torch.device("cuda"))
    assert capture.calls == [("begin", (7, 1)), ("_cuda_endAllocateToPool", 3, (7, 1)),  # the current GPU's
                             ("_cuda_releasePool", 3, (7, 1))]


def test_a_capture_that_ends_after_an_error_in_its_work_leaves_the_pool_to_its_graph(monkeypatch):
    capture = RecordedCapture(monkeypatch, lambda: capture.calls.append(("end",)), capturing=True)

    def work():
        raise ValueError("a Python error while capturing")

    with pytest.raises(ValueError, match="a Python error"):
        train_step.capture_graph(work, torch.device("cuda", 1))
    assert capture.calls == [("begin", (7, 1)), ("end",)]  # the ended graph gives its pool back when it goes


def test_the_weight_average_is_timms_model_ema_v3_with_warm_up_over_50_steps():
    """timm's ModelEmaV3 (use_warmup=True, as its train.py calls it: update(model, step=number of updates so far))
    on the same weights; a decay of 0.9 is reached at update 32, so both the warm-up and the cap are checked."""
    from timm.utils import ModelEmaV3

    from model import build_model
    torch.manual_seed(0)
    model = build_model("wideresnet", depth=10, widen_factor=1)  # BatchNorm statistics are averaged as well
    ours, theirs = WeightAverage(model, 0.9), ModelEmaV3(model, decay=0.9, use_warmup=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(1, 51):
        images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 100, (8,))
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        optimizer.zero_grad()
        ours.update()
        theirs.update(model, step=step)
        assert theirs.get_decay(step) == pytest.approx(train_step.average_decay(torch.tensor(step - 1.0), 0.9).item())
    for (name, mine), reference in zip(ours.model.state_dict().items(), theirs.module.state_dict().values()):
        assert torch.allclose(mine, reference, rtol=1e-5, atol=1e-6), name


def reference_sam_step(model, optimizer, images, labels, rho, adaptive):
    """One SAM step as its authors' reference code writes it (davda54/sam): the gradient, a climb to w + e(w),
    the gradient there with BatchNorm's running statistics left alone (momentum 0), back to w, the base step."""
    criterion = torch.nn.CrossEntropyLoss()
    optimizer.zero_grad()
    criterion(model(images), labels).backward()
    parameters = [p for p in model.parameters() if p.grad is not None]
    norm = torch.norm(torch.stack([((p.abs() if adaptive else 1.0) * p.grad).norm(p=2) for p in parameters]), p=2)
    starts = []
    for p in parameters:
        starts.append(p.data.clone())
        p.data.add_((p.pow(2) if adaptive else 1.0) * p.grad * (rho / (norm + 1e-12)))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.momentum = 0.0
    optimizer.zero_grad()
    criterion(model(images), labels).backward()
    for m in norms:
        m.momentum = 0.1
    for p, start in zip(parameters, starts):
        p.data = start
    optimizer.step()


@pytest.mark.parametrize("adaptive, rho", [(False, 0.05), (True, 0.5)], ids=["sam", "asam"])
def test_a_sam_step_equals_the_reference_step(cifar_dir, adaptive, rho):
    import copy

    from train_step import SharpnessAware
    from optimization import make_optimizer
    run = tiny_run(cifar_dir)
    batches = list(run.train_loader.batches(0))[:2]
    models = [copy.deepcopy(run.model) for _ in range(3)]
    optimizers = [make_optimizer(model, 0.05, momentum=0.9, weight_decay=5e-4, nesterov=True) for model in models]
    sharpness = SharpnessAware(models[0], rho, adaptive)
    ours = make_train_step(StepParts(models[0], optimizers[0], make_criterion(), sharpness=sharpness), CPU, "fp32")
    plain = make_train_step(StepParts(models[2], optimizers[2], make_criterion()), CPU, "fp32")
    ours.start_epoch(0)
    plain.start_epoch(0)
    for images, labels in batches:  # two steps: momentum and weight decay act on the sharpness gradient
        ours(images, labels)
        reference_sam_step(models[1], optimizers[1], images, labels, rho, adaptive)
        plain(images, labels)
    mine, reference, unsharpened = (model.state_dict() for model in models)
    floats = [key for key, value in mine.items() if value.is_floating_point()]
    apart = max((mine[key] - reference[key]).abs().max().item() for key in floats)
    moved = max((mine[key] - unsharpened[key]).abs().max().item() for key in floats)  # SAM's own effect
    assert moved > 1e-3 and apart <= 1e-3 * moved  # float rounding, not a different step
    assert all(mine[key].item() == 2 for key in mine if key.endswith("num_batches_tracked"))  # the first pass only


def test_train_top1_under_mixing_counts_each_hit_by_its_share_of_the_target(cifar_dir):
    run = tiny_run(cifar_dir)
    step = run.train_step
    step.start_epoch(0)
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]])  # predicts classes 1, 0, 2
    mixed = torch.tensor([[0.3, 0.7, 0.0], [0.6, 0.0, 0.4], [1.0, 0.0, 0.0]])  # as mixup-cifar10 counts them:
    step.record(torch.tensor(1.0), logits, mixed)  # lambda * hit(a) + (1 - lambda) * hit(b) per image
    assert step.sums[train_step.CORRECT].item() == pytest.approx(0.7 + 0.6 + 0.0)
    step.record(torch.tensor(1.0), logits, torch.tensor([1, 2, 2]))
    assert step.sums[train_step.CORRECT].item() == pytest.approx(1.3 + 2)


def test_the_progress_bar_starts_after_the_epochs_augmentation_so_its_rate_counts_steps_alone(cifar_dir,
                                                                                               monkeypatch):
    run = tiny_run(cifar_dir)
    events = []
    augment_epoch = run.train_loader.augment_epoch
    monkeypatch.setattr(run.train_loader, "augment_epoch", lambda *args: events.append("augmented") or
                        augment_epoch(*args))
    monkeypatch.setattr(report.Progress, "__init__", lambda self, *args, real=report.Progress.__init__: (
        events.append("progress starts"), real(self, *args))[1])
    train_one_epoch(run, show_progress=False)
    assert events == ["augmented", "progress starts"]  # not a first step that seems to take the whole augmentation


def reflected_shift(images, rows, cols):
    """Each pixel (i, j) taken from (i + rows, j + cols), an index past an edge reflected back inside it."""
    size = images.shape[-1]

    def reflect(index):
        return -index if index < 0 else 2 * (size - 1) - index if index >= size else index

    rows_from = torch.tensor([reflect(i + rows) for i in range(size)])
    cols_from = torch.tensor([reflect(j + cols) for j in range(size)])
    return images[..., rows_from, :][..., cols_from]


def test_crop_views_average_as_airbenchs_test_time_augmentation(cifar_dir):
    run = tiny_run(cifar_dir)
    model = run.model.eval()
    images = next(iter(run.test_loader))[0]

    def mirrored(batch):
        return (model(batch) + model(batch.flip(-1))) / 2

    with torch.no_grad():
        shifted = [mirrored(reflected_shift(images, -1, -1)), mirrored(reflected_shift(images, 1, 1))]
        reference = 0.5 * mirrored(images) + 0.5 * torch.stack(shifted).mean(0)
        assert torch.allclose(view_logits(model, images, "crops"), reference, atol=1e-5)
        assert torch.allclose(view_logits(model, images, "mirror"), mirrored(images), atol=1e-6)
        assert not torch.allclose(reference, mirrored(images), atol=1e-3)


def test_evaluation_scores_the_logits_of_its_views(cifar_dir):
    run = tiny_run(cifar_dir)
    model = run.model.eval()
    batches = list(run.test_loader)
    with torch.no_grad():
        logits = torch.cat([view_logits(model, images, "crops") for images, _ in batches])
    labels = torch.cat([labels for _, labels in batches])
    result = evaluate(model, run.test_loader, CPU, "fp32", views="crops")
    assert result.loss == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    assert result.top1 == pytest.approx((logits.argmax(1) == labels).float().mean().item())


def test_batchnorm_biases_take_the_scaled_lr_and_the_same_decay_per_step(cifar_dir):
    run = tiny_run(cifar_dir, "--bn-bias-lr-scale", 8, "--wd", 5e-4)
    others, biases = run.optimizer.param_groups
    batchnorms = [module for module in run.model.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    assert [id(p) for p in biases["params"]] == [id(module.bias) for module in batchnorms]
    assert len(others["params"]) + len(biases["params"]) == len(list(run.model.parameters()))
    assert biases["weight_decay"] * biases["lr"] == pytest.approx(others["weight_decay"] * others["lr"])
    for step in range(2 * run.train_loader.steps_per_epoch):  # the whole OneCycle keeps the ratio
        run.schedule.apply_to(run.optimizer, step)
        assert biases["lr"] == pytest.approx(8 * others["lr"])
        run.optimizer.step()
    assert max(run.schedule.peaks) == pytest.approx(8 * 0.05)


def test_a_batchnorm_bias_moves_by_the_sgd_formula_at_its_scaled_lr(cifar_dir):
    run = tiny_run(cifar_dir, "--bn-bias-lr-scale", 4, "--wd", 0.05, "--momentum", 0.9)
    bias = run.optimizer.param_groups[1]["params"][0]
    with torch.no_grad():
        bias.normal_()  # away from zero, so the decay shows
    before = bias.detach().clone()
    images, labels = next(iter(run.train_loader.batches(0)))
    run.train_step(images, labels)
    lr = run.optimizer.param_groups[1]["lr"]  # the step's lr: the schedule has not moved
    expected = before - lr * (bias.grad + 0.05 / 4 * before)  # the first step: the momentum buffer is the gradient
    assert torch.allclose(bias.detach(), expected, rtol=0, atol=1e-6)
    assert lr == pytest.approx(4 * run.optimizer.param_groups[0]["lr"])
