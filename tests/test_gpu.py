"""Checks of the CUDA path, run on a GPU machine and skipped elsewhere.

The rest of the suite hides the GPUs (conftest.py), so each check here runs in a subprocess
that sees them; the in-process checks live in gpu_checks.py (`python tests/gpu_checks.py CHECK`).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import GPU_ENV

REPO = Path(__file__).resolve().parent.parent


def gpu_env():
    return {**GPU_ENV, "PYTHONUNBUFFERED": "1"}


def cuda_available():
    if os.environ.get("CI"):
        return False
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True, env=gpu_env())
    return probe.stdout.strip() == "True"


pytestmark = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU")


def run_check(name):
    result = subprocess.run([sys.executable, str(REPO / "tests" / "gpu_checks.py"), name], capture_output=True, text=True, env=gpu_env(),
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def run_train_on_gpu(*args, nproc=None):
    command = [sys.executable, str(REPO / "train.py"), *map(str, args)]
    if nproc:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   *command[1:]]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=gpu_env(), timeout=300)


# ---- the tests ----


def test_graph_replays_match_eager_steps():
    run_check("check_graph_replays_match_eager_steps")


def test_an_epoch_prepared_on_a_side_stream_matches_one_made_on_demand():
    run_check("check_an_epoch_prepared_on_a_side_stream_matches_one_made_on_demand")


def test_a_refused_capture_falls_back_to_eager_with_one_note():
    result = run_check("check_a_refused_capture_falls_back_to_eager")
    notes = [line for line in result.stderr.splitlines() if "CUDA graph capture failed" in line]
    assert len(notes) == 1 and "training eagerly instead" in notes[0]


@pytest.fixture
def gpu_data(tmp_path):
    from conftest import write_cifar100
    return write_cifar100(tmp_path / "data", train_size=512, test_size=64)


def test_a_short_real_run_on_the_gpu_writes_checkpoints_that_resume(gpu_data, tmp_path):
    from conftest import TINY_MODEL
    from run_dir import load_checkpoint
    settings = [*TINY_MODEL, "--data-dir", gpu_data, "--no-download", "--batch-size", 32, "--device", "cuda"]
    common = [*settings, "--checkpoint-dir", tmp_path / "ckpt"]
    mixed = run_train_on_gpu(*settings, "--checkpoint-dir", tmp_path / "mixed", "--epochs", 1, "--mixup", 0.2,
                             "--cutmix", 1.0)  # soft targets through the bf16 graphed step
    assert mixed.returncode == 0 and "CUDA graph step" in mixed.stdout, mixed.stderr
    first = run_train_on_gpu(*common, "--epochs", 3, "--target-accuracy", 0.01, "--patience", 1)
    assert first.returncode == 0, first.stderr
    assert "CUDA graph step" in first.stdout and "the CUDA graph capture) not counted" in first.stdout
    assert load_checkpoint(tmp_path / "ckpt" / "last.pt")["epoch"] == 1
    second = run_train_on_gpu(*common, "--resume", "--target-accuracy", 1.0)
    assert second.returncode == 0, second.stderr
    resumed = load_checkpoint(tmp_path / "ckpt" / "last.pt")
    assert resumed["epoch"] == 3 and [row["epoch"] for row in resumed["history"]] == [1, 2, 3]
    assert resumed["history"][-1]["train_loss"] < resumed["history"][0]["train_loss"]


def test_torchrun_with_more_processes_than_gpus_is_one_line(gpu_data, tmp_path):
    from conftest import TINY_MODEL
    too_many = int(subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                                  capture_output=True, text=True, env=gpu_env()).stdout) + 1
    result = run_train_on_gpu(*TINY_MODEL, "--data-dir", gpu_data, "--no-download", "--checkpoint-dir",
                              tmp_path / "ckpt", "--device", "cuda", nproc=too_many)
    assert result.returncode != 0
    assert f"error: {too_many} processes per node but only {too_many - 1} GPU(s)" in result.stderr
    assert "CUDA error" not in result.stderr and "invalid device ordinal" not in result.stderr
    assert not (tmp_path / "ckpt").exists()

