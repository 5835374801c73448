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


# ---- restarts, several nodes, lost peers ----


def test_a_worker_killed_mid_run_is_one_line_and_torchrun_s_restart_finishes_the_run_exactly(runs, tmp_path):
    """torchrun --max-restarts: the relaunched group goes on from the folder's last.pt by itself, to the weights of
    the run that was never interrupted."""
    import signal
    import time

    from test_run_dir import worker_pids
    cifar_dir, _, _, _ = runs
    settings = ("--epochs", 8, "--batch-size", 64)
    whole = torchrun(*tiny_run_args(cifar_dir, tmp_path / "whole", *settings))
    assert whole.returncode == 0, whole.stderr
    folder = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "--max-restarts=1", str(REPO / "train.py"),
                                 *map(str, tiny_run_args(cifar_dir, folder, *settings))],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (folder / "last.pt").exists():
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(worker_pids(launcher.pid)[1], signal.SIGKILL)
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err
    assert out.count("resumed from") == 1
    (lost,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert lost.startswith("error: another process of the 2 stopped (") and "[127.0.0.1]" in lost and "by peer" in lost
    assert lost.endswith("; torchrun starts the run again from there (restart 1 of 1)") and "holds epoch" in lost
    assert "train.py\", line" not in err  # no traceback of ours
    assert load_checkpoint(folder / "last.pt")["run_id"] == load_checkpoint(folder / "best.pt")["run_id"]
    assert_same_weights(folder / "last.pt", tmp_path / "whole" / "last.pt")


def assert_same_weights(first, second):
    first, second = load_checkpoint(first)["model"], load_checkpoint(second)["model"]
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


def two_nodes(port, node_args, rendezvous="static", timeout=300):
    """Two torchrun launchers on this host standing for two nodes of one process each: `node_args` holds each
    node's train.py arguments. Returns both finished processes, node 0's first."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    meeting = (["--master-addr=127.0.0.1", f"--master-port={port}"] if rendezvous == "static" else
               ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes"])
    launchers = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                                   *meeting, *([f"--node-rank={node}"] if rendezvous == "static" else []),
                                   str(REPO / "train.py"), *map(str, args)],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for node, args in enumerate(node_args)]
    results = [(launcher, *launcher.communicate(timeout=timeout)) for launcher in launchers]
    return [subprocess.CompletedProcess(launcher.args, launcher.returncode, out, err) for launcher, out, err in results]


def free_port():
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_without_a_shared_disk_resume_from_rank_0_s_folder_alone(runs, tmp_path):
    cifar_dir, _, _, _ = runs
    folders = [tmp_path / "node0", tmp_path / "node1"]
    first = two_nodes(free_port(), [tiny_run_args(cifar_dir, folder, "--epochs", 1, "--batch-size", 32)
                                    for folder in folders])
    assert [result.returncode for result in first] == [0, 0], first[0].stderr + first[1].stderr
    assert (folders[0] / "last.pt").exists() and not folders[1].exists()  # rank 0 alone writes
    resumed = two_nodes(free_port(), [tiny_run_args(cifar_dir, folder, "--epochs", 2, "--batch-size", 32, "--resume")
                                      for folder in folders])
    assert [result.returncode for result in resumed] == [0, 0], resumed[0].stderr + resumed[1].stderr
    assert load_checkpoint(folders[0] / "last.pt")["epoch"] == 2 and not folders[1].exists()
    assert "error" not in resumed[1].stderr.lower()


def test_a_node_without_the_data_says_so_once_and_no_node_waits(runs, tmp_path):
    cifar_dir, _, _, _ = runs
    folders = [tmp_path / "node0", tmp_path / "node1"]
    results = two_nodes(free_port(), [tiny_run_args(cifar_dir, folders[0], "--epochs", 1),
                                      tiny_run_args(tmp_path / "no-data", folders[1], "--epochs", 1)], timeout=120)
    assert [result.returncode for result in results] == [1, 1]
    errors = [line for result in results for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: rank 1: CIFAR-100 not found") and \
        str(tmp_path / "no-data") in errors[0]
    assert not folders[0].exists() and not folders[1].exists()


def test_with_a_c10d_rendezvous_the_run_lands_in_rank_0_s_folder_alone(runs, tmp_path):
    cifar_dir, _, _, _ = runs
    folders = [tmp_path / "node0", tmp_path / "node1"]
    results = two_nodes(free_port(), [tiny_run_args(cifar_dir, folder, "--epochs", 1, "--batch-size", 32)
                                      for folder in folders], rendezvous="c10d")
    assert [result.returncode for result in results] == [0, 0], results[0].stderr + results[1].stderr
    assert sorted(folder.exists() for folder in folders) == [False, True]
    (held,) = [folder for folder in folders if folder.exists()]
    assert load_checkpoint(held / "last.pt")["epoch"] == 1


def test_a_process_that_never_joins_is_one_line_after_the_dist_timeout(runs, tmp_path):
    cifar_dir, _, _, _ = runs
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    result = subprocess.run([sys.executable, str(REPO / "train.py"),
                             *map(str, tiny_run_args(cifar_dir, tmp_path / "ckpt", "--dist-timeout", 2))],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("error: the 2 processes did not meet within --dist-timeout 2 s (")
    assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("flags, said", [
    (("--batch-size", 33), "error: batch size 33 does not split evenly over 2 processes"),
    (("--sync-bn",), "train.py: error: --sync-bn needs several processes on CUDA GPUs (torchrun)"),
], ids=["a setting every rank refuses", "a flag error"])
def test_an_error_that_every_rank_meets_is_printed_once(runs, tmp_path, flags, said):
    cifar_dir, _, _, _ = runs
    result = torchrun(*tiny_run_args(cifar_dir, tmp_path / "ckpt", "--epochs", 1, "--device", "cpu", *flags))
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if "error:" in line and "elastic" not in line]
    assert len(ours) == 1 and ours[0].startswith(said), result.stderr
