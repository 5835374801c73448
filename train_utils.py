"""The training loop: the run built whole (`build_run`), trained epoch by epoch (`fit`), evaluated, stopped early,
and checkpointed.

On the GPU the step loop never waits for the device: loss and accuracy are summed on the
device and read only at a few sync points per epoch (progress bar, NaN check, interrupt
agreement between ranks) and once at its end.
"""
import math
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from checkpoint import (RunState, check_same_split, check_same_training_data, model_from_config, restore,
                        restore_early_stopping, restore_generators, save_checkpoint, seed_everything, snapshot_to_host,
                        unwrap_model)
from checkpoint import load_model  # noqa: F401 - a public name: `from train_utils import load_model`
from config import Config, is_due
from device_utils import (all_reduce_sum, broadcast_from_main, describe_precision, distribute_model, on_main_rank,
                          resolve_precision, synchronize)
from evaluation import evaluate
from optimization import OneCycle, make_optimizer
from report import ESTIMATE_AFTER_STEPS, Progress, describe_estimate, format_epoch_line, log_tensorboard, show
from checkpoint_file import CheckpointError
from signals import Interrupt
from train_step import (CORRECT, LOSS_SUM, LossScale, NonFiniteLossError, RunningSums, SharpnessAware, StepParts,
                        TrainStep, WeightAverage, make_train_step)

SYNC_POINTS_PER_EPOCH = 10


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


# ---- the loops ----


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
        run.schedule.apply_to(run.optimizer, epoch * loader.steps_per_epoch + step)
        train_step(images, labels)
        last_step = step + 1 == loader.steps_per_epoch
        if train_step.first_step_at is None:  # cudnn's tuning, and compilation with --compile: start-up, not training
            synchronize(runtime.device)
            train_step.first_step_at = time.time()
            train_step.first_step_seconds = time.perf_counter() - step_started
        images_done += len(labels)
        progress.step_done()
        estimate_due = not run.estimated and (step + 1 - start_step >= ESTIMATE_AFTER_STEPS or last_step)
        unplanned = not runtime.distributed and (interrupt.requested or estimate_due or progress.line_due())
        if (step + 1) % sync_every == 0 or last_step or unplanned:  # under torchrun every rank syncs alike
            if next_epoch_wanted:  # now, with steps queued to keep the GPU busy, and after the graph capture
                loader.prepare(epoch + 1)
                next_epoch_wanted = False
            sums = check_in(train_step.sums, runtime)
            if sums.first_bad_step >= 0:
                raise NonFiniteLossError(f"the training loss became NaN or infinite at epoch {epoch + 1}, "
                                         f"step {int(sums.first_bad_step) + 1}{loss_not_gradients(run)}")
            if interrupt.agreed(runtime) and not last_step:
                stopped_at_step = step + 1
                break
            stepping = time.perf_counter() - stepping_started - (train_step.setup_seconds - setup_at_start)
            if estimate_due:
                first_step_here = setup_at_start != train_step.setup_seconds
                estimate_once(run, step + 1, step + 1 - start_step - first_step_here, stepping,
                              augment_seconds=stepping_started - started)
            progress.report(step, loss=sums.loss_sum / (sums.steps_done * len(labels)),
                            lr=run.schedule.lrs(epoch * loader.steps_per_epoch + step)[0],
                            images_per_sec=images_done * runtime.world_size / max(stepping, 1e-9), seconds=stepping)
    progress.close()
    synchronize(runtime.device)
    seconds = time.perf_counter() - started - (train_step.setup_seconds - setup_at_start)
    previous_images, previous_seconds = (totals["images"], totals["seconds"]) if totals else (0, 0.0)
    sums = train_step.sums.clone()
    epoch_totals = EpochTotals(sums[LOSS_SUM], sums[CORRECT], previous_images + images_done,
                               previous_seconds + seconds)
    return epoch_totals, stopped_at_step


def loss_not_gradients(run):
    """Under fp16 a step whose gradients overflow is skipped, not fatal: say that this was the loss itself."""
    if run.loss_scale is None:
        return ""
    return f" (the loss itself, not only its gradients; {run.loss_scale.describe()})"


def estimate_once(run, steps_done, timed_steps, stepping, augment_seconds):
    """Say, once a process, how long the run will take, from `timed_steps` taking `stepping` seconds (the first
    step's start-up work left out) after `augment_seconds` of augmenting the epoch, `steps_done` of it done."""
    run.estimated = True
    if run.runtime.is_main and timed_steps > 0:
        show(describe_estimate(run, stepping / timed_steps, augment_seconds, steps_done, timed_steps), run.interrupt)


def check_in(sums, runtime):
    """A sync point: this rank's sums as numbers (RunningSums), the first non-finite step taken over all ranks."""
    values = RunningSums(*sums.tolist())
    if runtime.distributed:
        first_bad = torch.tensor([values.first_bad_step], device=sums.device)
        dist.all_reduce(first_bad, op=dist.ReduceOp.MAX)
        values = values._replace(first_bad_step=first_bad.item())
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


def make_criterion(label_smoothing=0.0):
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


# ---- a whole run ----


@dataclass
class Run:
    """Everything a run trains with, built whole by `build_run`."""

    config: Config
    runtime: object
    precision: str
    model: nn.Module  # what trains: possibly under DistributedDataParallel and torch.compile
    optimizer: torch.optim.Optimizer
    schedule: OneCycle
    average: WeightAverage  # with --ema: the averaged weights, which are evaluated and saved; else None
    loss_scale: LossScale  # with fp16: the dynamic loss scale, saved with the run; else None
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
    first_epoch: int = 0  # the epochs done before this process: its own are the history's rows after them
    estimated: bool = False  # whether this process has said how long the run will take

    @property
    def evaluated_model(self):
        return self.average.model if self.average is not None else unwrap_model(self.model)

    @property
    def precision_words(self):
        return describe_precision(self.runtime.device, self.config.precision)

    @property
    def selection_split(self):
        return "val" if self.val_loader is not None else "test"

    @property
    def selection_loader(self):
        """What picks best.pt and stops early: the validation split, or the test set without one."""
        return self.val_loader if self.val_loader is not None else self.test_loader


def build_run(config, runtime, loaders, run_dir=None, resumed=None):
    """The run, ready to train: model, optimizer and schedule built, restored from `resumed` (a loaded checkpoint
    and its path) if given, the model wrapped for torchrun and compiled if asked, the training step made. Writes
    nothing: `run_dir` is where its checkpoints will go."""
    train_loader, val_loader, test_loader = loaders
    if config.workers:
        torch.set_num_threads(config.workers)
    torch.backends.cudnn.benchmark = True
    seed_everything(config.seed)  # every rank alike, so each draws the same initial weights
    precision = resolve_precision(runtime.device, config.precision)
    model = model_from_config(config.model_config)
    if runtime.distributed:  # the ranks drew the same initial weights; from here on (dropout) they differ
        seed_everything(config.seed + runtime.rank)
    if config.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(runtime.device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                               nesterov=config.nesterov, bn_bias_lr_scale=config.bn_bias_lr_scale)
    momenta = None if config.min_momentum is None else (config.min_momentum, config.momentum)
    schedule = OneCycle.for_optimizer(optimizer, config.epochs * train_loader.steps_per_epoch, momenta)
    average = WeightAverage(model, config.ema) if config.ema else None
    loss_scale = LossScale(runtime.device) if precision == "fp16" else None
    early_stopping = EarlyStopping(config.target_accuracy, config.patience)
    state = RunState()
    if resumed is not None:
        checkpoint, path = resumed
        check_same_training_data(checkpoint, path, train_loader)
        check_same_split(checkpoint, path, val_loader)
        state = restore(checkpoint, path, StepParts(model, optimizer, None, average, loss_scale=loss_scale),
                        train_loader.steps_per_epoch)
        restore_early_stopping(checkpoint, path, early_stopping)
        restore_generators(checkpoint, path, runtime, config.seed)  # last: nothing draws before training
    training_model = distribute_model(model, runtime)
    if config.compile:
        training_model = torch.compile(training_model)
    cuda_graphs = not config.no_cuda_graphs and momenta is None  # a captured step keeps its momentum
    sharpness = SharpnessAware(model, config.sam, config.asam) if config.sam else None
    parts = StepParts(training_model, optimizer, make_criterion(config.label_smoothing), average=average,
                      sharpness=sharpness, loss_scale=loss_scale)
    train_step = make_train_step(parts, runtime, precision, cuda_graphs)
    return Run(config=config, runtime=runtime, precision=precision, model=training_model, optimizer=optimizer,
               schedule=schedule, average=average, loss_scale=loss_scale, train_step=train_step,
               train_loader=train_loader, val_loader=val_loader, test_loader=test_loader, run_dir=run_dir,
               early_stopping=early_stopping, state=state, interrupt=Interrupt(runtime.is_main),
               first_epoch=state.epoch)


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
           "lr": float(f"{run.schedule.lrs(epoch * run.train_loader.steps_per_epoch - 1)[0]:.6g}"),  # its last step's
           "images_per_sec": round(train_result.images_per_sec, 1)}
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
        own_rows = state.history[run.first_epoch:]
        seconds_left = (config.epochs - epoch) * sum(row["epoch_seconds"] for row in own_rows) / len(own_rows)
        show(format_epoch_line(row, config.epochs, run.selection_split, seconds_left), run.interrupt)
        log_tensorboard(run.tensorboard, row)
    return saved


def evaluate_epoch(run, row):
    """Evaluate the finished epoch on the selection split into its row, and judge it for best.pt and early
    stopping; returns (seconds, whether it is the best so far)."""
    use_rank_0s_state(run)
    views = run.config.test_views
    evaluation = evaluate(run.evaluated_model, run.selection_loader, run.runtime, run.precision, views=views)
    if not math.isfinite(evaluation.loss):
        raise NonFiniteLossError(f"the model's {run.selection_split} loss became NaN or infinite after epoch "
                                 f"{row['epoch']}")
    row.update(evaluation_columns(run.selection_split, evaluation))
    if run.average is not None:  # the raw weights beside their average
        raw = evaluate(unwrap_model(run.model), run.selection_loader, run.runtime, run.precision, views=views)
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


