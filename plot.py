"""Draw a run's loss and accuracy curves from its metrics.csv (needs matplotlib).

    python plot.py checkpoint/metrics.csv          # writes checkpoint/metrics.png
"""
import argparse
import sys
from pathlib import Path

from run_dir import read_metrics


class PlotError(RuntimeError):
    """The plot cannot be drawn: no matplotlib, or no readable metrics."""


def plot_metrics(metrics_path, png_path=None):
    """Draw loss (train, test) and top-1/top-5 accuracy per epoch side by side; returns the PNG's path."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: works with no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("plotting needs matplotlib: pip install matplotlib") from None
    metrics_path = Path(metrics_path)
    try:
        rows = read_metrics(metrics_path)
    except OSError as err:
        raise PlotError(f"cannot read {metrics_path}: {err.strerror or err}") from None
    if not rows:
        raise PlotError(f"{metrics_path} has no epochs yet")
    epochs = [int(row["epoch"]) for row in rows]
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(11, 4))
    for axes, keys, scale in ((loss_axes, ("train_loss", "val_loss", "test_loss"), 1),
                              (accuracy_axes, ("train_top1", "val_top1", "val_top5", "test_top1", "test_top5"), 100)):
        for key in keys:
            if rows[0].get(key):  # a run fills either the val or the test columns each epoch
                axes.plot(epochs, [scale * float(row[key]) for row in rows], label=key.replace("_", " "))
    loss_axes.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    accuracy_axes.set(xlabel="epoch", ylabel="%", title="accuracy")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    png_path = Path(png_path) if png_path else metrics_path.with_suffix(".png")
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
    return png_path


def main(argv=None):
    parser = argparse.ArgumentParser(description="Plot a run's metrics.csv to a PNG.")
    parser.add_argument("metrics", nargs="?", default="checkpoint/metrics.csv")
    parser.add_argument("-o", "--output", help="PNG path (default: beside the CSV)")
    args = parser.parse_args(argv)
    try:
        print(plot_metrics(args.metrics, args.output))
    except PlotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
