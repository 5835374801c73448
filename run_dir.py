"""The run folder and what it holds: checkpoints, metrics.csv, the lock.

`RunDir` is the only code that knows the folder's layout. A save writes last.pt first, then
best.pt and metrics.csv: last.pt is the commit point, and every start of a resumed run brings
best.pt and metrics.csv up to it, so a kill between two writes loses nothing.
"""
import contextlib
import csv
import fcntl
import io
import os
import pickle
import re
import sys
import threading
from pathlib import Path

import torch

CHECKPOINT_FORMAT = "cifar100-trainer/1"
NUMBER = (int, float)
# What a checkpoint holds, and the type of each entry: anything else is a damaged file, refused in one line.
CHECKPOINT_TYPES = {"format": str, "model_config": dict, "model": dict, "optimizer": dict, "scheduler": dict,
                    "epoch": int, "step": int, "best_top1": NUMBER, "early_stopping": dict, "history": list,
                    "args": dict, "rng": list}
OPTIONAL_TYPES = {"ema": dict, "epoch_totals": dict, "val_split": str}  # None (or absent) when unused
METRICS_COLUMNS = ("epoch", "epoch_seconds", "train_seconds", "images", "train_loss", "train_top1", "val_loss",
                   "val_top1", "val_top5", "test_loss", "test_top1", "test_top5", "lr", "images_per_sec", "best")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, does not fit this run, or cannot be written."""

    def __init__(self, message, reason=None):
        super().__init__(message)
        self.reason = reason  # the operating system's word for a failed write, such as "No space left on device"


# ---- files written whole ----


def temporary_path(path):
    """Where `atomic_write` puts the bytes for `path` before renaming them into place: ".last.pt.tmp1234"."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def is_temporary_of(name, names):
    """Whether `name` is a temporary that `atomic_write` made for one of `names` (a user's ".notes.tmp" is not)."""
    return re.fullmatch(r"\.(" + "|".join(map(re.escape, names)) + r")\.tmp\d+", name) is not None


def atomic_write(path, data):
    """Write bytes to a temporary file beside `path`, fsync, then rename: a crash leaves the old file whole."""
    path = Path(path)
    temporary = temporary_path(path)
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as err:
        with contextlib.suppress(OSError):  # the folder itself may be gone or read-only by now
            temporary.unlink(missing_ok=True)
        raise CheckpointError(f"could not write {path}: {err.strerror or err}; "
                              f"the previous {path.name}, if any, is untouched", err.strerror or str(err)) from None
    try:
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)
    except OSError as err:
        raise CheckpointError(f"could not make the write of {path} durable: {err.strerror or err}",
                              err.strerror or str(err)) from None


# ---- checkpoints ----


def checkpoint_bytes(checkpoint):
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getbuffer()


def load_checkpoint(path):
    """Load one of our checkpoints with weights_only=True; refuse anything else with a one-line reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty, not a checkpoint")
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
    if checkpoint["epoch"] < 0 or checkpoint["step"] < 0 or not all(
            isinstance(row, dict) and set(row) <= set(METRICS_COLUMNS) for row in checkpoint["history"]):
        raise CheckpointError(f"{path} is damaged: its epoch, step or history rows are not what train.py writes")


def is_a(value, kind):
    """isinstance, except that True and False are not numbers here."""
    return isinstance(value, kind) and not isinstance(value, bool)


# ---- metrics ----


def metrics_text(rows):
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=METRICS_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def read_metrics(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ---- the folder ----


class RunDir:
    """One run's folder: its layout, its lock, and its writes.

    `open` takes the lock, which is held until `close`; `save` writes a checkpoint from a
    background thread (last.pt, then best.pt, then metrics.csv, each atomically), so the next
    epoch starts at once; a failed write is raised, as a CheckpointError, by the next `save`
    or `wait`. Only the process that opened the folder writes to it.
    """

    LAST, BEST, METRICS, LOCK = "last.pt", "best.pt", "metrics.csv", ".lock"
    PLOT, TENSORBOARD, PROBE = "metrics.png", "tensorboard", ".write-test"

    def __init__(self, path):
        self.path = Path(path)
        self.last, self.best, self.metrics = self.path / self.LAST, self.path / self.BEST, self.path / self.METRICS
        self.plot, self.tensorboard = self.path / self.PLOT, self.path / self.TENSORBOARD
        self.lock = self.thread = self.error = None

    def open(self, resuming):
        """Lock the folder for this run, check it can be written, and make it agree with last.pt."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CheckpointError(f"cannot create checkpoint folder {self.path}: {err.strerror or err}") from None
        self.take_lock()
        self.remove_own_temporaries()
        probe = self.path / self.PROBE
        try:
            atomic_write(probe, b"ok")
        except CheckpointError as err:
            raise CheckpointError(f"checkpoint folder {self.path} is not writable ({err.reason})") from None
        probe.unlink()
        if not resuming and self.last.exists():
            raise CheckpointError(f"{self.last} exists: continue it with --resume, "
                                  f"or start a new run in another --checkpoint-dir")
        if resuming:
            self.reconcile()

    def take_lock(self):
        try:  # opened read-only: flock needs no more, and the folder's file system can still be remounted
            self.lock = os.open(self.path / self.LOCK, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError as err:
            raise CheckpointError(f"checkpoint folder {self.path} is not writable ({err.strerror or err})") from None
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointError(f"another run is training in {self.path}: wait for it to end, "
                                  f"or use another --checkpoint-dir") from None

    def remove_own_temporaries(self):
        """What a kill mid-write left; the real files beside them are whole."""
        for entry in self.path.iterdir():
            if is_temporary_of(entry.name, (self.LAST, self.BEST, self.METRICS, self.PROBE)) and entry.is_file():
                entry.unlink()

    def reconcile(self):
        """Bring best.pt and metrics.csv up to last.pt, the commit point, after a kill between the writes."""
        if not self.last.exists():
            return
        last = load_checkpoint(self.last)
        best_epochs = [row["epoch"] for row in last["history"] if row.get("best")]
        if best_epochs and self.epoch_in_best() != best_epochs[-1]:
            if best_epochs[-1] == last["epoch"] and last["step"] == 0:
                # last.pt was written as the best epoch, and the kill came before the same bytes reached best.pt.
                atomic_write(self.best, self.last.read_bytes())
                print(f"note: {self.best} brought up to epoch {last['epoch']} from {self.last}", file=sys.stderr)
            else:
                print(f"note: {self.best} does not hold epoch {best_epochs[-1]}, the best one {self.last} records, "
                      f"and cannot be rebuilt from it", file=sys.stderr)
        atomic_write(self.metrics, metrics_text(last["history"]).encode())

    def epoch_in_best(self):
        """The epoch best.pt holds; None if it is missing or unreadable."""
        try:
            return load_checkpoint(self.best)["epoch"]
        except CheckpointError:
            return None

    def save(self, checkpoint, is_best):
        """Write `checkpoint` (host tensors that training no longer changes) in the background."""
        self.wait()
        self.thread = threading.Thread(target=self.write, args=(checkpoint, is_best), name="checkpoint-writer")
        self.thread.start()

    def write(self, checkpoint, is_best):
        try:
            data = checkpoint_bytes(checkpoint)
            atomic_write(self.last, data)
            if is_best:
                atomic_write(self.best, data)
            atomic_write(self.metrics, metrics_text(checkpoint["history"]).encode())
        except CheckpointError as err:
            self.error = err

    def wait(self):
        """Until the last save is on disk; raises its error if it failed."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def close(self):
        """Wait for the writes, then let another run have the folder."""
        try:
            self.wait()
        finally:
            if self.lock is not None:
                os.close(self.lock)
                self.lock = None
