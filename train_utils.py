"""Training and evaluation loops, early stopping, checkpoints and run records.

On the GPU the step loop never waits for the device: loss and accuracy are summed on the
device and read only at a few sync points per epoch (progress bar, NaN check, interrupt
agreement between ranks) and once at its end.
"""
import contextlib
import copy
import csv
import io
import math
import os
import pickle
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from device_utils import all_reduce_sum, any_rank, autocast, synchronize
from model import build_model

CHECKPOINT_FORMAT = "cifar100-trainer/1"
CHECKPOINT_KEYS = {"format", "model_config", "model", "optimizer", "scheduler", "epoch", "step", "best_top1",
                   "early_stopping", "history", "args", "rng"}
SYNC_POINTS_PER_EPOCH = 10
METRICS_COLUMNS = ("epoch", "epoch_seconds", "train_seconds", "images", "train_loss", "train_top1", "val_loss",
                   "val_top1", "val_top5", "test_loss", "test_top1", "test_top5", "lr", "images_per_sec", "best")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, does not fit this run, or cannot be written."""

    def __init__(self, message, reason=None):
        super().__init__(message)
        self.reason = reason  # the operating system's word for a failed write, such as "No space left on device"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


# ---- early stopping ----


class EarlyStopping:
    """Stop once test top-1 has been >= `target` for `patience` consecutive epochs; target None never stops.

    It keeps every epoch's top-1, not just a streak, so a target changed on --resume is judged fairly.
    """

    def __init__(self, target=None, patience=2):
        self.target, self.patience = target, patience
        self.top1_history = []

    def update(self, top1):
        self.top1_history.append(top1)
        return self.should_stop

    @property
    def streak(self):
        if self.target is None:
            return 0
        count = 0
        for top1 in reversed(self.top1_history):
            if top1 < self.target:
                break
            count += 1
        return count

    @property
    def should_stop(self):
        return self.target is not None and self.streak >= self.patience

    def state_dict(self):
        return {"top1_history": list(self.top1_history)}

    def load_state_dict(self, state):
        self.top1_history = list(state["top1_history"])


# ---- optimisation ----


def make_optimizer(model, lr, momentum=0.9, weight_decay=5e-4, nesterov=False):
    """SGD; on CUDA the fused kernel (one launch for every parameter, and it takes the lr as a device tensor)."""
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=nesterov, fused=fused or None)


def make_scheduler(optimizer, max_lr, total_steps):
    """OneCycle on the lr only: momentum stays what --momentum says (cycling it would override the flag)."""
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps,
                                               cycle_momentum=False)


def load_scheduler_state(scheduler, state):
    """Restore the schedule's position; the planned length stays this run's, so --epochs may grow on resume."""
    scheduler.load_state_dict({k: v for k, v in state.items() if k not in ("total_steps", "_schedule_phases")})


def current_lr(optimizer):
    return float(optimizer.param_groups[0]["lr"])


def lr_to_float(optimizer):
    """A graphed run keeps the lr in a device tensor; checkpoints and other runs see a plain number."""
    for group in optimizer.param_groups:
        group["lr"] = float(group["lr"])


class WeightAverage:
    """An exponential moving average of a model's weights and BatchNorm statistics, updated after every step:
    average = decay * average + (1 - decay) * current. `model` is the averaged copy, evaluated and saved."""

    def __init__(self, model, decay):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        pairs = list(zip(self.model.state_dict().values(), model.state_dict().values()))
        self.averaged = [mine for mine, theirs in pairs if mine.is_floating_point()]
        self.current = [theirs for mine, theirs in pairs if mine.is_floating_point()]
        self.counters = [(mine, theirs) for mine, theirs in pairs if not mine.is_floating_point()]

    @torch.no_grad()
    def update(self):
        # One fused launch for every tensor (the same call torch.optim.swa_utils makes for an EMA).
        torch._foreach_lerp_(self.averaged, self.current, 1 - self.decay)
        for mine, theirs in self.counters:
            mine.copy_(theirs)


# ---- the loops ----


class Interrupt:
    """The first SIGINT, SIGTERM or SIGHUP asks the loop to stop at a step boundary; a second one quits at once."""

    def __init__(self):
        self.signum = None

    def install(self):
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: a closed terminal, a batch system
            signal.signal(signum, self.handle)

    def handle(self, signum, frame):
        if self.signum is not None:
            os._exit(128 + signum)  # safe: every file is written to a temporary name and renamed
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (again to quit at once)",
              file=sys.stderr, flush=True)

    @property
    def requested(self):
        return self.signum is not None


@dataclass
class EpochTotals:
    """Running sums of one epoch on this rank; the loss sum and hits stay on the device until read."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    images: int = 0
    seconds: float = 0.0


@dataclass
class EpochResult:
    loss: float
    top1: float
    images: int  # over all ranks
    seconds: float

    @property
    def images_per_sec(self):
        return self.images / max(self.seconds, 1e-9)


class TrainStep:
    """Forward, loss, backward and SGD update of one batch, eagerly (CPU, MPS, torchrun, and the fallback).

    The epoch's running sums stay on the device in `sums`: loss sum, correct predictions,
    steps done, and the first step whose loss was not finite (-1 while none was).
    """

    kind = "eager"
    graph = None

    def __init__(self, model, optimizer, criterion, device, precision, average=None):
        self.model, self.optimizer, self.criterion = model, optimizer, criterion
        self.device, self.precision, self.average = device, precision, average
        self.sums = torch.zeros(4, device=device)
        self.setup_seconds = 0.0  # the process's first step and the graph capture: start-up, not training
        self.first_step_at = None  # time.time() when the process's first step had finished
        self.last_lr = None  # the lr of the last step of the last full epoch

    def start_epoch(self, start_step, totals=None):
        loss_sum, correct = (totals["loss_sum"], totals["correct"]) if totals else (0.0, 0.0)
        self.sums.copy_(torch.tensor([loss_sum, correct, start_step, -1.0]))

    def __call__(self, images, labels):
        self.forward_backward_update(images, labels)

    def forward_backward_update(self, images, labels):
        with autocast(self.device, self.precision, cache=False):
            logits = self.model(images)
            loss = self.criterion(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.average is not None:
            self.average.update()
        self.record(loss.detach(), logits.detach(), labels)

    def record(self, loss, logits, labels):
        first_bad = torch.where((self.sums[3] < 0) & ~loss.isfinite(), self.sums[2], self.sums[3])
        self.sums[:3] += torch.stack([loss.float() * len(labels), (logits.argmax(1) == labels).sum().float(),
                                      torch.ones((), device=self.device)])
        self.sums[3] = first_bad


class GraphedTrainStep(TrainStep):
    """The same step replayed as one CUDA graph: one launch instead of about 300 per batch.

    The first WARMUP_STEPS batches train eagerly on a side stream (cudnn picks its algorithms,
    the optimizer makes its momentum buffers); the next batch is captured, and every batch
    after it is copied into the graph's static inputs and replayed. The lr lives in a device
    tensor that the scheduler fills between replays. If capture fails, the step says so in
    one line and stays eager.
    """

    WARMUP_STEPS = 3
    kind = "CUDA graph"

    def __init__(self, model, optimizer, criterion, device, precision, average=None):
        super().__init__(model, optimizer, criterion, device, precision, average)
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
        self.graph, self.eager_steps, self.failed = None, 0, False
        self.static_images = self.static_labels = None

    def __call__(self, images, labels):
        if self.graph is None and not self.failed and self.eager_steps >= self.WARMUP_STEPS:
            self.capture(images, labels)
        if self.graph is None:
            self.eager_steps += 1
            self.forward_backward_update_on_side_stream(images, labels)
            return
        self.static_images.copy_(images)
        self.static_labels.copy_(labels)
        self.graph.replay()

    def forward_backward_update_on_side_stream(self, images, labels):
        if self.eager_steps > self.WARMUP_STEPS:  # after a failed capture: plain eager steps
            return self.forward_backward_update(images, labels)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.forward_backward_update(images, labels)
        torch.cuda.current_stream(self.device).wait_stream(side)

    def capture(self, images, labels):
        started = time.perf_counter()
        self.static_images, self.static_labels = images.clone(), labels.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            torch.cuda.synchronize(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.cuda.graph(graph):
                self.forward_backward_update(self.static_images, self.static_labels)
            self.graph = graph
        except Exception as err:  # capture refuses some ops; eager still trains correctly
            self.failed = True
            torch.cuda.synchronize(self.device)
            print(f"note: CUDA graph capture failed ({describe_error(err)}); training eagerly instead",
                  file=sys.stderr, flush=True)
        self.setup_seconds += time.perf_counter() - started


def describe_error(err):
    return f"{type(err).__name__}: {err}".strip().splitlines()[0][:160]


def uses_cuda_graphs(runtime, cuda_graphs=True):
    """Graphs on a single CUDA process unless turned off. Under torchrun the step stays eager:
    DistributedDataParallel's gradient hooks and collectives are not captured here."""
    return cuda_graphs and runtime.device.type == "cuda" and not runtime.distributed


def make_train_step(model, optimizer, criterion, runtime, precision, cuda_graphs=True, average=None):
    step_class = GraphedTrainStep if uses_cuda_graphs(runtime, cuda_graphs) else TrainStep
    return step_class(model, optimizer, criterion, runtime.device, precision, average)


def train_one_epoch(train_step, loader, scheduler, epoch, runtime, start_step=0, totals=None, interrupt=None,
                    show_progress=True):
    """Train one epoch from `start_step`; returns (totals, stopped_at_step), the step set only when interrupted.

    `totals` are the sums of an interrupted epoch's first steps (a dict from a checkpoint).
    """
    train_step.model.train()
    train_step.start_epoch(start_step, totals)
    sync_every = max(1, loader.steps_per_epoch // SYNC_POINTS_PER_EPOCH)
    bar = tqdm(total=loader.steps_per_epoch, initial=start_step, desc=f"epoch {epoch + 1}", leave=False,
               disable=None if show_progress else True, dynamic_ncols=True)  # None: only on a terminal
    started, setup_at_start = time.perf_counter(), train_step.setup_seconds
    images_done = 0
    stopped_at_step = None
    for step, (images, labels) in enumerate(loader.batches(epoch, start_step), start_step):
        step_started = time.perf_counter()
        train_step(images, labels)
        last_step = step + 1 == loader.steps_per_epoch
        if last_step:  # the lr this step used, before the schedule moves past it (one read an epoch)
            train_step.last_lr = current_lr(scheduler.optimizer)
        scheduler.step()
        if train_step.first_step_at is None:  # cudnn's tuning, and compilation with --compile: start-up, not training
            synchronize(runtime.device)
            train_step.first_step_at = time.time()
            train_step.setup_seconds += time.perf_counter() - step_started
        images_done += len(labels)
        bar.update(1)
        interrupted_here = interrupt is not None and interrupt.requested and not runtime.distributed
        if (step + 1) % sync_every == 0 or last_step or interrupted_here:
            loss_sum, _, steps_done, first_bad_step = check_in(train_step.sums, runtime)
            if first_bad_step >= 0:
                raise NonFiniteLossError(f"the training loss became NaN or infinite at epoch {epoch + 1}, "
                                         f"step {int(first_bad_step) + 1}")
            if interrupt_agreed(interrupt, runtime) and not last_step:
                stopped_at_step = step + 1
                break
            elapsed = time.perf_counter() - started - (train_step.setup_seconds - setup_at_start)
            bar.set_postfix(loss=f"{loss_sum / (steps_done * len(labels)):.3f}",
                            lr=f"{current_lr(scheduler.optimizer):.4f}",
                            img_s=f"{images_done * runtime.world_size / max(elapsed, 1e-9):,.0f}")
    bar.close()
    synchronize(runtime.device)
    seconds = time.perf_counter() - started - (train_step.setup_seconds - setup_at_start)
    previous_images, previous_seconds = (totals["images"], totals["seconds"]) if totals else (0, 0.0)
    sums = train_step.sums.clone()
    epoch_totals = EpochTotals(sums[0], sums[1], previous_images + images_done, previous_seconds + seconds)
    return epoch_totals, stopped_at_step


def check_in(sums, runtime):
    """A sync point: this rank's sums as numbers, the first non-finite step taken over all ranks."""
    values = sums.tolist()
    if runtime.distributed:
        first_bad = torch.tensor([values[3]], device=sums.device)
        dist.all_reduce(first_bad, op=dist.ReduceOp.MAX)
        values[3] = first_bad.item()
    return values


def interrupt_agreed(interrupt, runtime):
    return any_rank(interrupt is not None and interrupt.requested, runtime)


def reduce_totals(totals, runtime):
    """The ranks' running sums added up, as plain numbers (seconds are this rank's)."""
    sums = torch.stack([totals.loss_sum.float(), totals.correct.float(),
                        torch.tensor(float(totals.images), device=runtime.device)])
    loss_sum, correct, images = all_reduce_sum(sums, runtime).tolist()
    return {"loss_sum": loss_sum, "correct": correct, "images": int(images), "seconds": totals.seconds}


def summarize_epoch(totals, runtime):
    sums = reduce_totals(totals, runtime)
    images = max(sums["images"], 1)
    return EpochResult(sums["loss_sum"] / images, sums["correct"] / images, sums["images"], sums["seconds"])


@dataclass
class EvalResult:
    loss: float
    top1: float
    top5: float
    seconds: float


def evaluate(model, loader, runtime, precision, tta=False):
    """Loss, top-1 and top-5 over a whole evaluation set (all ranks' shards); `tta` averages with the flip.

    The model is left in the mode it came in.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, device=runtime.device)  # loss, top-1 hits, top-5 hits
    images = 0
    started = time.perf_counter()
    with torch.inference_mode(), autocast(runtime.device, precision):
        for batch, labels in loader:
            logits = model(batch).float()
            if tta:
                logits = (logits + model(batch.flip(-1)).float()) / 2
            top5 = logits.topk(5, dim=1).indices
            sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum"),
                                 (top5[:, 0] == labels).sum().float(),
                                 (top5 == labels[:, None]).any(1).sum().float()])
            images += len(labels)
    totals = torch.cat([sums, torch.tensor([float(images)], device=runtime.device)])
    loss_sum, top1, top5, count = all_reduce_sum(totals, runtime).tolist()
    model.train(was_training)
    return EvalResult(loss_sum / count, top1 / count, top5 / count, time.perf_counter() - started)


def make_criterion(label_smoothing=0.0):
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


# ---- checkpoints ----


def unwrap_model(model):
    """The plain module under torch.compile and DistributedDataParallel, so saved keys have no prefixes."""
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return getattr(model, "_orig_mod", model)


def atomic_write(path, data):
    """Write bytes to a temporary file beside `path`, fsync, then rename: a crash leaves the old file whole."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as err:
        with contextlib.suppress(OSError):  # the folder itself may be gone or read-only by now
            temporary.unlink(missing_ok=True)
        raise CheckpointError(f"could not write {path}: {err.strerror or err}; "
                              f"the previous {path.name}, if any, is untouched", err.strerror or str(err)) from None
    try:
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)
    except OSError as err:
        raise CheckpointError(f"could not make the write of {path} durable: {err.strerror or err}",
                              err.strerror or str(err)) from None


def checkpoint_bytes(checkpoint):
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getbuffer()


def load_checkpoint(path):
    """Load one of our checkpoints with weights_only=True; refuse anything else with a one-line reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty, not a checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"refusing {path}: it holds Python objects that weights_only loading forbids "
                              f"(possibly code), or it is corrupt") from None
    except Exception as err:  # truncated or garbage files fail in many ways inside torch.load
        message = f"{type(err).__name__}: {err}".split(". ")[0][:160]
        raise CheckpointError(f"{path} is not a readable checkpoint ({message})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint written by this repo's train.py")
    missing = CHECKPOINT_KEYS - set(checkpoint)
    if missing:
        raise CheckpointError(f"{path} is incomplete: it lacks {', '.join(sorted(missing))}")
    return checkpoint


def describe_model_config(config):
    extras = "".join(f", {key}={value}" for key, value in sorted(config["kwargs"].items()))
    return f"{config['name']} ({config['num_classes']} classes{extras})"


def check_model_config(checkpoint, model_config, path):
    if checkpoint["model_config"] != model_config:
        raise CheckpointError(f"{path} holds a {describe_model_config(checkpoint['model_config'])}, "
                              f"not the {describe_model_config(model_config)} asked for")


def model_from_config(config):
    return build_model(config["name"], config["num_classes"], **config["kwargs"])


def model_with_weights(config, weights, device="cpu"):
    """The model `config` describes, holding `weights`, on `device`, channels_last, in eval mode."""
    model = model_from_config(config)
    model.load_state_dict(weights)
    return model.to(device, memory_format=torch.channels_last).eval()


def model_from_checkpoint(checkpoint, device="cpu"):
    """The checkpoint's model with its weights (the averaged ones of an --ema run)."""
    return model_with_weights(checkpoint["model_config"], checkpoint.get("ema") or checkpoint["model"], device)


def load_model(path, device="cpu"):
    """A trained model back from a checkpoint, in eval mode: `load_model("checkpoint/best.pt")`."""
    return model_from_checkpoint(load_checkpoint(path), device)


# ---- random number generators ----


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def capture_rng_state():
    name, key, position, has_gauss, cached_gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(key.astype(np.int64)), position, has_gauss, cached_gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state):
    random.setstate(state["python"])
    name, key, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(runtime):
    """Every rank's generator states, so each rank of a resumed torchrun run draws as it would have."""
    state = capture_rng_state()
    if not runtime.distributed:
        return [state]
    states = [None] * runtime.world_size
    dist.all_gather_object(states, state)
    return states


# ---- run records ----


def write_metrics(path, rows):
    """Rewrite the whole metrics CSV atomically, so it always matches the checkpoint it was written with."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=METRICS_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, text.getvalue().encode())


def read_metrics(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ---- a whole run ----


@dataclass
class RunState:
    """Where a run stands; with the model, optimizer and schedule, what a checkpoint restores."""

    epoch: int = 0  # epochs completed
    step: int = 0  # steps of the next epoch already done, after an interrupt
    epoch_totals: dict = None  # that partial epoch's running sums, added over ranks
    best_top1: float = 0.0
    history: list = field(default_factory=list)  # one metrics row per epoch


@dataclass
class Run:
    model: nn.Module  # what trains: possibly under DistributedDataParallel and torch.compile
    train_step: TrainStep
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: object
    val_loader: object  # None without --val-size: then the test set picks best.pt and early stopping
    test_loader: object
    runtime: object
    precision: str
    epochs: int
    tta: bool
    checkpoint_dir: Path
    model_config: dict
    args: dict
    early_stopping: EarlyStopping
    state: RunState = field(default_factory=RunState)
    interrupt: Interrupt = field(default_factory=Interrupt)
    writer: "CheckpointWriter" = field(default_factory=lambda: CheckpointWriter())
    best_weights: dict = None  # a host copy of the best epoch's weights, for testing it at the end
    tensorboard: object = None
    average: WeightAverage = None  # with --ema: the averaged weights, which are evaluated and saved as well

    @property
    def evaluated_model(self):
        return self.average.model if self.average is not None else unwrap_model(self.model)

    @property
    def selection_split(self):
        return "val" if self.val_loader is not None else "test"


def fit(run):
    """Train until the last epoch, early stopping, or an interrupt; returns which of the three ended it.

    Checkpoints are written in the background; every write has finished when this returns.
    """
    try:
        return train_epochs(run)
    finally:
        run.writer.wait()


def train_epochs(run):
    while run.state.epoch < run.epochs:
        totals, stopped_at_step = train_one_epoch(
            run.train_step, run.train_loader, run.scheduler, run.state.epoch, run.runtime, run.state.step,
            resumed_totals(run), run.interrupt, run.runtime.is_main)
        if stopped_at_step is not None:
            run.state.step, run.state.epoch_totals = stopped_at_step, reduce_totals(totals, run.runtime)
            save_checkpoint(run, ["last.pt"])
            return "interrupted"
        check_state_is_finite(unwrap_model(run.model), run.state.epoch)
        finish_epoch(run, summarize_epoch(totals, run.runtime))
        if any_rank(run.interrupt.requested, run.runtime):
            return "interrupted"
        if run.early_stopping.should_stop:
            return "early-stopped"
    return "finished"


def check_state_is_finite(model, epoch):
    """A finite loss can hide diverged BatchNorm statistics: check every float tensor before saving them."""
    floats = [tensor for tensor in model.state_dict().values() if tensor.is_floating_point()]
    if not torch.stack([tensor.isfinite().all() for tensor in floats]).all():
        raise NonFiniteLossError(f"the weights or BatchNorm statistics became NaN or infinite in epoch {epoch + 1}")


def resumed_totals(run):
    """The interrupted epoch's sums go to rank 0 alone, so that adding over ranks counts them once."""
    if run.state.epoch_totals is None or not run.runtime.is_main:
        return None
    return run.state.epoch_totals


def finish_epoch(run, train_result):
    """Evaluate on the selection split, record, print and checkpoint one finished epoch."""
    evaluation = evaluate(run.evaluated_model, run.val_loader or run.test_loader, run.runtime, run.precision,
                          run.tta)
    if not math.isfinite(evaluation.loss):
        raise NonFiniteLossError(f"the model's {run.selection_split} loss became NaN or infinite after epoch "
                                 f"{run.state.epoch + 1}")
    state = run.state
    state.epoch, state.step, state.epoch_totals = state.epoch + 1, 0, None
    is_best = not state.history or evaluation.top1 > state.best_top1
    state.best_top1 = max(state.best_top1, evaluation.top1)
    run.early_stopping.update(evaluation.top1)
    row = {"epoch": state.epoch, "epoch_seconds": round(train_result.seconds + evaluation.seconds, 3),
           "train_seconds": round(train_result.seconds, 3), "images": train_result.images,
           "train_loss": round(train_result.loss, 5), "train_top1": round(train_result.top1, 5),
           **evaluation_columns(run.selection_split, evaluation), "lr": run.train_step.last_lr,
           "images_per_sec": round(train_result.images_per_sec, 1), "best": int(is_best)}
    state.history.append(row)
    if run.runtime.is_main:
        print(format_epoch_line(row, run.epochs, run.selection_split), flush=True)
    if is_best:
        run.best_weights = snapshot_to_host(run.evaluated_model.state_dict())
    save_checkpoint(run, ["best.pt", "last.pt"] if is_best else ["last.pt"])
    if run.runtime.is_main:
        log_tensorboard(run.tensorboard, row)


def evaluation_columns(split, evaluation):
    return {f"{split}_loss": round(evaluation.loss, 5), f"{split}_top1": round(evaluation.top1, 5),
            f"{split}_top5": round(evaluation.top5, 5)}


def test_final_and_best(run):
    """With a validation split: the test set's verdict on the final model and on the best epoch's (best.pt)."""
    final = evaluate(run.evaluated_model, run.test_loader, run.runtime, run.precision, run.tta)
    if run.best_weights is not None:
        best_model = model_with_weights(run.model_config, run.best_weights, run.runtime.device)
    else:  # a resumed run whose best epoch came before the resume finds it only in best.pt
        best_model = model_from_checkpoint(load_checkpoint(run.checkpoint_dir / "best.pt"), run.runtime.device)
    best = evaluate(best_model, run.test_loader, run.runtime, run.precision, run.tta)
    return final, best


def format_epoch_line(row, epochs, split="test"):
    return (f"epoch {row['epoch']:>3}/{epochs} | {row['epoch_seconds']:6.1f}s | train loss {row['train_loss']:.4f} | "
            f"{split} loss {row[f'{split}_loss']:.4f} | top-1 {100 * row[f'{split}_top1']:5.2f}% | "
            f"top-5 {100 * row[f'{split}_top5']:5.2f}% | lr {row['lr']:.5f} | {row['images_per_sec']:,.0f} img/s"
            + (" | new best" if row["best"] else ""))


def log_tensorboard(writer, row):
    if writer is None:
        return
    for key in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "test_loss", "test_top1", "test_top5",
                "lr", "images_per_sec"):
        if key in row:
            writer.add_scalar(key, row[key], row["epoch"])
    writer.flush()


def save_checkpoint(run, names):
    """Snapshot the run's whole state to host memory now, and write it to each of `names` (and metrics.csv)
    in the background (rank 0; all ranks must call)."""
    rng_states = gather_rng_states(run.runtime)
    if not run.runtime.is_main:
        return
    state = run.state
    checkpoint = snapshot_to_host({
        "format": CHECKPOINT_FORMAT, "model_config": run.model_config,
        "model": unwrap_model(run.model).state_dict(), "optimizer": run.optimizer.state_dict(),
        "ema": run.average.model.state_dict() if run.average is not None else None,
        "scheduler": run.scheduler.state_dict(), "epoch": state.epoch, "step": state.step,
        "epoch_totals": state.epoch_totals, "best_top1": state.best_top1,
        "early_stopping": run.early_stopping.state_dict(), "history": list(state.history), "args": run.args,
        "rng": rng_states,
    })
    run.writer.submit(run.checkpoint_dir, checkpoint, names)


def snapshot_to_host(value):
    """A copy of every tensor in `value` in host memory, taken now, so training can go on changing the originals."""
    copies = []

    def copy(item):
        if isinstance(item, torch.Tensor):
            if item.device.type != "cuda":
                return item.detach().clone()
            host = torch.empty(item.shape, dtype=item.dtype, pin_memory=True)
            copies.append(host)
            return host.copy_(item.detach(), non_blocking=True)
        if isinstance(item, dict):
            return {key: copy(entry) for key, entry in item.items()}
        if isinstance(item, (list, tuple)):
            return type(item)(copy(entry) for entry in item)
        return item

    result = copy(value)
    if copies:
        torch.cuda.synchronize()
    return result


class CheckpointWriter:
    """Writes checkpoints from one background thread, one save at a time, so the next epoch starts at once.

    A save writes best.pt (if it is one), then metrics.csv, then last.pt, each atomically: a kill
    at any moment leaves whole files, and last.pt, the file a resume reads, is never ahead of the
    others. A failed write is raised, as a CheckpointError, by the next `submit` or `wait`.
    """

    def __init__(self):
        self.thread, self.error = None, None

    def submit(self, directory, checkpoint, names):
        self.wait()
        self.thread = threading.Thread(target=self.write, args=(Path(directory), checkpoint, names),
                                       name="checkpoint-writer")
        self.thread.start()

    def write(self, directory, checkpoint, names):
        try:
            data = checkpoint_bytes(checkpoint)
            for name in [name for name in names if name != "last.pt"]:
                atomic_write(directory / name, data)
            write_metrics(directory / "metrics.csv", checkpoint["history"])
            if "last.pt" in names:
                atomic_write(directory / "last.pt", data)
        except CheckpointError as err:
            self.error = err

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def match_parameter_layouts(optimizer):
    """Loaded momentum buffers come back contiguous; fused SGD needs each in its parameter's (channels_last) layout."""
    for parameter, state in optimizer.state.items():
        if "momentum_buffer" in state and state["momentum_buffer"] is not None:
            state["momentum_buffer"] = torch.empty_like(parameter).copy_(state["momentum_buffer"])


def restore_run(run, checkpoint):
    """Put a run back where `checkpoint` left it: weights, optimizer, schedule, counters and generators."""
    unwrap_model(run.model).load_state_dict(checkpoint["model"])
    if run.average is not None:
        run.average.model.load_state_dict(checkpoint["ema"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    lr_to_float(run.optimizer)
    match_parameter_layouts(run.optimizer)
    load_scheduler_state(run.scheduler, checkpoint["scheduler"])
    run.early_stopping.load_state_dict(checkpoint["early_stopping"])
    run.state = RunState(checkpoint["epoch"], checkpoint["step"], checkpoint.get("epoch_totals"),
                         checkpoint["best_top1"], list(checkpoint["history"]))
    rng_states = checkpoint["rng"]
    if len(rng_states) == run.runtime.world_size:
        restore_rng_state(rng_states[run.runtime.rank])
    else:  # another number of processes: draws cannot match the old run anyway, so only keep ranks apart
        seed_everything(run.args["seed"] + 1000 * checkpoint["epoch"] + run.runtime.rank)
