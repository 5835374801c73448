"""Throughput benchmark: the bare training step, whole training epochs, the test pass, augmentation alone.

    python bench.py                                   # GPU: ResNet18 and WRN-28-10, batch 128 and 512, full size
    python bench.py --device cpu --models resnet18 --batch-sizes 32 --train-images 256 --test-images 256

Every figure is the median of --repeats timed runs after a warm-up, on random uint8 data
held on the device (never zeros, which can run faster than real data). The epoch runs
the same TrainLoader and train_one_epoch that train.py uses.
"""
import argparse
import statistics
import time

import torch

from dataset_utils import EvalLoader, TrainLoader
from device_utils import Runtime, get_device, resolve_precision, synchronize
from model import build_model
from train_utils import evaluate, make_criterion, make_optimizer, make_scheduler, train_one_epoch, train_step

MODEL_KWARGS = {"resnet18": {}, "wideresnet": {"depth": 28, "widen_factor": 10}}


def timed(device, work, repeats):
    """Median seconds of `work()` over `repeats` runs, after one untimed warm-up run."""
    work()
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        work()
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def random_images(count, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return images.to(device), torch.randint(0, 100, (count,), generator=generator).to(device)


def bench_one(name, batch_size, precision, args, device):
    runtime = Runtime(device)
    torch.manual_seed(0)
    model = build_model(name, **MODEL_KWARGS[name]).to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, lr=0.01, nesterov=True)
    loader = TrainLoader(*random_images(args.train_images, device), batch_size)
    scheduler = make_scheduler(optimizer, 0.01, (args.repeats + 2) * (loader.steps_per_epoch + args.steps))
    training_model = torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None) \
        if args.compile else model
    criterion = make_criterion(0.1)
    step_images = torch.randn(batch_size, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    step_labels = torch.randint(0, 100, (batch_size,), device=device)

    def bare_steps():
        for _ in range(args.steps):
            train_step(training_model, step_images, step_labels, optimizer, scheduler, criterion, device, precision)

    def epoch():
        train_one_epoch(training_model, loader, optimizer, scheduler, criterion, 0, runtime, precision,
                        show_progress=False)

    def augmentation():
        for images, _ in loader.batches(0):
            pass

    test_loader = EvalLoader(*random_images(args.test_images, device, seed=1), batch_size=args.test_batch_size)
    step_per_sec = args.steps * batch_size / timed(device, bare_steps, args.repeats)
    epoch_per_sec = loader.steps_per_epoch * batch_size / timed(device, epoch, args.repeats)
    augment_per_sec = loader.steps_per_epoch * batch_size / timed(device, augmentation, args.repeats)
    test_seconds = timed(device, lambda: evaluate(model, test_loader, runtime, precision), args.repeats)
    return {"model": name, "precision": precision, "batch": batch_size, "step_img_s": step_per_sec,
            "epoch_img_s": epoch_per_sec, "epoch_s": args.train_images / epoch_per_sec,
            "ratio": epoch_per_sec / step_per_sec, "augment_img_s": augment_per_sec, "test_s": test_seconds}


def format_table(rows, train_images, test_images):
    lines = [f"| model | precision | batch | step img/s (ceiling) | epoch img/s | s per {train_images:,}-image "
             f"epoch | epoch/ceiling | augmentation img/s | s per {test_images:,}-image test pass |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['precision']} | {row['batch']} | {row['step_img_s']:,.0f} | "
                     f"{row['epoch_img_s']:,.0f} | {row['epoch_s']:.2f} | {row['ratio']:.2f} | "
                     f"{row['augment_img_s']:,.0f} | {row['test_s']:.3f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", default="resnet18,wideresnet", help="comma-separated")
    parser.add_argument("--batch-sizes", default="128,512", help="comma-separated")
    parser.add_argument("--precisions", default="auto", help="comma-separated: auto, bf16, fp32")
    parser.add_argument("--train-images", type=int, default=50_000)
    parser.add_argument("--test-images", type=int, default=10_000)
    parser.add_argument("--test-batch-size", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50, help="bare training steps per timed run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = get_device(args.device)
    torch.backends.cudnn.benchmark = True
    rows = []
    for name in args.models.split(","):
        for precision in args.precisions.split(","):
            for batch_size in map(int, args.batch_sizes.split(",")):
                rows.append(bench_one(name, batch_size, resolve_precision(device, precision), args, device))
                print(format_table(rows[-1:], args.train_images, args.test_images).splitlines()[-1], flush=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type}, " \
        f"{torch.get_num_threads()} threads"
    print(f"\n{device_name}, torch {torch.__version__}{', compiled' if args.compile else ''}; "
          f"medians of {args.repeats} runs\n")
    print(format_table(rows, args.train_images, args.test_images))
    return rows


if __name__ == "__main__":
    main()
