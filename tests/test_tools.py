"""The tools around a run: the benchmark script, the plot, TensorBoard, and load_model for notebooks."""
import math

import pytest
import torch

import bench
from conftest import tiny_run_args
from plot import PlotError, plot_metrics
from train_utils import load_model


def test_benchmark_measures_every_figure_on_the_cpu():
    rows = bench.main(["--device", "cpu", "--models", "resnet18", "--batch-sizes", "8", "--train-images", "16",
                       "--test-images", "16", "--steps", "1", "--repeats", "3"])
    (row,) = rows
    assert (row["model"], row["precision"], row["batch"], row["step"]) == ("resnet18", "fp32", 8, "eager")
    for key in ("setup_s", "first_epoch_s", "step_img_s", "epoch_img_s", "augment_img_s"):
        assert math.isfinite(row[key]) and row[key] > 0
    for key in ("epoch_s", "test_s"):
        low, median, high = row[key]
        assert 0 < low <= median <= high
    assert row["epoch_s"][1] == pytest.approx(16 / row["epoch_img_s"])


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
