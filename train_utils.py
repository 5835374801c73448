"""Training and evaluation loops, early stopping, checkpoints and run records.

On the GPU the step loop never waits for the device: loss and accuracy are summed on the
device and read only at a few sync points per epoch (progress bar, NaN check, interrupt
agreement between ranks) and once at its end.
"""
import contextlib
import copy
import datetime
import math
import os
import random
import signal
import sys
import time
import typing
import warnings
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from dataset_utils import NUM_CLASSES, Augmentation
from device_utils import (all_reduce_sum, autocast, broadcast_from_main, distribute_model, get_device,
                          max_over_ranks, on_main_rank, resolve_precision, synchronize)
from model import build_model
from run_dir import CHECKPOINT_FORMAT, NUMBER, CheckpointError, is_a, load_checkpoint, new_run_id

SYNC_POINTS_PER_EPOCH = 10
PROGRESS_SECONDS = 60  # without a terminal, a progress line at most this often (a CPU epoch takes minutes)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


# ---- settings ----


def may_change():
    """A recipe setting that --resume (or --evaluate) may change; not given, it stays the checkpoint's."""
    return field(metadata={"on_resume": "may change"})


def this_command():
    """How this process runs, not what it trains: always taken from the command line, never the checkpoint."""
    return field(metadata={"on_resume": "this command's"})


@dataclass(frozen=True)
class Config:
    """Every setting of a run: train.py's flags over a preset, and on --resume over the checkpoint's settings.

    A field without a note is fixed for the life of a run: --resume refuses a different value.
    """

    model: str
    depth: int
    widen_factor: int
    dropout: float
    sync_bn: bool
    preset: str | None
    batch_size: int
    lr: float
    momentum: float
    min_momentum: float | None
    nesterov: bool
    weight_decay: float
    bn_bias_lr_scale: float
    label_smoothing: float
    auto_augment: str | None
    ra_num_ops: int
    ra_magnitude: int
    cutout: int
    flip: str
    mixup: float
    cutmix: float
    cutmix_prob: float
    sam: float | None
    asam: bool
    ema: float
    val_size: int
    seed: int
    epochs: int = may_change()
    eval_every: int = may_change()
    save_every: int = may_change()
    target_accuracy: float | None = may_change()
    patience: int = may_change()
    tta: bool = may_change()
    tta_crops: bool = may_change()
    precision: str = may_change()
    tensorboard: bool = may_change()
    checkpoint_dir: str = this_command()
    data_dir: str = this_command()
    no_download: bool = this_command()
    workers: int | None = this_command()
    device: str = this_command()
    compile: bool = this_command()
    no_cuda_graphs: bool = this_command()
    test_batch_size: int = this_command()
    plot: bool = this_command()

    @classmethod
    def from_flags(cls, flags):
        """The settings in an argparse namespace (which may hold more, such as --resume)."""
        return cls(**{setting.name: getattr(flags, setting.name) for setting in fields(cls)})

    def resumed_from(self, saved, given, path, defaults):
        """These settings (from `given` flags and defaults) merged with a checkpoint's `saved` ones, field by field.
        A fixed setting newer than the checkpoint was trained as its flag's default, which kept the behaviour from
        before the flag: its value in `defaults`, the settings of a run given no flags."""
        merged = {}
        for setting in fields(self):
            name, rule = setting.name, setting.metadata.get("on_resume", "fixed")
            if rule == "this command's" or name not in saved and rule == "may change":
                merged[name] = getattr(self, name)
                continue
            stored = saved[name] if name in saved else getattr(defaults, name)
            if not fits_type(stored, setting.type):
                raise CheckpointError(f"{path} is damaged: its setting {name} is a {type(stored).__name__}")
            merged[name] = given.get(name, stored) if rule == "may change" else stored
            if rule == "fixed" and name in given and given[name] != stored:
                flag = "--" + name.replace("_", "-")
                raise CheckpointError(f"{path} was trained with {flag} {stored}; refusing {flag} {given[name]} "
                                      f"(start a new run in another --checkpoint-dir instead)")
        return replace(self, **merged)

    @property
    def augmentation(self):
        return Augmentation(self.cutout, self.mixup, self.cutmix, self.cutmix_prob, self.auto_augment,
                            self.ra_num_ops, self.ra_magnitude, self.flip)

    @property
    def test_views(self):
        """What an evaluation averages over: the image alone, with its mirror, or with shifted crops as well."""
        return "crops" if self.tta_crops else "mirror" if self.tta else "image"

    @property
    def model_config(self):
        kwargs = {}
        if self.model == "wideresnet":
            kwargs = {"depth": self.depth, "widen_factor": self.widen_factor, "dropout": self.dropout}
        return {"name": self.model, "num_classes": NUM_CLASSES, "kwargs": kwargs}


def fits_type(value, annotation):
    """Whether a stored setting has its field's type (an int does for a float; True is no number here)."""
    kinds = typing.get_args(annotation) or (annotation,)
    if float in kinds:
        kinds += (int,)
    return type(value) in kinds


# ---- early stopping ----


class EarlyStopping:
    """Stop once top-1 has been >= `target` for `patience` consecutive evaluated epochs; target None never stops.

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


# The first torch whose fused SGD reads the lr from a device tensor and whose schedules fill that tensor in place
# (2.3 has the kernel, but its schedules put a number in the tensor's place): the graphed step needs both.
GRAPHED_SGD_TORCH = (2, 4)


def torch_release():
    """(major, minor) of the torch in use."""
    return tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def fused_sgd_available(device):
    return device.type == "cuda" and torch_release() >= GRAPHED_SGD_TORCH


def make_optimizer(model, lr, momentum=0.9, weight_decay=5e-4, nesterov=False, bn_bias_lr_scale=1.0):
    """SGD; on CUDA the fused kernel (one launch for every parameter, and it takes the lr as a device tensor).

    With `bn_bias_lr_scale` K other than 1, BatchNorm's biases form a second group at K times the lr and 1/K the
    weight decay, so that their decay per step stays the others' (airbench's bias scaler). The first group holds
    every other parameter; each group's lr is its peak.
    """
    fused = {"fused": True} if fused_sgd_available(next(model.parameters()).device) else {}  # older SGDs lack the flag
    groups = [{"params": list(model.parameters())}]
    if bn_bias_lr_scale != 1:
        biases = [module.bias for module in model.modules()
                  if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.bias is not None]
        scaled = {id(bias) for bias in biases}
        groups = [{"params": [p for p in model.parameters() if id(p) not in scaled]},
                  {"params": biases, "lr": lr * bn_bias_lr_scale, "weight_decay": weight_decay / bn_bias_lr_scale}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, **fused)


def make_scheduler(optimizer, total_steps, momentum_bounds=None):
    """OneCycle on each group's lr, peaking at the lr the group was made with. Momentum stays what the optimizer
    has, or with `momentum_bounds` (low, high) it cycles against the lr: high at the start and the end, low at the
    lr's peak."""
    peaks = [float(group["lr"]) for group in optimizer.param_groups]
    if momentum_bounds is None:
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=total_steps,
                                                   cycle_momentum=False)
    low, high = momentum_bounds
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=total_steps,
                                               base_momentum=low, max_momentum=high)


# What a schedule's state holds that follows from --epochs and the position (both may differ from this run's).
SCHEDULE_LENGTH = ("total_steps", "_schedule_phases", "_last_lr", "last_epoch", "_step_count")


def load_scheduler_state(scheduler, state):
    """Restore the schedule's position; the rest must be what this run's settings give (the planned length stays
    this run's, so --epochs may grow on resume)."""
    fresh = scheduler.state_dict()
    if set(state) != set(fresh):
        raise ValueError(f"it holds {sorted(state)}, not OneCycle's state")
    for key, value in fresh.items():
        if key not in SCHEDULE_LENGTH and (type(state[key]) is not type(value) or state[key] != value):
            raise ValueError(f"its {key} is {state[key]!r}, where this run's settings give {value!r}")
    position = state["last_epoch"], state["_step_count"]
    if not all(is_a(value, int) and value >= 0 for value in position):
        raise ValueError(f"its position {position} is not a count of steps")
    scheduler.last_epoch, scheduler._step_count = position


# Optimizer settings the schedule moves (their value is the checkpoint's), and those this machine chooses (never
# the checkpoint's: a fused kernel exists only on CUDA).
SCHEDULED = ("lr", "momentum")
THIS_MACHINES = ("fused", "foreach", "differentiable", "capturable")


def load_optimizer_state(optimizer, state):
    """SGD's state as this run would have written it: the same settings (the scheduled ones numbers), then the
    momentum buffers in their parameters' layouts."""
    expected = optimizer.state_dict()["param_groups"]
    groups = state.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(expected) or not isinstance(state.get("state"), dict):
        raise ValueError("it is not this model's SGD state")
    for group, fresh in zip(groups, expected):
        if not isinstance(group, dict) or set(group) != set(fresh):
            raise ValueError(f"its settings are {sorted(group) if isinstance(group, dict) else group}, not SGD's")
        for key, value in fresh.items():
            if key in SCHEDULED:
                if not (is_a(group[key], NUMBER) or isinstance(group[key], torch.Tensor) and group[key].numel() == 1):
                    raise ValueError(f"its {key} is {group[key]!r}, not a number")
            elif key not in THIS_MACHINES and (type(group[key]) is not type(value) or group[key] != value):
                raise ValueError(f"its {key} is {group[key]!r}, where this run's settings give {value!r}")
    optimizer.load_state_dict(state)
    for group, fresh in zip(optimizer.param_groups, expected):
        group.update({key: fresh[key] for key in THIS_MACHINES if key in fresh})
    lr_to_float(optimizer)
    match_parameter_layouts(optimizer)


def current_lr(optimizer):
    return float(optimizer.param_groups[0]["lr"])


def lr_to_float(optimizer):
    """A graphed run keeps the lr in a device tensor; checkpoints and other runs see a plain number."""
    for group in optimizer.param_groups:
        group["lr"] = float(group["lr"])


class WeightAverage:
    """An exponential moving average of a model's weights and BatchNorm statistics, updated after every step:
    average = decay_n * average + (1 - decay_n) * current, where decay_n = min(decay, (1 + n) / (10 + n)) after n
    updates (timm's warm-up), so the random starting weights fade within the first steps whatever the decay.
    `model` is the averaged copy, evaluated and saved."""

    def __init__(self, model, decay):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        pairs = list(zip(self.model.state_dict().values(), model.state_dict().values()))
        self.averaged = [mine for mine, theirs in pairs if mine.is_floating_point()]
        self.current = [theirs for mine, theirs in pairs if mine.is_floating_point()]
        self.counters = [(mine, theirs) for mine, theirs in pairs if not mine.is_floating_point()]
        self.updates = torch.zeros((), device=self.averaged[0].device)  # on the device: a CUDA graph counts them

    @torch.no_grad()
    def update(self):
        decay = torch.clamp((1 + self.updates) / (10 + self.updates), max=self.decay)
        self.updates += 1
        steps = torch._foreach_sub(self.current, self.averaged)  # a few fused launches for every tensor
        torch._foreach_mul_(steps, 1 - decay)
        torch._foreach_add_(self.averaged, steps)
        for mine, theirs in self.counters:
            mine.copy_(theirs)


def vector_norm(tensors):
    """The 2-norm of all `tensors` together, computed on their device."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


class SharpnessAware:
    """SAM (Foret et al., 2021): the gradient a step uses is taken again at the weights moved `rho` along the
    normalised gradient; ASAM (Kwon et al., 2021) scales that move by each weight's size, as the SAM authors'
    reference code does. The plain step then moves the original weights, with its own weight decay and momentum.
    BatchNorm's running statistics come from the first pass alone."""

    def __init__(self, model, rho, adaptive=False):
        self.rho, self.adaptive = rho, adaptive
        self.parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
        self.batch_norms = [module for module in model.modules()
                            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats]

    @torch.no_grad()
    def climb(self):
        """Move the weights uphill along this pass's gradients; returns the weights to come back to."""
        start = [parameter.detach().clone() for parameter in self.parameters]
        gradients = [parameter.grad for parameter in self.parameters]
        if self.adaptive:  # the norm of |w| * g, and a move along w^2 * g
            norm = vector_norm(torch._foreach_mul(torch._foreach_abs(self.parameters), gradients))
            gradients = torch._foreach_mul(torch._foreach_pow(self.parameters, 2), gradients)
        else:
            norm = vector_norm(gradients)
        moves = torch._foreach_mul(gradients, self.rho / (norm + 1e-12))
        torch._foreach_add_(self.parameters, moves)
        return start

    @torch.no_grad()
    def come_back(self, start):
        torch._foreach_copy_(self.parameters, start)

    @contextlib.contextmanager
    def statistics_kept(self):
        """Normalise by the batch's own statistics without updating the running ones (nor their counters)."""
        for module in self.batch_norms:
            module.track_running_stats = False
        try:
            yield
        finally:
            for module in self.batch_norms:
                module.track_running_stats = True


# ---- the loops ----


class Interrupt:
    """The first SIGINT, SIGTERM or SIGHUP asks the loop to stop at a step boundary; a second one quits at once.

    A closed standard output (`python train.py | head`) stops the run the same way, as SIGPIPE would. Under
    torchrun a signal may reach some ranks only: `agreed` tells every rank, with the signal that came.
    """

    def __init__(self, announce=True):
        self.signum = None
        self.announce = announce  # rank 0 says what happens; under torchrun each rank gets the launcher's signal

    def install(self):
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: a closed terminal, a batch system
            signal.signal(signum, self.handle)

    def handle(self, signum, frame):
        if self.signum is not None:
            os._exit(128 + signum)  # safe: every file is written to a temporary name and renamed
        self.signum = signum
        if self.announce:
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (again to quit at once)",
                  file=sys.stderr, flush=True)

    def output_closed(self):
        if self.signum is None:
            self.signum = signal.SIGPIPE
            print("note: standard output was closed: saving a checkpoint and stopping", file=sys.stderr, flush=True)

    @property
    def requested(self):
        return self.signum is not None

    def agreed(self, runtime):
        """Whether any rank was asked to stop (a collective: every rank must call it)."""
        signum = max_over_ranks(self.signum or 0, runtime)
        if signum and self.signum is None:
            self.signum = signum
        return signum > 0


def show(text, interrupt=None):
    """Print a line of the run's log. If nothing reads it any more, later lines go nowhere and `interrupt` is told."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that Python's own flush at exit finds somewhere to write
        os.close(devnull)
        if interrupt is not None:
            interrupt.output_closed()


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

    kind = planned = "eager"  # `kind`: the step that ran; `planned`: the one asked for
    graph = None

    def __init__(self, model, optimizer, criterion, device, precision, average=None, sharpness=None):
        self.model, self.optimizer, self.criterion = model, optimizer, criterion
        self.device, self.precision, self.average, self.sharpness = device, precision, average, sharpness
        self.sums = torch.zeros(4, device=device)
        self.first_step_seconds = 0.0  # the process's first step: cudnn's choice of algorithms, compilation
        self.capture_seconds = 0.0  # the CUDA graph's capture
        self.first_step_at = None  # time.time() when the process's first step had finished
        self.last_lr = None  # the lr of the last step of the last full epoch

    @property
    def setup_seconds(self):
        """Start-up work done inside the first epoch, left out of epoch times and img/s."""
        return self.first_step_seconds + self.capture_seconds

    def start_epoch(self, start_step, totals=None):
        loss_sum, correct = (totals["loss_sum"], totals["correct"]) if totals else (0.0, 0.0)
        self.sums.copy_(torch.tensor([loss_sum, correct, start_step, -1.0]))

    def __call__(self, images, labels):
        self.forward_backward_update(images, labels)

    def forward_backward_update(self, images, labels):
        loss, logits = self.forward_backward(images, labels)
        if self.sharpness is not None:
            start = self.sharpness.climb()
            with self.sharpness.statistics_kept():
                self.forward_backward(images, labels)
            self.sharpness.come_back(start)
        self.optimizer.step()
        if self.average is not None:
            self.average.update()
        self.record(loss.detach(), logits.detach(), labels)

    def forward_backward(self, images, labels):
        with autocast(self.device, self.precision, cache=False):
            logits = self.model(images)
            loss = self.criterion(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss, logits

    def record(self, loss, logits, labels):
        first_bad = torch.where((self.sums[3] < 0) & ~loss.isfinite(), self.sums[2], self.sums[3])
        predicted = logits.argmax(1, keepdim=True)
        if labels.dim() == 2:  # mixed targets (--mixup, --cutmix): a hit counts the predicted class's share
            hits = labels.gather(1, predicted).sum()
        else:
            hits = (predicted.squeeze(1) == labels).sum()
        self.sums[:3] += torch.stack([loss.float() * len(labels), hits.float(), torch.ones((), device=self.device)])
        self.sums[3] = first_bad


class GraphedTrainStep(TrainStep):
    """The same step replayed as one CUDA graph: one launch instead of about 300 per batch.

    The first WARMUP_STEPS batches train eagerly on a side stream (cudnn picks its algorithms,
    the optimizer makes its momentum buffers); the last of them also tells whether the step
    waits for the host anywhere, which a capture would refuse. Then the next batch is captured,
    and every batch after it is copied into the graph's static inputs and replayed. The lr lives
    in a device tensor that the scheduler fills between replays. If the step cannot be captured,
    it says why in one line and stays eager.
    """

    WARMUP_STEPS = 3
    planned = "CUDA graph"

    def __init__(self, model, optimizer, criterion, device, precision, average=None, sharpness=None):
        super().__init__(model, optimizer, criterion, device, precision, average, sharpness)
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
        self.graph, self.eager_steps, self.refusal, self.host_waits = None, 0, None, []
        self.static_images = self.static_labels = None

    @property
    def failed(self):
        return self.refusal is not None

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
        if self.eager_steps > self.WARMUP_STEPS:  # no graph to come: plain eager steps
            return self.forward_backward_update(images, labels)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            if self.eager_steps == self.WARMUP_STEPS:
                self.host_waits = host_waits_of(lambda: self.forward_backward_update(images, labels))
            else:
                self.forward_backward_update(images, labels)
        torch.cuda.current_stream(self.device).wait_stream(side)

    def capture(self, images, labels):
        if self.host_waits:  # a capture would be refused: none is begun, so nothing of one is left behind
            return self.refuse("the step waits for the host, which a CUDA graph cannot capture",
                               self.host_waits[0])
        started = time.perf_counter()
        self.static_images, self.static_labels = images.clone(), labels.clone()
        try:
            torch.cuda.synchronize(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            self.graph = capture_graph(lambda: self.forward_backward_update(self.static_images, self.static_labels),
                                       self.device)
        except Exception as err:  # capture refuses some ops; eager still trains correctly
            torch.cuda.synchronize(self.device)
            self.refuse("the CUDA graph capture failed", describe_error(err))
        self.capture_seconds = time.perf_counter() - started

    def refuse(self, reason, cause):
        self.refusal = reason
        print(f"note: {reason} ({cause}); training eagerly instead", file=sys.stderr, flush=True)

    @property
    def kind(self):
        if self.graph is not None:
            return "CUDA graph"
        return f"eager ({self.refusal})" if self.failed else "eager (no CUDA graph captured yet)"


def host_waits_of(work):
    """Run `work()` and return what CUDA's sync debug mode said of each wait for the host in it. Warned, not raised:
    an error would stop the step halfway through its update."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            work()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return [str(warning.message).splitlines()[0] for warning in caught
            if "synchronizing CUDA operation" in str(warning.message)]


def capture_graph(work, device):
    """`work()` captured as a CUDA graph on a side stream, into a memory pool of its own. If the capture fails, the
    process is left as an eager run would be: `torch.cuda.graph` would leave the capture stream current when its
    capture cannot end, and the pool allocating."""
    graph, pool = torch.cuda.CUDAGraph(), torch.cuda.graph_pool_handle()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        graph.capture_begin(pool=pool)
        try:
            work()
            graph.capture_end()
        except BaseException:
            abandon_capture(graph, pool, device.index if device.index is not None else torch.cuda.current_device())
            raise
    torch.cuda.current_stream(device).wait_stream(side)
    return graph


def abandon_capture(graph, pool, device_index):
    """End a failed capture and give its memory pool back. Where capture_end raises before it ends the allocation to
    the pool, the allocator counts a capture as under way for as long as the process lives: it holds back every later
    free of a tensor used on two streams (each prepared epoch's buffer), and empty_cache() fails an assert."""
    if torch.cuda.is_current_stream_capturing():
        try:
            graph.capture_end()
            return  # the graph holds its pool now, and gives it back when it goes
        except RuntimeError:
            pass
    with contextlib.suppress(RuntimeError):  # raises where the capture ended the allocation to the pool already
        torch._C._cuda_endAllocateToPool(device_index, pool)
    with contextlib.suppress(RuntimeError):  # the cause of the failure is the error worth reporting
        torch._C._cuda_releasePool(device_index, pool)


def describe_error(err):
    return f"{type(err).__name__}: {err}".strip().splitlines()[0][:160]


def uses_cuda_graphs(runtime, cuda_graphs=True):
    """Graphs on a single CUDA process unless turned off. Under torchrun the step stays eager:
    DistributedDataParallel's gradient hooks and collectives are not captured here."""
    if not (cuda_graphs and runtime.device.type == "cuda" and not runtime.distributed):
        return False
    if not fused_sgd_available(runtime.device):
        print(f"note: CUDA graphs need torch {'.'.join(map(str, GRAPHED_SGD_TORCH))} or newer, whose fused SGD and "
              f"schedule keep the lr on the GPU; torch {torch.__version__} trains eagerly", file=sys.stderr)
        return False
    return True


def make_train_step(model, optimizer, criterion, runtime, precision, cuda_graphs=True, average=None, sharpness=None):
    step_class = GraphedTrainStep if uses_cuda_graphs(runtime, cuda_graphs) else TrainStep
    return step_class(model, optimizer, criterion, runtime.device, precision, average, sharpness)


class Progress:
    """An epoch's progress: tqdm's bar on a terminal; where standard error is no terminal (a log file, a batch
    system), a line in the run's output every PROGRESS_SECONDS, with the epoch's ETA; nothing when not shown."""

    def __init__(self, run, start_step, shown):
        self.run, self.start_step = run, start_step
        self.steps = run.train_loader.steps_per_epoch
        self.bar = tqdm(total=self.steps, initial=start_step, desc=f"epoch {run.state.epoch + 1}", leave=False,
                        disable=None if shown else True, dynamic_ncols=True)  # None: only on a terminal
        self.lines = shown and self.bar.disable
        self.last_line = time.perf_counter()

    def step_done(self):
        self.bar.update(1)

    def report(self, step, loss, lr, images_per_sec, seconds):
        """At a sync point, after `step` (0-based) and `seconds` of training in this epoch."""
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.4f}", img_s=f"{images_per_sec:,.0f}")
        if self.lines and time.perf_counter() - self.last_line >= PROGRESS_SECONDS:
            remaining = (self.steps - step - 1) * seconds / max(step + 1 - self.start_step, 1)
            show(f"  epoch {self.run.state.epoch + 1}/{self.run.config.epochs}: step {step + 1}/{self.steps} | "
                 f"loss {loss:.4f} | lr {lr:.5f} | {images_per_sec:,.0f} img/s | epoch ETA "
                 f"{datetime.timedelta(seconds=round(remaining))}", self.run.interrupt)
            self.last_line = time.perf_counter()

    def close(self):
        self.bar.close()


def train_one_epoch(run, show_progress=None):
    """Train the run's next epoch from its step (an interrupted epoch goes on where it stopped).

    Returns (totals, stopped_at_step); the step is set only when an interrupt stopped the epoch.
    """
    train_step, loader, runtime, interrupt = run.train_step, run.train_loader, run.runtime, run.interrupt
    epoch, start_step, totals = run.state.epoch, run.state.step, resumed_totals(run)
    train_step.model.train()
    train_step.start_epoch(start_step, totals)
    sync_every = max(1, loader.steps_per_epoch // SYNC_POINTS_PER_EPOCH)
    started, setup_at_start = time.perf_counter(), train_step.setup_seconds
    batches = loader.batches(epoch, start_step)  # augments the epoch now, unless it was prepared ahead
    progress = Progress(run, start_step, runtime.is_main if show_progress is None else show_progress)
    stepping_started = time.perf_counter()  # the rate and ETA count steps alone, not the augmentation
    images_done = 0
    stopped_at_step = None
    next_epoch_wanted = loader.prepares_ahead and epoch + 1 < run.config.epochs
    for step, (images, labels) in enumerate(batches, start_step):
        step_started = time.perf_counter()
        train_step(images, labels)
        last_step = step + 1 == loader.steps_per_epoch
        if last_step:  # the lr this step used, before the schedule moves past it (one read an epoch)
            train_step.last_lr = current_lr(run.optimizer)
        run.scheduler.step()
        if train_step.first_step_at is None:  # cudnn's tuning, and compilation with --compile: start-up, not training
            synchronize(runtime.device)
            train_step.first_step_at = time.time()
            train_step.first_step_seconds = time.perf_counter() - step_started
        images_done += len(labels)
        progress.step_done()
        interrupted_here = interrupt.requested and not runtime.distributed
        if (step + 1) % sync_every == 0 or last_step or interrupted_here:
            if next_epoch_wanted:  # now, with steps queued to keep the GPU busy, and after the graph capture
                loader.prepare(epoch + 1)
                next_epoch_wanted = False
            loss_sum, _, steps_done, first_bad_step = check_in(train_step.sums, runtime)
            if first_bad_step >= 0:
                raise NonFiniteLossError(f"the training loss became NaN or infinite at epoch {epoch + 1}, "
                                         f"step {int(first_bad_step) + 1}")
            if interrupt.agreed(runtime) and not last_step:
                stopped_at_step = step + 1
                break
            stepping = time.perf_counter() - stepping_started - (train_step.setup_seconds - setup_at_start)
            progress.report(step, loss_sum / (steps_done * len(labels)), current_lr(run.optimizer),
                            images_done * runtime.world_size / max(stepping, 1e-9), stepping)
    progress.close()
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


def evaluate(model, loader, runtime, precision, views="image"):
    """Loss, top-1 and top-5 over a whole evaluation set (all ranks' shards), from the logits averaged over
    `views` (see `view_logits`).

    The model is left in the mode it came in.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, device=runtime.device)  # loss, top-1 hits, top-5 hits
    images = 0
    started = time.perf_counter()
    with torch.inference_mode(), autocast(runtime.device, precision):
        for batch, labels in loader:
            logits = view_logits(model, batch, views)
            top5 = logits.topk(5, dim=1).indices
            sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum"),
                                 (top5[:, 0] == labels).sum().float(),
                                 (top5 == labels[:, None]).any(1).sum().float()])
            images += len(labels)
    totals = torch.cat([sums, torch.tensor([float(images)], device=runtime.device)])
    loss_sum, top1, top5, count = all_reduce_sum(totals, runtime).tolist()
    model.train(was_training)
    return EvalResult(loss_sum / count, top1 / count, top5 / count, time.perf_counter() - started)


def view_logits(model, batch, views="image"):
    """Float logits of a batch of normalised images: "image" as it is; "mirror" averaged with its mirror;
    "crops" as airbench's test-time augmentation: half that pair, half the same pair of the two crops shifted one
    pixel up-left and down-right from the image padded by reflection (6 views)."""
    def with_mirror(images):
        return (model(images).float() + model(images.flip(-1)).float()) / 2

    if views == "image":
        return model(batch).float()
    if views == "mirror":
        return with_mirror(batch)
    size = batch.shape[-1]
    padded = F.pad(batch, (1, 1, 1, 1), mode="reflect")
    shifted = (with_mirror(padded[..., :size, :size]) + with_mirror(padded[..., 2:, 2:])) / 2
    return (with_mirror(batch) + shifted) / 2


def make_criterion(label_smoothing=0.0):
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


# ---- checkpoints ----


def unwrap_model(model):
    """The plain module under torch.compile and DistributedDataParallel, so saved keys have no prefixes."""
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return getattr(model, "_orig_mod", model)


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


def model_from_checkpoint(checkpoint, path, device="cpu"):
    """The checkpoint's model with its weights (the averaged ones of an --ema run)."""
    with damage_reported(path, "model"):
        return model_with_weights(checkpoint["model_config"], checkpoint.get("ema") or checkpoint["model"], device)


def load_model(path, device="cpu"):
    """A trained model back from a checkpoint, in eval mode: `load_model("checkpoint/best.pt")`. A device that
    this machine lacks is named as such (DeviceError), not blamed on the checkpoint."""
    device = get_device(device)
    return model_from_checkpoint(load_checkpoint(path), path, device)


@contextlib.contextmanager
def damage_reported(path, part):
    """A part of a checkpoint that does not fit (misshaped weights, a foreign optimizer state) as one line."""
    try:
        yield
    except CheckpointError:
        raise
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        raise CheckpointError(f"{path} is damaged: its {part} does not fit this run ({describe_error(err)})") from None


# ---- random number generators ----


def seed_everything(seed):
    """Seed every generator; `seed` may exceed NumPy's 32 bits (--seed plus a rank or an epoch), which wraps."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
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


# ---- a whole run ----


@dataclass
class RunState:
    """Where a run stands; with the model, optimizer and schedule, what a checkpoint restores."""

    epoch: int = 0  # epochs completed
    step: int = 0  # steps of the next epoch already done, after an interrupt
    epoch_totals: dict = None  # that partial epoch's running sums, added over ranks
    best_top1: float = 0.0
    history: list = field(default_factory=list)  # one metrics row per epoch
    run_id: str = field(default_factory=new_run_id)  # the same in every checkpoint of one run, through resumes


@dataclass
class Run:
    """Everything a run trains with, built whole by `build_run`."""

    config: Config
    runtime: object
    precision: str
    model: nn.Module  # what trains: possibly under DistributedDataParallel and torch.compile
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    average: WeightAverage  # with --ema: the averaged weights, which are evaluated and saved; else None
    train_step: TrainStep
    train_loader: object
    val_loader: object  # None without --val-size: then the test set picks best.pt and early stopping
    test_loader: object
    run_dir: object  # the RunDir that checkpoints go to (its owner is train.py); None to save nothing
    early_stopping: EarlyStopping
    state: RunState
    tensorboard: object = None
    interrupt: Interrupt = field(default_factory=Interrupt)
    best_weights: dict = None  # a host copy of the best epoch's weights, for testing it at the end

    @property
    def evaluated_model(self):
        return self.average.model if self.average is not None else unwrap_model(self.model)

    @property
    def selection_split(self):
        return "val" if self.val_loader is not None else "test"

    @property
    def selection_loader(self):
        """What picks best.pt and stops early: the validation split, or the test set without one."""
        return self.val_loader if self.val_loader is not None else self.test_loader


def build_run(config, runtime, loaders, run_dir=None, resumed=None):
    """The run, ready to train: model, optimizer and schedule built, restored from `resumed` (a loaded checkpoint
    and its path) if given, the run folder open (rank 0; every rank stops on its error), the model wrapped for
    torchrun and compiled if asked, the training step made, logging open."""
    train_loader, val_loader, test_loader = loaders
    precision = resolve_precision(runtime.device, config.precision)
    model = model_from_config(config.model_config)
    if runtime.distributed:  # the ranks drew the same initial weights; from here on (dropout) they differ
        seed_everything(config.seed + runtime.rank)
    if config.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(runtime.device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config.lr, config.momentum, config.weight_decay, config.nesterov,
                               config.bn_bias_lr_scale)
    momentum_bounds = None if config.min_momentum is None else (config.min_momentum, config.momentum)
    scheduler = make_scheduler(optimizer, config.epochs * train_loader.steps_per_epoch, momentum_bounds)
    average = WeightAverage(model, config.ema) if config.ema else None
    early_stopping = EarlyStopping(config.target_accuracy, config.patience)
    state = RunState()
    if resumed is not None:
        check_same_split(*resumed, val_loader)
        state = restore(*resumed, model, optimizer, scheduler, average, early_stopping, runtime,
                        train_loader.steps_per_epoch, config.seed)
    if run_dir is not None and resumed is not None:  # the checkpoint fits: the folder may now take it in
        on_main_rank(runtime, lambda: run_dir.adopt(*resumed))
    training_model = distribute_model(model, runtime)
    if config.compile:
        training_model = torch.compile(training_model)
    cuda_graphs = not config.no_cuda_graphs and momentum_bounds is None  # a captured step keeps its momentum
    sharpness = SharpnessAware(model, config.sam, config.asam) if config.sam else None
    train_step = make_train_step(training_model, optimizer, make_criterion(config.label_smoothing), runtime,
                                 precision, cuda_graphs, average, sharpness)
    tensorboard = None
    if config.tensorboard and run_dir is not None and runtime.is_main:
        tensorboard = open_tensorboard(run_dir.tensorboard)
    return Run(config, runtime, precision, training_model, optimizer, scheduler, average, train_step, train_loader,
               val_loader, test_loader, run_dir, early_stopping, state, tensorboard, Interrupt(runtime.is_main))


def split_fingerprint(val_loader):
    return val_loader.fingerprint if val_loader is not None else None


def check_same_split(checkpoint, path, val_loader):
    """A resumed run must hold out the very images it held out before, or its validation history means nothing."""
    saved, now = checkpoint.get("val_split"), split_fingerprint(val_loader)
    if "val_split" in checkpoint and saved != now:
        raise CheckpointError(f"{path} was trained with another validation split (fingerprint {saved}, now {now}): "
                              f"the training images or the split's code have changed")


def open_tensorboard(log_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("note: --tensorboard ignored: install tensorboard to use it", file=sys.stderr)
        return None
    return SummaryWriter(str(log_dir))


def fit(run):
    """Train until the last epoch, early stopping, or an interrupt; returns which of the three ended it.

    Checkpoints are written in the background; every write has finished when this returns.
    """
    try:
        outcome = train_epochs(run)
    except BaseException:
        if run.run_dir is not None and run.runtime.is_main:
            report_failed_write(run.run_dir)
        raise
    if run.run_dir is not None:
        on_main_rank(run.runtime, run.run_dir.wait)
    return outcome


def report_failed_write(run_dir):
    """Let the last write finish while another error ends the run; a failed write is then worth a note."""
    try:
        run_dir.wait()
    except CheckpointError as err:
        print(f"note: {err}", file=sys.stderr)


def train_epochs(run):
    while run.state.epoch < run.config.epochs:
        if run.early_stopping.should_stop:  # before training, too: a resumed run may have stopped early already
            return "early-stopped"
        totals, stopped_at_step = train_one_epoch(run)
        if stopped_at_step is not None:
            run.state.step, run.state.epoch_totals = stopped_at_step, reduce_totals(totals, run.runtime)
            save_checkpoint(run, is_best=False)
            return "interrupted"
        saved = finish_epoch(run, summarize_epoch(totals, run.runtime))
        if run.interrupt.agreed(run.runtime):
            if not saved:  # between two --save-every epochs: keep this one
                save_checkpoint(run, is_best=False)
            return "interrupted"
    return "early-stopped" if run.early_stopping.should_stop else "finished"


def is_due(epoch, every, epochs):
    """Whether 1-based `epoch` is one of every `every` epochs, or the last."""
    return epoch % every == 0 or epoch == epochs


def check_state_is_finite(run):
    """A finite loss can hide diverged BatchNorm statistics: check every float tensor, the weight average's too,
    before anything is saved."""
    models = [unwrap_model(run.model)] + ([run.average.model] if run.average is not None else [])
    floats = [tensor for model in models for tensor in model.state_dict().values() if tensor.is_floating_point()]
    if not torch.stack([tensor.isfinite().all() for tensor in floats]).all():
        epoch = run.state.epoch + (1 if run.state.step else 0)
        raise NonFiniteLossError(f"the weights or BatchNorm statistics became NaN or infinite in epoch {epoch}")


def resumed_totals(run):
    """The interrupted epoch's sums go to rank 0 alone, so that adding over ranks counts them once."""
    if run.state.epoch_totals is None or not run.runtime.is_main:
        return None
    return run.state.epoch_totals


def finish_epoch(run, train_result):
    """Record, evaluate (every --eval-every epochs and the last), checkpoint (every --save-every epochs, the last,
    a new best and an early stop) and print one finished epoch; it is saved before its line is shown, so that a
    closed output loses nothing. Returns whether it was saved."""
    state, config = run.state, run.config
    epoch = state.epoch + 1
    row = {"epoch": epoch, "train_seconds": round(train_result.seconds, 3), "images": train_result.images,
           "train_loss": round(train_result.loss, 5), "train_top1": round(train_result.top1, 5),
           "lr": run.train_step.last_lr, "images_per_sec": round(train_result.images_per_sec, 1)}
    evaluation_seconds, is_best = 0.0, False
    if is_due(epoch, config.eval_every, config.epochs):
        evaluation_seconds, is_best = evaluate_epoch(run, row)
    row.update(epoch_seconds=round(train_result.seconds + evaluation_seconds, 3), best=int(is_best))
    state.epoch, state.step, state.epoch_totals = epoch, 0, None
    state.history.append(row)
    if is_best:
        run.best_weights = snapshot_to_host(run.evaluated_model.state_dict())
    saved = is_best or run.early_stopping.should_stop or is_due(epoch, config.save_every, config.epochs)
    if saved:
        save_checkpoint(run, is_best)
    if run.runtime.is_main:
        show(format_epoch_line(row, config.epochs, run.selection_split), run.interrupt)
        log_tensorboard(run.tensorboard, row)
    return saved


def evaluate_epoch(run, row):
    """Evaluate the finished epoch on the selection split into its row, and judge it for best.pt and early
    stopping; returns (seconds, whether it is the best so far)."""
    use_rank_0s_state(run)
    views = run.config.test_views
    evaluation = evaluate(run.evaluated_model, run.selection_loader, run.runtime, run.precision, views)
    if not math.isfinite(evaluation.loss):
        raise NonFiniteLossError(f"the model's {run.selection_split} loss became NaN or infinite after epoch "
                                 f"{row['epoch']}")
    row.update(evaluation_columns(run.selection_split, evaluation))
    if run.average is not None:  # the raw weights beside their average
        raw = evaluate(unwrap_model(run.model), run.selection_loader, run.runtime, run.precision, views)
        row["raw_top1"] = round(raw.top1, 5)
    state = run.state
    is_best = not run.early_stopping.top1_history or evaluation.top1 > state.best_top1  # the first evaluation, too
    state.best_top1 = max(state.best_top1, evaluation.top1)
    run.early_stopping.update(evaluation.top1)
    return evaluation.seconds, is_best


def use_rank_0s_state(run):
    """Evaluate rank 0's model on every rank, the one that is saved: BatchNorm statistics are each rank's own (so
    are a weight average's), the weights themselves agree."""
    tensors = list(unwrap_model(run.model).buffers())
    if run.average is not None:
        tensors += list(run.average.model.state_dict().values())
    broadcast_from_main(tensors, run.runtime)


def evaluation_columns(split, evaluation):
    return {f"{split}_loss": round(evaluation.loss, 5), f"{split}_top1": round(evaluation.top1, 5),
            f"{split}_top5": round(evaluation.top5, 5)}


def test_final_and_best(run):
    """With a validation split: the test set's verdict on the final model and on the best epoch's (best.pt)."""
    final = evaluate(run.evaluated_model, run.test_loader, run.runtime, run.precision, run.config.test_views)
    if run.best_weights is not None:
        best_model = model_with_weights(run.config.model_config, run.best_weights, run.runtime.device)
    else:  # a resumed run whose best epoch came before the resume finds it only in best.pt
        best_model = load_model(run.run_dir.best, run.runtime.device)
    best = evaluate(best_model, run.test_loader, run.runtime, run.precision, run.config.test_views)
    return final, best


def format_epoch_line(row, epochs, split="test"):
    evaluation = ""
    if f"{split}_top1" in row:  # with --eval-every, not every epoch is evaluated
        raw = f" (raw {100 * row['raw_top1']:5.2f}%)" if "raw_top1" in row else ""
        evaluation = (f"{split} loss {row[f'{split}_loss']:.4f} | top-1 {100 * row[f'{split}_top1']:5.2f}%{raw} | "
                      f"top-5 {100 * row[f'{split}_top5']:5.2f}% | ")
    return (f"epoch {row['epoch']:>3}/{epochs} | {row['epoch_seconds']:6.1f}s | train loss {row['train_loss']:.4f} | "
            f"{evaluation}lr {row['lr']:.5f} | {row['images_per_sec']:,.0f} img/s"
            + (" | new best" if row["best"] else ""))


def log_tensorboard(writer, row):
    if writer is None:
        return
    for key in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "test_loss", "test_top1", "test_top5",
                "raw_top1", "lr", "images_per_sec"):
        if key in row:
            writer.add_scalar(key, row[key], row["epoch"])
    writer.flush()


def save_checkpoint(run, is_best):
    """Snapshot the run's whole state to host memory now, for the run folder to write in the background
    (a collective: every rank calls it, rank 0 writes, and every rank stops if its last write failed).
    A diverged state is never written: the previous checkpoint stays."""
    check_state_is_finite(run)
    rng_states = gather_rng_states(run.runtime)
    if run.run_dir is not None:
        on_main_rank(run.runtime, lambda: run.run_dir.save(checkpoint_of(run, rng_states), is_best))


def checkpoint_of(run, rng_states):
    state = run.state
    return snapshot_to_host({
        "format": CHECKPOINT_FORMAT, "model_config": run.config.model_config,
        "model": unwrap_model(run.model).state_dict(), "optimizer": run.optimizer.state_dict(),
        "ema": run.average.model.state_dict() if run.average is not None else None,
        "scheduler": run.scheduler.state_dict(), "epoch": state.epoch, "step": state.step,
        "epoch_totals": state.epoch_totals, "best_top1": state.best_top1,
        "early_stopping": run.early_stopping.state_dict(), "history": list(state.history),
        "args": asdict(run.config), "rng": rng_states, "val_split": split_fingerprint(run.val_loader),
        "run_id": state.run_id,
    })


def snapshot_to_host(value):
    """A copy of every tensor in `value` in host memory, taken now, so training can go on changing the originals."""
    devices = set()  # the GPUs copied from, each waited for before the copies are read

    def copy(item):
        if isinstance(item, torch.Tensor):
            if item.device.type != "cuda":
                return item.detach().clone()
            devices.add(item.device)
            host = torch.empty(item.shape, dtype=item.dtype, pin_memory=True)
            return host.copy_(item.detach(), non_blocking=True)
        if isinstance(item, dict):
            return {key: copy(entry) for key, entry in item.items()}
        if isinstance(item, (list, tuple)):
            return type(item)(copy(entry) for entry in item)
        return item

    result = copy(value)
    for device in devices:
        torch.cuda.synchronize(device)
    return result


def match_parameter_layouts(optimizer):
    """Loaded momentum buffers come back contiguous; fused SGD needs each in its parameter's (channels_last) layout."""
    for parameter, state in optimizer.state.items():
        buffer = state.get("momentum_buffer")
        if buffer is not None:
            if buffer.shape != parameter.shape:
                raise ValueError(f"a momentum buffer of shape {tuple(buffer.shape)} for a parameter of shape "
                                 f"{tuple(parameter.shape)}")
            state["momentum_buffer"] = torch.empty_like(parameter).copy_(buffer)


def restore(checkpoint, path, model, optimizer, scheduler, average, early_stopping, runtime, steps_per_epoch, seed):
    """Put the run's parts back where `checkpoint` left them and return its state; a part that does not fit
    is reported in one line naming it."""
    with damage_reported(path, "weights"):
        model.load_state_dict(checkpoint["model"])
    if average is not None:
        with damage_reported(path, "weight average (--ema)"):
            average.model.load_state_dict(checkpoint["ema"])
    with damage_reported(path, "optimizer state"):
        load_optimizer_state(optimizer, checkpoint["optimizer"])
    with damage_reported(path, "schedule"):
        load_scheduler_state(scheduler, checkpoint["scheduler"])
        if scheduler.last_epoch != checkpoint["epoch"] * steps_per_epoch + checkpoint["step"]:
            raise ValueError(f"it stands at step {scheduler.last_epoch}, not at epoch {checkpoint['epoch']} "
                             f"step {checkpoint['step']}")
    if average is not None:
        average.updates.fill_(scheduler.last_epoch)  # one update per step so far
    with damage_reported(path, "early-stopping record"):
        early_stopping.load_state_dict(checkpoint["early_stopping"])
        if not all(is_a(top1, NUMBER) for top1 in early_stopping.top1_history):
            raise ValueError("its top-1 values are not all numbers")
    with damage_reported(path, "random generator states"):
        rng_states = checkpoint["rng"]
        if len(rng_states) == runtime.world_size:
            restore_rng_state(rng_states[runtime.rank])
        else:  # another number of processes: draws cannot match the old run anyway, so only keep ranks apart
            seed_everything(seed + 1000 * checkpoint["epoch"] + runtime.rank)
    return RunState(checkpoint["epoch"], checkpoint["step"], checkpoint.get("epoch_totals"),
                    float(checkpoint["best_top1"]), list(checkpoint["history"]), checkpoint.get("run_id") or new_run_id())
