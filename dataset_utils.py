"""CIFAR-100 on the training device: reading, batched augmentation, and loaders.

The whole data set (about 180 MB as uint8) is read once and kept on the device. Each
epoch's order and every image's augmentation parameters are drawn up front from a
generator seeded by (seed, epoch), so batches come out with no Python per-image work, no
DataLoader workers, and the same plan on every device; a run resumed mid-epoch sees
exactly the batches it would have seen.
"""
import contextlib
import functools
import hashlib
import math
import os
import pickle
import shutil
import sys
import tarfile
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from auto_augment import PolicyPlan, apply_policy, draw_policy, grayscale, plan_policy

NUM_CLASSES = 100
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
CROP_PADDING = 4
MAX_ROTATION_DEGREES = 15.0
JITTER_STRENGTH = 0.2  # brightness, contrast and saturation factors are drawn from [0.8, 1.2]
IMAGE_SIZE = 32
# Images augmented per call: large enough that an epoch takes a handful of calls, small enough that the
# float32 intermediates (about 60 KB an image at their peak) stay near 1 GB.
AUGMENT_CHUNK_IMAGES = 16_384
VALIDATION_SEED = 20_231_117
FLIP_STREAM = 0xF11B  # keeps the alternating flip's draw apart from every other seeded draw


# The official python-version archive (about 161 MB) and the folder it unpacks to.
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE_NAME = "cifar-100-python.tar.gz"
ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
FOLDER_NAME = "cifar-100-python"
SPLIT_FILES = ("train", "test", "meta")


class DataError(RuntimeError):
    """The data set is missing, unreadable or not in the CIFAR-100 layout."""


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
    """The dict in one of the data set's pickles (written by Python 2, hence latin1)."""
    try:
        with open(path, "rb") as handle:
            entry = CifarUnpickler(handle, encoding="latin1").load()
    except Exception as err:  # a corrupt pickle can raise almost anything
        raise DataError(f"{path}: unreadable CIFAR-100 {what} ({describe(err)})") from None
    if not isinstance(entry, dict):
        raise DataError(f"{path}: unreadable CIFAR-100 {what} (it holds a {type(entry).__name__}, not a dict)")
    return entry


def describe(err):
    return f"{type(err).__name__}: {err}".splitlines()[0][:200]


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
    if root.exists() and not root.is_dir():
        raise DataError(f"--data-dir {root} is a file, not a folder")
    if all((root / name).is_file() for name in SPLIT_FILES):
        raise DataError(f"{root} is the {FOLDER_NAME} folder itself: point --data-dir at its parent, "
                        f"{root.resolve().parent}")
    for name in SPLIT_FILES:
        path = folder / name
        if (path.exists() or path.is_symlink()) and not path.is_file():
            raise DataError(f"{path} is not a readable file (a folder, or a link that leads nowhere)")
    if not all((folder / name).is_file() for name in SPLIT_FILES):
        fetch_archive(root, download)
    train_images, train_labels = read_split(folder / "train")
    test_images, test_labels = read_split(folder / "test")
    classes = unpickle(folder / "meta", "meta file").get("fine_label_names")
    if not isinstance(classes, list) or len(classes) != NUM_CLASSES:
        raise DataError(f"{folder / 'meta'}: expected {NUM_CLASSES} fine class names")
    return CifarArrays(train_images, train_labels, test_images, test_labels, classes)


def fetch_archive(root, download):
    """Unpack `root/cifar-100-python.tar.gz`, downloading it first if it is missing and that is allowed."""
    archive = root / ARCHIVE_NAME
    if not archive.is_file():
        if not download:
            raise DataError(f"CIFAR-100 not found: put {ARCHIVE_NAME} ({ARCHIVE_URL}) or its extracted "
                            f"{FOLDER_NAME}/ folder in {root.resolve()}, or drop --no-download")
        download_archive(archive)
    actual = file_md5(archive)
    if actual != ARCHIVE_MD5:
        raise DataError(f"{archive} is damaged (md5 {actual}, expected {ARCHIVE_MD5}): delete it and download it "
                        f"again (see the README's Data section)")
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
    except (OSError, tarfile.TarError) as err:
        raise DataError(f"could not unpack {archive} ({describe(err)})") from None


def download_archive(archive):
    """Fetch the official archive into `archive`; a failure leaves no partial file or new empty folder behind."""
    created = [folder for folder in (archive.parent, *archive.parent.parents) if not folder.exists()]
    partial = archive.with_name(archive.name + ".part")
    print(f"downloading CIFAR-100 (about 161 MB) to {archive}", file=sys.stderr, flush=True)
    try:
        archive.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(ARCHIVE_URL, timeout=60) as response, open(partial, "wb") as handle:
            shutil.copyfileobj(response, handle)
        os.replace(partial, archive)
    except (OSError, ValueError) as err:
        partial.unlink(missing_ok=True)
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise DataError(f"could not download CIFAR-100 ({describe(err)}); fetch {ARCHIVE_URL} elsewhere and put it, "
                        f"or its extracted {FOLDER_NAME}/ folder, in {archive.parent.resolve()}") from None


def file_md5(path):
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_split(path):
    """One split's images (N, 3, 32, 32) uint8 and fine labels (N,) int64, checked for the CIFAR-100 layout; from
    the cache beside the pickle when a previous run made one from this very file."""
    cached = read_cache(path)
    if cached is not None:
        return cached
    entry = unpickle(path, "file")
    images, labels = entry.get("data"), entry.get("fine_labels")
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


def cache_path(path):
    """Where a split's plain uint8 arrays are kept beside its pickle: `.train.uint8.npz`."""
    return path.with_name(f".{path.name}.uint8.npz")


def source_stamp(path):
    """The pickle's size and CRC-32: a cache made from other bytes, however recently, is never taken for it."""
    checksum, size = 0, 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            checksum, size = zlib.crc32(block, checksum), size + len(block)
    return np.array([size, checksum], dtype=np.int64)


def read_cache(path):
    """The split from its cache (plain arrays: a fraction of the unpickling time), if the cache was made from
    this very file and holds what a split must; None otherwise (then the pickle is read, and the cache made)."""
    try:
        with np.load(cache_path(path), allow_pickle=False) as cache:
            stamp, images, labels = cache["source"], cache["images"], cache["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if not np.array_equal(stamp, source_stamp(path)) or images.dtype != np.uint8 or images.shape[1:] != (3, 32, 32) \
            or labels.dtype != np.int64 or labels.shape != (len(images),) or not len(labels) \
            or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        return None
    return torch.from_numpy(images), torch.from_numpy(labels)


def write_cache(path, images, labels):
    """Keep the split's arrays beside its pickle for the next run; a folder that cannot take them is left as it
    was (nothing half-written stays)."""
    cache = cache_path(path)
    temporary = cache.with_name(cache.name + f".tmp{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            np.savez(handle, source=source_stamp(path), images=images, labels=labels)
        os.replace(temporary, cache)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)


# ---- batched augmentation: each op takes a float batch (B, 3, H, W) in [0, 1] ----


def random_crop(images, offsets, padding=CROP_PADDING):
    """Zero-pad by `padding`, then cut the original size at per-image (row, col) offsets in [0, 2*padding]."""
    size = images.shape[-1]
    padded = F.pad(images, (padding,) * 4)
    steps = torch.arange(size, device=images.device)
    rows = (offsets[:, 0:1] + steps)[:, :, None]
    cols = (offsets[:, 1:2] + steps)[:, None, :]
    batch = torch.arange(len(images), device=images.device)[:, None, None]
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2)  # advanced indexing puts channels last


def horizontal_flip(images, mask):
    return torch.where(mask[:, None, None, None], images.flip(-1), images)


def rotate(images, degrees):
    """Rotate each image about its centre, nearest-neighbour with zero fill, like torchvision's RandomRotation."""
    radians = degrees * (math.pi / 180)
    cos, sin, zero = radians.cos(), radians.sin(), torch.zeros_like(radians)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


@functools.lru_cache
def channel_constant(values, device):
    """A (3, 1, 1) tensor made once per device: building it each batch would be a blocking host-to-GPU copy."""
    return torch.tensor(values, device=device)[:, None, None]


def blend(images, other, factors):
    factors = factors[:, None, None, None]
    return (factors * images + (1 - factors) * other).clamp(0, 1)


# The jitter ops, by their index in a plan's jitter orders and factors.
BRIGHTNESS, CONTRAST, SATURATION = range(3)


def color_jitter(images, factors, orders):
    """Brightness, contrast and saturation with per-image factors (B, 3), in per-image op orders (B, 3), or one
    order (3,) for all. Each op blends an image towards black, its mean grey or its grey; at each of the three
    positions every image is blended towards what its own op there needs, so no image waits for a group."""
    orders = orders.expand(len(images), 3)
    for position in range(3):
        op = orders[:, position, None]
        gray = grayscale(images)
        towards = torch.where(op[:, :, None, None] == SATURATION, gray, gray.mean((1, 2, 3), keepdim=True))
        towards = torch.where(op[:, :, None, None] == BRIGHTNESS, 0.0, towards)
        images = blend(images, towards, factors.gather(1, op).squeeze(1))
    return images


def normalize(images):
    mean = channel_constant(CIFAR100_MEAN, images.device)
    std = channel_constant(CIFAR100_STD, images.device)
    return (images - mean) / std


def cutout(images, centres, size):
    """Zero a square per image around (row, col) `centres` that may lie on the border, as the Cutout paper's code
    does: rows and columns centre - size // 2 up to centre + size // 2, so an odd size cuts (size - 1) squared.
    On normalised images zero is the data set's mean colour, the paper's fill."""
    steps = torch.arange(images.shape[-1], device=images.device)
    low, high = centres - size // 2, centres + size // 2
    rows = (steps >= low[:, 0:1]) & (steps < high[:, 0:1])
    cols = (steps >= low[:, 1:2]) & (steps < high[:, 1:2])
    keep = ~(rows[:, :, None] & cols[:, None, :])
    return images * keep[:, None].to(images.dtype)


@dataclass(frozen=True)
class Augmentation:
    """How training images are augmented beyond the random crop and flip; every part is off by default."""

    cutout: int = 0  # the side of the square Cutout zeroes
    mixup: float = 0.0  # Beta(alpha, alpha) of the mixup weights
    cutmix: float = 0.0  # Beta(alpha, alpha) of the CutMix box shares
    cutmix_prob: float = 1.0  # the chance a batch is CutMix; the others are mixed up with --mixup, else left
    policy: str = None  # "ta_wide" or "ra": replaces the rotation and colour jitter
    num_ops: int = 2  # RandAugment's ops per image
    magnitude: int = 9  # RandAugment's magnitude bin
    flip: str = "random"  # "random": each image's own coin every epoch; "alternate": mirrored every other epoch

    @property
    def mixes(self):
        return self.mixup > 0 or self.cutmix > 0


@dataclass
class AugmentationPlan:
    """Every random choice of one epoch, one row per image position in the epoch's order."""

    order: torch.Tensor  # (N,) permutation of the data set
    crop_offsets: torch.Tensor  # (N, 2) in [0, 2 * CROP_PADDING]
    flip: torch.Tensor  # (N,) bool
    degrees: torch.Tensor  # (N,) in [-15, 15]
    jitter_factors: torch.Tensor  # (N, 3) in [0.8, 1.2]
    jitter_order: torch.Tensor  # (steps, 3): torchvision shuffles the jitter ops per call; we do per batch
    cutout_centres: torch.Tensor  # (N, 2) in [0, 32): used only with --cutout
    mixing: "MixPlan" = None  # with --mixup or --cutmix
    policy: PolicyPlan = None  # with --auto-augment


@dataclass
class MixPlan:
    """How each batch is mixed with a permutation of itself (image i with image partners[i]), one row per step.

    `weights` is each image's own share of the result and of its target; the partner has the rest.
    A CutMix step pastes the partner into `boxes` (top, left, bottom, right) and its weight is the area
    left; a mixup step has an empty box and blends the whole image by its weight; a step left unmixed
    has weight 1.
    """

    weights: torch.Tensor  # (steps,) in [0, 1]
    boxes: torch.Tensor  # (steps, 4)
    blend: torch.Tensor  # (steps,) the blending weight: 1 on CutMix and unmixed steps, the weight on mixup steps
    partners: torch.Tensor  # (steps, batch): a permutation of each batch (this process's share under torchrun)


def plan_epoch(num_images, steps, seed, epoch, device, augmentation=Augmentation(), batch_size=None):
    """Draw an epoch's plan on the CPU, so a seed gives the same run on every device, then move it once.

    `batch_size` is the batch each process trains on, whose images mixing pairs (default: one process).
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_images, generator=generator)
    crop_offsets = torch.randint(0, 2 * CROP_PADDING + 1, (num_images, 2), generator=generator)
    flip = torch.rand(num_images, generator=generator) < 0.5
    degrees = (torch.rand(num_images, generator=generator) * 2 - 1) * MAX_ROTATION_DEGREES
    jitter_factors = 1 + (torch.rand(num_images, 3, generator=generator) * 2 - 1) * JITTER_STRENGTH
    jitter_order = torch.stack([torch.randperm(3, generator=generator) for _ in range(steps)])
    cutout_centres = torch.randint(0, IMAGE_SIZE, (num_images, 2), generator=generator)
    # Drawn last, each only when on: switching one on leaves every other draw of the epoch as it was.
    mixing = policy = None
    if augmentation.mixes:
        mixing = plan_mixing(steps, batch_size or num_images // steps, augmentation, generator)
    if augmentation.policy:
        policy = plan_policy(*draw_policy(num_images, augmentation.policy, augmentation.num_ops,
                                          augmentation.magnitude, generator))
    if augmentation.flip == "alternate":
        flip = alternating_flips(num_images, seed, epoch)[order]

    def to_device(tensor):
        if torch.device(device).type == "cuda":  # from pageable memory a copy would wait for the stream's work
            tensor = tensor.pin_memory()
        return tensor.to(device, non_blocking=True)

    def parts_to_device(plan):
        return plan and type(plan)(*map(to_device, vars(plan).values()))

    return AugmentationPlan(*map(to_device, (order, crop_offsets, flip, degrees, jitter_factors, jitter_order,
                                             cutout_centres)), parts_to_device(mixing), parts_to_device(policy))


def alternating_flips(num_images, seed, epoch):
    """Which images (by index in the data set) are mirrored in `epoch`: a random half fixed by the seed in even
    epochs, the other half in odd ones, as airbench's alternating flip. Any two epochs in a row then show every
    image both ways, where independent coins leave a quarter of the images unmirrored in both."""
    first = np.random.default_rng([seed, FLIP_STREAM]).random(num_images) < 0.5
    return torch.from_numpy(first) ^ bool(epoch % 2)


def plan_mixing(steps, batch_size, augmentation, generator):
    """Each step is CutMix with chance cutmix_prob; the others are mixup with --mixup, else unmixed. Weights are
    drawn from Beta(alpha, alpha), and each batch's partners are a random permutation of it, as in the papers."""
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))  # torch has no seeded Beta
    use_cutmix = (rng.random(steps) < augmentation.cutmix_prob) & (augmentation.cutmix > 0)
    use_mixup = ~use_cutmix & (augmentation.mixup > 0)
    alpha = np.where(use_cutmix, augmentation.cutmix, augmentation.mixup)
    drawn = np.where(use_cutmix | use_mixup, rng.beta(np.maximum(alpha, 1e-9), np.maximum(alpha, 1e-9)), 1.0)
    # CutMix: a square of (1 - weight) of the image, centred anywhere, clipped by the border.
    half_side = np.sqrt(1 - drawn) * IMAGE_SIZE / 2
    centres = rng.integers(0, IMAGE_SIZE, (steps, 2))
    low = np.clip(np.rint(centres - half_side[:, None]), 0, IMAGE_SIZE).astype(np.int64)
    high = np.clip(np.rint(centres + half_side[:, None]), 0, IMAGE_SIZE).astype(np.int64)
    boxes = np.where(use_cutmix[:, None], np.concatenate([low, high], 1), 0)
    pasted = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / IMAGE_SIZE**2
    weights = np.where(use_cutmix, 1 - pasted, drawn)
    blend = np.where(use_mixup, drawn, 1.0)
    partners = rng.permuted(np.tile(np.arange(batch_size), (steps, 1)), axis=1)
    return MixPlan(torch.tensor(weights, dtype=torch.float32), torch.from_numpy(boxes),
                   torch.tensor(blend, dtype=torch.float32), torch.from_numpy(partners))


def mix_images(images, mixing):
    """Mix steps of batches (steps, B, 3, H, W) with their partners, by the plan's rows for those steps."""
    partners = images[torch.arange(len(images), device=images.device)[:, None], mixing.partners]
    blend = mixing.blend[:, None, None, None, None].to(images.dtype)
    mixed = blend * images + (1 - blend) * partners
    steps = torch.arange(images.shape[-1], device=images.device)
    top, left, bottom, right = (mixing.boxes[:, i, None] for i in range(4))
    rows = (steps >= top) & (steps < bottom)
    cols = (steps >= left) & (steps < right)
    pasted = (rows[:, :, None] & cols[:, None, :])[:, None, None]
    return torch.where(pasted, partners, mixed)


def mix_targets(labels, mixing, num_classes=NUM_CLASSES):
    """Targets (steps, B, classes) of batches of labels (steps, B) mixed with their partners: each row sums to 1."""
    own = F.one_hot(labels, num_classes).float()
    partners = own[torch.arange(len(own), device=own.device)[:, None], mixing.partners]
    weights = mixing.weights[:, None, None]
    return weights * own + (1 - weights) * partners


def augment(images, plan, positions, jitter_order, cutout_size=0):
    """Crop, flip, then the policy (or rotate and jitter), normalise and cut out uint8 images with the plan's rows
    at `positions`.

    `jitter_order` is one order of the jitter ops for all the images, or one row per image.
    """
    images = images.float()  # grey levels 0..255 until normalised: the policy's ops are defined on them
    images = random_crop(images, plan.crop_offsets[positions])
    images = horizontal_flip(images, plan.flip[positions])
    if plan.policy is not None:
        images = apply_policy(images, PolicyPlan(*(part[positions] for part in vars(plan.policy).values())))
        images = images.div_(255)
    else:
        images = rotate(images.div_(255), plan.degrees[positions])
        images = color_jitter(images, plan.jitter_factors[positions], jitter_order)
    images = normalize(images)
    if cutout_size:
        images = cutout(images, plan.cutout_centres[positions], cutout_size)
    return images


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

    def __init__(self, images, labels, batch_size, seed=0, rank=0, world_size=1, dtype=torch.float32,
                 augmentation=Augmentation()):
        if batch_size % world_size:
            raise DataError(f"batch size {batch_size} does not split evenly over {world_size} processes")
        if batch_size > len(images):
            raise DataError(f"batch size {batch_size} is larger than the {len(images)} training images")
        self.images, self.labels = images, labels
        self.batch_size, self.seed = batch_size, seed
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
        plan = plan_epoch(len(self.images), self.steps_per_epoch, self.seed, epoch, self.images.device,
                          self.augmentation, self.images_per_rank_step)
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
            images = augment(self.images[plan.order[positions]], plan, positions, orders, self.augmentation.cutout)
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
        return mix_targets(labels, MixPlan(*(part[start_step:] for part in vars(plan.mixing).values())))

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

    def __init__(self, images, labels, batch_size=1000, rank=0, world_size=1, dtype=torch.float32):
        images = normalize(images[rank::world_size].float().div_(255)).to(dtype)
        self.images = images.contiguous(memory_format=torch.channels_last)
        self.labels = labels[rank::world_size]
        self.batch_size = batch_size

    def __iter__(self):
        for start in range(0, len(self.images), self.batch_size):
            yield self.images[start:start + self.batch_size], self.labels[start:start + self.batch_size]

    def __len__(self):
        return math.ceil(len(self.images) / self.batch_size)


def split_validation(labels, val_size, seed=VALIDATION_SEED):
    """Indices (train, val) with `val_size` training images held out, as evenly over the classes as possible.

    The split has its own fixed seed, not the run's --seed, so every run of a comparison holds out the same images.
    """
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(len(labels), generator=generator)
    classes = labels.unique()
    quotas = torch.full((len(classes),), val_size // len(classes))
    quotas[:val_size % len(classes)] += 1
    held_out = []
    for label, quota in zip(classes.tolist(), quotas.tolist()):
        members = shuffled[labels[shuffled] == label]
        if quota > len(members):
            raise DataError(f"--val-size {val_size} asks for {quota} images of class {label}, "
                            f"which has only {len(members)}")
        held_out.append(members[:quota])
    val = torch.cat(held_out).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val] = False
    return keep.nonzero().squeeze(1), val


def split_fingerprint(indices, images, labels):
    """16 hex digits that change if the held-out images, their labels or their places in the data set do."""
    digest = hashlib.sha256()
    for tensor in (indices, images, labels):
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class DataConfig:
    """What the loaders need to know about a run."""

    batch_size: int
    data_dir: str = "data"
    download: bool = True
    device: str = "cpu"
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    test_batch_size: int = 1000
    val_size: int = 0
    augmentation: Augmentation = Augmentation()
    dtype: torch.dtype = torch.float32


def load_cifar100(config, arrays=None):
    """CIFAR-100 onto the device, read now unless `arrays` were; returns (train_loader, val_loader or None,
    test_loader)."""
    arrays = arrays or read_cifar100(config.data_dir, config.download)
    device = torch.device(config.device)
    images, labels = arrays.train_images, arrays.train_labels
    val = None
    if config.val_size:
        if config.val_size >= len(labels):
            raise DataError(f"--val-size {config.val_size} leaves no training images (there are {len(labels)})")
        train_indices, val_indices = split_validation(labels, config.val_size)
        val = EvalLoader(images[val_indices].to(device), labels[val_indices].to(device), config.test_batch_size,
                         config.rank, config.world_size, config.dtype)
        val.fingerprint = split_fingerprint(val_indices, images[val_indices], labels[val_indices])
        images, labels = images[train_indices], labels[train_indices]
    train = TrainLoader(images.to(device), labels.to(device), config.batch_size, config.seed, config.rank,
                        config.world_size, config.dtype, config.augmentation)
    test = EvalLoader(arrays.test_images.to(device), arrays.test_labels.to(device), config.test_batch_size,
                      config.rank, config.world_size, config.dtype)
    train.classes = test.classes = arrays.classes
    return train, val, test
