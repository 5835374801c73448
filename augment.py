"""Batched augmentation on the device: every random choice of an epoch drawn up front on the CPU (`plan_epoch`),
then applied to whole chunks of images with per-image parameters. Each op takes a float batch (B, 3, H, W)."""
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from auto_augment import PolicyPlan, apply_policy, draw_policy, grayscale, plan_policy
from config import Augmentation


CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)


CIFAR100_STD = (0.2673, 0.2564, 0.2762)


CROP_PADDING = 4


MAX_ROTATION_DEGREES = 15.0


JITTER_STRENGTH = 0.2  # brightness, contrast and saturation factors are drawn from [0.8, 1.2]


IMAGE_SIZE = 32


FLIP_STREAM = 0xF11B  # keeps the alternating flip's draw apart from every other seeded draw


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

    def to(self, device):
        """The plan on `device`, every part copied once (from pinned memory to a GPU, so that no copy waits for
        the work already queued on the stream)."""
        def moved(tensor):
            if torch.device(device).type == "cuda":
                tensor = tensor.pin_memory()
            return tensor.to(device, non_blocking=True)

        def part_moved(part):
            return part and type(part)(*map(moved, vars(part).values()))

        return AugmentationPlan(*map(moved, (self.order, self.crop_offsets, self.flip, self.degrees,
                                             self.jitter_factors, self.jitter_order, self.cutout_centres)),
                                part_moved(self.mixing), part_moved(self.policy))


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


def plan_epoch(num_images, steps, seed, epoch, augmentation=Augmentation(), batch_size=None):
    """Draw an epoch's plan on the CPU, so that a seed gives the same run on every device (`AugmentationPlan.to`
    moves it once). `batch_size` is the batch each process trains on, whose images mixing pairs (default: one
    process)."""
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
    if augmentation.auto_augment:
        policy = plan_policy(*draw_policy(num_images, augmentation.auto_augment, generator,
                                          num_ops=augmentation.ra_num_ops, magnitude=augmentation.ra_magnitude))
    if augmentation.flip == "alternate":
        flip = alternating_flips(num_images, seed, epoch)[order]
    return AugmentationPlan(order=order, crop_offsets=crop_offsets, flip=flip, degrees=degrees,
                            jitter_factors=jitter_factors, jitter_order=jitter_order, cutout_centres=cutout_centres,
                            mixing=mixing, policy=policy)


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
    boxes = np.where(use_cutmix[:, None], cutmix_boxes(drawn, rng.integers(0, IMAGE_SIZE, (steps, 2))), 0)
    pasted = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / IMAGE_SIZE**2
    weights = np.where(use_cutmix, 1 - pasted, drawn)
    blend = np.where(use_mixup, drawn, 1.0)
    partners = rng.permuted(np.tile(np.arange(batch_size), (steps, 1)), axis=1)
    return MixPlan(torch.tensor(weights, dtype=torch.float32), torch.from_numpy(boxes),
                   torch.tensor(blend, dtype=torch.float32), torch.from_numpy(partners))


def cutmix_boxes(shares, centres, size=IMAGE_SIZE):
    """(top, left, bottom, right) of each CutMix box as the CutMix authors' code cuts it: a square of side
    int(size * sqrt(1 - share)) about its (row, col) centre, centre - side // 2 to centre + side // 2, clipped by
    the border (so the pasted share is what the box keeps of about 1 - share)."""
    side = (size * np.sqrt(1 - shares)).astype(np.int64)[:, None]
    return np.concatenate([np.clip(centres - side // 2, 0, size), np.clip(centres + side // 2, 0, size)], 1)


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


def mix_targets(labels, mixing, num_classes):
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
