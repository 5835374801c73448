"""The run folder and what it holds: checkpoints, metrics.csv, the lock.

`RunDir` is the only code that knows the folder's layout. A folder holds one run: every
checkpoint carries the run's id, and a folder is continued only by a resume of the run it
holds. A save writes last.pt first, then best.pt, metrics.csv and config.json: last.pt is the
commit point, and every start of a resumed run brings the others up to it, so a kill between
two writes loses nothing. What a checkpoint holds, and how one is read, is checkpoint_file.py's. Importing this
module does not load torch (reading and writing checkpoints does), so train.py can check a folder before it spends
seconds on that.
"""
import contextlib
import csv
import io
import json
import os
import re
import sys
import threading
from pathlib import Path

from checkpoint_file import (METRICS_COLUMNS, CheckpointError, checkpoint_bytes, describe_position, load_checkpoint,
                             position, run_id_of)
from cli import stop_signals_held
from launch import launch_record, relaunched_by
from system import LOCK_FILE_FLAGS, lock_exclusively, release_lock, sync_folder

MODEL_SETTINGS = ("depth", "widen_factor", "dropout")  # a WideResNet's: config.json leaves them out for a ResNet18


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
        sync_folder(path.parent)  # make the rename itself durable
    except OSError as err:
        raise CheckpointError(f"could not make the write of {path} durable: {err.strerror or err}",
                              err.strerror or str(err)) from None


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

    `claim` takes the lock before anything in the folder is read, and holds it until `close`;
    `save` writes a checkpoint from a background thread (last.pt, then best.pt, metrics.csv and
    config.json, each atomically), so the next epoch starts at once; a failed write is raised,
    as a CheckpointError, by the next `save` or `wait`. Only the process that claimed the
    folder writes to it.
    """

    LAST, BEST, METRICS, CONFIG, LOCK = "last.pt", "best.pt", "metrics.csv", "config.json", ".lock"
    PLOT, TENSORBOARD, PROBE = "metrics.png", "tensorboard", ".write-test"
    OURS = (LAST, BEST, METRICS, CONFIG, PLOT, TENSORBOARD)  # any of them means the folder holds a run

    def __init__(self, path):
        self.path = Path(path)
        self.last, self.best, self.metrics = self.path / self.LAST, self.path / self.BEST, self.path / self.METRICS
        self.config, self.plot, self.tensorboard = self.path / self.CONFIG, self.path / self.PLOT, \
            self.path / self.TENSORBOARD
        self.lock = self.thread = self.error = None
        self.created = False

    def held(self):
        """The files of ours the folder holds, by name."""
        return [name for name in self.OURS if (self.path / name).exists()]

    def check_can_hold(self, source):
        """Refuse what can be told without reading a checkpoint: a new run in a folder that holds one, a resume
        of a checkpoint that is not there. Called again under the lock."""
        if source is None and self.held():
            raise CheckpointError(f"{self.path} holds a run ({', '.join(self.held())}): continue it with --resume, "
                                  f"or start a new run in another --checkpoint-dir")
        if source is not None and not Path(source).is_file():
            raise CheckpointError(f"no checkpoint at {source}")

    def claim(self, source=None):
        """Lock the folder for this run and check it can be written; for a resume of `source`, read it and check
        the folder holds that very run, or nothing. Returns (the checkpoint to go on from, its path), or None for a
        new run; writes nothing. A command that torchrun or SLURM started again goes on from the folder's last.pt,
        if its own launch wrote it or it holds the run `source` names."""
        with stop_signals_held():  # a stop between the folder's making and its lock would leave both behind
            try:
                self.created = not self.path.exists()
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
        relaunched = self.relaunched_source(source)
        if relaunched != source:
            checkpoint = load_checkpoint(relaunched)
            if self.continues(checkpoint, source):
                return checkpoint, relaunched
        self.check_can_hold(source)
        if source is None:
            return None
        checkpoint = load_checkpoint(source)
        if not self.is_own(source):
            self.check_holds_run_of(checkpoint, Path(source))
        return checkpoint, Path(source)

    def relaunched_source(self, source):
        """What a command goes on from when torchrun (--max-restarts) or SLURM (a requeue) started it again after
        a failure: the folder's last.pt, if it has one; else, and at a command's first start, `source`."""
        return self.last if relaunched_by() and self.last.is_file() and not (
            source is not None and self.is_own(source)) else source

    def continues(self, checkpoint, source):
        """Whether a relaunched command goes on from the folder's own `checkpoint`: the same launch wrote it, or it
        is the run that the command's --resume names. A fresh command on a folder of another run is still refused."""
        kind = relaunched_by()
        this_launch = launch_record().get(kind)
        if this_launch is not None and (checkpoint.get("launch") or {}).get(kind) == this_launch:
            return True
        run_id = checkpoint.get("run_id")
        return source is not None and run_id is not None and run_id_of(source) == run_id

    def is_own(self, path):
        return Path(path).resolve() == self.last.resolve()

    def check_holds_run_of(self, checkpoint, source):
        """A folder that holds a run goes on only from a checkpoint of that run, at or after where it stands."""
        held = self.held()
        if not held:
            return
        record = self.last if self.last.exists() else self.best
        here = load_checkpoint(record) if record.exists() else {}  # a folder of metrics alone is no run's we know
        if here.get("run_id") is None or here.get("run_id") != checkpoint.get("run_id"):
            raise CheckpointError(f"{self.path} holds another run ({', '.join(held)}), not the one in {source}: "
                                  f"continue {source} in a new --checkpoint-dir")
        if self.last.exists() and position(here) > position(checkpoint):
            raise CheckpointError(f"{source} is at {describe_position(checkpoint)}, behind {self.last} at "
                                  f"{describe_position(here)} of the same run: resume {self.last}, or continue "
                                  f"{source} in a new --checkpoint-dir")

    def adopt(self, checkpoint=None, source=None):
        """Make the folder hold the run this process goes on with: a resume from elsewhere copies `source` in as
        last.pt (and, into a new folder, its folder's best.pt of the same run); then best.pt and metrics.csv are
        brought up to last.pt."""
        if source is None:
            return
        if not self.is_own(source):
            best = Path(source).parent / self.BEST
            if not self.held() and best.is_file() and run_id_of(best) == checkpoint.get("run_id"):
                atomic_write(self.best, best.read_bytes())  # first: a kill before last.pt leaves a folder that the
                # same command takes whole again (it holds that run's best alone, and no last.pt to be behind)
            atomic_write(self.last, Path(source).read_bytes())
        self.reconcile(checkpoint)

    def take_lock(self):
        try:
            self.lock = os.open(self.path / self.LOCK, LOCK_FILE_FLAGS, 0o644)
        except OSError as err:
            raise CheckpointError(f"checkpoint folder {self.path} is not writable ({err.strerror or err})") from None
        try:
            lock_exclusively(self.lock)
        except BlockingIOError:
            os.close(self.lock)
            self.lock = None
            raise CheckpointError(f"another run is training in {self.path}: wait for it to end, "
                                  f"or use another --checkpoint-dir") from None

    def remove_own_temporaries(self):
        """What a kill mid-write left; the real files beside them are whole."""
        for entry in self.path.iterdir():
            if is_temporary_of(entry.name, (*self.OURS, self.PROBE)) and entry.is_file():
                entry.unlink()

    def reconcile(self, last):
        """Bring best.pt and the records up to last.pt (whose contents `last` is), the commit point, after a kill
        between the writes."""
        best_epochs = [row["epoch"] for row in last["history"] if row.get("best")]
        if best_epochs and self.epoch_in_best() != best_epochs[-1]:
            if best_epochs[-1] == last["epoch"] and last["step"] == 0:
                # last.pt was written as the best epoch, and the kill came before the same bytes reached best.pt.
                atomic_write(self.best, self.last.read_bytes())
                print(f"note: {self.best} brought up to epoch {last['epoch']} from {self.last}", file=sys.stderr)
            else:
                print(f"note: {self.best} does not hold epoch {best_epochs[-1]}, the best one {self.last} records, "
                      f"and cannot be rebuilt from it", file=sys.stderr)
        self.write_records(last)

    def write_records(self, checkpoint):
        """metrics.csv and config.json, the run's readable records, from a checkpoint."""
        atomic_write(self.metrics, metrics_text(checkpoint["history"]).encode())
        settings = {name: value for name, value in checkpoint["args"].items()
                    if name not in MODEL_SETTINGS or name in checkpoint["model_config"]["kwargs"]}  # the model's own
        settings["world_size"] = len(checkpoint["rng"])  # the processes that trained it: one generator state each
        atomic_write(self.config, (json.dumps(settings, indent=2, sort_keys=True) + "\n").encode())

    def epoch_in_best(self):
        """The epoch best.pt holds; None if it is missing or unreadable."""
        try:
            return load_checkpoint(self.best)["epoch"]
        except CheckpointError:
            return None

    def save(self, checkpoint, is_best):
        """Write `checkpoint` (host tensors that training no longer changes) in the background."""
        self.wait()
        thread = threading.Thread(target=self.write, args=(checkpoint, is_best), name="checkpoint-writer")
        try:
            thread.start()
        except RuntimeError as err:  # "can't start new thread" on a loaded machine
            raise CheckpointError(f"could not start writing {self.last} ({err}); the previous {self.LAST}, if "
                                  f"any, is untouched") from None
        self.thread = thread

    def write(self, checkpoint, is_best):
        """The writer thread: any failure, whatever its kind, is kept for `wait` to raise, naming the file."""
        path = self.last
        try:
            data = checkpoint_bytes(checkpoint)
            atomic_write(path, data)
            if is_best:
                path = self.best
                atomic_write(path, data)
            path = self.metrics
            self.write_records(checkpoint)
        except CheckpointError as err:
            self.error = err
        except BaseException as err:  # noqa: BLE001 - a MemoryError or a pickling error must not vanish
            self.error = CheckpointError(f"could not write {path}: {type(err).__name__}: {err}; the previous "
                                         f"{path.name}, if any, is untouched")

    def wait(self):
        """Until the last save is on disk; raises its error if it failed."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def close(self):
        """Wait for the writes, then let another run have the folder. A folder this run left holding nothing of
        its own (it failed before its first save) is not left behind with only its lock in it."""
        try:
            self.wait()
        finally:
            if self.lock is not None:
                lonely = False  # the lock is all the folder would hold
                with contextlib.suppress(OSError):
                    self.remove_own_temporaries()  # what a claim stopped halfway (a signal) may have left
                    (self.path / self.PROBE).unlink(missing_ok=True)
                    lonely = [entry.name for entry in self.path.iterdir()] == [self.LOCK]
                lock, self.lock = self.lock, None
                with contextlib.suppress(OSError):
                    release_lock(lock, self.path / self.LOCK, remove=lonely)
                    if lonely and self.created:
                        self.path.rmdir()
