"""CIFAR-100 on the training device: reading, batched augmentation, and loaders.

The whole data set (about 180 MB as uint8) is read once and kept on the device. Each
epoch's order and every image's augmentation parameters are drawn up front from a
generator seeded by (seed, epoch), so batches come out with no Python per-image work, no
DataLoader workers, and the same plan on every device; a run resumed mid-epoch sees
exactly the batches it would have seen.
"""
import functools
import math
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.datasets import CIFAR100
from torchvision.datasets.utils import download_and_extract_archive

NUM_CLASSES = 100
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
CROP_PADDING = 4
MAX_ROTATION_DEGREES = 15.0
JITTER_STRENGTH = 0.2  # brightness, contrast and saturation factors are drawn from [0.8, 1.2]
GRAYSCALE_WEIGHTS = (0.2989, 0.587, 0.114)  # the weights torchvision's rgb_to_grayscale uses


class DataError(RuntimeError):
    """The data set is missing, unreadable or not in the CIFAR-100 layout."""


class CIFAR100Folder(CIFAR100):
    """torchvision's CIFAR100 reader, checking files exist instead of their md5 sums.

    The md5 sums are those of the official files, so they would refuse the small folders
    the tests generate; the downloaded archive is still checked against its md5, and
    `read_cifar100` checks the structure of what was read.
    """

    train_list = [["train", None]]
    test_list = [["test", None]]
    meta = {**CIFAR100.meta, "md5": None}

    def _load_meta(self):
        try:
            super()._load_meta()
        except Exception as err:  # a corrupt pickle can raise almost anything
            raise DataError(f"{meta_path(self.root)}: unreadable CIFAR-100 meta file ({describe(err)})") from None


def meta_path(root):
    return Path(root) / CIFAR100.base_folder / CIFAR100.meta["filename"]


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
    """Read `data_dir/cifar-100-python/{train,test,meta}`, fetching the archive first if allowed."""
    root = Path(data_dir)
    folder = root / CIFAR100.base_folder
    archive = root / CIFAR100.filename
    if not all((folder / name).is_file() for name in ("train", "test", "meta")):
        if not (download or archive.is_file()):
            raise DataError(
                f"CIFAR-100 not found: put {CIFAR100.filename} or its extracted {CIFAR100.base_folder}/ "
                f"folder in {root.resolve()} (or allow the download: drop --no-download)"
            )
        fetch_archive(root)
    train_images, train_labels, _ = read_split(root, train=True)
    test_images, test_labels, classes = read_split(root, train=False)
    if len(classes) != NUM_CLASSES:
        raise DataError(f"{meta_path(root)}: expected {NUM_CLASSES} class names, found {len(classes)}")
    return CifarArrays(train_images, train_labels, test_images, test_labels, classes)


def fetch_archive(root):
    """Download (unless the archive is already there), check its md5 and extract it."""
    try:
        download_and_extract_archive(CIFAR100Folder.url, str(root), filename=CIFAR100.filename, md5=CIFAR100.tgz_md5)
    except (OSError, RuntimeError, tarfile.TarError) as err:
        raise DataError(
            f"could not get CIFAR-100 ({describe(err)}); put {CIFAR100.filename} or its extracted "
            f"{CIFAR100.base_folder}/ folder in {Path(root).resolve()}"
        ) from None


def read_split(root, train):
    path = Path(root) / CIFAR100.base_folder / ("train" if train else "test")
    try:
        dataset = CIFAR100Folder(root, train=train)
    except DataError:
        raise
    except Exception as err:  # a corrupt pickle can raise almost anything
        raise DataError(f"{path}: unreadable CIFAR-100 file ({describe(err)})") from None
    images, labels = dataset.data, dataset.targets
    if images.dtype.name != "uint8" or images.shape[1:] != (32, 32, 3):
        raise DataError(f"{path}: expected uint8 images of 3x32x32, got {images.dtype.name} {images.shape[1:]}")
    if len(labels) != len(images):
        raise DataError(f"{path}: {len(images)} images but {len(labels)} labels")
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise DataError(f"{path}: labels must lie in 0..{NUM_CLASSES - 1} and the split must not be empty")
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels, dataset.classes


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


def grayscale(images):
    return (images * channel_constant(GRAYSCALE_WEIGHTS, images.device)).sum(1, keepdim=True)


def blend(images, other, factors):
    factors = factors[:, None, None, None]
    return (factors * images + (1 - factors) * other).clamp(0, 1)


def adjust_brightness(images, factors):
    return blend(images, torch.zeros_like(images), factors)


def adjust_contrast(images, factors):
    return blend(images, grayscale(images).mean((1, 2, 3), keepdim=True), factors)


def adjust_saturation(images, factors):
    return blend(images, grayscale(images), factors)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation)


def color_jitter(images, factors, order):
    """Apply brightness, contrast and saturation with per-image factors (B, 3), in the given op order."""
    for op_index in order.tolist():
        images = JITTER_OPS[op_index](images, factors[:, op_index])
    return images


def normalize(images):
    mean = channel_constant(CIFAR100_MEAN, images.device)
    std = channel_constant(CIFAR100_STD, images.device)
    return (images - mean) / std


@dataclass
class AugmentationPlan:
    """Every random choice of one epoch, one row per image position in the epoch's order."""

    order: torch.Tensor  # (N,) permutation of the data set
    crop_offsets: torch.Tensor  # (N, 2) in [0, 2 * CROP_PADDING]
    flip: torch.Tensor  # (N,) bool
    degrees: torch.Tensor  # (N,) in [-15, 15]
    jitter_factors: torch.Tensor  # (N, 3) in [0.8, 1.2]
    jitter_order: torch.Tensor  # (steps, 3): torchvision shuffles the jitter ops per call; we do per batch


def plan_epoch(num_images, steps, seed, epoch, device):
    """Draw an epoch's plan on the CPU, so a seed gives the same run on every device, then move it once."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_images, generator=generator)
    crop_offsets = torch.randint(0, 2 * CROP_PADDING + 1, (num_images, 2), generator=generator)
    flip = torch.rand(num_images, generator=generator) < 0.5
    degrees = (torch.rand(num_images, generator=generator) * 2 - 1) * MAX_ROTATION_DEGREES
    jitter_factors = 1 + (torch.rand(num_images, 3, generator=generator) * 2 - 1) * JITTER_STRENGTH
    jitter_order = torch.stack([torch.randperm(3, generator=generator) for _ in range(steps)])

    def to_device(tensor):
        return tensor.to(device, non_blocking=True)

    # jitter_order stays on the CPU: it picks which ops run, and reading it from a GPU would sync every batch.
    return AugmentationPlan(to_device(order), to_device(crop_offsets), to_device(flip), to_device(degrees),
                            to_device(jitter_factors), jitter_order)


def augment(images, plan, positions, jitter_order):
    """Crop, flip, rotate, jitter and normalise a uint8 batch with the plan's rows at `positions`."""
    images = images.float().div_(255)
    images = random_crop(images, plan.crop_offsets[positions])
    images = horizontal_flip(images, plan.flip[positions])
    images = rotate(images, plan.degrees[positions])
    images = color_jitter(images, plan.jitter_factors[positions], jitter_order)
    return normalize(images)


class TrainLoader:
    """Shuffled, augmented batches of a device-resident training set.

    `batch_size` is the global batch: under torchrun each of the `world_size` ranks takes
    its own disjoint slice of every batch, so N ranks train on exactly the images and
    augmentations one process would. The last incomplete batch is dropped to keep shapes static.
    """

    def __init__(self, images, labels, batch_size, seed=0, rank=0, world_size=1):
        if batch_size % world_size:
            raise DataError(f"batch size {batch_size} does not split evenly over {world_size} processes")
        if batch_size > len(images):
            raise DataError(f"batch size {batch_size} is larger than the {len(images)} training images")
        self.images, self.labels = images, labels
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = len(images) // batch_size
        self.images_per_rank_step = batch_size // world_size

    def positions(self, step):
        """Positions in the epoch's order that this rank trains on at `step`."""
        start = step * self.batch_size + self.rank * self.images_per_rank_step
        return torch.arange(start, start + self.images_per_rank_step, device=self.images.device)

    def batches(self, epoch, start_step=0):
        plan = plan_epoch(len(self.images), self.steps_per_epoch, self.seed, epoch, self.images.device)
        for step in range(start_step, self.steps_per_epoch):
            positions = self.positions(step)
            indices = plan.order[positions]
            images = augment(self.images[indices], plan, positions, plan.jitter_order[step])
            yield images.contiguous(memory_format=torch.channels_last), self.labels[indices]


class EvalLoader:
    """Normalised, unaugmented batches; under torchrun each rank takes every world_size-th image."""

    def __init__(self, images, labels, batch_size=1000, rank=0, world_size=1):
        self.images, self.labels = images[rank::world_size], labels[rank::world_size]
        self.batch_size = batch_size

    def __iter__(self):
        for start in range(0, len(self.images), self.batch_size):
            images = normalize(self.images[start : start + self.batch_size].float().div_(255))
            yield images.contiguous(memory_format=torch.channels_last), self.labels[start : start + self.batch_size]

    def __len__(self):
        return math.ceil(len(self.images) / self.batch_size)


def load_cifar100(batch_size, data_dir="data", download=True, device="cpu", seed=0, rank=0, world_size=1,
                  test_batch_size=1000):
    """Read CIFAR-100 onto `device` and return (train_loader, test_loader)."""
    arrays = read_cifar100(data_dir, download)
    device = torch.device(device)
    train = TrainLoader(arrays.train_images.to(device), arrays.train_labels.to(device), batch_size, seed,
                        rank, world_size)
    test = EvalLoader(arrays.test_images.to(device), arrays.test_labels.to(device), test_batch_size,
                      rank, world_size)
    train.classes = test.classes = arrays.classes
    return train, test
