"""A checkpoint as a file: what it holds (its schema, in one place), how it is read, and the check that what it
holds is what train.py writes: each entry's type, the records (history, running sums, best top-1), the training
data's record. Whether it fits this run (its settings, its model, its weights and optimizer) is checked where those
are built: config.py and checkpoint.py. Importing this module does not load torch (reading a checkpoint does), so
train.py can refuse a missing one before it spends seconds on that.
"""
import io
import math
import pickle
import secrets
from pathlib import Path

CHECKPOINT_FORMAT = "cifar100-trainer/1"
NUMBER = (int, float)
# What a checkpoint holds, and the type of each entry: anything else is a damaged file, refused in one line.
CHECKPOINT_TYPES = {"format": str, "model_config": dict, "model": dict, "optimizer": dict, "scheduler": dict,
                    "epoch": int, "step": int, "best_top1": NUMBER, "early_stopping": dict, "history": list,
                    "args": dict, "rng": list}
OPTIONAL_TYPES = {"ema": dict, "epoch_totals": dict, "val_split": str,  # None (or absent) when unused
                  "run_id": str,  # absent from checkpoints written before runs had ids
                  "train_data": dict,  # absent from those written before the training data was recorded
                  "launch": dict,  # torchrun's and SLURM's identity of the launch that wrote it (launch.py)
                  "loss_scale": dict}  # fp16's loss scale (train_step.LossScale)
METRICS_COLUMNS = ("epoch", "epoch_seconds", "train_seconds", "images", "train_loss", "train_top1", "val_loss",
                   "val_top1", "val_top5", "test_loss", "test_top1", "test_top5", "raw_top1", "lr", "images_per_sec",
                   "best")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, does not fit this run, or cannot be written."""

    def __init__(self, message, reason=None):
        super().__init__(message)
        self.reason = reason  # the operating system's word for a failed write, such as "No space left on device"


def new_run_id():
    return secrets.token_hex(8)


def checkpoint_bytes(checkpoint):
    import torch
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getbuffer()


def load_checkpoint(path):
    """Load one of our checkpoints with weights_only=True; refuse anything else with a one-line reason."""
    import torch
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty, not a checkpoint")
    with open(path, "rb") as handle:
        start = handle.read(2)
    if start != b"PK" and start[:1] != b"\x80":  # torch.save writes a zip archive (or, long ago, a pickle)
        raise CheckpointError(f"{path} is not a checkpoint: torch.save did not write it")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"refusing {path}: it holds Python objects that weights_only loading forbids "
                              f"(possibly code), or it is corrupt") from None
    except Exception as err:  # truncated or garbage files fail in many ways inside torch.load
        message = f"{type(err).__name__}: {err}".split(". ")[0][:160]
        raise CheckpointError(f"{path} is not a readable checkpoint ({message})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint written by this repo's train.py")
    missing = set(CHECKPOINT_TYPES) - set(checkpoint)
    if missing:
        raise CheckpointError(f"{path} is incomplete: it lacks {', '.join(sorted(missing))}")
    check_entry_types(checkpoint, path)
    return checkpoint


def check_entry_types(checkpoint, path):
    """Each entry of the type it is written with, so a damaged file fails here and not halfway through a run."""
    for name, kind in CHECKPOINT_TYPES.items():
        if not is_a(checkpoint[name], kind):
            raise CheckpointError(f"{path} is damaged: its {name} is a {type(checkpoint[name]).__name__}")
    for name, kind in OPTIONAL_TYPES.items():
        if checkpoint.get(name) is not None and not is_a(checkpoint[name], kind):
            raise CheckpointError(f"{path} is damaged: its {name} is a {type(checkpoint[name]).__name__}")
    config = checkpoint["model_config"]
    if not (isinstance(config.get("name"), str) and is_a(config.get("num_classes"), int)
            and isinstance(config.get("kwargs"), dict)):
        raise CheckpointError(f"{path} is damaged: its model_config is not a model name, class count and options")
    if checkpoint["epoch"] < 0 or checkpoint["step"] < 0:
        raise CheckpointError(f"{path} is damaged: its epoch or step is negative")
    history = checkpoint["history"]
    if not all(is_history_row(row) for row in history) or [row["epoch"] for row in history] != list(
            range(1, checkpoint["epoch"] + 1)):
        raise CheckpointError(f"{path} is damaged: its history rows are not one row of numbers per epoch, as "
                              f"train.py writes them")
    totals = checkpoint.get("epoch_totals")
    if totals is not None and not (set(totals) == set(EPOCH_TOTALS) and all(is_a(totals[key], NUMBER)
                                                                              for key in EPOCH_TOTALS)):
        raise CheckpointError(f"{path} is damaged: its epoch_totals are not {', '.join(EPOCH_TOTALS)}")
    data = checkpoint.get("train_data")
    if data is not None and not (set(data) == {"images", "fingerprint"} and is_a(data["images"], int)
                                 and data["images"] > 0 and isinstance(data["fingerprint"], str)):
        raise CheckpointError(f"{path} is damaged: its train_data is not a count of images and a fingerprint")
    launch = checkpoint.get("launch")
    if launch is not None and not (set(launch) <= {"torchrun", "slurm"} and all(isinstance(value, str)
                                                                              for value in launch.values())):
        raise CheckpointError(f"{path} is damaged: its launch is not torchrun's and SLURM's names of a launch")
    if not 0 <= checkpoint["best_top1"] <= 1:  # NaN too: a best that no epoch could beat
        raise CheckpointError(f"{path} is damaged: its best_top1 {checkpoint['best_top1']} is no fraction in [0, 1]")
    evaluated = [row[f"{split}_top1"] for row in history for split in ("val", "test") if f"{split}_top1" in row]
    if abs(checkpoint["best_top1"] - max(evaluated, default=0.0)) > 1e-5:  # the history's are rounded to 5 places
        raise CheckpointError(f"{path} is damaged: its best_top1 {checkpoint['best_top1']} is not the best top-1 of "
                              f"its history ({max(evaluated, default=0.0)})")


HISTORY_NUMBERS = ("epoch", "epoch_seconds", "train_seconds", "images", "train_loss", "train_top1", "lr",
                   "images_per_sec", "best")
EPOCH_TOTALS = ("loss_sum", "correct", "images", "seconds")


def is_history_row(row):
    """One epoch's metrics as train.py writes them: every column a number, and one split's evaluation if the
    epoch was evaluated."""
    if not isinstance(row, dict) or not set(row) <= set(METRICS_COLUMNS):
        return False
    splits = [split for split in ("val", "test") if f"{split}_top1" in row]
    needed = HISTORY_NUMBERS + tuple(f"{split}_{part}" for split in splits for part in ("loss", "top1", "top5"))
    return len(splits) <= 1 and set(needed) <= set(row) and all(is_a(value, NUMBER) for value in row.values()) \
        and all(0 <= value < math.inf for value in row.values()) \
        and all(row[name] <= 1 for name in row if name.endswith(("_top1", "_top5")) or name == "best")


def is_a(value, kind):
    """isinstance, except that True and False are not numbers here."""
    return isinstance(value, kind) and not isinstance(value, bool)


def run_id_of(path):
    """The run id in the checkpoint at `path`; None if it has none or cannot be read."""
    try:
        return load_checkpoint(path).get("run_id")
    except CheckpointError:
        return None


def position(checkpoint):
    return checkpoint["epoch"], checkpoint["step"]


def describe_position(checkpoint):
    epoch, step = position(checkpoint)
    return f"epoch {epoch}" + (f", step {step} of epoch {epoch + 1}" if step else "")
