"""The class report (--evaluate, --report, evaluate_report): each figure computed by hand on a model whose
predictions are fixed, the files read back, and the real train.py paths on generated data."""
import csv
import json
import math

import pytest
import torch
from PIL import Image

from class_report import ECE_BINS, Superclasses, read_superclasses, report_from_logits, write_report
from conftest import tiny_run_args
from dataset_utils import read_cifar100
from checkpoint_file import load_checkpoint

# Six images of four classes (two superclasses: 0-1 and 2-3), each row the probabilities the model gives.
PROBABILITIES = [[0.90, 0.05, 0.03, 0.02],  # class 0, right, confidence 0.90
                 [0.30, 0.50, 0.10, 0.10],  # class 0, taken for 1 (same superclass), 0.50
                 [0.10, 0.70, 0.10, 0.10],  # class 1, right, 0.70
                 [0.08, 0.10, 0.20, 0.62],  # class 2, taken for 3 (same superclass), 0.62
                 [0.06, 0.06, 0.78, 0.10],  # class 3, taken for 2 (same superclass), 0.78
                 [0.02, 0.03, 0.05, 0.90]]  # class 3, right, 0.90
LABELS = [0, 0, 1, 2, 3, 3]
CLASSES = ["apple", "pear", "oak", "maple"]
SUPERCLASSES = Superclasses(["fruit", "trees"], [0, 0, 1, 1])


@pytest.fixture
def report():
    return report_from_logits(torch.tensor(PROBABILITIES).log(), torch.tensor(LABELS), CLASSES, SUPERCLASSES)


def test_each_figure_is_the_one_computed_by_hand(report):
    assert report.top1 == pytest.approx(3 / 6) and report.top5 == 1.0  # four classes: all are in the top 5
    assert report.superclass_top1 == 1.0  # every mistake stays inside its superclass
    assert report.loss == pytest.approx(-sum(math.log(PROBABILITIES[i][label]) for i, label in enumerate(LABELS)) / 6)
    assert report.mean_confidence == pytest.approx((0.9 + 0.5 + 0.7 + 0.62 + 0.78 + 0.9) / 6)
    # Bins of width 1/15: 0.90 twice in (13/15, 14/15] (both right), 0.50 in (7/15, 8/15] (wrong), 0.70 in
    # (10/15, 11/15] (right), 0.62 in (9/15, 10/15] (wrong), 0.78 in (11/15, 12/15] (wrong).
    filled = {index: (row["images"], row["accuracy"]) for index, row in enumerate(report.reliability)
              if row["images"]}
    assert len(report.reliability) == ECE_BINS
    assert filled == {13: (2, 1.0), 7: (1, 0.0), 10: (1, 1.0), 9: (1, 0.0), 11: (1, 0.0)}
    assert report.ece == pytest.approx((2 * 0.1 + 0.5 + 0.3 + 0.62 + 0.78) / 6)
    assert [(row["class"], row["top1"], row["most_confused_with"]) for row in report.per_class] == [
        ("apple", 0.5, "pear"), ("pear", 1.0, ""), ("oak", 0.0, "maple"), ("maple", 0.5, "oak")]
    assert [row["class"] for row in report.worst(2)] == ["oak", "apple"]
    assert [row["class"] for row in report.best(2)] == ["pear", "apple"]  # ties in class order
    assert report.confused_pairs() == [("apple", "pear", 1), ("oak", "maple", 1), ("maple", "oak", 1)]
    assert report.confusion.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 1]]


def test_the_files_read_back_and_the_picture_has_its_size(report, tmp_path):
    about = {"checkpoint": "best.pt", "run_id": "abc", "epoch": 3, "views": "image"}
    assert write_report(report, tmp_path / "report", about) == ["per_class.csv", "evaluation.json", "confusion.png"]
    with open(tmp_path / "report" / "per_class.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0] == {"class": "apple", "superclass": "fruit", "images": "2", "top1": "0.5", "top5": "1.0",
                       "most_confused_with": "pear"}
    figures = json.loads((tmp_path / "report" / "evaluation.json").read_text())
    assert figures["run_id"] == "abc" and figures["epoch"] == 3 and figures["images"] == 6
    assert figures["ece"] == pytest.approx(report.ece) and figures["superclass_top1"] == 1.0
    assert figures["confused_pairs"][0] == {"true": "apple", "predicted": "pear", "images": 1}
    with Image.open(tmp_path / "report" / "confusion.png") as picture:
        assert picture.format == "PNG" and picture.size == (1600, 700)


def test_without_matplotlib_the_figures_are_still_written_with_one_note(report, tmp_path, monkeypatch, capsys):
    import plot
    monkeypatch.setattr(plot, "matplotlib_missing", lambda: "plotting needs matplotlib: pip install matplotlib")
    assert write_report(report, tmp_path, {}) == ["per_class.csv", "evaluation.json"]
    assert capsys.readouterr().err == (f"note: {tmp_path / 'confusion.png'} not drawn: plotting needs matplotlib: "
                                       f"pip install matplotlib\n")
    assert not (tmp_path / "confusion.png").exists()


def test_evaluate_and_report_write_the_report_of_the_checkpoint(cifar_dir, tmp_path, train_main, capsys):
    folder = tmp_path / "ckpt"
    assert train_main(tiny_run_args(cifar_dir, folder, "--epochs", 1, "--report")) == 0
    out = capsys.readouterr().out
    assert f"report of {folder / 'best.pt'} in {folder}: per_class.csv, evaluation.json, confusion.png" in out
    assert "superclass top-1" in out and "ECE" in out and "most confused:" in out
    best = load_checkpoint(folder / "best.pt")
    figures = json.loads((folder / "evaluation.json").read_text())
    assert figures["run_id"] == best["run_id"] and figures["epoch"] == 1 and figures["images"] == 32
    assert figures["top1"] == pytest.approx(best["history"][-1]["test_top1"], abs=1e-5)
    assert train_main(tiny_run_args(cifar_dir, folder, "--evaluate", "--report-dir", tmp_path / "elsewhere")) == 0
    assert json.loads((tmp_path / "elsewhere" / "evaluation.json").read_text())["top1"] == figures["top1"]


def test_the_superclasses_come_from_the_data(cifar_dir):
    superclasses = read_superclasses(cifar_dir)  # the generated data puts class c in superclass c // 5
    seen = {int(label) for label in read_cifar100(cifar_dir).test_labels}
    assert superclasses.of_class == [label // 5 if label in seen else -1 for label in range(100)]
    assert superclasses.names == [f"superclass_{index}" for index in range(20)]


def test_report_dir_without_a_report_is_a_flag_error(cifar_dir, tmp_path, train_main, capsys):
    with pytest.raises(SystemExit) as stop:
        train_main(tiny_run_args(cifar_dir, tmp_path / "ckpt", "--report-dir", tmp_path / "r"))
    assert stop.value.code == 2 and "--report-dir needs --report or --evaluate" in capsys.readouterr().err
