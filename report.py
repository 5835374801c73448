"""What a run prints: its header and recipe, progress within an epoch, the epoch line, the summary at the end,
TensorBoard, and standard output and error that may close under it. Imports nothing heavy."""
import datetime
import os
import shlex
import sys
import time
from dataclasses import fields

from tqdm import tqdm

from config import GIVEN, Config, OnResume, as_flags, describe_model_config, is_due, parse_args
from launch import is_first_on_its_node, launcher_words, rank


PROGRESS_SECONDS = 60  # without a terminal, a progress line at most this often (a CPU epoch takes minutes)
ESTIMATE_AFTER_STEPS = 10  # steps of an epoch timed before the run's length is estimated
# What an evaluated image costs against a trained one (a forward pass, no backward), as measured: 0.55 on a 2-core
# CPU (WRN-10-1, fp32), 0.18 on an H100 (ResNet18 in bf16, whose test pass is cached in bf16 and not augmented).
FORWARD_SHARE = {"cuda": 0.2, "other": 0.5}
VIEWS = {"image": 1, "mirror": 2, "crops": 6}  # the forward passes an evaluated image takes (Config.test_views)


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

    def line_due(self):
        """Whether a progress line is due: the loop then reads its sums at once, not at its next sync point."""
        return self.lines and time.perf_counter() - self.last_line >= PROGRESS_SECONDS

    def report(self, step, loss, lr, images_per_sec, seconds):
        """At a sync point, after `step` (0-based) and `seconds` of training in this epoch."""
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.4f}", img_s=f"{images_per_sec:,.0f}")
        if self.line_due():
            remaining = (self.steps - step - 1) * seconds / max(step + 1 - self.start_step, 1)
            show(f"  epoch {self.run.state.epoch + 1}/{self.run.config.epochs}: step {step + 1}/{self.steps} | "
                 f"loss {loss:.4f} | lr {lr:.5f} | {images_per_sec:,.0f} img/s | epoch ETA {clock(remaining)}",
                 self.run.interrupt)
            self.last_line = time.perf_counter()

    def close(self):
        self.bar.close()


def describe_estimate(run, step_seconds, augment_seconds, steps_done, timed_steps):
    """About how long the run will take from here, evaluation included, from `timed_steps` of this epoch (`steps_done`
    of it done), `step_seconds` each, after `augment_seconds` of augmenting it: one line."""
    config, loader, state = run.config, run.train_loader, run.state
    epochs = range(state.epoch + 1, config.epochs + 1)
    training = (len(epochs) * loader.steps_per_epoch - steps_done) * step_seconds + (len(epochs) - 1) * augment_seconds
    share = FORWARD_SHARE["cuda" if run.runtime.device.type == "cuda" else "other"] / (2 if config.sam else 1)
    image_seconds = step_seconds * run.runtime.world_size / config.batch_size * share
    passes = sum(is_due(epoch, config.eval_every, config.epochs) for epoch in epochs) * (2 if config.ema else 1)
    images = passes * len(run.selection_loader.images) + (2 * len(run.test_loader.images) if run.val_loader else 0)
    evaluation = images * VIEWS[config.test_views] * image_seconds
    return (f"estimated time to the end: {clock(training + evaluation)} for {plural(len(epochs), 'epoch')} "
            f"({clock(training)} training, about {clock(evaluation)} evaluating), from {plural(timed_steps, 'timed step')} "
            f"of epoch {state.epoch + 1}; each epoch line updates it")


def clock(seconds):
    """H:MM:SS."""
    return str(datetime.timedelta(seconds=round(seconds)))


def format_epoch_line(row, epochs, split="test", seconds_left=None):
    """The line of a finished epoch; with `seconds_left`, the run's time to its end as well."""
    evaluation = ""
    if f"{split}_top1" in row:  # with --eval-every, not every epoch is evaluated
        raw = f" (raw {100 * row['raw_top1']:5.2f}%)" if "raw_top1" in row else ""
        evaluation = (f"{split} loss {row[f'{split}_loss']:.4f} | top-1 {100 * row[f'{split}_top1']:5.2f}%{raw} | "
                      f"top-5 {100 * row[f'{split}_top5']:5.2f}% | ")
    return (f"epoch {row['epoch']:>3}/{epochs} | {row['epoch_seconds']:6.1f}s | train loss {row['train_loss']:.4f} | "
            f"train top-1 {100 * row['train_top1']:5.2f}% | "
            f"{evaluation}lr {row['lr']:.5f} | {row['images_per_sec']:,.0f} img/s"
            + (" | new best" if row["best"] else "") + (f" | ETA {clock(seconds_left)}" if seconds_left else ""))


def log_tensorboard(writer, row):
    if writer is None:
        return
    for key in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "test_loss", "test_top1", "test_top5",
                "raw_top1", "lr", "images_per_sec"):
        if key in row:
            writer.add_scalar(key, row[key], row["epoch"])
    writer.flush()


def open_tensorboard(log_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("note: --tensorboard ignored: install tensorboard to use it", file=sys.stderr)
        return None
    return SummaryWriter(str(log_dir))


def describe_error(err):
    return f"{type(err).__name__}: {err}".strip().splitlines()[0][:160]


def describe_run(run, resumed, sources):
    config = run.config
    parameters = sum(p.numel() for p in run.model.parameters())
    subset = " (a class-balanced subset, --train-images)" if config.train_images else ""
    lines = [f"{describe_model_config(config.model_config)}: {parameters / 1e6:.1f}M parameters on "
             f"{run.runtime.device} x{run.runtime.world_size}, {run.precision_words}, channels_last, "
             f"{run.train_step.planned} step"
             f"{', compiled' if config.compile else ''}",
             f"batch {config.batch_size} (global), {run.train_loader.steps_per_epoch} steps/epoch, "
             f"{plural(config.epochs, 'epoch')}, OneCycle peak lr {config.lr}, momentum {config.momentum}, "
             f"checkpoints in {run.run_dir.path}/",
             f"training on {len(run.train_loader.images):,} images{subset}; best.pt and early stopping judged on the "
             f"{run.selection_split} set",
             describe_recipe(config, sources)]
    if resumed is not None:
        lines.append(f"resumed from {resumed[1]} at epoch {run.state.epoch + 1}, step {run.state.step}"
                     + describe_early_stop(run, resumed[0]))
    return "\n".join(lines)


def describe_recipe(config, sources):
    """The recipe's settings that differ from the defaults, as the flags that give them, grouped by where they
    came from (`sources`, from config.setting_sources), the flags given last."""
    defaults = Config.from_flags(parse_args([])[0])
    groups = {}
    for setting in fields(Config):
        name, value = setting.name, getattr(config, setting.name)
        if OnResume.of(setting) is not OnResume.THIS_COMMAND and value != getattr(defaults, name):
            groups.setdefault(sources.get(name, "implied"), {})[name] = value  # implied: --cutmix-prob's own rule
    if GIVEN in groups:
        groups[GIVEN] = groups.pop(GIVEN)
    return "recipe: " + ("; ".join(f"{shlex.join(as_flags(settings))} ({source})" for source, settings in
                                   groups.items()) or "the defaults")


def describe_early_stop(run, checkpoint):
    """Whether a resumed run had stopped early, and whether the target and patience given now keep it stopped."""
    saved = checkpoint["args"]
    before = type(run.early_stopping)(saved.get("target_accuracy"), saved.get("patience", 2))
    before.load_state_dict(checkpoint["early_stopping"])
    if run.early_stopping.should_stop:
        return f"; it stopped early at epoch {run.state.epoch} and its target still holds: nothing to train"
    if before.should_stop:
        return (f"; it had stopped early at epoch {run.state.epoch}, and goes on with --target-accuracy "
                f"{run.config.target_accuracy} --patience {run.config.patience}")
    return ""


def plural(count, noun):
    return f"{count} {noun}{'' if count == 1 else 's'}"


def describe_finished(checkpoint, path, explicit):
    """A resume of a run that has trained all its epochs: nothing to do, and how to train it longer."""
    epochs = checkpoint["epoch"]
    longer = f"{resume_command(path, explicit)} --epochs {2 * epochs}"
    return (f"{path} has finished its {plural(epochs, 'epoch')}: nothing to train. To train it longer, give a larger "
            f"--epochs (the schedule is stretched to it), for example:\n  {longer}")


def describe_start_up_work(run, first_epoch):
    """The start-up work done in the first epoch (the first step, with cudnn's search and compilation, and the graph
    capture), left out of epoch times and img/s; when the first step ended, by the clock (bench.py and reproduce.py
    time a run's start-up from outside with it); and which step trained."""
    step = run.train_step
    if step.first_step_at is None:
        return "no training step ran"
    work = ["the first step"] + ["cudnn's choice of algorithms"] * (run.runtime.device.type == "cuda") + \
        ["compilation"] * run.config.compile + ["the CUDA graph capture"] * (step.graph is not None)
    return (f"{step.setup_seconds:.2f}s of start-up work in epoch {first_epoch} ({', '.join(work)}) not counted in "
            f"epoch times; first step done at Unix time {step.first_step_at:.3f}; training step: {step.kind}")


def describe_outcome(run, outcome, seconds, epochs_before, final_tests=None):
    """The run's end: how it ended, its accuracy and speed; after a resume, what this process did of it."""
    state = run.state
    if outcome == "interrupted":
        return f"interrupted after {plural(state.epoch, 'full epoch')}, {seconds:.1f}s in this process"
    history = state.history
    images_per_sec = sum(row["images"] for row in history) / max(sum(row["train_seconds"] for row in history), 1e-9)
    split = run.selection_split
    final_top1 = history[-1][f"{split}_top1"] if history else 0.0
    reason = "early stop: target reached" if outcome == "early-stopped" else "done"
    here = f"{seconds:.1f}s" if not epochs_before else \
        f"{plural(state.epoch - epochs_before, 'epoch')} of them in this process, in {seconds:.1f}s"
    summary = (f"{reason} after {plural(state.epoch, 'epoch')}, {here} "
               f"({sum(row['epoch_seconds'] for row in history):.1f}s of epochs in all); final {split} top-1 "
               f"{100 * final_top1:.2f}%, best {split} top-1 {100 * state.best_top1:.2f}%; "
               f"{images_per_sec:,.0f} img/s overall")
    if run.loss_scale is not None:
        summary += f"; {run.loss_scale.describe()}"
    if final_tests is not None:
        final, best = final_tests
        summary += (f"\ntest top-1 {100 * final.top1:.2f}% (top-5 {100 * final.top5:.2f}%) for the final model, "
                    f"{100 * best.top1:.2f}% for best.pt")
    return summary


def draw_plot(run_dir):
    from plot import PlotError, plot_metrics
    try:
        show(f"plot: {plot_metrics(run_dir.metrics, run_dir.plot)}")
    except PlotError as err:
        print(f"note: --plot skipped: {err}", file=sys.stderr)


def plot_is_possible():
    """--plot needs matplotlib: said at the start of a run, not after hours of training."""
    from plot import matplotlib_missing
    missing = matplotlib_missing()
    if missing:
        print(f"note: --plot will draw nothing: {missing}", file=sys.stderr)
    return not missing


def fail(error, code=1):
    """One line on standard error. Under torchrun, an error that rank 0 says for every rank (`shown_by_rank_0`)
    is said there alone; any other, met by each rank alike or by one node's ranks, once a node: by rank 0, and by
    each other node's first rank, which names itself."""
    if getattr(error, "shown_by_rank_0", False) or not (rank() == 0 or is_first_on_its_node()):
        return code
    print(f"error: {'' if rank() == 0 else f'rank {rank()}: '}{error}", file=sys.stderr)
    return code


class Notes:
    """Standard error, for notes and errors: when nothing reads it any more (closed, or a pipe whose reader has
    gone), what follows goes nowhere instead of raising, so the run still saves and stops as it would have."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except (OSError, ValueError, AttributeError):  # a broken pipe, a closed file, no stream (fd 2 closed)
            self.to_nowhere()
        except RuntimeError:  # a signal's note written while another was being written: this one is dropped
            pass
        return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except (OSError, ValueError, AttributeError):
            self.to_nowhere()

    def to_nowhere(self):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)  # so that Python's own flush at exit finds somewhere to write
        os.close(devnull)
        self.stream = open(os.devnull, "w")

    def __getattr__(self, name):
        return getattr(self.stream, name)


def resume_command(last, explicit):
    """The command that continues this run: the launcher it runs under, and this command's own settings given."""
    flags = as_flags({setting.name: explicit[setting.name] for setting in fields(Config)
                      if OnResume.of(setting) is OnResume.THIS_COMMAND and setting.name in explicit
                      and setting.name != "checkpoint_dir"})
    return shlex.join([*launcher_words(), "--resume", str(last), *flags])
