"""Fault injection on real training processes: kills, signals, and exact resume afterwards."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, assert_same_weights, load_weights, run_train, tiny_run_args, write_cifar100
from checkpoint_file import load_checkpoint

EPOCHS = 4


# Every augmentation, SAM and the weight average together: the most state a resume has to bring back.
STRONGEST_RECIPE = ("--auto-augment", "ta_wide", "--sam", 0.05, "--ema", 0.999, "--cutmix", 1.0, "--cutmix-prob", 0.5)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """256 training images: 16 steps an epoch."""
    return write_cifar100(tmp_path_factory.mktemp("faults") / "data", train_size=256)


def uninterrupted(data_dir, folder, *recipe):
    result = run_train(*tiny_run_args(data_dir, folder, "--epochs", EPOCHS, *recipe))
    assert result.returncode == 0, result.stderr
    return load_weights(folder / "last.pt")


@pytest.fixture(scope="module")
def run_setup(data_dir):
    """The data and the uninterrupted run every faulty run must match."""
    return data_dir, uninterrupted(data_dir, data_dir.parent / "reference")


@pytest.fixture(scope="module")
def strongest_setup(data_dir):
    return data_dir, uninterrupted(data_dir, data_dir.parent / "strongest", *STRONGEST_RECIPE)


def start_train(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoints(process, path, count, timeout=120):
    """Wait until `path` has been (re)written `count` times or the process ended; True if it did."""
    seen, last_mtime, deadline = 0, None, time.monotonic() + timeout
    while seen < count and process.poll() is None and time.monotonic() < deadline:
        mtime = path.stat().st_mtime_ns if path.exists() else None
        if mtime is not None and mtime != last_mtime:
            seen, last_mtime = seen + 1, mtime
        time.sleep(0.002)
    return seen >= count


def finish_by_resuming(cifar_dir, checkpoint_dir, *recipe):
    """Resume (or start, if nothing was saved yet) until the run completes."""
    resume = ["--resume"] if (checkpoint_dir / "last.pt").exists() else list(recipe)
    result = run_train(*tiny_run_args(cifar_dir, checkpoint_dir, "--epochs", EPOCHS, *resume))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("trial", range(4))
def test_sigkill_at_a_random_point_then_resume_matches_an_uninterrupted_run(request, tmp_path, trial):
    recipe = STRONGEST_RECIPE if trial == 3 else ()
    cifar_dir, reference = request.getfixturevalue("strongest_setup" if recipe else "run_setup")
    chance = random.Random(1000 + trial)
    checkpoint_dir = tmp_path / "ckpt"
    process = start_train(*tiny_run_args(cifar_dir, checkpoint_dir, "--epochs", EPOCHS, *recipe))
    wait_for_checkpoints(process, checkpoint_dir / "last.pt", chance.randint(0, 2))
    time.sleep(chance.uniform(0, 0.3))
    process.kill()
    process.communicate()
    if (checkpoint_dir / "last.pt").exists():
        load_checkpoint(checkpoint_dir / "last.pt")  # whatever instant the kill hit, the checkpoint is whole
    finish_by_resuming(cifar_dir, checkpoint_dir, *recipe)
    assert_same_weights(reference, load_weights(checkpoint_dir / "last.pt"))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_saves_a_resumable_checkpoint_and_says_how_to_resume(run_setup, tmp_path, signum):
    cifar_dir, reference = run_setup
    checkpoint_dir = tmp_path / "ckpt"
    process = start_train(*tiny_run_args(cifar_dir, checkpoint_dir, "--epochs", EPOCHS))
    assert wait_for_checkpoints(process, checkpoint_dir / "last.pt", 1), "training ended before the signal"
    time.sleep(0.05)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err
    assert f"python train.py --resume {checkpoint_dir / 'last.pt'}" in err
    load_checkpoint(checkpoint_dir / "last.pt")
    finish_by_resuming(cifar_dir, checkpoint_dir)
    assert_same_weights(reference, load_weights(checkpoint_dir / "last.pt"))


SPARSE_RECORDS = ("--eval-every", 3, "--save-every", 2)  # how often a run looks and writes: never what it trains


@pytest.mark.parametrize("recipe", [(), STRONGEST_RECIPE, SPARSE_RECORDS], ids=["default", "strongest", "sparse"])
def test_an_interrupt_mid_epoch_resumes_at_that_step_exactly(request, tmp_path, train_main, monkeypatch, recipe):
    import train_utils
    cifar_dir, reference = request.getfixturevalue("strongest_setup" if "--sam" in recipe else "run_setup")
    real_criterion, calls = train_utils.make_criterion(), []

    passes = 2 if "--sam" in recipe else 1  # SAM takes the loss twice a step

    def interrupted_at_step_23(logits, labels):  # epoch 2, step 7 of 16
        calls.append(1)
        if len(calls) == 1 + 22 * passes:
            os.kill(os.getpid(), signal.SIGINT)
        return real_criterion(logits, labels)

    monkeypatch.setattr(train_utils, "make_criterion", lambda label_smoothing: interrupted_at_step_23)
    checkpoint_dir = tmp_path / "ckpt"
    assert train_main(tiny_run_args(cifar_dir, checkpoint_dir, "--epochs", EPOCHS, *recipe)) == 130
    saved = load_checkpoint(checkpoint_dir / "last.pt")
    assert (saved["epoch"], saved["step"]) == (1, 7) and saved["epoch_totals"]["images"] == 7 * 16
    monkeypatch.undo()
    assert train_main(tiny_run_args(cifar_dir, checkpoint_dir, "--resume")) == 0
    # In-process and subprocess runs use the same two threads, so the weights agree to the bit.
    assert_same_weights(reference, load_weights(checkpoint_dir / "last.pt"))
    assert len(load_checkpoint(checkpoint_dir / "last.pt")["history"]) == EPOCHS


def test_a_second_ctrl_c_quits_at_once_and_leaves_the_checkpoint_whole(run_setup, tmp_path):
    cifar_dir, _ = run_setup
    checkpoint_dir = tmp_path / "ckpt"
    process = start_train(*tiny_run_args(cifar_dir, checkpoint_dir, "--epochs", 50))
    assert wait_for_checkpoints(process, checkpoint_dir / "last.pt", 1)
    process.send_signal(signal.SIGINT)
    time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=60)
    assert process.returncode == 130
    load_checkpoint(checkpoint_dir / "last.pt")
    assert finish_after_stale_temp(cifar_dir, checkpoint_dir)


def finish_after_stale_temp(cifar_dir, checkpoint_dir):
    """A run killed mid-write may leave a temporary file; resuming cleans it up and carries on."""
    (checkpoint_dir / ".last.pt.tmp99999").write_bytes(b"half a checkpoint")
    result = run_train(*tiny_run_args(cifar_dir, checkpoint_dir, "--resume", "--epochs", 3))
    return result.returncode == 0 and not list(checkpoint_dir.glob(".*.tmp*"))


def test_a_kill_while_a_background_checkpoint_write_is_in_flight_then_resume_matches(run_setup, tmp_path):
    cifar_dir, reference = run_setup
    checkpoint_dir = tmp_path / "ckpt"
    process = start_train(*tiny_run_args(cifar_dir, checkpoint_dir, "--epochs", EPOCHS))
    deadline = time.monotonic() + 120
    # The writer thread writes each file to a temporary name first: seeing one means a write is in flight.
    while not (checkpoint_dir.is_dir() and any(".tmp" in p.name and p.name != ".write-test"
                                                for p in checkpoint_dir.iterdir())):
        assert process.poll() is None and time.monotonic() < deadline, "no background write was caught in flight"
    process.kill()
    process.communicate()
    if (checkpoint_dir / "last.pt").exists():
        load_checkpoint(checkpoint_dir / "last.pt")
    finish_by_resuming(cifar_dir, checkpoint_dir)
    assert_same_weights(reference, load_weights(checkpoint_dir / "last.pt"))
