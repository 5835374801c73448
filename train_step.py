"""The training step: forward, loss, backward and SGD update of one batch, eagerly or replayed as one CUDA graph,
with SAM's second pass and the weight average's update inside it.

On the GPU the step never waits for the host: its loss and accuracy are summed on the device and read only at a
few sync points per epoch.
"""
import contextlib
import copy
import sys
import time
import typing
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from device_utils import GRAPHED_SGD_TORCH, autocast, fused_sgd_available
from report import describe_error, plural


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def average_decay(updates, decay):
    """The share of the average that the update after `updates` others keeps: timm's ModelEmaV3 warm-up,
    min(decay, 1 - n^(-2/3)) at the n-th update, so the first copies the weights and the random start fades within
    the first steps whatever the decay. A function of the count alone: a resume needs nothing more."""
    return torch.clamp(1 - (1 + updates) ** (-2 / 3), max=decay)


class WeightAverage:
    """An exponential moving average of a model's weights and BatchNorm statistics, updated after every step:
    average = decay_n * average + (1 - decay_n) * current, decay_n from `average_decay`. `model` is the averaged
    copy, evaluated and saved."""

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
        decay = average_decay(self.updates, self.decay)
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


class LossScale:
    """fp16's dynamic loss scaling, as torch.amp.GradScaler does it, on the device alone so that a CUDA graph can
    capture it: the loss is multiplied by `scale` before backward, the gradients divided by it after (and checked);
    a step whose gradients are not finite is skipped and the scale halved, and after `growth_interval` finite steps
    in a row it doubles. Nothing is read on the host, except by an optimizer that cannot skip a step itself."""

    GROWTH, BACKOFF = 2.0, 0.5

    def __init__(self, device, scale=2.0 ** 16, growth_interval=2000):
        self.growth_interval = growth_interval
        self.scale = torch.full((), scale, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)  # finite steps in a row
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.found_inf = torch.zeros((), device=device)  # this step's: 1 once a pass's gradients were not finite

    def scaled(self, loss):
        return loss * self.scale

    @torch.no_grad()
    def unscale(self, parameters):
        """Divide this pass's gradients by the scale, flagging the step if any is not finite."""
        gradients = [parameter.grad for parameter in parameters if parameter.grad is not None]
        torch._amp_foreach_non_finite_check_and_unscale_(gradients, self.found_inf, self.scale.reciprocal())

    def step(self, optimizer):
        """The optimizer's step, unless a gradient was not finite (fused SGD skips it on the device, with no host
        read); then the scale's update."""
        if optimizer.defaults.get("fused"):
            optimizer.grad_scale, optimizer.found_inf = None, self.found_inf  # the gradients are unscaled already
            try:
                optimizer.step()
            finally:
                del optimizer.grad_scale, optimizer.found_inf
        elif not self.found_inf.item():
            optimizer.step()
        self.update()

    @staticmethod
    def is_usable(scale):
        return bool(scale.isfinite() and scale > 0)

    @torch.no_grad()
    def update(self):
        """Halve the scale after a skipped step, double it after `growth_interval` finite ones; ready the next."""
        torch._amp_update_scale_(self.scale, self.growth_tracker, self.found_inf, self.GROWTH, self.BACKOFF,
                                 self.growth_interval)
        self.skipped_steps += self.found_inf.long()
        self.found_inf.zero_()

    def describe(self):
        return (f"fp16 loss scale {float(self.scale):g}, {plural(int(self.skipped_steps), 'step')} skipped for "
                f"gradients that overflowed")

    @staticmethod
    @torch.no_grad()
    def make_momentum_buffers(optimizer):
        """Zero momentum buffers for SGD's parameters that have none yet. Fused SGD makes them uninitialised on its
        first step and leaves them so when it skips that step, then reads them on the next; with zeros its first
        step is the same to the bit (0 * momentum + gradient)."""
        for group in optimizer.param_groups:
            if group["momentum"]:
                for parameter in group["params"]:
                    state = optimizer.state[parameter]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(parameter)

    def state_dict(self):
        return {"scale": self.scale, "growth_tracker": self.growth_tracker, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state):
        """A checkpoint's scale back in, checked: a finite scale above 0, and counts that are counts."""
        if not isinstance(state, dict) or set(state) != set(self.state_dict()):
            raise ValueError(f"it holds {sorted(state) if isinstance(state, dict) else type(state).__name__}, "
                             f"not a loss scale's {sorted(self.state_dict())}")
        for name, mine in self.state_dict().items():
            theirs = state[name]
            if not isinstance(theirs, torch.Tensor) or theirs.shape != () or theirs.dtype != mine.dtype:
                raise ValueError(f"its {name} is not a single {mine.dtype} number")
        if not self.is_usable(state["scale"]):
            raise ValueError(f"its scale is {state['scale'].item()}, not a finite number above 0")
        if state["growth_tracker"] < 0 or state["skipped_steps"] < 0:
            raise ValueError("its counts of steps are negative")
        for name, mine in self.state_dict().items():
            mine.copy_(state[name])


class RunningSums(typing.NamedTuple):
    """An epoch's running sums on this rank, in the order the step keeps them in one device tensor (`sums`)."""

    loss_sum: float
    correct: float  # predictions that hit, each counted by its target's share under mixing
    steps_done: float
    first_bad_step: float  # the first step whose loss was not finite; -1 while none was


LOSS_SUM, CORRECT, STEPS_DONE, FIRST_BAD_STEP = range(len(RunningSums._fields))


@dataclass
class StepParts:
    """What a training step works with: the model it trains (as wrapped for torchrun or compiled), its optimizer and
    loss, and the weight average (--ema) and SAM (--sam) when they are on."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: object
    average: WeightAverage = None
    sharpness: SharpnessAware = None
    loss_scale: LossScale = None


class TrainStep:
    """Forward, loss, backward and SGD update of one batch, eagerly (CPU, MPS, torchrun, and the fallback).

    The epoch's running sums stay on the device in `sums`, a tensor in `RunningSums`' order.
    """

    kind = planned = "eager"  # `kind`: the step that ran; `planned`: the one asked for
    graph = None

    def __init__(self, parts, device, precision):
        self.model, self.optimizer, self.criterion = parts.model, parts.optimizer, parts.criterion
        self.average, self.sharpness, self.loss_scale = parts.average, parts.sharpness, parts.loss_scale
        if self.loss_scale is not None:
            self.loss_scale.make_momentum_buffers(self.optimizer)
        self.device, self.precision = device, precision
        self.sums = torch.zeros(len(RunningSums._fields), device=device)
        self.first_step_seconds = 0.0  # the process's first step: cudnn's choice of algorithms, compilation
        self.capture_seconds = 0.0  # the CUDA graph's capture
        self.first_step_at = None  # time.time() when the process's first step had finished

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
        if self.loss_scale is None:
            self.optimizer.step()
        else:
            self.loss_scale.step(self.optimizer)
        if self.average is not None:
            self.average.update()
        self.record(loss.detach(), logits.detach(), labels)

    def forward_backward(self, images, labels):
        with autocast(self.device, self.precision, cache=False):
            logits = self.model(images)
            loss = self.criterion(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        if self.loss_scale is None:
            loss.backward()
        else:  # fp16: scaled up so that small gradients do not underflow, then back to their true size
            self.loss_scale.scaled(loss).backward()
            self.loss_scale.unscale(self.model.parameters())
        return loss, logits

    def record(self, loss, logits, labels):
        sums = self.sums
        first_bad = torch.where((sums[FIRST_BAD_STEP] < 0) & ~loss.isfinite(), sums[STEPS_DONE], sums[FIRST_BAD_STEP])
        predicted = logits.argmax(1, keepdim=True)
        if labels.dim() == 2:  # mixed targets (--mixup, --cutmix): a hit counts the predicted class's share
            hits = labels.gather(1, predicted).sum()
        else:
            hits = (predicted.squeeze(1) == labels).sum()
        sums[LOSS_SUM:FIRST_BAD_STEP] += torch.stack([loss.float() * len(labels), hits.float(),
                                                      torch.ones((), device=self.device)])
        sums[FIRST_BAD_STEP] = first_bad


class GraphedTrainStep(TrainStep):
    """The same step replayed as one CUDA graph: one launch instead of about 300 per batch.

    The first WARMUP_STEPS batches train eagerly on a side stream (cudnn picks its algorithms,
    the optimizer makes its momentum buffers); the last of them also tells whether the step
    waits for the host anywhere, which a capture would refuse. Then the next batch is captured,
    and every batch after it is copied into the graph's static inputs and replayed. The lr lives
    in a device tensor that the schedule fills between replays. If the step cannot be captured,
    it says why in one line and stays eager.
    """

    WARMUP_STEPS = 3
    planned = "CUDA graph"

    def __init__(self, parts, device, precision):
        super().__init__(parts, device, precision)
        for group in self.optimizer.param_groups:
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


def make_train_step(parts, runtime, precision, cuda_graphs=True):
    step_class = GraphedTrainStep if uses_cuda_graphs(runtime, cuda_graphs) else TrainStep
    return step_class(parts, runtime.device, precision)
