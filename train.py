"""Train ResNet18 or WideResNet on CIFAR-100.

    python train.py                          # ResNet18, 100 epochs, batch 128
    python train.py --preset fast            # ResNet18 to 75 % top-1 in the fewest seconds
    python train.py --resume                 # continue checkpoint/last.pt
    python train.py --evaluate               # test checkpoint/best.pt and exit
    torchrun --nproc_per_node=4 train.py     # the same run on 4 GPUs
"""
import argparse
import contextlib
import os
import re
import shlex
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields, replace
from pathlib import Path


def process_started_at():
    """When this process started, by the wall clock (Linux: from /proc); elsewhere, the moment train.py began."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            since_boot = float(stat.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
            return time.time() - (float(uptime.read().split()[0]) - since_boot)
    except (OSError, ValueError, IndexError):
        return time.time()


STARTED = process_started_at()  # before the heavy imports, so "first step after start" counts them

from cli import (FRACTION, NON_NEGATIVE_FLOAT, NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, FlagError, Parser,  # noqa: E402
                 bounded, non_empty)
from run_dir import CheckpointError, RunDir, load_checkpoint  # noqa: E402

PRESETS = {
    # ResNet18 to >= 73 % top-1 in the fewest seconds on one GPU; see README "Recipes".
    "fast": {"batch_size": 512, "lr": 0.4, "epochs": 24, "nesterov": True, "label_smoothing": 0.1, "tta": True},
    # WRN-28-10 for accuracy within 100 epochs; see README "Recipes".
    "wrn": {"model": "wideresnet", "depth": 28, "widen_factor": 10, "batch_size": 256, "lr": 0.2, "epochs": 80,
            "nesterov": True, "label_smoothing": 0.1, "cutout": 8},
}


def device_name(text):
    """auto, cpu, mps, cuda or cuda:N, checked by its form alone (whether it exists needs torch)."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not auto, cpu, mps, cuda or cuda:N")
    return text


def build_parser(raising=False):
    parser = Parser("Train ResNet18 or WideResNet on CIFAR-100.", raising)
    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=["resnet18", "wideresnet"], default="resnet18", help="the network")
    model.add_argument("--depth", type=bounded(int, low=10), default=28, help="WideResNet depth, 6n+4")
    model.add_argument("--widen-factor", type=bounded(int, low=1, high=32), default=10, help="WideResNet width multiplier")
    model.add_argument("--dropout", type=FRACTION, default=0.0, help="WideResNet dropout between convs")
    model.add_argument("--sync-bn", action="store_true", help="synchronise BatchNorm over GPUs under torchrun")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--preset", choices=sorted(PRESETS),
                       help="a named recipe; flags given still win. " + "; ".join(
                           f"{name}: {' '.join(as_flags(preset))}" for name, preset in PRESETS.items()))
    optim.add_argument("-b", "--batch-size", type=POSITIVE_INT, default=128,
                       help="global batch size, split over the processes of a torchrun run")
    optim.add_argument("--epochs", type=POSITIVE_INT, default=100, help="length of the OneCycle schedule")
    optim.add_argument("--lr", "--base-lr", type=POSITIVE_FLOAT, default=0.1, help="OneCycle peak lr")
    optim.add_argument("--momentum", type=FRACTION, default=0.9,
                       help="SGD momentum: held through the schedule, or the high end with --min-momentum")
    optim.add_argument("--min-momentum", type=FRACTION, default=None, metavar="M",
                       help="cycle the momentum against the lr: from --momentum down to M at the lr's peak and back "
                            "(the step then runs eagerly on CUDA: a CUDA graph keeps the momentum it was captured "
                            "with; None: held at --momentum)")
    optim.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    optim.add_argument("--wd", "--weight-decay", dest="weight_decay", type=NON_NEGATIVE_FLOAT, default=5e-4,
                       help="weight decay")
    optim.add_argument("--bn-bias-lr-scale", type=POSITIVE_FLOAT, default=1.0, metavar="K",
                       help="BatchNorm biases train at K times the lr and 1/K the weight decay, so they decay per "
                            "step as the other weights (airbench's bias scaler) (1: as the other weights)")
    optim.add_argument("--label-smoothing", type=FRACTION, default=0.0, help="in [0, 1)")
    optim.add_argument("--auto-augment", choices=["ta_wide", "ra"], default=None,
                       help="TrivialAugment-Wide or RandAugment, each image with its own ops, in place of the "
                            "rotation and colour jitter (None: off)")
    optim.add_argument("--ra-num-ops", type=bounded(int, low=1, high=10), default=2, metavar="N",
                       help="RandAugment's ops per image")
    optim.add_argument("--ra-magnitude", type=bounded(int, low=0, high=30), default=9, metavar="M",
                       help="RandAugment's magnitude, one of 31 bins")
    optim.add_argument("--cutout", type=bounded(int, low=0, high=32), default=0, metavar="SIZE",
                       help="set a square of about SIZE x SIZE per training image to the mean colour, as the Cutout "
                            "paper's code does (an odd SIZE cuts SIZE - 1) (0: off)")
    optim.add_argument("--flip", choices=["random", "alternate"], default="random",
                       help="random: each image mirrored by its own coin every epoch; alternate: each image mirrored "
                            "in every other epoch, a random half in the even epochs and the other half in the odd "
                            "(airbench's alternating flip)")
    optim.add_argument("--mixup", type=NON_NEGATIVE_FLOAT, default=0.0, metavar="ALPHA",
                       help="blend each training image with another of its batch (a random pairing per batch), "
                            "images and targets, by a weight drawn per batch from Beta(ALPHA, ALPHA) (0: off)")
    optim.add_argument("--cutmix", type=NON_NEGATIVE_FLOAT, default=0.0, metavar="ALPHA",
                       help="paste a box of another image of the batch into each training image, the targets "
                            "weighted by area, the box's share drawn per batch from Beta(ALPHA, ALPHA) (0: off)")
    optim.add_argument("--cutmix-prob", type=bounded(float, low=0, high=1, low_open=True), default=None, metavar="P",
                       help="the chance that a batch is CutMix; the others are mixed up with --mixup, else left "
                            "unmixed (None: 1 alone, 0.5 beside --mixup)")
    optim.add_argument("--ema", type=bounded(float, low=0, high=1, high_open=True), default=0.0, metavar="DECAY",
                       help="also keep an exponential moving average of the weights, updated every step with this "
                            "decay; it is what is evaluated, saved as best.pt's choice and returned by load_model "
                            "(0: off)")
    optim.add_argument("--sam", type=POSITIVE_FLOAT, default=None, metavar="RHO",
                       help="sharpness-aware minimisation: each step's gradient is taken at the weights moved RHO "
                            "uphill, two forward and backward passes per step (None: off)")
    optim.add_argument("--asam", action="store_true",
                       help="with --sam: the adaptive variant, the move scaled by each weight's size")
    optim.add_argument("--val-size", type=NON_NEGATIVE_INT, default=0, metavar="N",
                       help="hold out N training images (class-balanced, fixed split) to pick best.pt and stop "
                            "early on; the test set is then used only at the end (0: off)")
    optim.add_argument("--target-accuracy", type=bounded(float, low=0, high=1, low_open=True), default=None,
                       help="stop once top-1 on the validation split (the test set without one) reaches this fraction "
                            "for --patience epochs (None: off)")
    optim.add_argument("--patience", type=POSITIVE_INT, default=2,
                       help="evaluated epochs at the target before stopping")
    optim.add_argument("--seed", type=bounded(int, low=0, high=2**32 - 1), default=0,
                       help="seeds the weights, the data order and the augmentation")
    run = parser.add_argument_group("run")
    run.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                     help="continue from PATH (default <checkpoint-dir>/last.pt)")
    run.add_argument("--evaluate", nargs="?", const="", default=None, metavar="PATH",
                     help="test PATH (default <checkpoint-dir>/best.pt) and exit")
    run.add_argument("--checkpoint-dir", type=non_empty, default="checkpoint",
                     help="checkpoints, metrics, plot, TensorBoard logs")
    run.add_argument("--data-dir", type=non_empty, default="data", help="where cifar-100-python/ is, or goes")
    run.add_argument("--no-download", action="store_true", help="never download CIFAR-100")
    run.add_argument("--workers", type=bounded(int, low=1, high=os.cpu_count() or 1), default=None,
                     help="CPU threads for torch (None: torch's choice; the data needs no worker processes)")
    run.add_argument("--device", type=device_name, default="auto", help="auto, cuda, cuda:N, mps or cpu")
    run.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                     help="auto: bf16 autocast on CUDA, fp32 elsewhere")
    run.add_argument("--compile", action="store_true", help="torch.compile the model (inductor kernels)")
    run.add_argument("--no-cuda-graphs", action="store_true",
                     help="run the training step eagerly on CUDA instead of replaying it as a CUDA graph")
    run.add_argument("--tta", action="store_true", help="evaluate on the image and its mirror, averaged")
    run.add_argument("--tta-crops", action="store_true",
                     help="evaluate on 6 views, airbench's test-time augmentation: half the image and its mirror, "
                          "half the same pair for the crops shifted one pixel up-left and down-right (edges "
                          "reflected); implies --tta")
    run.add_argument("--test-batch-size", type=POSITIVE_INT, default=1000, help="evaluation batch")
    run.add_argument("--eval-every", type=POSITIVE_INT, default=1, metavar="K",
                     help="evaluate every K epochs and the last (best.pt and early stopping judge those alone)")
    run.add_argument("--save-every", type=POSITIVE_INT, default=1, metavar="K",
                     help="write checkpoints every K epochs and the last, a new best, an early stop and an "
                          "interrupt (a kill loses up to K - 1 epochs)")
    run.add_argument("--plot", action="store_true", help="draw metrics.png at the end (needs matplotlib)")
    run.add_argument("--tensorboard", action="store_true", help="log to <checkpoint-dir>/tensorboard if installed")
    return parser


def parse_args(argv=None):
    """Parse flags, apply a preset under them, and return (args, the flags given explicitly)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset:
        parser.set_defaults(**PRESETS[args.preset])
        args = parser.parse_args(argv)
    explicit_parser = build_parser()  # the same flags with no defaults: what the user typed
    for action in explicit_parser._actions:
        action.default = argparse.SUPPRESS
    explicit = vars(explicit_parser.parse_args(argv))
    if args.resume is not None and args.evaluate is not None:
        parser.error("--resume and --evaluate exclude each other")
    if args.sync_bn and (int(os.environ.get("WORLD_SIZE", "1")) < 2 or args.device in ("cpu", "mps")):
        parser.error("--sync-bn needs several processes on CUDA GPUs (torchrun)")
    check_combination(args, parser)
    for flag, needs, value in (("cutmix_prob", "cutmix", None), ("asam", "sam", None),
                               ("ra_num_ops", "auto_augment", "ra"), ("ra_magnitude", "auto_augment", "ra")):
        if flag in explicit and not (getattr(args, needs) if value is None else getattr(args, needs) == value):
            parser.error(f"--{flag.replace('_', '-')} needs --{needs.replace('_', '-')}{' ' + value if value else ''}")
    if args.cutmix_prob is None:
        args.cutmix_prob = 0.5 if args.mixup and args.cutmix else 1.0
    return args, explicit


def as_flags(settings):
    """The command-line words for settings (name: value): a switch when True, left out when None or False."""
    words = []
    for name, value in settings.items():
        if value is not None and value is not False:
            words += ["--" + name.replace("_", "-")] + ([] if value is True else [str(value)])
    return words


def check_combination(args, parser):
    """The checks between settings, on top of each flag's own range."""
    if args.min_momentum is not None and args.min_momentum > args.momentum:
        parser.error(f"--min-momentum {args.min_momentum} is above --momentum {args.momentum}")
    if args.nesterov and args.momentum == 0:
        parser.error("--nesterov needs a momentum above 0")
    if (args.depth - 4) % 6:
        parser.error(f"argument --depth: {args.depth} is not 6n+4 (10, 16, 22, 28, ...)")


def check_saved_settings(saved, path):
    """A checkpoint's recipe goes through the very checks its flags would: one definition of each range."""
    rules = {setting.name: setting.metadata.get("on_resume") for setting in fields(Config)}
    unknown = sorted(set(saved) - set(rules))
    if unknown:
        raise CheckpointError(f"{path} is damaged: its settings hold {', '.join(unknown)}, which train.py has not")
    flags = as_flags({name: value for name, value in saved.items() if rules[name] != "this command's"})
    parser = build_parser(raising=True)
    try:
        check_combination(parser.parse_args(flags), parser)
    except FlagError as err:
        raise CheckpointError(f"{path} is damaged: its settings fail their flags' checks ({err})") from None


def checkpoint_path(given, checkpoint_dir, name):
    """The checkpoint --resume or --evaluate names: PATH, a run folder's `name`, or the --checkpoint-dir's."""
    path = Path(given) if given else Path(checkpoint_dir) / name
    return path / name if path.is_dir() else path


def run_folder(args, explicit):
    """(the checkpoint a run resumes or None, the folder it trains in): a resume goes on in its checkpoint's
    folder unless --checkpoint-dir says otherwise."""
    if args.resume is None:
        return None, Path(args.checkpoint_dir)
    source = checkpoint_path(args.resume, args.checkpoint_dir, RunDir.LAST)
    return source, Path(args.checkpoint_dir) if "checkpoint_dir" in explicit else source.parent


def first_look(args, explicit):
    """What can be told from the file system alone, before torch loads: a missing checkpoint, a folder that
    already holds a run. Checked again under the folder's lock."""
    if args.evaluate is not None:
        path = checkpoint_path(args.evaluate, args.checkpoint_dir, RunDir.BEST)
        if not path.is_file():
            raise CheckpointError(f"no checkpoint at {path}")
        return
    source, folder = run_folder(args, explicit)
    RunDir(folder).check_can_hold(source)


def fail(error, code=1):
    """One line on standard error; under torchrun only once, by rank 0, for an error every rank stopped on."""
    if not getattr(error, "shown_by_rank_0", False):
        print(f"error: {error}", file=sys.stderr)
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


def quit_while_starting(signum, frame):
    print("\ninterrupted while starting: nothing was written", file=sys.stderr, flush=True)
    os._exit(128 + signum)


if __name__ == "__main__":
    sys.stderr = Notes(sys.stderr)
    try:  # flag errors, and what the file system alone tells, before the imports below spend seconds on torch
        first_look(*parse_args())
    except CheckpointError as err:
        err.shown_by_rank_0 = os.environ.get("RANK", "0") != "0"  # under torchrun every rank stops, one says why
        sys.exit(fail(err))
    signal.signal(signal.SIGINT, quit_while_starting)  # Ctrl-C while torch loads: one line, not a traceback

TORCH_STARTED = time.time()
import torch  # noqa: E402

from dataset_utils import (FOLDER_NAME, SPLIT_FILES, DataConfig, DataError, EvalLoader, load_cifar100,  # noqa: E402
                           read_cifar100)
from device_utils import (DeviceError, input_dtype, leave_together, on_main_rank, resolve_precision,  # noqa: E402
                          setup_runtime, teardown_runtime)
from train_utils import (Config, EarlyStopping, NonFiniteLossError, build_run, check_model_config,  # noqa: E402
                         describe_model_config, evaluate, fit, model_from_checkpoint, seed_everything, show,
                         test_final_and_best)

USER_ERRORS = (CheckpointError, DataError, DeviceError, NonFiniteLossError)
IMPORTED = time.time()


class DataReader:
    """CIFAR-100 read on a thread of its own, started first, so that the reading goes on beside the device's
    set-up (CUDA's initialisation) and the run folder's checks; `arrays()` waits for it and raises what it
    raised, where the run needs the data. Data still to be downloaded or unpacked is fetched there and then
    instead: a run that stops before would otherwise wait for the download to end."""

    def __init__(self, data_dir, download):
        self.data_dir, self.download, self.seconds, self.future = data_dir, download, 0.0, None
        if all((Path(data_dir) / FOLDER_NAME / name).is_file() for name in SPLIT_FILES):
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="data-reader")
            self.future = pool.submit(self.read)
            pool.shutdown(wait=False)

    def read(self):
        started = time.perf_counter()
        arrays = read_cifar100(self.data_dir, self.download)
        self.seconds = time.perf_counter() - started
        return arrays

    def arrays(self):
        return self.future.result() if self.future is not None else self.read()


def main(argv=None):
    saved, sys.stderr = sys.stderr, Notes(sys.stderr)
    try:
        return run_main(argv)
    finally:
        sys.stderr = saved


def run_main(argv):
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here a Ctrl-C is handled below
    args, explicit = parse_args(argv)
    reader = DataReader(args.data_dir, not args.no_download)
    started = time.perf_counter()
    try:
        runtime = setup_runtime(args.device)
    except DeviceError as err:
        return fail(err)
    runtime.startup.update({"python": TORCH_STARTED - STARTED, "import torch": IMPORTED - TORCH_STARTED,
                            "device": time.perf_counter() - started})
    try:
        if args.evaluate is not None:
            return evaluate_checkpoint(args, explicit, runtime, reader)
        code = train(args, explicit, runtime, reader)
        if runtime.distributed:  # finished, or an interrupt every rank agreed on: rank 0 has saved and said so
            leave_together(runtime)
        return code
    except USER_ERRORS as err:
        code = fail(err)
        if getattr(err, "every_rank_stops", False):
            leave_together(runtime)
        return code
    except KeyboardInterrupt:
        return fail("interrupted before training started; nothing needed saving", code=130)
    finally:
        teardown_runtime(runtime)


def resumed_config(args, explicit, checkpoint, path):
    """The settings of a run going on from `checkpoint`: its own, with the flags given now that may change."""
    check_saved_settings(checkpoint["args"], path)
    defaults = Config.from_flags(parse_args([])[0])
    config = Config.from_flags(args).resumed_from(checkpoint["args"], explicit, path, defaults)
    check_model_config(checkpoint, config.model_config, path)
    return config


def train(args, explicit, runtime, reader):
    source, folder = run_folder(args, explicit)
    run_dir = RunDir(folder)
    try:
        checkpoint = on_main_rank(runtime, lambda: run_dir.claim(source))  # the lock first, then any read
        config, resumed = Config.from_flags(args), None
        if source is not None:
            checkpoint = checkpoint if runtime.is_main else load_checkpoint(source)
            config, resumed = resumed_config(args, explicit, checkpoint, source), (checkpoint, source)
        config = replace(config, checkpoint_dir=str(folder))
        return train_with(run_dir, config, runtime, reader, resumed, resume_command(run_dir.last, explicit))
    finally:
        run_dir.close()  # every write has finished: another run may use the folder now


def resume_command(last, explicit):
    """The command that continues this run: the launcher it runs under, and this command's own settings given."""
    launcher = ["python", "train.py"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        processes = os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
        launcher = ["torchrun", "--standalone", f"--nproc_per_node={processes}", "train.py"]
        if processes != os.environ["WORLD_SIZE"]:  # several nodes: their rendezvous is the user's to repeat
            launcher = ["torchrun", f"--nnodes={int(os.environ['WORLD_SIZE']) // int(processes)}",
                        f"--nproc_per_node={processes}", "...", "train.py"]
    flags = as_flags({setting.name: explicit[setting.name] for setting in fields(Config)
                      if setting.metadata.get("on_resume") == "this command's" and setting.name in explicit
                      and setting.name != "checkpoint_dir"})
    return shlex.join([*launcher, "--resume", str(last), *flags])


def train_with(run_dir, config, runtime, reader, resumed, resume_hint):
    if config.sync_bn and runtime.device.type != "cuda":
        raise DeviceError("--sync-bn needs CUDA GPUs (SyncBatchNorm has no CPU implementation)")
    if config.workers:
        torch.set_num_threads(config.workers)
    torch.backends.cudnn.benchmark = True
    seed_everything(config.seed)  # every rank alike, so each draws the same initial weights
    precision = resolve_precision(runtime.device, config.precision)
    arrays = reader.arrays()
    started = time.perf_counter()
    loaders = load_cifar100(DataConfig(
        config.batch_size, config.data_dir, not config.no_download, runtime.device, config.seed, runtime.rank,
        runtime.world_size, config.test_batch_size, config.val_size, config.augmentation, input_dtype(precision)),
        arrays)
    runtime.startup.update({"reading the data": reader.seconds, "data to the device": time.perf_counter() - started})
    return train_in(run_dir, config, runtime, loaders, resumed, resume_hint)


def train_in(run_dir, config, runtime, loaders, resumed, resume_hint):
    started = time.perf_counter()
    run = build_run(config, runtime, loaders, run_dir, resumed)
    runtime.startup["model"] = time.perf_counter() - started
    if runtime.is_main:
        show(describe_run(run, resumed), run.interrupt)
    plot = config.plot and runtime.is_main and plot_is_possible()
    run.interrupt.install()
    epochs_before, started, fit_started_at = run.state.epoch, time.perf_counter(), time.time()
    try:
        outcome = fit(run)
    except NonFiniteLossError as err:
        kept = (f"the last good checkpoint, {run_dir.last}, left as it was" if run_dir.last.exists()
                else "no checkpoint written yet")
        raise NonFiniteLossError(f"{err}; stopped with {kept}") from None
    if runtime.is_main:
        show(describe_timing(run, epochs_before + 1, fit_started_at), run.interrupt)
    final_tests = test_final_and_best(run) if run.val_loader is not None and outcome != "interrupted" else None
    if runtime.is_main:
        show(describe_outcome(run, outcome, time.perf_counter() - started, epochs_before, final_tests), run.interrupt)
        if outcome == "interrupted":
            print(f"stopped at epoch {run.state.epoch + 1}, step {run.state.step}; checkpoint saved. Resume with:\n"
                  f"  {resume_hint}", file=sys.stderr)
        if plot and run.state.history:
            draw_plot(run_dir)
    return 128 + run.interrupt.signum if outcome == "interrupted" else 0


def describe_run(run, resumed):
    config = run.config
    parameters = sum(p.numel() for p in run.model.parameters())
    lines = [f"{describe_model_config(config.model_config)}: {parameters / 1e6:.1f}M parameters on "
             f"{run.runtime.device} x{run.runtime.world_size}, {run.precision}, channels_last, {run.train_step.planned} step"
             f"{', compiled' if config.compile else ''}",
             f"batch {config.batch_size} (global), {run.train_loader.steps_per_epoch} steps/epoch, "
             f"{plural(config.epochs, 'epoch')}, OneCycle peak lr {config.lr}, momentum {config.momentum}, "
             f"checkpoints in {run.run_dir.path}/",
             f"training on {len(run.train_loader.images):,} images; best.pt and early stopping judged on the "
             f"{run.selection_split} set",
             describe_recipe(config)]
    if resumed is not None:
        lines.append(f"resumed from {resumed[1]} at epoch {run.state.epoch + 1}, step {run.state.step}"
                     + describe_early_stop(run, resumed[0]))
    return "\n".join(lines)


def describe_recipe(config):
    """The recipe's settings that differ from the defaults, as the flags that give them."""
    defaults = Config.from_flags(parse_args([])[0])
    changed = {setting.name: getattr(config, setting.name) for setting in fields(Config)
               if setting.metadata.get("on_resume") != "this command's"
               and getattr(config, setting.name) != getattr(defaults, setting.name)}
    return "recipe: " + (shlex.join(as_flags(changed)) if changed else "the defaults")


def describe_early_stop(run, checkpoint):
    """Whether a resumed run had stopped early, and whether the target and patience given now keep it stopped."""
    saved = checkpoint["args"]
    before = EarlyStopping(saved.get("target_accuracy"), saved.get("patience", 2))
    before.load_state_dict(checkpoint["early_stopping"])
    if run.early_stopping.should_stop:
        return f"; it stopped early at epoch {run.state.epoch} and its target still holds: nothing to train"
    if before.should_stop:
        return (f"; it had stopped early at epoch {run.state.epoch}, and goes on with --target-accuracy "
                f"{run.config.target_accuracy} --patience {run.config.patience}")
    return ""


def plural(count, noun):
    return f"{count} {noun}{'' if count == 1 else 's'}"


def describe_timing(run, first_epoch, fit_started_at):
    """Start-up, part by part, to the end of the first step; and the start-up work done in the first epoch (the
    first step, with cudnn's search and compilation, and the graph capture), left out of epoch times and img/s."""
    step = run.train_step
    if step.first_step_at is None:
        return "no training step ran"
    parts = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in run.runtime.startup.items())
    work = ["the first step"] + ["cudnn's choice of algorithms"] * (run.runtime.device.type == "cuda") + \
        ["compilation"] * run.config.compile + ["the CUDA graph capture"] * (step.graph is not None)
    return (f"first training step done {step.first_step_at - STARTED:.1f}s after start: {parts}, then "
            f"{step.first_step_at - fit_started_at:.1f}s to the first step's end (epoch {first_epoch}'s "
            f"augmentation, {', '.join(work)}); the reading went on beside the device's set-up\n"
            f"{step.setup_seconds:.2f}s of start-up work in epoch {first_epoch} ({', '.join(work)}) not counted in "
            f"epoch times; training step: {step.kind}")


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
    if final_tests is not None:
        final, best = final_tests
        summary += (f"\ntest top-1 {100 * final.top1:.2f}% (top-5 {100 * final.top5:.2f}%) for the final model, "
                    f"{100 * best.top1:.2f}% for best.pt")
    return summary


def evaluate_checkpoint(args, explicit, runtime, reader):
    """--evaluate: test a checkpoint's model on the test set and print its accuracy next to the stored best."""
    path = checkpoint_path(args.evaluate, args.checkpoint_dir, RunDir.BEST)
    checkpoint = load_checkpoint(path)
    config = resumed_config(args, explicit, checkpoint, path)
    model = model_from_checkpoint(checkpoint, path, runtime.device)
    arrays = reader.arrays()
    test_loader = EvalLoader(arrays.test_images.to(runtime.device), arrays.test_labels.to(runtime.device),
                             config.test_batch_size, runtime.rank, runtime.world_size)
    result = evaluate(model, test_loader, runtime, resolve_precision(runtime.device, config.precision),
                      config.test_views)
    if runtime.is_main:
        show(f"{path}: test loss {result.loss:.4f}, top-1 {100 * result.top1:.2f}%, top-5 {100 * result.top5:.2f}% "
             f"(stored best top-1 {100 * checkpoint['best_top1']:.2f}% after epoch {checkpoint['epoch']})")
    return 0


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


def exit_worker(code):
    """A torchrun worker leaves without running C++ teardown: on a loaded machine the process group's threads
    can abort it there ("terminate called without an active exception") after everything was done and saved."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_worker(code)
    sys.exit(code)
