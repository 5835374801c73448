"""Throughput benchmark of what train.py runs: the training step, whole epochs, the test pass, augmentation.

    python bench.py                                   # GPU: ResNet18 at batch 128 and 512
    python bench.py --models wideresnet --batch-sizes 512
    python bench.py --device cpu --models resnet18 --batch-sizes 32 --train-images 256 --test-images 256

Each configuration builds the model, the TrainLoader and the training step exactly as train.py
does (on CUDA the step is replayed as a CUDA graph unless --no-cuda-graphs), on random uint8
data held on the device (never zeros, which can run faster than real data). It prints the
set-up time, the first epoch (its augmentation, the first step and the graph capture included),
the first step alone (cudnn's choice of algorithms; compilation with --compile), the capture
alone, then min / median / max over --repeats of the steady epoch (consecutive epochs, so on CUDA each
one's augmentation runs beside the one before, as in train.py), the bare step on one fixed batch
(the ceiling), augmentation of an epoch alone and the test pass. A row whose spread exceeds 10 % of its
median is flagged: the machine was busy, so compare it with care.

    python bench.py --startup --repeats 3 -- --data-dir DATA --no-download   # train.py's start-up, from outside

`--startup` times train.py's start-up as child processes, each in a new folder: python with the modules train.py
loads (torch among them), and `python train.py FLAGS --epochs 1` from its spawn to the end of its first training
step, which the run prints by the clock.
"""
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cli import POSITIVE_FLOAT, POSITIVE_INT, Parser, bounded, comma_separated, one_of, split_at_dashes
from config import Config, device_name
from config import parse_args as parse_train_flags

REPO = Path(__file__).resolve().parent


def parse_args(argv=None):
    parser = Parser(__doc__.splitlines()[0])
    parser.add_argument("--device", type=device_name, default="auto", help="auto, cuda, cuda:N, mps or cpu")
    parser.add_argument("--models", type=comma_separated(one_of("resnet18", "wideresnet")), default="resnet18",
                        help="comma-separated: resnet18, wideresnet (WRN-28-10)")
    parser.add_argument("--batch-sizes", type=comma_separated(POSITIVE_INT), default="128,512",
                        help="comma-separated")
    parser.add_argument("--precisions", type=comma_separated(one_of("auto", "bf16", "fp16", "fp32")), default="auto",
                        help="comma-separated: auto, bf16, fp16, fp32")
    parser.add_argument("--train-images", type=POSITIVE_INT, default=50_000, help="images in a timed epoch")
    parser.add_argument("--test-images", type=POSITIVE_INT, default=10_000, help="images in a timed test pass")
    parser.add_argument("--test-batch-size", type=POSITIVE_INT, default=1000, help="evaluation batch")
    parser.add_argument("--steps", type=POSITIVE_INT, default=50, help="bare training steps per timed run")
    parser.add_argument("--repeats", type=bounded(int, low=1), default=5, help="timed runs of each measurement")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model as well")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="eager steps on CUDA")
    parser.add_argument("--auto-augment", choices=["ta_wide", "ra"], help="train.py's augmentation policy")
    parser.add_argument("--sam", type=POSITIVE_FLOAT, help="train.py's --sam RHO: two passes per step")
    parser.add_argument("--startup", action="store_true",
                        help="time train.py's start-up instead, as child processes given the flags after --")
    own, args_for_train = split_at_dashes(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(own)
    args.train_flags = args_for_train
    too_big = [size for size in args.batch_sizes if size > args.train_images]
    if too_big:
        parser.error(f"--batch-sizes {too_big[0]} is more than --train-images {args.train_images}")
    return args


if __name__ == "__main__":
    parse_args()  # answers --help and flag errors now, before the imports below spend seconds loading torch

import torch  # noqa: E402

from augment import plan_epoch  # noqa: E402
from dataset_utils import EvalLoader, TrainLoader  # noqa: E402
from device_utils import DeviceError, Runtime, get_device, input_dtype, resolve_precision, synchronize  # noqa: E402
from evaluation import evaluate  # noqa: E402
from train_step import NonFiniteLossError  # noqa: E402
from report import plural  # noqa: E402
from train_utils import build_run, train_one_epoch  # noqa: E402

NOISY_SPREAD = 0.10


def time_runs(device, work, repeats):
    """Seconds of each of `repeats` runs of `work()`, the device synchronised around each."""
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        work()
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return seconds


def spread(seconds):
    """(min, median, max) of a list of times."""
    return min(seconds), statistics.median(seconds), max(seconds)


def random_images(count, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return images.to(device), torch.randint(0, 100, (count,), generator=generator).to(device)


def bench_one(name, batch_size, precision, args, device):
    torch.compiler.reset()  # a second configuration must not reuse (or recompile into) the first one's graphs
    runtime = Runtime(device)
    started = time.perf_counter()
    torch.manual_seed(0)
    dtype = input_dtype(resolve_precision(device, precision))
    config = bench_config(name, batch_size, precision, steps_per_epoch=args.train_images // batch_size, args=args)
    loader = TrainLoader(*random_images(args.train_images, device), batch_size, dtype=dtype,
                         augmentation=config.augmentation)
    test_loader = EvalLoader(*random_images(args.test_images, device, seed=1), args.test_batch_size, dtype=dtype)
    run = build_run(config, runtime, (loader, None, test_loader))
    synchronize(device)
    setup_seconds = time.perf_counter() - started

    def epoch():  # consecutive epochs, as train.py runs them: on CUDA each one's augmentation overlaps the last
        train_one_epoch(run, show_progress=False)
        run.state.epoch += 1

    fixed_images, fixed_labels = next(loader.batches(1))
    fixed_images = fixed_images.clone()

    def bare_steps():
        for _ in range(args.steps):
            run.train_step(fixed_images, fixed_labels)

    plan = plan_epoch(len(loader.images), loader.steps_per_epoch, 0, 0, augmentation=loader.augmentation,
                      batch_size=batch_size).to(device)
    (first_epoch_seconds,) = time_runs(device, epoch, 1)
    epoch_seconds = time_runs(device, epoch, args.repeats)
    step_seconds = time_runs(device, bare_steps, args.repeats)
    augment_seconds = time_runs(device, lambda: loader.augment_epoch(plan), args.repeats)
    test_seconds = time_runs(device, lambda: evaluate(run.evaluated_model, test_loader, runtime, run.precision),
                             args.repeats)  # train.py's evaluation: the plain module, never the compiled one
    epoch_images = loader.steps_per_epoch * batch_size
    return {"model": name, "precision": run.precision, "batch": batch_size,
            "step": run.train_step.kind + (f", SAM {args.sam}" if args.sam else ""),
            "augmentation": args.auto_augment or "crop, flip, rotate, jitter",
            "setup_s": setup_seconds, "first_epoch_s": first_epoch_seconds,
            "first_step_s": run.train_step.first_step_seconds, "capture_s": run.train_step.capture_seconds,
            "epoch_s": spread(epoch_seconds), "epoch_img_s": epoch_images / statistics.median(epoch_seconds),
            "step_img_s": args.steps * batch_size / statistics.median(step_seconds),
            "augment_img_s": epoch_images / statistics.median(augment_seconds), "test_s": spread(test_seconds),
            "noisy": any(noisy(times) for times in (epoch_seconds, step_seconds, test_seconds))}


def bench_config(name, batch_size, precision, steps_per_epoch, args):
    """train.py's settings for this model and batch, with a schedule long enough for every timed step."""
    epochs = args.repeats + 2 + math.ceil(args.repeats * args.steps / steps_per_epoch)
    flags = ["--model", name, "--batch-size", str(batch_size), "--precision", precision, "--epochs", str(epochs),
             "--test-batch-size", str(args.test_batch_size)]
    flags += ["--compile"] * args.compile + ["--no-cuda-graphs"] * args.no_cuda_graphs
    flags += ["--auto-augment", args.auto_augment] if args.auto_augment else []
    flags += ["--sam", str(args.sam)] if args.sam else []
    return Config.from_flags(parse_train_flags(flags)[0])


def noisy(seconds):
    low, median, high = spread(seconds)
    return (high - low) > NOISY_SPREAD * median


HEADER = ("| model | precision | batch | step | augmentation | set-up s | first epoch s | first step s | capture s | "
          "epoch s min / median / max | epoch img/s | step img/s (ceiling) | epoch/ceiling | augmentation img/s | "
          "test pass s min / median / max |")


def format_row(row):
    epoch, test = row["epoch_s"], row["test_s"]
    capture = f"{row['capture_s']:.2f}" if row["step"].startswith("CUDA graph") else "-"  # nothing was captured
    return (f"| {row['model']} | {row['precision']} | {row['batch']} | {row['step']} | {row['augmentation']} | "
            f"{row['setup_s']:.1f} | "
            f"{row['first_epoch_s']:.2f} | {row['first_step_s']:.2f} | {capture} | "
            f"{epoch[0]:.3f} / {epoch[1]:.3f} / {epoch[2]:.3f} | "
            f"{row['epoch_img_s']:,.0f} | {row['step_img_s']:,.0f} | {row['epoch_img_s'] / row['step_img_s']:.2f} | "
            f"{row['augment_img_s']:,.0f} | {test[0]:.3f} / {test[1]:.3f} / {test[2]:.3f} |"
            + (" spread > 10 %: busy machine?" if row["noisy"] else ""))


def time_start_up(train_flags, repeats):
    """(min, median, max) seconds of each part of train.py's start-up, timed from outside over `repeats` runs."""
    imports, first_steps = [], []
    for _ in range(repeats):
        spawned = time.time()
        subprocess.run([sys.executable, "-c", "import train, train_utils"], cwd=REPO, check=True)
        imports.append(time.time() - spawned)
        with tempfile.TemporaryDirectory() as folder:
            spawned = time.time()
            result = subprocess.run([sys.executable, "train.py", *train_flags, "--epochs", "1", "--checkpoint-dir",
                                     folder], cwd=REPO, capture_output=True, text=True)
        ended = re.search(r"first step done at Unix time ([\d.]+)", result.stdout)
        if result.returncode or not ended:
            raise StartUpError((result.stderr.strip().splitlines() or ["no first step"])[-1].removeprefix("error: "))
        first_steps.append(float(ended.group(1)) - spawned)
    return {"python with the modules train.py loads (torch among them)": spread(imports),
            "spawn to the end of the first training step": spread(first_steps)}


class StartUpError(RuntimeError):
    """The timed train.py run failed; its last line of errors says why."""


def show_start_up(train_flags, repeats):
    parts = time_start_up(train_flags, repeats)
    print(f"train.py's start-up, {repeats} runs: python train.py {' '.join(train_flags)} --epochs 1\n\n"
          f"| part | seconds min / median / max |\n|---|---|")
    for part, (low, median, high) in parts.items():
        print(f"| {part} | {low:.2f} / {median:.2f} / {high:.2f} |")


def main(argv=None):
    args = parse_args(argv)
    if args.startup:
        try:
            show_start_up(args.train_flags, args.repeats)
        except StartUpError as err:
            print(f"error: train.py failed: {err}", file=sys.stderr)
            return 1
        return 0
    try:
        run_benchmarks(args, get_device(args.device))
    except (DeviceError, NonFiniteLossError) as err:  # NonFiniteLossError: a --sam or batch too large to train
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def run_benchmarks(args, device):
    """Print the table's header, then a row for each model, precision and batch size as it is measured."""
    torch.backends.cudnn.benchmark = True
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{device.type}, {plural(torch.get_num_threads(), 'thread')}"
    print(f"{device_name}, torch {torch.__version__}{', compiled' if args.compile else ''}; "
          f"{args.train_images:,}-image epochs, {args.test_images:,}-image test pass, {args.repeats} timed runs each\n")
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1), flush=True)
    rows = []
    for name in args.models:
        for precision in args.precisions:
            for batch_size in args.batch_sizes:
                rows.append(bench_one(name, batch_size, precision, args=args, device=device))
                print(format_row(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
