"""A real 2-process torchrun run on the CPU (gloo), compared with one process on the same global batch."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, load_weights, run_train, tiny_run_args, write_cifar100
from model import build_model
from checkpoint_file import load_checkpoint


# The last --batch-size wins: 32 per process. The weight average (--ema) is what is evaluated and saved.
SETTINGS = ("--epochs", 2, "--lr", 0.05, "--ema", 0.5, "--batch-size", 64)


def torchrun(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "train.py"), *map(str, args)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    cifar_dir = write_cifar100(root / "data", train_size=256)
    single = run_train(*tiny_run_args(cifar_dir, root / "single", *SETTINGS))
    double = torchrun(*tiny_run_args(cifar_dir, root / "double", *SETTINGS))
    assert single.returncode == 0, single.stderr
    assert double.returncode == 0, double.stderr
    return cifar_dir, root, single, double


def distance(first, second):
    keys = [k for k in first if first[k].is_floating_point() and "running" not in k]
    return sum((first[k] - second[k]).float().norm() ** 2 for k in keys).sqrt().item()


def test_two_processes_match_one_process_on_the_same_global_batch(runs):
    _, root, _, _ = runs
    torch.manual_seed(0)  # train.py's --seed 0 draws the initial weights the same way
    initial = build_model("wideresnet", depth=10, widen_factor=1).state_dict()
    single, double = load_weights(root / "single" / "last.pt"), load_weights(root / "double" / "last.pt")
    # BatchNorm normalises over each process's half batch, so the runs agree closely but not to the bit:
    # measured 8-9 % of the distance training moved the weights; a run that trained each half batch on its
    # own (no gradient averaging) lands 200 % away.
    assert distance(single, double) < 0.25 * distance(single, initial)
    single, double = load_checkpoint(root / "single" / "last.pt"), load_checkpoint(root / "double" / "last.pt")
    assert single["optimizer"]["param_groups"][0]["lr"] == double["optimizer"]["param_groups"][0]["lr"]
    assert [row["images"] for row in double["history"]] == [256, 256]  # both processes' images, counted once


def test_only_rank_zero_prints_and_writes_one_set_of_checkpoints(runs):
    _, root, _, double = runs
    assert sorted(p.name for p in (root / "double").iterdir()) == [".lock", "best.pt", "config.json", "last.pt",
                                                                    "metrics.csv"]
    assert sum(line.startswith("epoch ") for line in double.stdout.splitlines()) == 2
    assert "cpu x2" in double.stdout


def test_checkpoints_carry_no_module_prefix_and_load_in_one_process(runs):
    _, root, _, _ = runs
    weights = load_weights(root / "double" / "best.pt")
    assert not any(key.startswith(("module.", "_orig_mod.")) for key in weights)
    from train_utils import load_model
    assert load_model(root / "double" / "best.pt")(torch.zeros(1, 3, 32, 32)).shape == (1, 100)


def test_resume_under_torchrun_continues_exactly(runs):
    cifar_dir, root, _, _ = runs
    split = root / "split"
    first = torchrun(*tiny_run_args(cifar_dir, split, *SETTINGS, "--target-accuracy", 0.01, "--patience", 1))
    assert first.returncode == 0, first.stderr
    assert load_checkpoint(split / "last.pt")["epoch"] == 1
    second = torchrun(*tiny_run_args(cifar_dir, split, *SETTINGS, "--resume", "--target-accuracy", 1.0))
    assert second.returncode == 0, second.stderr
    straight, resumed = load_checkpoint(root / "double" / "last.pt"), load_checkpoint(split / "last.pt")
    for part in ("model", "ema"):
        assert all(torch.equal(straight[part][key], resumed[part][key]) for key in straight[part]), part
    measured = ("train_loss", "test_loss", "test_top1", "test_top5")  # evaluation too: the ranks evaluate one average
    assert [[row[key] for key in measured] for row in straight["history"]] == \
        [[row[key] for key in measured] for row in resumed["history"]]


def test_under_torchrun_every_rank_evaluates_the_average_that_is_saved(runs):
    from dataset_utils import EvalLoader, read_cifar100
    from device_utils import Runtime
    from evaluation import evaluate
    from train_utils import load_model
    cifar_dir, root, _, _ = runs
    test = read_cifar100(cifar_dir, download=False)
    result = evaluate(load_model(root / "double" / "last.pt"), EvalLoader(test.test_images, test.test_labels),
                      Runtime(torch.device("cpu")), "fp32")
    recorded = load_checkpoint(root / "double" / "last.pt")["history"][-1]
    assert recorded["test_loss"] == pytest.approx(result.loss, abs=2e-5)
    assert recorded["test_top1"] == pytest.approx(result.top1, abs=1e-5)


def test_a_one_image_validation_split_and_the_largest_seed_work_under_torchrun(runs, tmp_path):
    cifar_dir, _, _, _ = runs
    folder = tmp_path / "ckpt"
    result = torchrun(*tiny_run_args(cifar_dir, folder, "--epochs", 1, "--batch-size", 64, "--val-size", 1,
                                     "--seed", 2**32 - 1))  # rank 1 holds no validation image; its seed wraps
    assert result.returncode == 0, result.stderr
    (row,) = load_checkpoint(folder / "last.pt")["history"]
    assert row["val_top1"] in (0.0, 1.0) and "test_top1" not in row  # judged on the one image, not the test set


def training_under_torchrun(cifar_dir, folder, **popen_kwargs):
    """A long 2-process torchrun run, returned once its first checkpoint is on disk."""
    import time
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 str(REPO / "train.py"), *map(str, tiny_run_args(cifar_dir, folder, "--epochs", 1000,
                                                                                 "--batch-size", 64))],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                **popen_kwargs)
    deadline = time.monotonic() + 120
    while not (folder / "last.pt").exists():
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    return launcher


def test_a_signal_that_reaches_one_rank_stops_every_rank_with_a_checkpoint(runs, tmp_path):
    import signal

    from test_run_dir import running, worker_pids
    cifar_dir, _, _, _ = runs
    folder = tmp_path / "ckpt"
    launcher = training_under_torchrun(cifar_dir, folder)
    workers = worker_pids(launcher.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGTERM)  # one worker only, as a batch system or a user's kill might
    out, err = launcher.communicate(timeout=120)
    assert not any(running(pid) for pid in workers)
    assert "TypeError" not in err and err.count("checkpoint saved. Resume with:") == 1
    assert err.count("exitcode  : 143") == 2  # both ranks stopped as on SIGTERM
    saved = load_checkpoint(folder / "last.pt")
    assert saved["epoch"] >= 1


def test_ctrl_c_on_torchrun_saves_once_says_so_once_and_hints_the_torchrun_command(runs, tmp_path):
    import signal
    cifar_dir, _, _, _ = runs
    folder = tmp_path / "ckpt"
    launcher = training_under_torchrun(cifar_dir, folder, start_new_session=True)
    os.killpg(launcher.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the launcher and its workers
    _, err = launcher.communicate(timeout=120)
    assert err.count("SIGINT: saving a checkpoint after this step") == 1  # rank 0 says it for every rank
    assert f"torchrun --standalone --nproc_per_node=2 train.py --resume {folder / 'last.pt'}" in err
    saved = load_checkpoint(folder / "last.pt")
    assert saved["epoch"] >= 1
