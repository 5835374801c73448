"""CIFAR-100 on the training device: reading, the validation split, and loaders.

The whole data set (about 180 MB as uint8) is read once and kept on the device. Each
epoch's order and every image's augmentation parameters are drawn up front from a
generator seeded by (seed, epoch) (augment.py), so batches come out with no Python per-image
work, no DataLoader workers, and the same plan on every device; a run resumed mid-epoch sees
exactly the batches it would have seen.
"""
import contextlib
import hashlib
import math
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from augment import IMAGE_SIZE, Augmentation, MixPlan, augment, mix_images, mix_targets, normalize, plan_epoch
from data_cache import cached_split, crc32_of, write_cache
from data_files import FOLDER_NAME, SPLIT_FILES, DataError, check_data_dir, describe, fetch_archive
from device_utils import input_dtype, resolve_precision

NUM_CLASSES = 100
# Images augmented per call: large enough that an epoch takes a handful of calls, small enough that the
# float32 intermediates (about 60 KB an image at their peak) stay near 1 GB.
AUGMENT_CHUNK_IMAGES = 16_384
VALIDATION_SEED = 20_231_117
SUBSET_SEED = 20_261_207


class CifarUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR-100's files hold (dicts, lists, strings, numbers, numpy arrays): a file that
    asks for anything else, such as a function to call, is refused instead of run."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a CIFAR-100 file never holds")
        return super().find_class(module, name)


def unpickle(path, what):
    """The dict in one of the data set's pickles (written by Python 2, hence latin1), its keys as text: a subset
    pickled from the dict that `pickle.load(..., encoding="bytes")` gives has them as bytes (b"data")."""
    try:
        with open(path, "rb") as handle:
            entry = CifarUnpickler(handle, encoding="latin1").load()
    except Exception as err:  # a corrupt pickle can raise almost anything
        raise DataError(f"{path}: unreadable CIFAR-100 {what} ({describe(err)})") from None
    if not isinstance(entry, dict):
        raise DataError(f"{path}: unreadable CIFAR-100 {what} (it holds a {type(entry).__name__}, not a dict)")
    return {as_text(key): value for key, value in entry.items()}


def as_text(value):
    return value.decode("latin1") if isinstance(value, bytes) else value


@dataclass
class CifarArrays:
    """Both splits as tensors: images (N, 3, 32, 32) uint8, labels (N,) int64."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list


def read_cifar100(data_dir, download=True):
    """Read `data_dir/cifar-100-python/{train,test,meta}`, unpacking or downloading the archive first if need be."""
    root = Path(data_dir)
    folder = root / FOLDER_NAME
    check_data_dir(root, download)
    if not all((folder / name).is_file() for name in SPLIT_FILES):
        fetch_archive(root)
    train_images, train_labels = read_split(folder / "train")
    test_images, test_labels = read_split(folder / "test")
    classes = unpickle(folder / "meta", "meta file").get("fine_label_names")
    if isinstance(classes, list):
        classes = [as_text(name) for name in classes]
    if not isinstance(classes, list) or len(classes) != NUM_CLASSES:
        raise DataError(f"{folder / 'meta'}: expected {NUM_CLASSES} fine class names")
    return CifarArrays(train_images=train_images, train_labels=train_labels, test_images=test_images,
                       test_labels=test_labels, classes=classes)


def read_split(path):
    """One split's images (N, 3, 32, 32) uint8 and fine labels (N,) int64, checked for the CIFAR-100 layout; from
    the cache beside the pickle when a previous run made one from this very file."""
    cached = cached_split(path, NUM_CLASSES)
    if cached is not None:
        return cached
    entry = unpickle(path, "file")
    images, labels = entry.get("data"), entry.get("fine_labels")
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":  # a subset's, from numpy
        labels = labels.tolist()
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072:
        got = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise DataError(f"{path}: expected 'data' as uint8 rows of 3x32x32 pixels, got {got}")
    if not isinstance(labels, list) or not all(type(label) is int for label in labels):
        raise DataError(f"{path}: expected 'fine_labels' as a list of whole numbers")
    if len(labels) != len(images):
        raise DataError(f"{path}: {len(images)} images but {len(labels)} labels")
    if not labels or not all(0 <= label < NUM_CLASSES for label in labels):
        raise DataError(f"{path}: labels must lie in 0..{NUM_CLASSES - 1} and the split must not be empty")
    images, labels = images.reshape(-1, 3, 32, 32), np.array(labels, dtype=np.int64)
    write_cache(path, images, labels)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels)


# ---- loaders ----


@dataclass
class PreparedEpoch:
    """An epoch augmented ahead by `TrainLoader.prepare`; on CUDA, `done` marks the end of its work on a side stream."""

    epoch: int
    images: torch.Tensor
    targets: torch.Tensor
    done: object = None


class TrainLoader:
    """Shuffled, augmented batches of a device-resident training set.

    Each epoch is augmented up front, in chunks of about AUGMENT_CHUNK_IMAGES, into one
    buffer of normalised images (in `dtype`), and batches are slices of it: a few large
    kernels instead of about sixty small ones per batch. On CUDA the training loop also asks
    for the next epoch while this one trains (`prepare`): it is augmented on a side stream,
    beside the training steps, into a second buffer. `batch_size` is the global batch:
    under torchrun each of the `world_size` ranks takes its own disjoint slice of every
    batch, so N ranks train on exactly the images and augmentations one process would. The
    last incomplete batch is dropped to keep shapes static.
    """

    def __init__(self, images, labels, batch_size, augmentation=Augmentation(), shard=(0, 1), dtype=torch.float32):
        rank, world_size = shard  # this process's rank, and how many there are
        if batch_size % world_size:
            raise DataError(f"batch size {batch_size} does not split evenly over {world_size} processes")
        if batch_size > len(images):
            raise DataError(f"batch size {batch_size} is larger than the {len(images)} training images")
        self.images, self.labels = images, labels
        self.batch_size, self.seed = batch_size, augmentation.seed
        self.rank, self.world_size = rank, world_size
        self.dtype, self.augmentation = dtype, augmentation
        self.steps_per_epoch = len(images) // batch_size
        self.images_per_rank_step = batch_size // world_size
        # Elsewhere than on CUDA nothing runs beside the training, and a second epoch would only take memory.
        self.prepares_ahead = images.device.type == "cuda"
        self.prepared = self.side_stream = None

    def positions(self, steps):
        """Positions in the epoch's order that this rank trains on at each of `steps` (a range): (steps, batch)."""
        device = self.images.device
        firsts = torch.arange(steps.start, steps.stop, device=device) * self.batch_size
        firsts += self.rank * self.images_per_rank_step
        return firsts[:, None] + torch.arange(self.images_per_rank_step, device=device)

    def augmented(self, epoch, start_step=0):
        """This rank's augmented images and targets of steps start_step.. of `epoch`."""
        plan = plan_epoch(len(self.images), self.steps_per_epoch, self.seed, epoch, augmentation=self.augmentation,
                          batch_size=self.images_per_rank_step).to(self.images.device)
        return self.augment_epoch(plan, start_step), self.epoch_targets(plan, start_step)

    def augment_epoch(self, plan, start_step=0):
        """This rank's images of steps start_step.. of the epoch, augmented: (steps * rank batch, 3, 32, 32)."""
        steps = range(start_step, self.steps_per_epoch)
        per_rank = self.images_per_rank_step
        buffer = torch.empty((len(steps) * per_rank, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=self.dtype,
                             device=self.images.device).contiguous(memory_format=torch.channels_last)
        chunk_steps = max(1, AUGMENT_CHUNK_IMAGES // per_rank)
        for first in range(0, len(steps), chunk_steps):
            chunk = steps[first:first + chunk_steps]
            positions = self.positions(chunk).flatten()
            orders = plan.jitter_order[chunk.start:chunk.stop].repeat_interleave(per_rank, dim=0)
            images = augment(self.images[plan.order[positions]], plan, positions, orders,
                             cutout_size=self.augmentation.cutout)
            if plan.mixing is not None:
                rows = MixPlan(*(part[chunk.start:chunk.stop] for part in vars(plan.mixing).values()))
                images = mix_images(images.view(len(chunk), per_rank, *images.shape[1:]), rows).flatten(0, 1)
            buffer[first * per_rank:(first + len(chunk)) * per_rank] = images
        return buffer

    def epoch_targets(self, plan, start_step=0):
        """The labels of this rank's batches (steps, B); with mixing, their mixed targets (steps, B, classes)."""
        labels = self.labels[plan.order[self.positions(range(start_step, self.steps_per_epoch))]]
        if plan.mixing is None:
            return labels
        return mix_targets(labels, MixPlan(*(part[start_step:] for part in vars(plan.mixing).values())), NUM_CLASSES)

    def prepare(self, epoch):
        """Start augmenting `epoch` now, for its `batches` to take. On CUDA the work goes to a side stream, so
        it runs beside the training steps already queued instead of after them."""
        if self.images.device.type == "cuda" and self.side_stream is None:
            # One stream for every epoch: the allocator reuses memory only on the stream that freed it.
            self.side_stream = torch.cuda.Stream(self.images.device)
        side = self.side_stream
        with torch.cuda.stream(side) if side else contextlib.nullcontext():
            self.prepared = PreparedEpoch(epoch, *self.augmented(epoch), side and side.record_event())

    def take_prepared(self, epoch):
        """The prepared epoch if it is `epoch`, ready for the current stream to read; else None."""
        prepared, self.prepared = self.prepared, None
        if prepared is None or prepared.epoch != epoch:
            return None
        if prepared.done is not None:
            stream = torch.cuda.current_stream(self.images.device)
            stream.wait_event(prepared.done)
            for tensor in (prepared.images, prepared.targets):
                tensor.record_stream(stream)  # made on the side stream: not to be reused while this one reads
        return prepared

    def batches(self, epoch, start_step=0):
        """This rank's (images, targets) batches of `epoch` from `start_step`; the epoch is augmented (or its
        preparation taken) now, at the call, so that the first batch is no slower than the others."""
        per_rank = self.images_per_rank_step
        prepared = self.take_prepared(epoch)
        if prepared is None:
            images, targets = self.augmented(epoch, start_step)
        else:
            images, targets = prepared.images[start_step * per_rank:], prepared.targets[start_step:]
        return ((images[index * per_rank:(index + 1) * per_rank], targets[index]) for index in range(len(targets)))


class EvalLoader:
    """Normalised, unaugmented batches, prepared once in `dtype`; under torchrun each rank takes every
    world_size-th image."""

    def __init__(self, images, labels, batch_size=1000, shard=(0, 1), dtype=torch.float32):
        rank, world_size = shard
        images = normalize(images[rank::world_size].float().div_(255)).to(dtype)
        self.images = images.contiguous(memory_format=torch.channels_last)
        self.labels = labels[rank::world_size]
        self.batch_size = batch_size

    def __iter__(self):
        for start in range(0, len(self.images), self.batch_size):
            yield self.images[start:start + self.batch_size], self.labels[start:start + self.batch_size]

    def __len__(self):
        return math.ceil(len(self.images) / self.batch_size)


def balanced_choice(labels, count, seed, flag):
    """The sorted indices of `count` of `labels`, as evenly over their classes as possible (the first classes get
    one more when `count` does not divide evenly), drawn by `seed` alone; `flag` names the request in an error."""
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(len(labels), generator=generator)
    classes = labels.unique()
    quotas = torch.full((len(classes),), count // len(classes))
    quotas[:count % len(classes)] += 1
    chosen = []
    for label, quota in zip(classes.tolist(), quotas.tolist()):
        members = shuffled[labels[shuffled] == label]
        if quota > len(members):
            raise DataError(f"{flag} {count} asks for {quota} images of class {label}, which has only {len(members)}")
        chosen.append(members[:quota])
    return torch.cat(chosen).sort().values


def split_validation(labels, val_size, seed=VALIDATION_SEED):
    """Indices (train, val) with `val_size` training images held out, class-balanced (`balanced_choice`).

    The split has its own fixed seed, not the run's --seed, so every run of a comparison holds out the same images.
    """
    val = balanced_choice(labels, val_size, seed, "--val-size")
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val] = False
    return keep.nonzero().squeeze(1), val


def training_subset(labels, train_images, val_size, seed=SUBSET_SEED):
    """The positions in `labels` (the training images beside a `val_size` validation split) of `train_images` of
    them, class-balanced, with a seed of their own: every run asking for N images trains on the same N."""
    if train_images > len(labels):
        beside = f" beside --val-size {val_size}" if val_size else ""
        raise DataError(f"--train-images {train_images} asks for more than the {len(labels):,} training images "
                        f"there are{beside}")
    return balanced_choice(labels, train_images, seed, "--train-images")


def split_fingerprint(indices, images, labels):
    """16 hex digits that change if the held-out images, their labels or their places in the data set do."""
    digest = hashlib.sha256()
    for tensor in (indices, images, labels):
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def data_fingerprint(images, labels):
    """8 hex digits (a CRC-32) that change if the training images or their labels do: a resume on other data
    says so, in these terms."""
    return f"{crc32_of(images.numpy(), labels.numpy()):08x}"


def load_cifar100(config, runtime, arrays=None):
    """CIFAR-100 onto the runtime's device for a run with these settings (a `Config`), in the dtype it computes in,
    read now unless `arrays` were; returns (train_loader, val_loader or None, test_loader)."""
    arrays = arrays or read_cifar100(config.data_dir, not config.no_download)
    device, shard = runtime.device, (runtime.rank, runtime.world_size)
    dtype = input_dtype(resolve_precision(device, config.precision))
    images, labels = arrays.train_images, arrays.train_labels
    val = None
    if config.val_size:
        if config.val_size >= len(labels):
            raise DataError(f"--val-size {config.val_size} leaves no training images (there are {len(labels)})")
        train_indices, val_indices = split_validation(labels, config.val_size)
        val = EvalLoader(images[val_indices].to(device), labels[val_indices].to(device), config.test_batch_size,
                         shard=shard, dtype=dtype)
        val.fingerprint = split_fingerprint(val_indices, images[val_indices], labels[val_indices])
        images, labels = images[train_indices], labels[train_indices]
    if config.train_images:
        subset = training_subset(labels, config.train_images, config.val_size)
        images, labels = images[subset], labels[subset]
    train = TrainLoader(images.to(device), labels.to(device), config.batch_size, augmentation=config.augmentation,
                        shard=shard, dtype=dtype)
    train.fingerprint = data_fingerprint(images, labels)
    test = EvalLoader(arrays.test_images.to(device), arrays.test_labels.to(device), config.test_batch_size,
                      shard=shard, dtype=dtype)
    train.classes = test.classes = arrays.classes
    return train, val, test


class DataReader:
    """CIFAR-100 read on a thread of its own, started first, so that the reading goes on beside the device's
    set-up (CUDA's initialisation) and the run folder's checks; `arrays()` waits for it and raises what it
    raised, where the run needs the data. Data still to be downloaded or unpacked is fetched there and then
    instead: a run that stops before would otherwise wait for the download to end."""

    def __init__(self, data_dir, download):
        self.data_dir, self.download, self.future = data_dir, download, None
        if all((Path(data_dir) / FOLDER_NAME / name).is_file() for name in SPLIT_FILES):
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="data-reader")
            self.future = pool.submit(self.read)
            pool.shutdown(wait=False)

    def read(self):
        return read_cifar100(self.data_dir, self.download)

    def arrays(self):
        return self.future.result() if self.future is not None else self.read()
