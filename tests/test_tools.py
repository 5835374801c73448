"""The tools around a run: the benchmark script, the plot, TensorBoard, and load_model for notebooks."""
import datetime
import math
import os
import time
from pathlib import Path

import pytest
import torch

import bench
from conftest import tiny_run_args
from plot import PlotError, plot_metrics
from train_utils import load_model


def test_benchmark_measures_every_figure_on_the_cpu():
    args = bench.parse_args(["--models", "resnet18", "--batch-sizes", "8", "--train-images", "16", "--test-images",
                             "16", "--steps", "1", "--repeats", "3"])
    rows = bench.run_benchmarks(args, torch.device("cpu"))
    (row,) = rows
    assert (row["model"], row["precision"], row["batch"], row["step"]) == ("resnet18", "fp32", 8, "eager")
    for key in ("setup_s", "first_epoch_s", "step_img_s", "epoch_img_s", "augment_img_s"):
        assert math.isfinite(row[key]) and row[key] > 0
    for key in ("epoch_s", "test_s"):
        low, median, high = row[key]
        assert 0 < low <= median <= high
    assert row["epoch_s"][1] == pytest.approx(16 / row["epoch_img_s"])
    cells = bench.format_row(row).split(" | ")
    assert cells[bench.HEADER.split(" | ").index("capture s")] == "-"  # an eager step captures nothing


@pytest.mark.parametrize("threads, said", [(1, "CPU, 1 thread, torch"), (2, "CPU, 2 threads, torch")])
def test_the_tables_device_counts_its_threads_in_words(monkeypatch, threads, said):
    import reproduce
    monkeypatch.setenv("OMP_NUM_THREADS", str(threads))
    assert said in reproduce.describe_device()


@pytest.fixture
def finished_run(train_main, cifar_dir, tmp_path):
    checkpoint_dir = tmp_path / "ckpt"
    assert train_main(tiny_run_args(cifar_dir, checkpoint_dir, "--epochs", "2", "--plot", "--tensorboard")) == 0
    return checkpoint_dir


def test_plot_draws_the_curves_to_a_png(finished_run):
    png = finished_run / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert plot_metrics(finished_run / "metrics.csv", finished_run / "again.png").is_file()


def test_plot_of_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(PlotError, match="cannot read"):
        plot_metrics(tmp_path / "metrics.csv")


@pytest.mark.parametrize("epochs", [1, 3])
def test_plot_marks_every_epoch_and_counts_epochs_in_whole_numbers(finished_run, epochs):
    from plot import draw, read_rows
    rows = read_rows(finished_run / "metrics.csv")
    rows = [dict(rows[0], epoch=epoch) for epoch in range(1, epochs + 1)]  # the first run a CPU user tries: 1 epoch
    figure = draw(rows)
    for axes in figure.axes:
        assert all(line.get_marker() == "o" and len(line.get_xdata()) == epochs for line in axes.get_lines())
        ticks = [tick for tick in axes.get_xticks() if axes.get_xlim()[0] <= tick <= axes.get_xlim()[1]]
        assert ticks and all(tick == int(tick) for tick in ticks)


@pytest.mark.parametrize("mistake", ["another csv", "a checkpoint", "no such folder"])
def test_plot_answers_ordinary_mistakes_in_one_line(finished_run, tmp_path, mistake):
    import subprocess
    import sys

    from conftest import REPO
    other = tmp_path / "other.csv"
    other.write_text("name,score\nx,1\n")
    given = {"another csv": [other], "a checkpoint": [finished_run / "last.pt"],
             "no such folder": [finished_run / "metrics.csv", "-o", tmp_path / "nowhere" / "curves.png"]}[mistake]
    result = subprocess.run([sys.executable, str(REPO / "plot.py"), *map(str, given)], capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and {"another csv": "is not a metrics.csv written by train.py",
                                            "a checkpoint": "is not a metrics.csv written by train.py",
                                            "no such folder": "does not exist"}[mistake] in line


@pytest.mark.parametrize("value", ["inf", "nan", ""], ids=["infinite", "nan", "an-empty-epoch"])
def test_plot_refuses_a_metrics_file_with_values_train_py_never_writes(finished_run, value):
    path = finished_run / "metrics.csv"
    header, first, *rest = path.read_text().splitlines()
    column = "epoch" if value == "" else "train_loss"
    cells = dict(zip(header.split(","), first.split(",")), **{column: value})
    path.write_text("\n".join([header, ",".join(cells[name] for name in header.split(",")), *rest]) + "\n")
    with pytest.raises(PlotError, match="not finite numbers, or an epoch without its number"):
        plot_metrics(path)


def test_plot_of_a_run_folder_draws_its_metrics_csv_beside_it(finished_run, capsys):
    import plot
    (finished_run / "metrics.png").unlink()
    assert plot.main([str(finished_run)]) == 0  # as train.py --resume and --evaluate take a run folder
    assert capsys.readouterr().out.split() == [str(finished_run / "metrics.png")]
    assert (finished_run / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_into_a_folder_or_without_the_suffix_writes_and_says_the_png_it_wrote(finished_run, tmp_path, capsys):
    import plot
    folder = tmp_path / "pictures"
    folder.mkdir()
    assert plot.main([str(finished_run / "metrics.csv"), "-o", str(folder)]) == 0
    assert plot.main([str(finished_run / "metrics.csv"), "-o", str(tmp_path / "curves")]) == 0
    said = capsys.readouterr().out.split()
    assert said == [str(folder / "metrics.png"), str(tmp_path / "curves.png")]
    assert all(Path(path).read_bytes()[:4] == b"\x89PNG" for path in said)


def test_tensorboard_logs_each_epoch(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(finished_run / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("test_top1")] == [1, 2]


def test_load_model_returns_the_trained_model_ready_to_predict(finished_run):
    model = load_model(finished_run / "best.pt")
    assert not model.training
    with torch.inference_mode():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_load_model_on_a_device_this_machine_lacks_names_the_device(finished_run):
    from device_utils import DeviceError
    with pytest.raises(DeviceError, match="device 'cuda' was asked for, but no CUDA GPU is available"):
        load_model(finished_run / "best.pt", device="cuda")  # the tests hide every GPU


@pytest.mark.parametrize("flags, message", [
    (["--batch-sizes", "0"], "argument --batch-sizes: 0 must be at least 1"),
    (["--batch-sizes", "abc"], "argument --batch-sizes: 'abc' is not a valid int"),
    (["--steps", "0"], "argument --steps: 0 must be at least 1"),
    (["--train-images", "0"], "argument --train-images: 0 must be at least 1"),
    (["--models", "resnet50"], "argument --models: 'resnet50' is not one of resnet18, wideresnet"),
    (["--repeats", "0"], "argument --repeats: 0 must be at least 1"),
])
def test_bench_answers_bad_flags_in_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exited:
        bench.parse_args(flags)
    assert exited.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert message in line


def test_bench_on_a_device_that_does_not_exist_is_a_flag_error_as_in_train_py(capsys):
    with pytest.raises(SystemExit) as exited:
        bench.main(["--device", "tpu"])
    assert exited.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_bench_whose_training_diverges_says_so_in_one_line(capsys):
    assert bench.main(["--device", "cpu", "--batch-sizes", "8", "--train-images", "32", "--test-images", "8",
                       "--steps", "1", "--repeats", "1", "--sam", "3e38"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: the training loss became NaN or infinite")


def test_bench_on_a_device_this_machine_lacks_is_one_line(capsys):
    assert bench.main(["--device", "cuda"]) == 1
    assert capsys.readouterr().err == "error: device 'cuda' was asked for, but no CUDA GPU is available\n"


def test_bench_times_train_pys_start_up_from_outside(cifar_dir):
    import subprocess
    import sys

    from conftest import REPO, TINY_MODEL
    spawned = time.time()
    result = subprocess.run([sys.executable, str(REPO / "bench.py"), "--startup", "--repeats", "1", "--",
                             *TINY_MODEL, "--data-dir", str(cifar_dir), "--no-download", "--batch-size", "16"],
                            capture_output=True, text=True, timeout=300)
    whole = time.time() - spawned
    assert result.returncode == 0, result.stderr
    rows = {line.split(" | ")[0][2:]: [float(value) for value in line.split(" | ")[1].strip(" |").split(" / ")]
            for line in result.stdout.splitlines() if line.startswith("| ") and "/" in line and "part" not in line}
    imports, first_step = rows["python with the modules train.py loads (torch among them)"], \
        rows["spawn to the end of the first training step"]
    assert 0 < imports[1] < first_step[1] < whole  # the imports are part of the start-up, itself part of the call


def test_the_package_lists_every_module_so_pip_install_e_imports_them_anywhere():
    import tomllib

    from conftest import REPO
    modules = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["py-modules"]
    assert sorted(modules) == sorted(path.stem for path in REPO.glob("*.py"))


def test_git_ignores_a_virtual_environment_and_a_data_link(tmp_path):
    import shutil
    import subprocess

    from conftest import REPO
    if not (REPO / ".git").exists() or not shutil.which("git"):
        pytest.skip("not a git checkout")
    result = subprocess.run(["git", "check-ignore", "--no-index", "data", ".venv/bin/python", "runs/fast"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.stdout.split() == ["data", ".venv/bin/python", "runs/fast"]


def reproduce(*args, cwd):
    import subprocess
    import sys

    from conftest import REPO
    return subprocess.run([sys.executable, str(REPO / "reproduce.py"), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})


def test_reproduce_runs_a_tables_commands_keeps_their_logs_and_prints_the_table(cifar_dir, tmp_path):
    from conftest import TINY_MODEL
    from checkpoint_file import load_checkpoint
    from run_dir import read_metrics
    tiny = [*TINY_MODEL, "--data-dir", cifar_dir, "--no-download", "--batch-size", 16, "--epochs", 2, "--device", "cpu"]
    result = reproduce("fast", "--runs", "seed1", "--", *tiny, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    folder = tmp_path / "results" / "fast" / "seed1"
    rows = read_metrics(folder / "metrics.csv")
    assert len(rows) == 2 and "epoch   2/2" in (folder / "output.txt").read_text()
    assert load_checkpoint(tmp_path / "runs" / "fast" / "seed1" / "last.pt")["args"]["seed"] == 1
    table = (tmp_path / "results" / "fast" / "table.md").read_text()
    assert table.strip() in result.stdout
    heading, row = table.splitlines()[0], next(line for line in table.splitlines() if line.startswith("| seed1 |"))
    assert heading.startswith("fast: ") and ", torch 2." in heading and heading.endswith(str(datetime.date.today()))
    assert "`python train.py --preset fast --seed 1 --model wideresnet" in row
    assert row.endswith(f"| test {100 * float(rows[-1]['test_top1']):.2f} % |")
    wall_seconds, first_step_seconds = (float(cell) for cell in row.split(" | ")[3:5])
    assert 0 < first_step_seconds < wall_seconds  # from the spawn to the first step's end, which the run printed
    again = reproduce("fast", "--runs", "seed1", "--", *tiny, cwd=tmp_path)  # never over an earlier run's folder
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'runs' / 'fast' / 'seed1'} already exist: move them away, or pass another --work folder"]


def test_a_failed_reproduce_rerun_keeps_the_earlier_results_and_a_split_table_comes_out_whole(cifar_dir, tmp_path):
    from conftest import TINY_MODEL
    tiny = [*TINY_MODEL, "--data-dir", cifar_dir, "--no-download", "--batch-size", 16, "--epochs", 1, "--device", "cpu"]
    assert reproduce("fast", "--runs", "seed0", "--", *tiny, cwd=tmp_path).returncode == 0
    seed0 = tmp_path / "results" / "fast" / "seed0"
    (seed0 / "notes.txt").write_text("a user's notes on the published figure")
    before = {path.name: path.read_bytes() for path in seed0.iterdir()}
    failed = reproduce("fast", "--runs", "seed0", "--work", "elsewhere", "--", *tiny, "--epochs", "0", cwd=tmp_path)
    assert failed.returncode == 1
    assert {path.name: path.read_bytes() for path in seed0.iterdir()} == before  # nothing of it touched
    assert "argument --epochs: 0 must be at least 1" in (seed0.parent / "seed0.failed" / "output.txt").read_text()
    second = reproduce("fast", "--runs", "seed2", "--", *tiny, cwd=tmp_path)  # the table's other half
    assert second.returncode == 0, second.stdout + second.stderr
    table = (tmp_path / "results" / "fast" / "table.md").read_text()
    assert [line.split(" |")[0] for line in table.splitlines() if line.startswith("| seed")] == ["| seed0", "| seed2"]
    assert not [path.name for path in seed0.parent.iterdir() if path.name.startswith(".")]  # no half-made folder


@pytest.mark.parametrize("stop", ["ctrl-c", "ctrl-c with SIGINT ignored", "SIGTERM to reproduce alone"])
def test_a_stop_of_reproduce_stops_its_run_with_a_checkpoint_and_keeps_the_earlier_results(cifar_dir, tmp_path,
                                                                                          stop):
    """Ctrl-C reaches a terminal's whole group, and under nohup or in a background job reproduce.py ignores SIGINT;
    `kill PID` reaches reproduce.py alone. Each time the run saves once and stops, and nothing half-made stays."""
    import signal
    import subprocess
    import sys

    from conftest import REPO, TINY_MODEL
    tiny = [*TINY_MODEL, "--data-dir", cifar_dir, "--no-download", "--batch-size", 16, "--device", "cpu"]
    assert reproduce("default", "--", *tiny, "--epochs", 1, cwd=tmp_path).returncode == 0
    results = tmp_path / "results" / "default"
    before = {path.name: path.read_bytes() for path in (results / "seed0").iterdir()}
    sigint = signal.SIG_IGN if stop == "ctrl-c with SIGINT ignored" else signal.SIG_DFL
    rerun = subprocess.Popen([sys.executable, str(REPO / "reproduce.py"), "default", "--work", "again", "--",
                              *map(str, tiny), "--epochs", "5000"], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True,  # a terminal's group
                             preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))
    for line in rerun.stdout:  # the run's first epoch line: it is training now
        if line.startswith("epoch "):
            break
    (run_pid,) = map(int, Path(f"/proc/{rerun.pid}/task/{rerun.pid}/children").read_text().split())
    if stop == "SIGTERM to reproduce alone":
        rerun.send_signal(signal.SIGTERM)
    else:
        os.killpg(rerun.pid, signal.SIGINT)  # Ctrl-C reaches every process of the group
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 130, out[-2000:] + err
    assert "checkpoint saved. Resume with:" in out and out.count("saving a checkpoint after this step") == 1
    assert not Path(f"/proc/{run_pid}").exists() or Path(f"/proc/{run_pid}/stat").read_text().split()[2] == "Z"
    assert err.strip().splitlines()[-1] == "interrupted: the earlier results are kept as they were"
    assert {path.name: path.read_bytes() for path in (results / "seed0").iterdir()} == before
    assert sorted(path.name for path in results.iterdir()) == ["seed0", "table.md"]


def test_reproduce_check_writes_one_report_and_says_when_no_gpu_is_there(tmp_path):
    result = reproduce("check", "--results", tmp_path / "report", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    (report,) = (tmp_path / "report" / "check").iterdir()
    text = report.read_text()
    assert text.startswith("check: ") and ", torch 2." in text.splitlines()[0]
    assert "no CUDA GPU here (or CI is set): every GPU test was skipped" in text
    assert "SKIPPED" in text and " skipped in " in text  # each case reported


def test_reproduce_marks_a_failed_run_and_exits_non_zero(tmp_path):
    result = reproduce("default", "--", "--data-dir", tmp_path / "nowhere", "--no-download", cwd=tmp_path)
    assert result.returncode == 1
    assert "| seed0 |" in result.stdout and "failed (exit 1) |" in result.stdout
    assert "CIFAR-100 not found" in (tmp_path / "results" / "default" / "seed0" / "output.txt").read_text()


def test_reproduce_speed_keeps_the_benchmarks_rows(tmp_path):
    result = reproduce("speed", "--runs", "resnet18", "--", "--device", "cpu", "--batch-sizes", 8, "--train-images", 16,
                       "--test-images", 16, "--steps", 1, "--repeats", 1, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    table = (tmp_path / "results" / "speed" / "table.md").read_text().splitlines()
    assert table[2].startswith("| model |") and table[4].startswith("| resnet18 | fp32 | 8 | eager |")
    assert (tmp_path / "results" / "speed" / "resnet18" / "output.txt").is_file()


def test_reproduce_judges_a_choice_on_the_validation_split(cifar_dir, tmp_path):
    from conftest import TINY_MODEL
    from run_dir import read_metrics
    tiny = [*TINY_MODEL, "--data-dir", cifar_dir, "--no-download", "--batch-size", 16, "--epochs", 1, "--val-size", 20]
    result = reproduce("r18-choice", "--runs", "ema", "--", *tiny, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("| ema |")]
    final = read_metrics(tmp_path / "results" / "r18-choice" / "ema" / "metrics.csv")[-1]
    assert "--ema 0.999" in row and row.endswith(f"| val {100 * float(final['val_top1']):.2f} % |")
