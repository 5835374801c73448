"""A run's settings: the presets, the flags, `Config`, and what a resume may change. Imports nothing heavy, so
--help and a wrong flag answer at once."""
import argparse
import enum
import json
import os
import re
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from cli import (FLOAT32_MAX, FRACTION, NON_NEGATIVE_FLOAT, NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, FlagError,
                 Parser, bounded, non_empty)
from checkpoint_file import CheckpointError
from launch import rank, world_size


@dataclass(frozen=True)
class Augmentation:
    """How training images are drawn and augmented beyond the random crop and flip, by the flags' names (a part of
    `Config`); every part is off by default."""

    seed: int = 0  # with the epoch, seeds every draw of an epoch: its order, crops, flips, ops and mixing
    cutout: int = 0  # the side of the square Cutout zeroes
    mixup: float = 0.0  # Beta(alpha, alpha) of the mixup weights
    cutmix: float = 0.0  # Beta(alpha, alpha) of the CutMix box shares
    cutmix_prob: float = 1.0  # the chance a batch is CutMix; the others are mixed up with --mixup, else left
    auto_augment: str | None = None  # "ta_wide" or "ra": replaces the rotation and colour jitter
    ra_num_ops: int = 2  # RandAugment's ops per image
    ra_magnitude: int = 9  # RandAugment's magnitude bin
    flip: str = "random"  # "random": each image's own coin every epoch; "alternate": mirrored every other epoch

    @property
    def mixes(self):
        return self.mixup > 0 or self.cutmix > 0


class OnResume(enum.Enum):
    """What --resume (or --evaluate) does with a setting."""

    FIXED = "fixed for the life of a run: a different value is refused"
    MAY_CHANGE = "a recipe setting a resume may change: not given, it stays the checkpoint's"
    THIS_COMMAND = "how this process runs, not what it trains: always the command line's, never the checkpoint's"

    @classmethod
    def of(cls, setting):
        """A `Config` field's rule."""
        return setting.metadata.get("on_resume", cls.FIXED)


def may_change():
    return field(metadata={"on_resume": OnResume.MAY_CHANGE})


def this_command():
    return field(metadata={"on_resume": OnResume.THIS_COMMAND})


@dataclass(frozen=True)
class Config:
    """Every setting of a run: train.py's flags over a preset, and on --resume over the checkpoint's settings.

    Each field's rule on --resume is an `OnResume`: a field without a note is fixed for the life of a run.
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
    train_images: int
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
    dist_timeout: int = this_command()
    compile: bool = this_command()
    no_cuda_graphs: bool = this_command()
    test_batch_size: int = this_command()
    plot: bool = this_command()
    report: bool = this_command()
    report_dir: str | None = this_command()

    @classmethod
    def from_flags(cls, flags):
        """The settings in an argparse namespace (which may hold more, such as --resume)."""
        return cls(**{setting.name: getattr(flags, setting.name) for setting in fields(cls)})

    def resumed_from(self, saved, given, path, defaults, evaluating=False):
        """These settings (from `given` flags and defaults) merged with a checkpoint's `saved` ones, field by field,
        for a resume (or, `evaluating`, an --evaluate). A fixed setting newer than the checkpoint was trained as its
        flag's default, which kept the behaviour from before the flag: its value in `defaults`, the settings of a run
        given no flags."""
        merged = {}
        for setting in fields(self):
            name, rule = setting.name, OnResume.of(setting)
            if rule is OnResume.THIS_COMMAND or name not in saved and rule is OnResume.MAY_CHANGE:
                merged[name] = getattr(self, name)
                continue
            stored = saved[name] if name in saved else getattr(defaults, name)  # checked by check_saved_settings
            merged[name] = given.get(name, stored) if rule is OnResume.MAY_CHANGE else stored
            if rule is OnResume.FIXED and name in given and given[name] != stored:
                flag = "--" + name.replace("_", "-")
                trained = f"without {flag}" if stored is None else f"with {flag} {stored}"
                advice = (f"drop {flag}: --evaluate tests a model as it was trained" if evaluating else
                          f"drop {flag} to go on as it was trained, or start a new run in another --checkpoint-dir")
                raise CheckpointError(f"{path} was trained {trained}; refusing {flag} {given[name]} ({advice})")
        return replace(self, **merged)

    @property
    def augmentation(self):
        return Augmentation(**{part.name: getattr(self, part.name) for part in fields(Augmentation)})

    @property
    def test_views(self):
        """What an evaluation averages over: the image alone, with its mirror, or with shifted crops as well."""
        return "crops" if self.tta_crops else "mirror" if self.tta else "image"

    @property
    def model_config(self):
        kwargs = {}
        if self.model == "wideresnet":
            kwargs = {"depth": self.depth, "widen_factor": self.widen_factor, "dropout": self.dropout}
        return {"name": self.model, "num_classes": 100, "kwargs": kwargs}  # CIFAR-100's fine classes


def is_due(epoch, every, epochs):
    """Whether 1-based `epoch` is one of every `every` epochs, or the last (--eval-every, --save-every)."""
    return epoch % every == 0 or epoch == epochs


def check_model_config(checkpoint, model_config, path):
    if checkpoint["model_config"] != model_config:
        raise CheckpointError(f"{path} holds a {describe_model_config(checkpoint['model_config'])}, "
                              f"not the {describe_model_config(model_config)} asked for")


def describe_model_config(config):
    extras = "".join(f", {key}={value}" for key, value in sorted(config["kwargs"].items()))
    return f"{config['name']} ({config['num_classes']} classes{extras})"


PRESETS = {
    # A quick look on a laptop's CPU: WRN-10-1 for 12 epochs, about 8 minutes on 2 cores; see README "Recipes".
    "cpu": {"model": "wideresnet", "depth": 10, "widen_factor": 1, "lr": 0.2, "epochs": 12, "nesterov": True,
            "label_smoothing": 0.1, "flip": "alternate"},
    # ResNet18 to >= 73 % top-1 in the fewest seconds on one GPU; see README "Recipes".
    "fast": {"batch_size": 512, "lr": 0.4, "epochs": 24, "nesterov": True, "label_smoothing": 0.1, "tta": True},
    # WRN-28-10 for accuracy within 100 epochs; see README "Recipes".
    "wrn": {"model": "wideresnet", "depth": 28, "widen_factor": 10, "batch_size": 256, "lr": 0.2, "epochs": 80,
            "nesterov": True, "label_smoothing": 0.1, "cutout": 8},
}


MAX_DEPTH = 1000  # WideResNet-1000 (166 blocks a stage) still builds; a deeper one would only exhaust memory


def device_name(text):
    """auto, cpu, mps, cuda or cuda:N, checked by its form alone (whether it exists needs torch)."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not auto, cpu, mps, cuda or cuda:N")
    return text


def build_parser(raising=False):
    parser = Parser("Train ResNet18 or WideResNet on CIFAR-100.", raising)
    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=["resnet18", "wideresnet"], default="resnet18", help="the network")
    model.add_argument("--depth", type=bounded(int, low=10, high=MAX_DEPTH), default=28, help="WideResNet depth, 6n+4")
    model.add_argument("--widen-factor", type=bounded(int, low=1, high=32), default=10,
                       help="WideResNet width multiplier")
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
    optim.add_argument("--train-images", type=NON_NEGATIVE_INT, default=0, metavar="N",
                       help="train on N of the training images (class-balanced, a fixed choice, beside --val-size's) "
                            "(0: all)")
    optim.add_argument("--target-accuracy", type=bounded(float, low=0, high=1, low_open=True), default=None,
                       help="stop once top-1 on the validation split (the test set without one) reaches this fraction "
                            "for --patience epochs (None: off)")
    optim.add_argument("--patience", type=POSITIVE_INT, default=2,
                       help="evaluated epochs at the target before stopping")
    optim.add_argument("--seed", type=bounded(int, low=0, high=2**32 - 1), default=0,
                       help="seeds the weights, the data order and the augmentation")
    run = parser.add_argument_group("run")
    run.add_argument("--config", metavar="FILE", default=None,
                     help="start a new run with the settings of FILE, a JSON object by the flags' names such as a "
                          "run's config.json, over its --preset; flags given still win. How that run was launched "
                          "(its folder, data, device, processes) is this command's own")
    run.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                     help="continue from PATH (default <checkpoint-dir>/last.pt); auto: continue the folder's run "
                          "if it holds one, else start it (for a job that a scheduler repeats)")
    run.add_argument("--evaluate", nargs="?", const="", default=None, metavar="PATH",
                     help="test PATH (default <checkpoint-dir>/best.pt) and exit")
    run.add_argument("--checkpoint-dir", type=non_empty, default="checkpoint",
                     help="checkpoints, metrics, plot, TensorBoard logs")
    run.add_argument("--data-dir", type=non_empty, default="data", help="where cifar-100-python/ is, or goes")
    run.add_argument("--no-download", action="store_true", help="never download CIFAR-100")
    run.add_argument("--workers", type=bounded(int, low=1, high=os.cpu_count() or 1), default=None,
                     help="CPU threads for torch (None: torch's choice; the data needs no worker processes)")
    run.add_argument("--device", type=device_name, default="auto", help="auto, cuda, cuda:N, mps or cpu")
    run.add_argument("--dist-timeout", type=bounded(int, low=1, high=7 * 24 * 3600), default=600, metavar="SECONDS",
                     help="under torchrun, how long a process waits for the others, to meet or in a collective, "
                          "before the run stops")
    run.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                     help="auto: bf16 autocast on CUDA GPUs that compute it natively (compute capability 8.0 and "
                          "newer), fp16 with loss scaling on older ones, fp32 on the CPU and MPS")
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
    run.add_argument("--report", action="store_true",
                     help="at the end, the class report of best.pt on the test set, as --evaluate writes it")
    run.add_argument("--report-dir", type=non_empty, default=None, metavar="DIR",
                     help="where --evaluate and --report write per_class.csv, evaluation.json and confusion.png "
                          "(default: beside the checkpoint)")
    run.add_argument("--tensorboard", action="store_true", help="log to <checkpoint-dir>/tensorboard if installed")
    return parser


def parse_args(argv=None):
    """Parse flags over the settings beneath them (a --config file, a preset), and return (args, the flags given
    explicitly); `args.sources` says where each setting came from."""
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit_parser = build_parser()  # the same flags with no defaults: what the user typed
    for action in explicit_parser._actions:
        action.default = argparse.SUPPRESS
    explicit = vars(explicit_parser.parse_args(argv))
    layers = settings_beneath(args, explicit, parser)
    for _, settings in layers:
        parser.set_defaults(**settings)
    args = parser.parse_args(argv)
    args.sources = setting_sources(explicit, layers)
    if args.resume is not None and args.evaluate is not None:
        parser.error("--resume and --evaluate exclude each other")
    if args.report_dir is not None and not (args.report or args.evaluate is not None):
        parser.error("--report-dir needs --report or --evaluate")
    if args.sync_bn and (int(os.environ.get("WORLD_SIZE", "1")) < 2 or args.device in ("cpu", "mps")):
        parser.error("--sync-bn needs several processes on CUDA GPUs (torchrun)")
    check_combination(args, parser)
    for flag, needs, value in (("cutmix_prob", "cutmix", None), ("ra_num_ops", "auto_augment", "ra"),
                               ("ra_magnitude", "auto_augment", "ra")):
        if flag in explicit and not (getattr(args, needs) if value is None else getattr(args, needs) == value):
            parser.error(f"--{flag.replace('_', '-')} needs --{needs.replace('_', '-')}{' ' + value if value else ''}")
    if args.cutmix_prob is None:
        args.cutmix_prob = 0.5 if args.mixup and args.cutmix else 1.0
    return args, explicit


def settings_beneath(args, explicit, parser):
    """The layers of settings under the flags given, lowest first, each (where it comes from, its settings): a
    --config file over the preset it names, then the preset given on the command line."""
    layers = []
    if args.config is not None:
        if args.evaluate is not None or args.resume not in (None, "auto"):
            parser.error("--config starts a new run: it excludes --resume (all but --resume auto) and --evaluate")
        try:
            file, settings, trained_by = read_config_file(args.config)
        except FlagError as err:
            parser.error(str(err))
        if trained_by not in (None, world_size()) and rank() == 0:
            print(f"note: {file} was trained by {trained_by} processes and this run has {world_size()}: the same "
                  f"recipe, but not the same numbers, bit for bit", file=sys.stderr)
        if settings.get("preset"):
            layers.append((f"--preset {settings['preset']}", PRESETS[settings["preset"]]))
        layers.append((str(file), settings))
    if "preset" in explicit:
        layers.append((f"--preset {args.preset}", PRESETS[args.preset]))
    return layers


GIVEN = "given"  # the source of a setting typed on the command line


def setting_sources(explicit, layers):
    """Where each setting came from: GIVEN for a flag typed, else the last of `layers` that holds it (one in
    none is its flag's default)."""
    sources = {}
    for source, settings in layers:
        sources.update(dict.fromkeys(settings, source))
    sources.update(dict.fromkeys(explicit, GIVEN))
    return sources


def read_config_file(path):
    """(the file, its recipe, the processes that trained it if it says): a JSON object of settings by the flags'
    names (a run's config.json, or one written by hand; a run folder stands for its config.json), each checked by
    its flag. How that run was launched (its folder, data, device, processes) is left to this command."""
    file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    try:
        settings = json.loads(file.read_text(encoding="utf-8"))
    except OSError as err:
        raise FlagError(f"--config {file}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise FlagError(f"--config {file} is not JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as err:
        raise FlagError(f"--config {file} is not JSON ({err})") from None
    if not isinstance(settings, dict):
        raise FlagError(f"--config {file} holds a JSON {type(settings).__name__}, not an object of settings")
    trained_by = settings.pop("world_size", None)  # what a run's config.json records beside its settings
    if trained_by is not None and (type(trained_by) is not int or trained_by < 1):
        raise FlagError(f"--config {file}: world_size is {trained_by!r}, not a number of processes")
    try:
        recipe = checked_recipe(settings, lambda unknown: f"train.py has no setting {', '.join(map(repr, unknown))}")
    except FlagError as err:
        raise FlagError(f"--config {file}: {err}") from None
    return file, recipe, trained_by


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
    if args.asam and not args.sam:
        parser.error("--asam needs --sam")
    if args.lr * args.bn_bias_lr_scale > FLOAT32_MAX:
        parser.error(f"--lr {args.lr} times --bn-bias-lr-scale {args.bn_bias_lr_scale} is beyond float32")


def check_settings(settings):
    """Settings (name: value) through their flags' own checks: each must be what its flag parses back to (a
    range, a type or a missing value is refused as the flag would refuse it, naming the setting), and the checks
    between settings must hold. Raises FlagError."""
    parser = build_parser(raising=True)
    switches = {action.dest for action in parser._actions if action.nargs == 0}
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        if name in switches and not isinstance(value, bool):
            raise FlagError(f"{name} is {value!r}, but {flag} is a switch: true or false")
        try:
            parsed = getattr(parser.parse_args(as_flags({name: value})), name)
        except FlagError as err:
            raise FlagError(f"{name} is {value!r}, which {flag} refuses ({err})") from None
        if parsed != value or isinstance(value, bool) != isinstance(parsed, bool):
            raise FlagError(f"{name} is {value!r}, which {flag} cannot give")
    check_combination(parser.parse_args(as_flags(settings)), parser)


def checked_recipe(settings, name_unknown):
    """The recipe among `settings` (by name; those that are not this command's own), through its flags' checks;
    names that no setting has are refused in the words `name_unknown(sorted names)` gives. Raises FlagError."""
    rules = {setting.name: OnResume.of(setting) for setting in fields(Config)}
    unknown = sorted(set(settings) - set(rules))
    if unknown:
        raise FlagError(name_unknown(unknown))
    recipe = {name: value for name, value in settings.items() if rules[name] is not OnResume.THIS_COMMAND}
    check_settings(recipe)
    return recipe


def check_saved_settings(saved, path):
    """A checkpoint's recipe goes through its flags' own checks, once."""
    try:
        checked_recipe(saved, lambda unknown: f"its settings hold {', '.join(unknown)}, which train.py has not")
    except FlagError as err:
        raise CheckpointError(f"{path} is damaged: {err}") from None


def resumed_config(args, explicit, checkpoint, path):
    """The settings of a run going on from `checkpoint`: its own, with the flags given now that may change."""
    check_saved_settings(checkpoint["args"], path)
    defaults = Config.from_flags(parse_args([])[0])
    config = Config.from_flags(args).resumed_from(checkpoint["args"], explicit, path, defaults,
                                                  evaluating=args.evaluate is not None)
    check_model_config(checkpoint, config.model_config, path)
    return config
