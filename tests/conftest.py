"""Shared fixtures: tiny CIFAR-100 folders in the real on-disk pickle layout, and a train.py runner."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# Every test runs on the CPU, also on a GPU machine, so bit-exact and multi-process checks hold there too.
# tests/test_gpu.py runs its checks in subprocesses that see the GPUs again (GPU_ENV).
GPU_ENV = dict(os.environ)
os.environ["CUDA_VISIBLE_DEVICES"] = ""

REPO = Path(__file__).resolve().parent.parent
LEARNABLE_CLASSES = 10  # a colour per class: learnable in a few steps, labels still in 0..99
TINY_MODEL = ["--model", "wideresnet", "--depth", "10", "--widen-factor", "1"]


def make_images(labels, rng):
    """3x32x32 uint8 images whose colour says their class, plus noise: learnable despite augmentation."""
    hues = rng.uniform(30, 225, size=(LEARNABLE_CLASSES, 3))
    images = hues[labels][:, :, None, None] + rng.normal(0, 25, size=(len(labels), 3, 32, 32))
    return np.clip(images, 0, 255).astype(np.uint8)


def write_split(path, labels, rng):
    images = make_images(np.asarray(labels), rng)
    entry = {"batch_label": path.name, "filenames": [f"{i}.png" for i in range(len(labels))],
             "fine_labels": list(map(int, labels)), "coarse_labels": [int(x) // 5 for x in labels],
             "data": images.reshape(len(labels), -1)}
    with open(path, "wb") as handle:
        pickle.dump(entry, handle)


def write_cifar100(root, train_size=64, test_size=32, seed=0):
    """Write root/cifar-100-python/{train,test,meta} as the official archive lays them out."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # Same class colours in both splits: the generator is re-seeded per split.
    write_split(folder / "train", np.arange(train_size) % LEARNABLE_CLASSES, np.random.default_rng(seed))
    write_split(folder / "test", rng.permutation(np.arange(test_size) % LEARNABLE_CLASSES), np.random.default_rng(seed))
    meta = {"fine_label_names": [f"class_{i}" for i in range(100)],
            "coarse_label_names": [f"superclass_{i}" for i in range(20)]}
    with open(folder / "meta", "wb") as handle:
        pickle.dump(meta, handle)
    return Path(root)


@pytest.fixture
def cifar_dir(tmp_path):
    return write_cifar100(tmp_path / "data")


def run_train(*args, cwd=None, timeout=300, **popen_kwargs):
    """Run `python train.py ARGS` in a subprocess; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *map(str, args)], cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout, env=env, **popen_kwargs)


@pytest.fixture
def train_main():
    """train.main called in-process (fast: no interpreter start); restores the signal handlers it installs."""
    import signal

    import train
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield train.main
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def tiny_run_args(cifar_dir, checkpoint_dir, *extra):
    return [*TINY_MODEL, "--data-dir", str(cifar_dir), "--checkpoint-dir", str(checkpoint_dir), "--no-download",
            "--batch-size", "16", *map(str, extra)]


def run_settings(cifar_dir, *flags):
    """The `Config` of `python train.py FLAGS` on the data in `cifar_dir`, on the CPU."""
    from config import Config, parse_args
    return Config.from_flags(parse_args(["--data-dir", str(cifar_dir), "--no-download", "--device", "cpu",
                                         *map(str, flags)])[0])


def load_weights(path):
    import torch
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(first, second):
    import torch
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
