"""Draw a run's loss and accuracy curves from its metrics.csv (needs matplotlib).

    python plot.py checkpoint/metrics.csv          # writes checkpoint/metrics.png
    python plot.py checkpoint                      # the same: a run folder stands for its metrics.csv
"""
import csv
import math
import sys
from pathlib import Path

from cli import Parser
from checkpoint_file import METRICS_COLUMNS

CURVES = ((("train_loss", "val_loss", "test_loss"), 1, "cross-entropy", "loss"),
          (("train_top1", "val_top1", "val_top5", "test_top1", "test_top5", "raw_top1"), 100, "%", "accuracy"))


class PlotError(RuntimeError):
    """The plot cannot be drawn: no matplotlib, no readable metrics, or nowhere to write it."""


def matplotlib_missing():
    """Why no plot can be drawn here (matplotlib is not installed), or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "plotting needs matplotlib: pip install matplotlib"
    return None


def read_rows(metrics_path):
    """The epochs of a metrics.csv that train.py wrote; anything else is a PlotError naming the file."""
    try:
        with open(metrics_path, newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            columns = reader.fieldnames or []
    except OSError as err:
        raise PlotError(f"cannot read {metrics_path}: {err.strerror or err}") from None
    except (UnicodeDecodeError, csv.Error):
        raise PlotError(f"{metrics_path} is not a metrics.csv written by train.py (it is not text)") from None
    if "epoch" not in columns or not set(columns) <= set(METRICS_COLUMNS):
        raise PlotError(f"{metrics_path} is not a metrics.csv written by train.py (its columns are "
                        f"{', '.join(columns) or 'missing'})")
    if not rows:
        raise PlotError(f"{metrics_path} has no epochs yet")
    try:
        numbers = [{key: float(value) for key, value in row.items() if value} for row in rows]
    except (TypeError, ValueError):
        numbers = None
    if numbers is None or not all("epoch" in row and all(map(math.isfinite, row.values())) for row in numbers):
        raise PlotError(f"{metrics_path} is not a metrics.csv written by train.py (it holds values that are not "
                        f"finite numbers, or an epoch without its number)")
    return numbers


def draw(rows):
    """A figure with loss (train, val or test) and top-1/top-5 accuracy per epoch side by side: each epoch a
    marker, so that a single epoch shows, and whole-number epochs on the axis."""
    import matplotlib
    matplotlib.use("Agg")  # files only: works with no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    figure, all_axes = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [int(row["epoch"]) for row in rows]
    for axes, (keys, scale, unit, title) in zip(all_axes, CURVES):
        for key in keys:
            points = [(int(row["epoch"]), scale * row[key]) for row in rows if key in row]  # evaluated epochs
            if points:  # a run fills the val or the test columns
                axes.plot(*zip(*points), marker="o", markersize=4, label=key.replace("_", " "))
        axes.set(xlabel="epoch", ylabel=unit, title=title, xlim=(min(epochs) - 0.5, max(epochs) + 0.5))
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    return figure


def draw_confusion(report, target):
    """A class report's picture into `target` (a path or a binary file), 1,600 x 700 pixels: the confusion matrix
    with its classes ordered by superclass, so that the superclasses show as blocks along the diagonal (each row a
    true class's images, as fractions), and the reliability diagram beside it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (matrix_axes, reliability_axes) = plt.subplots(1, 2, figsize=(16, 7), width_ratios=(1.15, 1))
    classes = len(report.per_class)
    superclasses = report.superclasses
    order = sorted(range(classes), key=lambda index: (superclasses.of_class[index] if superclasses else 0, index))
    counts = report.confusion[order][:, order].float()
    shares = counts / counts.sum(1, keepdim=True).clamp(min=1)
    shown = matrix_axes.imshow(shares.numpy() ** 0.5, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    colour_bar = figure.colorbar(shown, ax=matrix_axes, fraction=0.046, pad=0.02)
    colour_bar.set_ticks([0, 0.1 ** 0.5, 0.5 ** 0.5, 1], labels=["0", "0.1", "0.5", "1"])
    colour_bar.set_label("share of the true class's images (square-root scale)")
    matrix_axes.set(xlabel="predicted class", ylabel="true class",
                    title=f"confusion, {classes} classes" + (" ordered by superclass" if superclasses else ""))
    if superclasses is not None:
        ordered = [superclasses.of_class[index] for index in order]
        starts = [position for position in range(classes) if position == 0 or ordered[position] != ordered[position - 1]]
        for start in starts[1:]:
            for line in (matrix_axes.axhline, matrix_axes.axvline):
                line(start - 0.5, color="white", linewidth=0.6)
        centres = [(start + end - 1) / 2 for start, end in zip(starts, [*starts[1:], classes])]
        names = [superclasses.names[ordered[start]].replace("_", " ") if ordered[start] >= 0 else "not in the test set"
                 for start in starts]
        matrix_axes.set_yticks(centres, names, fontsize=7)
        matrix_axes.set_xticks(centres, names, fontsize=7, rotation=90)
    bins = report.reliability
    width = bins[0]["high"] - bins[0]["low"]
    lows = [row["low"] for row in bins]
    reliability_axes.bar(lows, [row["accuracy"] for row in bins], width=width, align="edge", edgecolor="black",
                         label="accuracy of the bin's images")
    reliability_axes.bar(lows, [row["confidence"] - row["accuracy"] for row in bins], bottom=[row["accuracy"] for row
                         in bins], width=width, align="edge", color="tab:red", alpha=0.35, label="gap to confidence")
    reliability_axes.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    reliability_axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top softmax probability)", ylabel="accuracy",
                         title=f"reliability: ECE {100 * report.ece:.2f}% over {len(bins)} bins")
    reliability_axes.legend(loc="upper left")
    figure.tight_layout()
    try:
        figure.savefig(target, dpi=100, format="png")
    finally:
        plt.close(figure)


def plot_metrics(metrics_path, png_path=None):
    """Draw a metrics.csv's curves to a PNG (default: beside it); returns the PNG's path."""
    missing = matplotlib_missing()
    if missing:
        raise PlotError(missing)
    metrics_path = Path(metrics_path)
    png_path = Path(png_path) if png_path else metrics_path.with_suffix(".png")
    if png_path.is_dir():
        png_path = png_path / "metrics.png"
    elif png_path.suffix.lower() != ".png":  # matplotlib would add the suffix, and the path said would be wrong
        png_path = png_path.with_name(png_path.name + ".png")
    if not png_path.parent.is_dir():
        raise PlotError(f"cannot write {png_path}: the folder {png_path.parent} does not exist")
    figure = draw(read_rows(metrics_path))
    import matplotlib.pyplot as plt
    try:
        figure.savefig(png_path, dpi=120)
    except (OSError, ValueError) as err:
        raise PlotError(f"cannot write {png_path}: {getattr(err, 'strerror', None) or err}") from None
    finally:
        plt.close(figure)
    return png_path


def main(argv=None):
    parser = Parser("Plot a run's metrics.csv to a PNG.")
    parser.add_argument("metrics", nargs="?", default="checkpoint/metrics.csv",
                        help="a metrics.csv of train.py, or the run folder that holds it")
    parser.add_argument("-o", "--output", help="the PNG to write (default: beside the CSV, as metrics.png)")
    args = parser.parse_args(argv)
    metrics = Path(args.metrics) / "metrics.csv" if Path(args.metrics).is_dir() else args.metrics
    try:
        print(plot_metrics(metrics, args.output))
    except PlotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
