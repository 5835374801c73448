"""Which classes a model gets right, and how far its confidence can be trusted: per-class and per-superclass
top-1, the expected calibration error, the most confused pairs, and the files that keep them (per_class.csv,
evaluation.json, confusion.png). Everything comes from the logits of one pass over the set after training;
nothing here runs in the step loop.

    from class_report import evaluate_report
    report = evaluate_report(load_model("checkpoint/best.pt"), arrays.test_images, arrays.test_labels,
                             arrays.classes, read_superclasses("data"))
"""
import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from checkpoint_file import CheckpointError
from data_files import FOLDER_NAME, DataError
from dataset_utils import NUM_CLASSES, EvalLoader, as_text, unpickle
from device_utils import autocast
from evaluation import view_logits

ECE_BINS = 15  # equal-width confidence bins, as in Guo et al. 2017, "On Calibration of Modern Neural Networks"
SHOWN = 5  # the worst and best classes, and the confused pairs, that a report prints
FILES = ("per_class.csv", "evaluation.json", "confusion.png")


@dataclass
class Superclasses:
    """CIFAR-100's 20 coarse classes: their names, and the superclass of each fine class."""

    names: list
    of_class: list  # of_class[fine label] = its superclass's index; -1 for a class the test split lacks


def read_superclasses(data_dir):
    """CIFAR-100's 20 superclasses (class_report.Superclasses): their names from the meta file, and each fine
    class's from the test split's `coarse_labels`; None where the files hold none (a subset without them)."""
    folder = Path(data_dir) / FOLDER_NAME
    names = unpickle(folder / "meta", "meta file").get("coarse_label_names")
    test = unpickle(folder / "test", "file")
    fine, coarse = test.get("fine_labels"), test.get("coarse_labels")
    if not isinstance(names, list) or coarse is None:
        return None
    names = [as_text(name) for name in names]
    pairs = {(int(label), int(group)) for label, group in zip(fine, coarse)}
    of_class = dict(pairs)
    if len(of_class) != len(pairs) or not all(0 <= group < len(names) for group in of_class.values()):
        raise DataError(f"{folder / 'test'}: its coarse_labels do not give each class one of the {len(names)} "
                        f"superclasses")
    return Superclasses(names, [of_class.get(label, -1) for label in range(NUM_CLASSES)])


@dataclass
class ClassReport:
    loss: float
    top1: float
    top5: float
    superclass_top1: float | None  # None when the data holds no superclasses
    ece: float
    mean_confidence: float
    per_class: list  # one dict a class: class, superclass, images, top1, top5, most_confused_with
    confusion: torch.Tensor  # (classes, classes) image counts, true class by predicted class
    reliability: list  # one dict a confidence bin: low, high, images, accuracy, confidence
    superclasses: Superclasses | None

    @property
    def ranked(self):
        """The classes with images, worst top-1 first (ties by class index)."""
        return sorted((row for row in self.per_class if row["images"]), key=lambda row: row["top1"])

    def worst(self, count=SHOWN):
        return self.ranked[:count]

    def best(self, count=SHOWN):
        return sorted(self.ranked, key=lambda row: -row["top1"])[:count]

    def confused_pairs(self, count=SHOWN):
        """(true class, predicted class, images) of the largest mistakes, by count, ties by class index."""
        wrong = self.confusion.clone()
        wrong.fill_diagonal_(0)
        order = sorted(((-int(wrong[true, predicted]), true, predicted) for true, predicted in wrong.nonzero().tolist()))
        names = [row["class"] for row in self.per_class]
        return [(names[true], names[predicted], -negative) for negative, true, predicted in order[:count]]


def report_from_logits(logits, labels, classes, superclasses=None):
    """Every figure of a report from a set's logits (N, C) and its labels (N,)."""
    logits, labels = logits.float().cpu(), labels.cpu()
    num_classes = logits.shape[1]
    probabilities = logits.softmax(1)
    confidence, predicted = probabilities.max(1)
    hit = predicted == labels
    in_top5 = (logits.topk(min(5, num_classes), dim=1).indices == labels[:, None]).any(1)
    confusion = torch.bincount(labels * num_classes + predicted, minlength=num_classes ** 2).view(num_classes, -1)
    reliability = reliability_bins(confidence, hit)
    ece = sum(row["images"] * abs(row["accuracy"] - row["confidence"]) for row in reliability) / len(labels)
    superclass_top1 = None
    if superclasses is not None:
        of_class = torch.tensor(superclasses.of_class)
        superclass_top1 = (of_class[predicted] == of_class[labels]).float().mean().item()
    per_class = [class_row(index, classes, superclasses, labels == index, hit, in_top5, confusion[index])
                 for index in range(num_classes)]
    return ClassReport(loss=F.cross_entropy(logits, labels).item(), top1=hit.float().mean().item(),
                       top5=in_top5.float().mean().item(), superclass_top1=superclass_top1, ece=ece,
                       mean_confidence=confidence.mean().item(), per_class=per_class, confusion=confusion,
                       reliability=reliability, superclasses=superclasses)


def reliability_bins(confidence, hit, bins=ECE_BINS):
    """The images whose confidence lies in each bin ((m - 1)/M, m/M], with their accuracy and mean confidence."""
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1
    rows = []
    for bin_index in range(bins):
        inside = index == bin_index
        count = int(inside.sum())
        rows.append({"low": bin_index / bins, "high": (bin_index + 1) / bins, "images": count,
                     "accuracy": hit[inside].float().mean().item() if count else 0.0,
                     "confidence": confidence[inside].mean().item() if count else 0.0})
    return rows


def class_row(index, classes, superclasses, is_class, hit, in_top5, confusion_row):
    images = int(is_class.sum())
    wrong = confusion_row.clone()
    wrong[index] = 0
    return {"class": classes[index],
            "superclass": superclass_name(superclasses, index),
            "images": images,
            "top1": hit[is_class].float().mean().item() if images else 0.0,
            "top5": in_top5[is_class].float().mean().item() if images else 0.0,
            "most_confused_with": classes[int(wrong.argmax())] if wrong.sum() else ""}


def superclass_name(superclasses, index):
    """The superclass of class `index`: "" where the data holds none, or the test split lacks the class."""
    known = superclasses is not None and superclasses.of_class[index] >= 0
    return superclasses.names[superclasses.of_class[index]] if known else ""


def evaluate_report(model, images, labels, classes=None, superclasses=None, views="image", precision="fp32",
                    batch_size=1000):
    """The report of `model` on uint8 `images` (N, 3, 32, 32) and their `labels`, normalised as in training, on
    the model's device; `views` as in evaluation ("mirror" for --tta, "crops" for --tta-crops)."""
    device = next(model.parameters()).device
    loader = EvalLoader(images.to(device), labels.to(device), batch_size)
    was_training = model.training
    model.eval()
    with torch.inference_mode(), autocast(device, precision):
        logits = torch.cat([view_logits(model, batch, views) for batch, _ in loader])
    model.train(was_training)
    classes = classes or [str(index) for index in range(logits.shape[1])]
    return report_from_logits(logits, loader.labels, classes, superclasses)


def per_class_csv(report):
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(report.per_class[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({**row, "top1": round(row["top1"], 5), "top5": round(row["top5"], 5)}
                     for row in report.per_class)
    return text.getvalue()


def report_json(report, about):
    """evaluation.json: every figure, and what was evaluated (`about`: the checkpoint, its run id and epoch)."""
    figures = {**about, "images": int(report.confusion.sum()), "loss": report.loss, "top1": report.top1,
               "top5": report.top5, "superclass_top1": report.superclass_top1, "ece": report.ece,
               "ece_bins": ECE_BINS, "mean_confidence": report.mean_confidence,
               "worst_classes": [{"class": row["class"], "top1": row["top1"]} for row in report.worst()],
               "best_classes": [{"class": row["class"], "top1": row["top1"]} for row in report.best()],
               "confused_pairs": [{"true": true, "predicted": predicted, "images": count}
                                  for true, predicted, count in report.confused_pairs()],
               "reliability": report.reliability}
    return json.dumps(figures, indent=2) + "\n"


def describe_report(report):
    """What a report adds to the evaluation's line, in three lines."""
    superclass = (f"superclass top-1 {100 * report.superclass_top1:.2f}%; " if report.superclass_top1 is not None
                  else "")
    worst, best = (", ".join(f"{row['class']} {100 * row['top1']:.1f}%" for row in rows)
                   for rows in (report.worst(), report.best()))
    pairs = ", ".join(f"{true} → {predicted} ({count})" for true, predicted, count in report.confused_pairs())
    return (f"{superclass}ECE {100 * report.ece:.2f}% ({ECE_BINS} bins), mean confidence "
            f"{100 * report.mean_confidence:.2f}%\nworst classes: {worst}; best: {best}\nmost confused: {pairs or 'none'}")


def write_report(report, folder, about):
    """per_class.csv, evaluation.json and, where matplotlib is installed, confusion.png, written whole into
    `folder`; returns the names written."""
    from plot import draw_confusion, matplotlib_missing
    from run_dir import atomic_write
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"cannot create the report's folder {folder}: {err.strerror or err}") from None
    atomic_write(folder / "per_class.csv", per_class_csv(report).encode())
    atomic_write(folder / "evaluation.json", report_json(report, about).encode())
    missing = matplotlib_missing()
    if missing:
        print(f"note: {folder / 'confusion.png'} not drawn: {missing}", file=sys.stderr)
        return list(FILES[:2])
    buffer = io.BytesIO()
    draw_confusion(report, buffer)
    atomic_write(folder / "confusion.png", buffer.getvalue())
    return list(FILES)


def report_checkpoint(checkpoint, path, config, arrays, device):
    """--evaluate's and --report's class report of a checkpoint on the test set, in `config`'s views and precision:
    written beside the checkpoint (or into --report-dir), and returned as the lines to print."""
    from checkpoint import model_from_checkpoint
    from device_utils import resolve_precision
    model = model_from_checkpoint(checkpoint, path, device)
    report = evaluate_report(model, arrays.test_images, arrays.test_labels, arrays.classes,
                             read_superclasses(config.data_dir), views=config.test_views,
                             precision=resolve_precision(device, config.precision))
    folder = Path(config.report_dir) if config.report_dir else Path(path).parent
    about = {"checkpoint": str(path), "run_id": checkpoint.get("run_id"), "epoch": checkpoint["epoch"],
             "views": config.test_views}
    written = write_report(report, folder, about)
    return f"{describe_report(report)}\nreport of {path} in {folder}: {', '.join(written)}"
