"""The in-process GPU checks of test_gpu.py; each runs in its own process: `python tests/gpu_checks.py CHECK`."""
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import Augmentation, Config, parse_args  # noqa: E402
from dataset_utils import EvalLoader, TrainLoader  # noqa: E402
from device_utils import Runtime, input_dtype  # noqa: E402
from model import build_model  # noqa: E402
from train_step import (LossScale, RunningSums, SharpnessAware, StepParts, WeightAverage,  # noqa: E402
                        make_train_step)
from optimization import OneCycle, make_optimizer  # noqa: E402
from train_utils import build_run, make_criterion, train_one_epoch  # noqa: E402


def two_identical_steps(graphed, criterion=None, rho=None, precision="bf16"):
    torch.manual_seed(0)
    model = build_model("wideresnet", depth=10, widen_factor=2).cuda().to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, lr=0.05, nesterov=True)
    sharpness = SharpnessAware(model, rho) if rho else None
    loss_scale = LossScale(torch.device("cuda")) if precision == "fp16" else None
    parts = StepParts(model, optimizer, criterion or make_criterion(0.1), WeightAverage(model, 0.9), sharpness,
                      loss_scale)
    step = make_train_step(parts, Runtime(torch.device("cuda")), precision, cuda_graphs=graphed)
    return model, optimizer, step


def fixed_batches(count, size=64, dtype=torch.bfloat16):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(count, size, 3, 32, 32, generator=generator).cuda().to(dtype)
    labels = torch.randint(0, 100, (count, size), generator=generator).cuda()
    return [(images[i].contiguous(memory_format=torch.channels_last), labels[i]) for i in range(count)]


def train_on(batches, step, optimizer):
    """One short epoch of `batches` through `step`, with its OneCycle schedule."""
    schedule = OneCycle.for_optimizer(optimizer, len(batches))
    step.start_epoch(0)
    for index, (images, labels) in enumerate(batches):
        schedule.apply_to(optimizer, index)
        step(images, labels)
    torch.cuda.synchronize()


def distance(weights, others):
    return sum((a - b).norm() ** 2 for a, b in zip(weights, others)).sqrt()


def check_graph_replays_match_eager_steps(rho=None):
    """Also with SAM (`rho`): both passes, the climb and the return inside the graph."""
    rho = rho and float(rho)
    batches = fixed_batches(12)
    results = []
    for graphed in (False, True):
        model, optimizer, step = two_identical_steps(graphed, rho=rho)
        train_on(batches, step, optimizer)
        assert graphed == (step.graph is not None), "the graph was not captured"
        weights = [*model.parameters(), *step.average.model.parameters()]  # the trained and the averaged weights
        results.append(([p.detach().float().clone() for p in weights], step.sums.clone(),
                        float(optimizer.param_groups[0]["lr"])))
    (eager, eager_sums, eager_lr), (replayed, replayed_sums, replayed_lr) = results
    start = [p.detach().float() for p in two_identical_steps(False)[0].parameters()] * 2
    moved, apart = distance(eager, start), distance(eager, replayed)
    print(f"eager moved the weights {moved:.4g}; graph and eager differ by {apart:.4g}")
    assert apart < 0.05 * moved  # bf16 rounding and cudnn's algorithm choice, not a different computation
    eager_sums, replayed_sums = RunningSums(*eager_sums.tolist()), RunningSums(*replayed_sums.tolist())
    assert eager_sums.steps_done == replayed_sums.steps_done == len(batches)
    assert eager_sums.first_bad_step == replayed_sums.first_bad_step == -1
    assert abs(eager_sums.loss_sum - replayed_sums.loss_sum) < 0.02 * eager_sums.loss_sum
    assert eager_lr == pytest.approx(replayed_lr)


def check_fp16_steps_match_fp32_eager_steps():
    """fp16 with loss scaling, eager and replayed as a graph, against fp32 eager steps: apart by fp16's rounding
    alone. Then a scale so large that the gradients overflow, replayed: the weights stay, the scale halves, and the
    skipped step is counted, all on the device."""
    trained = {}
    for precision, graphed in (("fp32", False), ("fp16", False), ("fp16", True)):
        model, optimizer, step = two_identical_steps(graphed, precision=precision)
        train_on(fixed_batches(12, dtype=input_dtype(precision)), step, optimizer)
        assert graphed == (step.graph is not None), "the graph was not captured"
        trained[precision, graphed] = [p.detach().float().clone() for p in model.parameters()], step
    reference = trained["fp32", False][0]
    moved = distance(reference, [p.detach().float() for p in two_identical_steps(False)[0].parameters()])
    for graphed in (False, True):
        weights, step = trained["fp16", graphed]
        apart = distance(weights, reference)
        skipped = int(step.loss_scale.skipped_steps)  # an early overflow at 2^16 is allowed, as GradScaler has them
        print(f"fp32 moved the weights {moved:.4g}; fp16 {'graphed' if graphed else 'eager'} differs by {apart:.4g}, "
              f"{skipped} of 12 steps skipped")
        assert apart < 0.1 * moved  # fp16 rounding over 12 steps (3 % on a CPU), not a different computation
        assert skipped <= 2 and float(step.loss_scale.scale) == 2.0 ** (16 - skipped)
    step = trained["fp16", True][1]
    before, skipped = [p.detach().clone() for p in step.model.parameters()], int(step.loss_scale.skipped_steps)
    step.loss_scale.scale.fill_(2.0 ** 127)  # the loss times this is infinite, and so is every gradient
    images, labels = fixed_batches(1, dtype=torch.float16)[0]
    step(images, labels)
    torch.cuda.synchronize()
    assert step.graph is not None
    assert all(torch.equal(p, q) for p, q in zip(step.model.parameters(), before)), "a skipped step moved a weight"
    assert float(step.loss_scale.scale) == 2.0 ** 126 and int(step.loss_scale.skipped_steps) == skipped + 1


def random_loader(count=8192, batch_size=256, augmentation=Augmentation()):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator).cuda()
    labels = torch.randint(0, 100, (count,), generator=generator).cuda()
    return TrainLoader(images, labels, batch_size, augmentation=replace(augmentation, seed=1), dtype=torch.bfloat16)


def syncing(criterion, only_while_capturing):
    """`criterion` with a host sync (`.item()`) in it, always or only while a graph is being captured."""
    def with_a_host_sync(logits, labels):
        loss = criterion(logits, labels)
        if torch.cuda.is_current_stream_capturing() or not only_while_capturing:
            loss.item()
        return loss
    return with_a_host_sync


def six_epochs_beside_their_preparation(step, optimizer):
    """Six epochs as train_one_epoch runs them, the next one prepared on a side stream; memory reserved after each."""
    loader = random_loader()
    epochs = 6
    schedule = OneCycle.for_optimizer(optimizer, epochs * loader.steps_per_epoch)
    reserved = []
    for epoch in range(epochs):
        step.start_epoch(0)
        for index, (images, labels) in enumerate(loader.batches(epoch)):
            schedule.apply_to(optimizer, epoch * loader.steps_per_epoch + index)
            step(images, labels)
            if index == 0:
                loader.prepare(epoch + 1)
        torch.cuda.synchronize()
        reserved.append(torch.cuda.memory_reserved())
    assert torch.cuda.current_stream() == torch.cuda.default_stream()  # not the capture's stream
    sums = RunningSums(*step.sums.tolist())
    assert sums.steps_done == loader.steps_per_epoch and math.isfinite(sums.loss_sum)
    print(f"memory reserved after each epoch: {[f'{value / 2**20:.0f} MiB' for value in reserved]}")
    assert reserved[-1] - reserved[2] < 2**20 * 16  # a prepared epoch's buffer is 48 MiB: none is held back
    torch.cuda.empty_cache()  # asserts inside the allocator if a capture is still counted as under way
    assert torch.cuda.memory_reserved() < reserved[-1]


def check_a_refused_capture_leaves_the_process_as_an_eager_run():
    """The device index left to the current GPU (torch.device("cuda")), as a notebook would leave it."""
    _, optimizer, step = two_identical_steps(True, syncing(make_criterion(), only_while_capturing=True))
    six_epochs_beside_their_preparation(step, optimizer)
    assert step.graph is None and step.failed and step.kind == "eager (the CUDA graph capture failed)"


def check_a_step_that_waits_for_the_host_is_never_captured():
    _, optimizer, step = two_identical_steps(True, syncing(make_criterion(), only_while_capturing=False))
    six_epochs_beside_their_preparation(step, optimizer)
    assert step.graph is None and step.capture_seconds == 0.0  # no capture was begun
    assert step.kind == "eager (the step waits for the host, which a CUDA graph cannot capture)"


def gpu_run(*flags, count=2048):
    """train.py's run for these flags on random data on the GPU, built as train.py builds it."""
    args, _ = parse_args(["--model", "wideresnet", "--depth", "10", "--widen-factor", "1", "--batch-size", "128",
                          "--device", "cuda", *map(str, flags)])
    config = Config.from_flags(args)
    loader = random_loader(count, config.batch_size, config.augmentation)
    test = EvalLoader(loader.images[:512], loader.labels[:512], dtype=torch.bfloat16)
    torch.manual_seed(0)
    return build_run(config, Runtime(torch.device("cuda", 0)), (loader, None, test))


def check_eager_steps_beside_the_next_epochs_preparation_train_as_on_demand():
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    weights = {}
    for ahead in (False, True):
        run = gpu_run("--no-cuda-graphs", "--epochs", 3, "--cutout", 8)
        run.train_loader.prepares_ahead = ahead
        start = [p.detach().float().clone() for p in run.model.parameters()]
        for epoch in range(3):
            run.state.epoch = epoch
            train_one_epoch(run, show_progress=False)
        assert run.train_step.kind == "eager" and (run.train_loader.side_stream is not None) == ahead
        weights[ahead] = [p.detach().float().clone() for p in run.model.parameters()]
    moved = sum((a - s).norm() ** 2 for a, s in zip(weights[False], start)).sqrt()
    apart = sum((a - b).norm() ** 2 for a, b in zip(weights[False], weights[True])).sqrt()
    print(f"training moved the weights {moved:.4g}; with and without preparation ahead they differ by {apart:.4g}")
    assert apart <= 1e-3 * moved  # reading a half-written epoch would put them far apart


def check_preparing_an_epoch_never_waits_for_the_host():
    """Every policy, with Cutout and mixing, prepared on the side stream with any host sync an error."""
    for policy in (None, "ta_wide", "ra"):
        loader = random_loader(augmentation=Augmentation(cutout=8, mixup=0.2, cutmix=1.0, auto_augment=policy))
        loader.prepare(0)  # constants made once per device, and the side stream: the set-up, not an epoch's work
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loader.prepare(1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert next(loader.batches(1))[0].isfinite().all()


def check_the_captured_lr_follows_the_schedule():
    """fp32 and cudnn's deterministic kernels, so that replays and eager steps agree closely: a graph that kept the
    lr it was captured with would leave the weights far apart over a OneCycle ramp."""
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    batches = [(images.float(), labels) for images, labels in fixed_batches(16)]
    weights, lrs = [], []
    for graphed in (False, True):
        torch.manual_seed(0)
        model = build_model("wideresnet", depth=10, widen_factor=1).cuda().to(memory_format=torch.channels_last)
        optimizer = make_optimizer(model, lr=0.2, nesterov=True)
        step = make_train_step(StepParts(model, optimizer, make_criterion()), Runtime(torch.device("cuda")), "fp32",
                               cuda_graphs=graphed)
        schedule = OneCycle.for_optimizer(optimizer, len(batches))
        step.start_epoch(0)
        for index, (images, labels) in enumerate(batches):
            schedule.apply_to(optimizer, index)
            lrs.append(float(optimizer.param_groups[0]["lr"]))
            step(images, labels)
        torch.cuda.synchronize()
        assert graphed == (step.graph is not None), "the graph was not captured"
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    eager_lrs, graphed_lrs = lrs[:len(batches)], lrs[len(batches):]
    assert graphed_lrs == pytest.approx(eager_lrs) and len(set(graphed_lrs)) == len(batches)  # it moved every step
    apart = (weights[0] - weights[1]).norm() / weights[0].norm()
    print(f"graph and eager weights differ by {apart:.3g} of their norm")
    assert apart < 1e-4


def check_an_epoch_prepared_on_a_side_stream_matches_one_made_on_demand():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8192, 3, 32, 32), dtype=torch.uint8, generator=generator).cuda()
    labels = torch.randint(0, 100, (8192,), generator=generator).cuda()

    def loader():
        return TrainLoader(images, labels, 256, dtype=torch.bfloat16,
                           augmentation=Augmentation(seed=1, cutout=8, mixup=0.2, cutmix=1.0, cutmix_prob=0.5,
                                                     auto_augment="ta_wide"))

    expected = [(batch.clone(), targets.clone()) for batch, targets in loader().batches(1)]
    ahead = loader()
    assert ahead.prepares_ahead
    ahead.prepare(1)
    read_at_once = [(batch.clone(), targets.clone()) for batch, targets in ahead.batches(1)]  # must wait for it
    assert len(read_at_once) == len(expected)
    for (batch, targets), (expected_batch, expected_targets) in zip(read_at_once, expected):
        assert torch.equal(batch, expected_batch) and torch.equal(targets, expected_targets)


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
