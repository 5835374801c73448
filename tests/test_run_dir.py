"""The run folder under hostile conditions: kills between writes, damaged checkpoints, closed outputs,
file systems that change under a run, and errors that only torchrun's rank 0 sees."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import run_dir
from conftest import REPO, load_weights, run_train, tiny_run_args, write_cifar100
from checkpoint_file import load_checkpoint
from run_dir import read_metrics
from test_distributed import torchrun


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-epoch run on 256 images, copied by each test that damages it."""
    root = tmp_path_factory.mktemp("run_dir")
    cifar_dir = write_cifar100(root / "data", train_size=256)
    result = run_train(*tiny_run_args(cifar_dir, root / "ckpt", "--epochs", 2))
    assert result.returncode == 0, result.stderr
    return cifar_dir, root / "ckpt"


def copy_of(trained, tmp_path):
    cifar_dir, folder = trained
    shutil.copytree(folder, tmp_path / "ckpt")
    return cifar_dir, tmp_path / "ckpt"


def start_train(*args, **popen_kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    popen_kwargs = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen_kwargs}
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=env, **popen_kwargs)


def wait_for(condition, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended first"
        time.sleep(0.02)


def assert_one_line_error(result_stderr, *fragments):
    lines = result_stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result_stderr
    assert all(fragment in lines[0] for fragment in fragments), lines[0]


# ---- last.pt is the commit point ----

KILL_AT_SECOND_BEST_WRITE = """
import os, signal, sys
sys.path.insert(0, os.getcwd())
import run_dir
real_write, best_writes = run_dir.atomic_write, []

def write_or_die(path, data):
    if path.name == "best.pt":
        best_writes.append(path)
        if len(best_writes) == 2:  # last.pt of this epoch is on disk; best.pt and metrics.csv are not
            os.kill(os.getpid(), signal.SIGKILL)
    real_write(path, data)

run_dir.atomic_write = write_or_die
import train
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_kill_between_the_last_pt_and_best_pt_writes_is_repaired_on_resume(trained, tmp_path):
    cifar_dir, _ = trained
    folder = tmp_path / "ckpt"
    killed = run_python(KILL_AT_SECOND_BEST_WRITE, *tiny_run_args(cifar_dir, folder, "--epochs", 3))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    last = load_checkpoint(folder / "last.pt")
    assert last["history"][-1]["best"] and load_checkpoint(folder / "best.pt")["epoch"] < last["epoch"]
    assert len(read_metrics(folder / "metrics.csv")) < last["epoch"]  # both behind: what a kill there leaves
    resumed = run_train(*tiny_run_args(cifar_dir, folder, "--resume", "--epochs", last["epoch"]))
    assert resumed.returncode == 0, resumed.stderr
    assert f"best.pt brought up to epoch {last['epoch']}" in resumed.stderr
    assert (folder / "best.pt").read_bytes() == (folder / "last.pt").read_bytes()
    assert [int(row["epoch"]) for row in read_metrics(folder / "metrics.csv")] == list(range(1, last["epoch"] + 1))


def run_python(code, *args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


# ---- a folder belongs to one run ----

WAIT_FOR_THE_FIRST_RUN = """
import os, sys, time
sys.path.insert(0, os.getcwd())
import dataset_utils
real_read, first_run = dataset_utils.read_cifar100, int(os.environ["FIRST_RUN"])

def read_once_the_first_run_has_ended(*args, **kwargs):
    while os.path.exists(f"/proc/{first_run}") and open(f"/proc/{first_run}/stat").read().split()[2] != "Z":
        time.sleep(0.05)
    return real_read(*args, **kwargs)

dataset_utils.read_cifar100 = read_once_the_first_run_has_ended
import train
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_second_resume_is_refused_before_it_reads_what_the_first_is_rewriting(trained, tmp_path):
    cifar_dir, _ = trained
    folder = tmp_path / "ckpt"
    first = start_train(REPO / "train.py", *tiny_run_args(cifar_dir, folder, "--epochs", 12))
    wait_for(lambda: (folder / "last.pt").exists(), first)
    # The second run, too slow to read its data until the first has ended, must not go on from what it saw.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2", "FIRST_RUN": str(first.pid)}
    second = subprocess.run([sys.executable, "-c", WAIT_FOR_THE_FIRST_RUN,
                             *map(str, tiny_run_args(cifar_dir, folder, "--resume", "--epochs", 3))],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    first.communicate(timeout=300)
    assert first.returncode == 0
    # Refused while the first held the folder, or (had the first ended already) nothing left to train.
    assert second.returncode == 0 and "nothing to train" in second.stdout or second.returncode == 1 and \
        second.stderr.strip() == f"error: another run is training in {folder}: wait for it to end, or use another " \
                                 f"--checkpoint-dir"
    assert load_checkpoint(folder / "last.pt")["epoch"] == 12 and len(read_metrics(folder / "metrics.csv")) == 12


def run_in(cifar_dir, folder, epochs=1, *flags):
    result = run_train(*tiny_run_args(cifar_dir, folder, "--epochs", epochs, *flags))
    assert result.returncode == 0, result.stderr
    return folder


def contents(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file() and path.name != ".lock"}


def test_a_resume_never_writes_into_a_folder_that_holds_another_run(trained, tmp_path, train_main, capsys):
    cifar_dir, original = trained
    other = run_in(cifar_dir, tmp_path / "other")
    before, original_before = contents(other), contents(original)
    capsys.readouterr()
    assert train_main(tiny_run_args(cifar_dir, other, "--resume", original / "last.pt")) == 1
    assert_one_line_error(capsys.readouterr().err, f"{other} holds another run", "new --checkpoint-dir")
    shutil.copy(original / "last.pt", other / "x.pt")  # a checkpoint of another run dropped into the folder
    before = contents(other)
    in_its_folder = [arg for arg in tiny_run_args(cifar_dir, "unused", "--resume", other / "x.pt")
                     if arg not in ("--checkpoint-dir", "unused")]  # the run goes on in x.pt's folder
    assert train_main(in_its_folder) == 1
    assert_one_line_error(capsys.readouterr().err, f"{other} holds another run")
    assert contents(other) == before and contents(original) == original_before


def test_a_resume_from_an_older_checkpoint_of_the_same_run_is_refused(trained, tmp_path, train_main, capsys):
    cifar_dir, original = trained
    folder = tmp_path / "ckpt"
    shutil.copytree(original, folder)
    older = tmp_path / "older.pt"
    checkpoint = torch.load(folder / "last.pt", weights_only=True)
    checkpoint["epoch"], checkpoint["history"] = 1, checkpoint["history"][:1]
    first = checkpoint["history"][0]
    checkpoint["best_top1"] = first.get("val_top1", first.get("test_top1"))  # what the run held after epoch 1
    torch.save(checkpoint, older)
    before = contents(folder)
    capsys.readouterr()
    assert train_main(tiny_run_args(cifar_dir, folder, "--resume", older, "--epochs", 3)) == 1
    assert_one_line_error(capsys.readouterr().err, f"{older} is at epoch 1, behind {folder / 'last.pt'} at epoch 2")
    assert contents(folder) == before


@pytest.mark.parametrize("leftover", ["best.pt", "metrics.csv"])
def test_a_new_run_refuses_a_folder_holding_any_file_of_a_run(trained, tmp_path, leftover):
    cifar_dir, original = trained
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copy(original / leftover, folder / leftover)
    result = run_train(*tiny_run_args(cifar_dir, folder, "--epochs", 1))
    assert result.returncode == 1
    assert_one_line_error(result.stderr, f"{folder} holds a run ({leftover})")
    assert (folder / leftover).read_bytes() == (original / leftover).read_bytes()


def test_resuming_into_a_new_folder_makes_it_hold_the_whole_run(trained, tmp_path, train_main):
    cifar_dir, original = trained
    new = tmp_path / "new"
    # The stored best is not beaten by the extra epoch at a tiny lr? Whatever happens, the new folder is complete.
    assert train_main(tiny_run_args(cifar_dir, new, "--resume", original / "last.pt", "--epochs", 2)) == 0
    assert sorted(contents(new)) == ["best.pt", "config.json", "last.pt", "metrics.csv"]
    assert (new / "best.pt").read_bytes() == (original / "best.pt").read_bytes()
    assert load_checkpoint(new / "last.pt")["run_id"] == load_checkpoint(original / "last.pt")["run_id"]
    assert train_main(["--evaluate", "--checkpoint-dir", str(new), "--data-dir", str(cifar_dir),
                       "--no-download"]) == 0


def test_a_kill_while_a_resume_adopts_its_checkpoint_into_a_new_folder_leaves_it_whole_or_to_take_again(
        trained, tmp_path, train_main, monkeypatch):
    """best.pt is copied in before last.pt, the commit point: a kill between the two leaves best.pt alone, which the
    same command takes up again (and --evaluate reads meanwhile)."""
    cifar_dir, original = trained
    new, written = tmp_path / "new", []
    real_write = run_dir.atomic_write
    monkeypatch.setattr(run_dir, "atomic_write", lambda path, data: (written.append(Path(path).name),
                                                                    real_write(path, data)))
    assert train_main(tiny_run_args(cifar_dir, new, "--resume", original / "last.pt", "--epochs", 2)) == 0
    assert [name for name in written if name.endswith(".pt")][:2] == ["best.pt", "last.pt"]
    monkeypatch.undo()
    killed = tmp_path / "killed"  # as a kill right after best.pt's copy leaves it
    killed.mkdir()
    (killed / "best.pt").write_bytes((original / "best.pt").read_bytes())
    assert train_main(["--evaluate", "--checkpoint-dir", str(killed), "--data-dir", str(cifar_dir),
                       "--no-download"]) == 0
    assert train_main(tiny_run_args(cifar_dir, killed, "--resume", original / "last.pt", "--epochs", 2)) == 0
    report = ["confusion.png", "evaluation.json", "per_class.csv"]  # --evaluate's, written beside best.pt
    assert sorted(contents(killed)) == sorted(["best.pt", "config.json", "last.pt", "metrics.csv", *report])


def test_resuming_an_early_stopped_run_is_a_no_op_unless_the_target_moves(tmp_path, train_main, capsys):
    cifar_dir = write_cifar100(tmp_path / "data")
    folder = tmp_path / "ckpt"
    assert train_main(tiny_run_args(cifar_dir, folder, "--epochs", 4, "--target-accuracy", 0.01,
                                    "--patience", 1)) == 0
    stopped = (folder / "last.pt").read_bytes()
    assert load_checkpoint(folder / "last.pt")["epoch"] == 1
    capsys.readouterr()
    assert train_main(tiny_run_args(cifar_dir, folder, "--resume")) == 0
    assert "it stopped early at epoch 1 and its target still holds: nothing to train" in capsys.readouterr().out
    assert (folder / "last.pt").read_bytes() == stopped
    assert train_main(tiny_run_args(cifar_dir, folder, "--resume", "--target-accuracy", 1.0)) == 0
    assert "it had stopped early at epoch 1, and goes on with --target-accuracy 1.0" in capsys.readouterr().out
    assert load_checkpoint(folder / "last.pt")["epoch"] == 4


def test_a_run_that_fails_before_its_first_save_leaves_no_folder_behind(trained, tmp_path):
    cifar_dir, _ = trained
    folder = tmp_path / "new" / "ckpt"
    result = run_train(*tiny_run_args(cifar_dir, folder, "--epochs", 3, "--lr", 300))  # diverges in epoch 1
    assert result.returncode == 1 and "no checkpoint written yet" in result.stderr
    assert not folder.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    assert run_train(*tiny_run_args(cifar_dir, existing, "--epochs", 3, "--lr", 300)).returncode == 1
    assert list(existing.iterdir()) == []  # a folder that was there stays, without our lock in it


def test_the_resume_hint_repeats_this_commands_settings_and_quotes_paths(trained, tmp_path, train_main, capsys,
                                                                         monkeypatch):
    import shlex

    import train_utils
    cifar_dir, _ = trained
    folder = tmp_path / "with space"

    def interrupted(logits, labels):
        os.kill(os.getpid(), signal.SIGINT)
        return torch.nn.functional.cross_entropy(logits, labels)

    monkeypatch.setattr(train_utils, "make_criterion", lambda label_smoothing: interrupted)
    capsys.readouterr()
    assert train_main(tiny_run_args(cifar_dir, folder, "--epochs", 2, "--device", "cpu")) == 130
    hint = capsys.readouterr().err.strip().splitlines()[-1].strip()
    assert hint == shlex.join(["python", "train.py", "--resume", str(folder / "last.pt"), "--data-dir",
                               str(cifar_dir), "--no-download", "--device", "cpu"])
    monkeypatch.undo()
    assert train_main(shlex.split(hint)[2:] + ["--epochs", "2"]) == 0


# ---- checkpoints in our format, damaged ----


def misshape_a_weight(checkpoint):
    checkpoint["model"]["conv1.weight"] = torch.zeros(3)


def drop_a_weight(checkpoint):
    del checkpoint["model"]["fc.bias"]


def add_a_weight(checkpoint):
    checkpoint["model"]["extra.weight"] = torch.zeros(3)


def misshape_a_momentum_buffer(checkpoint):
    checkpoint["optimizer"]["state"][0]["momentum_buffer"] = torch.zeros(1)


def drop_an_optimizer_group(checkpoint):
    checkpoint["optimizer"]["param_groups"] = []


def break_the_rng_state(checkpoint):
    checkpoint["rng"][0]["torch"] = torch.zeros(7, dtype=torch.uint8)


def move_the_schedule(checkpoint):
    checkpoint["scheduler"]["last_epoch"] = 5


def make_a_weight_an_integer(checkpoint):
    name = next(name for name, tensor in checkpoint["model"].items() if tensor.is_floating_point())
    checkpoint["model"][name] = checkpoint["model"][name].long()


def make_best_top1_above_its_history(checkpoint):
    checkpoint["best_top1"] = min(1.0, max(row["test_top1"] for row in checkpoint["history"]) + 0.1)


def make_a_history_top1_above_one(checkpoint):
    checkpoint["history"][0]["test_top1"] = 1.5


def make_a_history_loss_nan(checkpoint):
    checkpoint["history"][0]["train_loss"] = float("nan")


def make_an_early_stopping_top1_nan(checkpoint):
    checkpoint["early_stopping"]["top1_history"][0] = float("nan")


def make_a_setting_a_string(checkpoint):
    checkpoint["args"]["lr"] = "fast"


def make_best_top1_a_string(checkpoint):
    checkpoint["best_top1"] = "90%"


def make_the_history_a_dict(checkpoint):
    checkpoint["history"] = {"epoch": 1}


def make_best_top1_nan(checkpoint):
    checkpoint["best_top1"] = float("nan")


def make_best_top1_infinite(checkpoint):
    checkpoint["best_top1"] = float("inf")


def make_best_top1_negative(checkpoint):
    checkpoint["best_top1"] = -0.5


def make_the_training_data_count_a_string(checkpoint):
    checkpoint["train_data"]["images"] = "64"


def make_the_launch_a_number(checkpoint):
    checkpoint["launch"] = {"torchrun": 7}


def setting(name, value):
    """A checkpoint whose saved settings say `name` is `value`."""
    def damage(checkpoint):
        checkpoint["args"][name] = value
    damage.__name__ = f"setting_{name}_{value}"
    return damage


def optimizer_setting(name, value):
    def damage(checkpoint):
        checkpoint["optimizer"]["param_groups"][0][name] = value
    damage.__name__ = f"optimizer_{name}_{value}"
    return damage


def schedule_field(name, value):
    def damage(checkpoint):
        checkpoint["scheduler"][name] = value
    damage.__name__ = f"schedule_{name}_{value}"
    return damage


def drop_a_history_value(checkpoint):
    del checkpoint["history"][0]["train_loss"]


def make_a_history_value_a_string(checkpoint):
    checkpoint["history"][1]["test_top1"] = "0.5"


def misshape_the_epoch_totals(checkpoint):
    checkpoint["epoch_totals"] = {"loss_sum": 1.0, "correct": 2.0}


DAMAGES = [misshape_a_weight, drop_a_weight, add_a_weight, misshape_a_momentum_buffer, drop_an_optimizer_group,
           break_the_rng_state, move_the_schedule, make_a_setting_a_string, make_best_top1_a_string,
           make_the_history_a_dict, make_best_top1_nan, make_best_top1_infinite, make_best_top1_negative,
           # settings the flags would refuse, and what else a checkpoint holds beyond what train.py writes
           setting("lr", float("nan")), setting("weight_decay", float("nan")), setting("precision", "fp8"),
           setting("cutout", 1000), setting("min_momentum", 5.0), setting("dropout", 5.0), setting("batch_size", -3),
           setting("epochs", -1), setting("lr", -0.1), setting("label_smoothing", 5.0), setting("seed", -1),
           setting("seed", 2**40), setting("mixup", -1.0), setting("an_unknown_setting", 1),
           setting("asam", True), setting("lr", None), setting("depth", 28.0), setting("tta", 1),
           optimizer_setting("weight_decay", None), optimizer_setting("momentum", "0.9"),
           schedule_field("_anneal_func_type", "foo"), schedule_field("cycle_momentum", True),
           drop_a_history_value, make_a_history_value_a_string, misshape_the_epoch_totals,
           # records this program could never have written
           make_a_weight_an_integer, make_best_top1_above_its_history, make_a_history_top1_above_one,
           make_a_history_loss_nan, make_an_early_stopping_top1_nan, make_the_training_data_count_a_string,
           make_the_launch_a_number]


@pytest.mark.parametrize("damage", DAMAGES, ids=[damage.__name__ for damage in DAMAGES])
def test_each_kind_of_damaged_checkpoint_is_refused_in_one_line_and_kept(trained, tmp_path, train_main, capsys,
                                                                         damage):
    cifar_dir, folder = copy_of(trained, tmp_path)
    path = folder / "last.pt"
    checkpoint = torch.load(path, weights_only=True)
    damage(checkpoint)
    torch.save(checkpoint, path)
    damaged = path.read_bytes()
    capsys.readouterr()
    assert train_main(tiny_run_args(cifar_dir, folder, "--resume", "--epochs", 3)) == 1
    assert_one_line_error(capsys.readouterr().err, str(path))
    assert path.read_bytes() == damaged
    assert load_checkpoint(folder / "best.pt")["epoch"] <= 2  # nothing else was touched either


def test_evaluate_refuses_a_checkpoint_naming_a_model_it_does_not_know(trained, tmp_path, train_main, capsys):
    cifar_dir, folder = copy_of(trained, tmp_path)
    path = folder / "best.pt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model_config"]["name"] = "resnet9000"
    torch.save(checkpoint, path)
    capsys.readouterr()
    assert train_main(tiny_run_args(cifar_dir, folder, "--evaluate")) == 1
    assert_one_line_error(capsys.readouterr().err, str(path), "resnet9000")


# ---- the background writer's own failures ----


class ThreadsRefused:
    """threading as a loaded machine offers it: no new thread can start."""

    class Thread:
        def __init__(self, **kwargs):
            pass

        def start(self):
            raise RuntimeError("can't start new thread")


def test_a_writer_thread_that_cannot_start_stops_the_run_in_one_line(trained, tmp_path, train_main, capsys,
                                                                       monkeypatch):
    import run_dir
    cifar_dir, folder = copy_of(trained, tmp_path)
    before = contents(folder)
    monkeypatch.setattr(run_dir, "threading", ThreadsRefused)
    capsys.readouterr()
    assert train_main(tiny_run_args(cifar_dir, folder, "--resume", "--epochs", 3)) == 1
    assert_one_line_error(capsys.readouterr().err, f"could not start writing {folder / 'last.pt'} (can't start new "
                                                   f"thread)")
    assert contents(folder) == before


@pytest.mark.parametrize("error", [MemoryError(), TypeError("cannot pickle '_thread.lock' object")],
                         ids=["memory", "pickling"])
def test_any_error_of_the_writer_stops_the_run_in_one_line_naming_the_file(trained, tmp_path, train_main, capsys,
                                                                           monkeypatch, error):
    import run_dir
    cifar_dir, folder = copy_of(trained, tmp_path)
    before = contents(folder)

    def fails(checkpoint):
        raise error

    monkeypatch.setattr(run_dir, "checkpoint_bytes", fails)
    capsys.readouterr()
    assert train_main(tiny_run_args(cifar_dir, folder, "--resume", "--epochs", 4)) == 1
    assert_one_line_error(capsys.readouterr().err, f"could not write {folder / 'last.pt'}: {type(error).__name__}")
    assert contents(folder) == before


def test_a_state_that_diverged_mid_epoch_is_never_saved_at_an_interrupt(trained, tmp_path, train_main, capsys,
                                                                        monkeypatch):
    import train_utils
    cifar_dir, folder = copy_of(trained, tmp_path)
    before, runs, calls, build_run = contents(folder), [], [], train_utils.build_run

    def build_and_keep(*args, **kwargs):
        runs.append(build_run(*args, **kwargs))
        return runs[-1]

    def diverges_then_interrupted(logits, labels):  # the loss stays finite; a BatchNorm variance does not
        calls.append(1)
        if len(calls) == 5:
            batch_norm = next(m for m in runs[0].model.modules() if isinstance(m, torch.nn.BatchNorm2d))
            batch_norm.running_var.data.fill_(float("inf"))  # .data: behind autograd's back, as a diverging update
            os.kill(os.getpid(), signal.SIGINT)
        return torch.nn.functional.cross_entropy(logits, labels)

    monkeypatch.setattr(train_utils, "build_run", build_and_keep)
    monkeypatch.setattr(train_utils, "make_criterion", lambda label_smoothing: diverges_then_interrupted)
    capsys.readouterr()
    assert train_main(tiny_run_args(cifar_dir, folder, "--resume", "--epochs", 4)) == 1
    note, error = capsys.readouterr().err.strip().splitlines()
    assert note.startswith("SIGINT: saving a checkpoint") and error.startswith("error: ")
    assert "NaN or infinite in epoch 3" in error and f"the last good checkpoint, {folder / 'last.pt'}, left" in error
    assert contents(folder) == before


# ---- outputs and signals ----


@pytest.mark.parametrize("stderr", ["open", "closed"])
def test_a_closed_stdout_stops_the_run_with_a_checkpoint_that_resumes_exactly(trained, tmp_path, stderr):
    cifar_dir, _ = trained
    folder = tmp_path / "ckpt"
    closes_stderr = {"preexec_fn": lambda: os.close(2)} if stderr == "closed" else {}  # `2>&-`
    process = start_train(REPO / "train.py", *tiny_run_args(cifar_dir, folder, "--epochs", 2), **closes_stderr)
    process.stdout.close()  # before the run writes its first line, whatever the machine's load: `| head -0`
    err = process.stderr.read() if stderr == "open" else ""
    assert process.wait(timeout=120) == 128 + signal.SIGPIPE, err
    assert "Traceback" not in err
    if stderr == "open":
        assert "standard output was closed" in err and f"python train.py --resume {folder / 'last.pt'}" in err
    saved = load_checkpoint(folder / "last.pt")
    assert (saved["epoch"], saved["step"]) == (0, 1)  # noticed at the first line: stopped at the first sync point
    resumed = run_train(*tiny_run_args(cifar_dir, folder, "--resume", "--epochs", 2))
    assert resumed.returncode == 0, resumed.stderr
    reference = load_weights(trained[1] / "last.pt")
    assert all(torch.equal(reference[key], value) for key, value in load_weights(folder / "last.pt").items())


def loads_torch(pid):
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see the import under way")
def test_ctrl_c_while_torch_loads_is_one_line_and_writes_nothing(trained, tmp_path):
    cifar_dir, _ = trained
    process = start_train(REPO / "train.py", *tiny_run_args(cifar_dir, tmp_path / "ckpt", "--epochs", 1))
    wait_for(lambda: loads_torch(process.pid), process, timeout=60)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err.strip().splitlines() == ["error: interrupted before training started; nothing needed saving"]
    assert not (tmp_path / "ckpt").exists()  # the same words as a stop after torch has loaded (below)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_stop_signal_after_the_lock_and_before_training_is_one_line_and_leaves_no_folder(trained, tmp_path, signum):
    """Between the lock and the handlers that save (model, optimizer and the first optimizer's imports: a second or
    so), each stop signal behaves as Ctrl-C does there."""
    cifar_dir, _ = trained
    folder = tmp_path / "ckpt"
    process = start_train(REPO / "train.py", *tiny_run_args(cifar_dir, folder, "--epochs", 1))
    deadline = time.monotonic() + 120
    while not (folder / ".lock").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended first"
        time.sleep(0.002)
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, err
    assert err.strip().splitlines() == ["error: interrupted before training started; nothing needed saving"]
    assert not folder.exists()


# ---- the file system changes under a running run ----


def test_a_checkpoint_folder_replaced_by_a_file_mid_run_is_one_line(trained, tmp_path):
    cifar_dir, _ = trained
    folder = tmp_path / "ckpt"
    process = start_train(REPO / "train.py", *tiny_run_args(cifar_dir, folder, "--epochs", 1000))
    wait_for(lambda: (folder / "last.pt").exists(), process)
    folder.rename(tmp_path / "moved-away")
    folder.write_text("not a folder")
    out, err = process.communicate(timeout=120)
    assert process.returncode == 1
    assert_one_line_error(err, str(folder))
    assert load_checkpoint(tmp_path / "moved-away" / "last.pt")["epoch"] >= 1


def can_mount_in_a_namespace():
    probe = "d=$(mktemp -d) && mount -t tmpfs none $d && mount -o remount,ro $d"
    return shutil.which("unshare") and subprocess.run(["unshare", "-rm", "sh", "-c", probe],
                                                      capture_output=True).returncode == 0


REMOUNT_MID_RUN = """
mount -t tmpfs none "$1"
shift
"$@" &
run=$!
while [ ! -e "$CHECKPOINTS/last.pt" ]; do sleep 0.05; done
mount -o remount,ro "$CHECKPOINTS"
wait $run
echo "exit $?"
"""


@pytest.mark.skipif(not can_mount_in_a_namespace(), reason="needs unshare and tmpfs mounts in a user namespace")
def test_a_tmpfs_remounted_read_only_mid_run_is_one_line(trained, tmp_path):
    cifar_dir, _ = trained
    folder = tmp_path / "ckpt"
    folder.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2", "CHECKPOINTS": str(folder)}
    command = [sys.executable, str(REPO / "train.py"), *map(str, tiny_run_args(cifar_dir, folder, "--epochs", 1000))]
    result = subprocess.run(["unshare", "-rm", "sh", "-c", REMOUNT_MID_RUN, "sh", str(folder), *command], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.stdout.strip().splitlines()[-1] == "exit 1", result.stderr
    assert_one_line_error(result.stderr, "Read-only file system")


def test_a_data_file_that_is_a_folder_or_a_link_loop_is_named(tmp_path, train_main, capsys):
    for make_it in (Path.mkdir, lambda path: path.symlink_to(path)):
        cifar_dir = write_cifar100(tmp_path / "data")
        test_file = cifar_dir / "cifar-100-python" / "test"
        test_file.unlink()
        make_it(test_file)
        capsys.readouterr()
        assert train_main(tiny_run_args(cifar_dir, tmp_path / "ckpt", "--epochs", 1)) == 1
        assert_one_line_error(capsys.readouterr().err, str(test_file), "not a readable file")
        shutil.rmtree(tmp_path / "data")


# ---- torchrun ----


def test_an_error_only_rank_0_sees_stops_every_rank_with_one_line(trained, tmp_path):
    from test_cli import unwritable_folder
    cifar_dir, _ = trained
    folder = unwritable_folder(tmp_path)  # only rank 0 claims the folder, so only it finds out
    result = torchrun(*tiny_run_args(cifar_dir, folder, "--epochs", 1))
    assert result.returncode == 1
    ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and ours[0].startswith(f"error: checkpoint folder {folder} is not writable")
    assert result.stderr.count("exitcode  : 1") == 2  # the launcher's report: each rank exited with 1
    assert "train.py\", line" not in result.stderr and "Connection closed" not in result.stderr


def test_a_folder_holding_a_run_stops_every_torchrun_rank_in_one_line(trained, tmp_path, monkeypatch):
    cifar_dir, _ = trained
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "last.pt").write_bytes(b"a run lives here")
    result = torchrun(*tiny_run_args(cifar_dir, folder, "--epochs", 1))
    assert result.returncode == 1
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {folder} holds a run (last.pt): continue it with --resume, or start a new run in another "
        f"--checkpoint-dir"]
    assert result.stderr.count("exitcode  : 1") == 2  # both stopped, neither waited for the other
    # The folder is rank 0's alone (on another node, rank 1 may not see it): rank 1 does not look at it.
    import train
    from config import parse_args
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for resume in ([], ["--resume", str(tmp_path / "elsewhere" / "last.pt")]):
        train.first_look(*parse_args(tiny_run_args(cifar_dir, folder, "--epochs", 1, *resume)))


def worker_pids(launcher_pid):
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children")
    return [int(pid) for pid in children.read_text().split()] if children.exists() else []


def running(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")
def test_killing_the_torchrun_launcher_stops_the_workers_with_a_checkpoint(trained, tmp_path):
    cifar_dir, _ = trained
    folder = tmp_path / "ckpt"
    launcher = start_train("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", REPO / "train.py",
                           *tiny_run_args(cifar_dir, folder, "--epochs", 1000, "--batch-size", 64),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: (folder / "last.pt").exists(), launcher)
    workers = worker_pids(launcher.pid)
    assert len(workers) == 2
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 60
    while any(running(pid) for pid in workers):
        assert time.monotonic() < deadline, "the workers trained on without their launcher"
        time.sleep(0.1)
    assert load_checkpoint(folder / "last.pt")["epoch"] >= 1
    assert not [entry for entry in folder.iterdir() if ".tmp" in entry.name]


@pytest.mark.parametrize("landing", ["after the folder is made", "after the lock file is opened"])
def test_a_stop_signal_inside_the_claim_of_a_new_folder_leaves_no_folder(tmp_path, monkeypatch, landing):
    """The signal lands between two calls of the claim, where a stop once left the folder (and its lock) behind:
    it is held back until the lock is recorded, then stops the claim as it would have, and the close removes all."""
    from cli import STOP_SIGNALS, Stopped, raise_stopped
    folder = tmp_path / "ckpt"
    patched = "mkdir" if landing == "after the folder is made" else "open"
    owner = Path if patched == "mkdir" else run_dir.os
    real = getattr(owner, patched)

    def then_a_signal(*args, **kwargs):
        result = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(owner, patched, then_a_signal)
    previous = {signum: signal.signal(signum, raise_stopped) for signum in STOP_SIGNALS}
    run_folder = run_dir.RunDir(folder)
    try:
        with pytest.raises(Stopped) as stopped:
            run_folder.claim()
        assert stopped.value.signum == signal.SIGTERM and run_folder.lock is not None
        assert signal.getsignal(signal.SIGTERM) is raise_stopped  # handed back to the handler it held back
    finally:
        run_folder.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    assert not folder.exists()


# ---- commands a launcher starts again ----


RELAUNCHES = {  # the environment of a command's first start by each launcher, and what its relaunch adds
    "torchrun": ({"TORCHELASTIC_RUN_ID": "launch-a", "TORCHELASTIC_RESTART_COUNT": "0"},
                 {"TORCHELASTIC_RESTART_COUNT": "1"}, {"TORCHELASTIC_RUN_ID": "launch-b"}),
    "slurm": ({"SLURM_JOB_ID": "7"}, {"SLURM_RESTART_COUNT": "1"}, {"SLURM_JOB_ID": "8"}),
}


def set_environment(monkeypatch, *variables):
    for values in variables:
        for name, value in values.items():
            monkeypatch.setenv(name, value)


@pytest.mark.parametrize("launcher", RELAUNCHES)
def test_a_relaunched_command_goes_on_from_its_own_launch_s_checkpoint_and_no_other(trained, tmp_path, train_main,
                                                                                  capsys, monkeypatch, launcher):
    """torchrun's --max-restarts and a SLURM requeue run the same command again: it goes on from the folder's
    last.pt when its own launch wrote it, and a fresh command on a folder of another launch's run is still
    refused, relaunched or not."""
    cifar_dir, _ = trained
    first_start, relaunch, other_launch = RELAUNCHES[launcher]
    folder = tmp_path / "ckpt"
    set_environment(monkeypatch, first_start)
    assert train_main(tiny_run_args(cifar_dir, folder, "--epochs", 1)) == 0
    started = load_checkpoint(folder / "last.pt")
    assert set(started["launch"]) == {launcher}
    set_environment(monkeypatch, relaunch)
    capsys.readouterr()
    assert train_main(tiny_run_args(cifar_dir, folder, "--epochs", 2)) == 0
    assert f"resumed from {folder / 'last.pt'} at epoch 2" in capsys.readouterr().out
    went_on = load_checkpoint(folder / "last.pt")
    assert went_on["epoch"] == 2 and went_on["run_id"] == started["run_id"]
    set_environment(monkeypatch, other_launch)
    held = (folder / "last.pt").read_bytes()
    assert train_main(tiny_run_args(cifar_dir, folder, "--epochs", 3)) == 1
    assert_one_line_error(capsys.readouterr().err, f"{folder} holds a run", "continue it with --resume")
    assert (folder / "last.pt").read_bytes() == held


def test_a_relaunched_resume_goes_on_from_where_its_folder_got_to(trained, tmp_path, train_main, capsys,
                                                                  monkeypatch):
    """A relaunched `--resume PATH --checkpoint-dir NEW` goes on from NEW's last.pt, of the same run and further
    on, not from PATH, which is now behind it; even where the launch looks another (rank 0 on another node after
    a c10d rendezvous), since the command names that very run."""
    cifar_dir, source = copy_of(trained, tmp_path)
    folder = tmp_path / "new"
    command = tiny_run_args(cifar_dir, folder, "--resume", source / "last.pt")
    set_environment(monkeypatch, RELAUNCHES["torchrun"][0])
    assert train_main([*command, "--epochs", "3"]) == 0
    set_environment(monkeypatch, *RELAUNCHES["torchrun"][1:])
    capsys.readouterr()
    assert train_main([*command, "--epochs", "4"]) == 0
    assert f"resumed from {folder / 'last.pt'} at epoch 4" in capsys.readouterr().out
    assert load_checkpoint(folder / "last.pt")["epoch"] == 4 and load_checkpoint(source / "last.pt")["epoch"] == 2


def test_resume_auto_starts_a_run_in_an_empty_folder_and_continues_the_one_it_finds(trained, tmp_path, train_main,
                                                                                    capsys):
    cifar_dir, _ = trained
    folder = tmp_path / "ckpt"
    assert train_main(tiny_run_args(cifar_dir, folder, "--resume", "auto", "--epochs", 1)) == 0
    first = load_checkpoint(folder / "last.pt")
    capsys.readouterr()
    assert train_main(tiny_run_args(cifar_dir, folder, "--resume", "auto", "--epochs", 2)) == 0
    assert f"resumed from {folder / 'last.pt'} at epoch 2" in capsys.readouterr().out
    assert load_checkpoint(folder / "last.pt")["run_id"] == first["run_id"]


def test_several_slurm_tasks_without_torchrun_are_refused_in_one_line(trained, tmp_path, train_main, capsys,
                                                                      monkeypatch):
    cifar_dir, _ = trained
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    assert train_main(tiny_run_args(cifar_dir, tmp_path / "ckpt", "--epochs", 1)) == 1
    assert_one_line_error(capsys.readouterr().err, "SLURM started 4 tasks of train.py", "srun torchrun")
    assert not (tmp_path / "ckpt").exists()


def test_only_a_collective_that_lost_its_peer_is_called_a_lost_peer():
    from device_utils import Runtime, describe_lost_peer
    runtime = Runtime(torch.device("cpu"), rank=0, world_size=2)
    gloo = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
                        "[10.0.0.2]:64737: Connection reset by peer. This is typically caused by a remote worker "
                        "hanging or bugs in the application. Check the logs of the remote worker before reporting.")
    assert describe_lost_peer(gloo, runtime) == ("another process of the 2 stopped (Read error [10.0.0.2]:64737: "
                                                 "Connection reset by peer)")
    assert describe_lost_peer(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), runtime) is None
    assert describe_lost_peer(gloo, Runtime(torch.device("cpu"))) is None  # one process has no peers to lose


# ---- Windows, as far as Linux allows ----


def pretend_windows(monkeypatch):
    """Imports from here on see no fcntl, and msvcrt's byte locks (played by flock, which refuses another open
    file of the same lock as Windows refuses a locked byte)."""
    import errno
    import fcntl
    import types

    def locking(descriptor, mode, size):
        assert size == 1
        if mode == msvcrt.LK_UNLCK:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
            return
        assert mode == msvcrt.LK_NBLCK
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OSError(errno.EACCES, "Permission denied") from None  # what Windows says

    msvcrt = types.SimpleNamespace(LK_UNLCK=0, LK_NBLCK=2, locking=locking)
    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` raises ImportError
    monkeypatch.setitem(sys.modules, "msvcrt", msvcrt)


def windows_module(name):
    """`name`.py imported afresh, under pretend_windows."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"{name}_on_windows", REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_run_folder_s_lock_works_without_fcntl_as_on_windows(tmp_path, monkeypatch):
    pretend_windows(monkeypatch)
    system = windows_module("system")
    assert system.fcntl is None and system.LOCK_FILE_FLAGS & os.O_RDWR
    monkeypatch.setitem(sys.modules, "system", system)
    windows_run_dir = windows_module("run_dir")
    folder = tmp_path / "ckpt"
    first = windows_run_dir.RunDir(folder)
    first.claim()
    with pytest.raises(run_dir.CheckpointError, match="another run is training in"):
        windows_run_dir.RunDir(folder).claim()
    windows_run_dir.atomic_write(folder / "metrics.csv", b"epoch\n")  # no folder fsync on Windows
    first.close()
    assert (folder / ".lock").exists()  # kept beside the run's records
    (folder / "metrics.csv").unlink()
    second = windows_run_dir.RunDir(folder)
    second.claim()  # the lock was given back
    second.close()
    assert list(folder.iterdir()) == []  # it held nothing of a run's: the lock goes, closed first as Windows needs
