"""Checks of the CUDA path, run on a GPU machine and skipped elsewhere.

The rest of the suite hides the GPUs (conftest.py), so each check here runs in a subprocess
that sees them; the in-process checks live in gpu_checks.py (`python tests/gpu_checks.py CHECK`).
"""
import math
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


def run_check(name, *args):
    result = subprocess.run([sys.executable, str(REPO / "tests" / "gpu_checks.py"), name, *args], capture_output=True,
                            text=True, env=gpu_env(), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def run_train_on_gpu(*args, nproc=None):
    command = [sys.executable, str(REPO / "train.py"), *map(str, args)]
    if nproc:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   *command[1:]]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=gpu_env(), timeout=300)


# ---- the tests ----


@pytest.mark.parametrize("rho", [[], ["0.05"]], ids=["plain", "sam"])
def test_graph_replays_match_eager_steps(rho):
    run_check("check_graph_replays_match_eager_steps", *rho)


def test_fp16_steps_with_loss_scaling_match_fp32_and_skip_an_overflow_inside_the_graph():
    run_check("check_fp16_steps_match_fp32_eager_steps")


def test_an_epoch_prepared_on_a_side_stream_matches_one_made_on_demand():
    run_check("check_an_epoch_prepared_on_a_side_stream_matches_one_made_on_demand")


def test_a_refused_capture_falls_back_to_eager_with_one_note_and_leaves_no_trace():
    result = run_check("check_a_refused_capture_leaves_the_process_as_an_eager_run")
    notes = [line for line in result.stderr.splitlines() if "CUDA graph capture failed" in line]
    assert len(notes) == 1 and "training eagerly instead" in notes[0]


def test_a_step_that_waits_for_the_host_is_never_captured_and_says_so_once():
    result = run_check("check_a_step_that_waits_for_the_host_is_never_captured")
    notes = [line for line in result.stderr.splitlines() if "training eagerly instead" in line]
    assert len(notes) == 1 and "the step waits for the host" in notes[0]
    assert "synchronizing CUDA operation" in notes[0]


def test_preparing_an_epoch_never_waits_for_the_host():
    run_check("check_preparing_an_epoch_never_waits_for_the_host")


def test_the_captured_lr_follows_the_schedule():
    run_check("check_the_captured_lr_follows_the_schedule")


def test_eager_steps_beside_the_next_epochs_preparation_train_as_on_demand():
    run_check("check_eager_steps_beside_the_next_epochs_preparation_train_as_on_demand")


@pytest.fixture
def gpu_data(tmp_path):
    from conftest import write_cifar100
    return write_cifar100(tmp_path / "data", train_size=512, test_size=64)


def gpu_count():
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           capture_output=True, text=True, env=gpu_env())
    return int(probe.stdout)


def tiny_gpu_run(data, folder, *flags, device="cuda"):
    """A tiny run of train.py on the GPU that must succeed, capture no failed graph, and say which step it used."""
    from conftest import TINY_MODEL
    result = run_train_on_gpu(*TINY_MODEL, "--data-dir", data, "--no-download", "--batch-size", 32, "--device", device,
                              "--checkpoint-dir", folder, *flags)
    assert result.returncode == 0, result.stderr
    assert "training eagerly instead" not in result.stderr, result.stderr  # no graph refused or given up
    return result


def step_used(result):
    return result.stdout.split("training step: ", 1)[1].splitlines()[0]


def test_a_short_real_run_on_the_gpu_writes_checkpoints_that_resume(gpu_data, tmp_path):
    from checkpoint_file import load_checkpoint
    mixed = tiny_gpu_run(gpu_data, tmp_path / "mixed", "--epochs", 1, "--mixup", 0.2, "--cutmix", 1.0)
    assert step_used(mixed) == "CUDA graph"  # soft targets through the bf16 graphed step
    first = tiny_gpu_run(gpu_data, tmp_path / "ckpt", "--epochs", 3, "--target-accuracy", 0.01, "--patience", 1)
    assert "CUDA graph step" in first.stdout and step_used(first) == "CUDA graph"
    assert load_checkpoint(tmp_path / "ckpt" / "last.pt")["epoch"] == 1
    second = tiny_gpu_run(gpu_data, tmp_path / "ckpt", "--resume", "--target-accuracy", 1.0)
    resumed = load_checkpoint(tmp_path / "ckpt" / "last.pt")
    assert resumed["epoch"] == 3 and [row["epoch"] for row in resumed["history"]] == [1, 2, 3]
    assert resumed["history"][-1]["train_loss"] < resumed["history"][0]["train_loss"]
    assert step_used(second) == "CUDA graph"


@pytest.mark.parametrize("flags, step", [
    (["--compile", "--epochs", 2], "CUDA graph"),  # inductor's kernels inside the captured graph
    (["--no-cuda-graphs", "--epochs", 3], "eager"),  # eager steps beside the next epoch's preparation
    (["--min-momentum", 0.85, "--epochs", 2], "eager"),  # a cycled momentum: eager on CUDA
    (["--batch-size", 256, "--epochs", 4], "CUDA graph"),  # 2 steps an epoch: captured in epoch 2
    (["--auto-augment", "ra", "--sam", 0.05, "--asam", "--ema", 0.99, "--cutmix", 1, "--epochs", 3], "CUDA graph"),
    # two lr tensors in the graphed fused step, and six bf16 views an evaluation
    (["--bn-bias-lr-scale", 8, "--flip", "alternate", "--tta-crops", "--epochs", 2], "CUDA graph"),
    (["--precision", "fp16", "--sam", 0.05, "--epochs", 3], "CUDA graph"),  # both passes scaled, skipped on the GPU
], ids=["compile", "no-cuda-graphs", "min-momentum", "2-step-epochs", "strongest-recipe", "airbench-tricks",
        "fp16-sam"])
def test_each_cuda_path_trains_with_the_step_it_says(gpu_data, tmp_path, flags, step):
    from checkpoint_file import load_checkpoint
    result = tiny_gpu_run(gpu_data, tmp_path / "ckpt", *flags)
    assert step_used(result) == step
    history = load_checkpoint(tmp_path / "ckpt" / "last.pt")["history"]
    assert len(history) == flags[-1] and all(math.isfinite(row["train_loss"]) for row in history)
    if "--cutmix" not in flags:  # mixed targets keep the training loss high on so short a run
        assert history[-1]["train_loss"] < history[0]["train_loss"]


@pytest.mark.skipif(not cuda_available() or gpu_count() < 2, reason="needs two GPUs")
def test_a_run_on_the_second_gpu_captures_and_trains_there(gpu_data, tmp_path):
    from checkpoint_file import load_checkpoint
    result = tiny_gpu_run(gpu_data, tmp_path / "ckpt", "--epochs", 2, device="cuda:1")
    assert "on cuda:1 x1" in result.stdout and step_used(result) == "CUDA graph"
    history = load_checkpoint(tmp_path / "ckpt" / "last.pt")["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_torchrun_with_more_processes_than_gpus_is_one_line(gpu_data, tmp_path):
    from conftest import TINY_MODEL
    too_many = gpu_count() + 1
    result = run_train_on_gpu(*TINY_MODEL, "--data-dir", gpu_data, "--no-download", "--checkpoint-dir",
                              tmp_path / "ckpt", "--device", "cuda", nproc=too_many)
    assert result.returncode != 0
    assert f"error: {too_many} processes per node but only {too_many - 1} GPU(s)" in result.stderr
    assert "CUDA error" not in result.stderr and "invalid device ordinal" not in result.stderr
    assert not (tmp_path / "ckpt").exists()

