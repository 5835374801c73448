"""TrivialAugment-Wide and RandAugment with each image's own op and magnitude, for a whole batch at once.

The op set, the magnitude bins, the signs, the nearest-neighbour resampling with black fill and
the uint8 arithmetic (each op's result rounded or truncated to whole grey levels as torchvision
does) follow torchvision.transforms.v2's TrivialAugmentWide and RandAugment. Those apply one op
to a whole batch; here every image draws its own. Images are float tensors (B, 3, H, W) holding
whole numbers in [0, 255]. Every op is computed for the whole batch with per-image parameters,
and each image keeps the result of its own: a few large tensor operations, no per-image Python
and no host synchronisation.
"""
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

POLICIES = ("ta_wide", "ra")
OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color", "contrast",
       "sharpness", "posterize", "solarize", "autocontrast", "equalize")
(IDENTITY, SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y, ROTATE, BRIGHTNESS, COLOR, CONTRAST, SHARPNESS, POSTERIZE,
 SOLARIZE, AUTOCONTRAST, EQUALIZE) = range(len(OPS))
SIGNED = (SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y, ROTATE, BRIGHTNESS, COLOR, CONTRAST, SHARPNESS)
NUM_BINS = 31
GRAYSCALE_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


def magnitude_table(policy, size=32):
    """(len(OPS), NUM_BINS) float64: each op's magnitude in each bin (0 for ops that take none)."""
    wide = policy == "ta_wide"
    span = {SHEAR_X: 0.99 if wide else 0.3, TRANSLATE_X: 32.0 if wide else 150.0 / 331.0 * size,
            ROTATE: 135.0 if wide else 30.0, BRIGHTNESS: 0.99 if wide else 0.9}
    span[SHEAR_Y], span[TRANSLATE_Y] = span[SHEAR_X], span[TRANSLATE_X]
    span[COLOR] = span[CONTRAST] = span[SHARPNESS] = span[BRIGHTNESS]
    table = torch.zeros(len(OPS), NUM_BINS, dtype=torch.float64)
    for op, high in span.items():
        table[op] = torch.linspace(0.0, high, NUM_BINS).double()  # float32 steps, as torchvision's tables
    table[POSTERIZE] = (8 - torch.arange(NUM_BINS) / ((NUM_BINS - 1) / (6 if wide else 4))).round().int().double()
    table[SOLARIZE] = torch.linspace(1.0, 0.0, NUM_BINS).double()
    return table


@dataclass
class PolicyPlan:
    """Each image's ops, one column per op applied in turn, and their parameters, derived on the CPU in float64
    and rounded to float32 as torchvision rounds them."""

    op: torch.Tensor  # (N, ops) indices into OPS
    theta: torch.Tensor  # (N, ops, 2, 3) inverse affine map in pixel units about the centre; identity unless geometric
    factor: torch.Tensor  # (N, ops) brightness, colour, contrast and sharpness factor, 1 + magnitude
    complement: torch.Tensor  # (N, ops) 1 - factor, computed in float64 first
    threshold: torch.Tensor  # (N, ops) solarize: grey levels from this one up are inverted
    level_step: torch.Tensor  # (N, ops) posterize: grey levels are rounded down to multiples of this


def draw_policy(num_images, policy, generator, num_ops=2, magnitude=9, size=32):
    """Every image's ops and their magnitudes (float64), (N, ops) each: TrivialAugment-Wide draws one op and a bin
    per image; RandAugment draws `num_ops` ops per image at the fixed bin `magnitude`. A signed op's magnitude is
    negated with chance 1/2."""
    slots = 1 if policy == "ta_wide" else num_ops
    op = torch.randint(len(OPS), (num_images, slots), generator=generator)
    if policy == "ta_wide":
        bins = torch.randint(NUM_BINS, (num_images, slots), generator=generator)
    else:
        bins = torch.full((num_images, slots), magnitude)
    negate = torch.rand(num_images, slots, generator=generator) <= 0.5
    values = magnitude_table(policy, size)[op, bins]
    return op, torch.where(negate & torch.isin(op, torch.tensor(SIGNED)), -values, values)


def plan_policy(op, magnitude, size=32):
    """The parameters each image's op needs, from its magnitude (float64), as torchvision derives them."""
    factor = 1.0 + magnitude
    return PolicyPlan(op=op, theta=inverse_affine(op, magnitude, size).float(), factor=factor.float(),
                      complement=(1.0 - factor).float(), threshold=(255.0 * magnitude).float(),
                      level_step=2.0 ** (8 - magnitude.trunc().clamp(0, 8)).float())


def inverse_affine(op, magnitude, size):
    """(..., 2, 3) float64: the map from each output pixel back to where it samples, in pixel units from the
    image centre, for torchvision's shear (about the top-left corner), translate (whole pixels) and rotate."""
    zero = torch.zeros_like(magnitude)
    shear = torch.deg2rad(torch.rad2deg(torch.atan(magnitude)))  # torchvision passes degrees(atan(m))
    shear_x = torch.where(op == SHEAR_X, shear, zero)
    shear_y = torch.where(op == SHEAR_Y, shear, zero)
    rotation = torch.where(op == ROTATE, -torch.deg2rad(torch.remainder(magnitude, 360.0)), zero)
    corner = torch.where((op == SHEAR_X) | (op == SHEAR_Y), -size / 2, zero)  # the centre the shear keeps
    shift_x = torch.where(op == TRANSLATE_X, magnitude.trunc(), zero)
    shift_y = torch.where(op == TRANSLATE_Y, magnitude.trunc(), zero)
    # rotation, then the shears: its inverse has determinant 1
    a = torch.cos(rotation - shear_y) / torch.cos(shear_y)
    b = -(a * torch.tan(shear_x) + torch.sin(rotation))
    c = torch.sin(rotation - shear_y) / torch.cos(shear_y)
    d = torch.cos(rotation) - c * torch.tan(shear_x)
    x, y = corner + shift_x, corner + shift_y
    row_x = torch.stack([d, -b, corner - d * x + b * y], -1)
    row_y = torch.stack([-c, a, corner + c * x - a * y], -1)
    return torch.stack([row_x, row_y], -2)


# Images put through the ops at once: every op is computed for each of them, with float64 and int64
# intermediates (about 100 KB an image at their peak), so large batches go through in slices of this many.
SLICE_IMAGES = 4096


def apply_policy(images, plan):
    """Apply each image's ops, in turn, to (B, 3, H, W) whole-number float images, in place; `plan` holds their
    rows."""
    for start in range(0, len(images), SLICE_IMAGES):
        rows = slice(start, start + SLICE_IMAGES)
        for slot in range(plan.op.shape[1]):
            images[rows] = apply_ops(images[rows], PolicyPlan(*(part[rows, slot] for part in vars(plan).values())))
    return images


def apply_ops(images, ops):
    """Each image's own op, `ops` a PolicyPlan of one op per image: every op is computed for the batch and each
    image keeps the result of its own."""
    def per_image(values):
        return values[:, None, None, None]

    op, factor, complement, threshold, level_step = (per_image(values) for values in (
        ops.op, ops.factor, ops.complement, ops.threshold, ops.level_step))
    images = resample(images, ops.theta)  # identity for every image whose op is not geometric
    gray = grayscale(images).floor()
    towards = torch.where(op == COLOR, gray, gray.mean((1, 2, 3), keepdim=True))
    towards = torch.where(op == BRIGHTNESS, 0.0, towards)
    blended = blend(images, towards, factor, complement)
    result = torch.where((op == BRIGHTNESS) | (op == COLOR) | (op == CONTRAST), blended, images)
    result = torch.where(op == SHARPNESS, sharpen(images, complement), result)
    result = torch.where(op == POSTERIZE, (images / level_step).floor() * level_step, result)
    result = torch.where((op == SOLARIZE) & (images >= threshold), 255.0 - images, result)
    result = torch.where(op == AUTOCONTRAST, autocontrast(images), result)
    return torch.where(op == EQUALIZE, equalize(images), result)


def resample(images, theta):
    """Nearest-neighbour resampling by per-image inverse affine maps (pixel units about the centre), black fill."""
    height, width = images.shape[-2:]
    grid = torch.bmm(pixel_centres(height, width, images.device).expand(len(images), -1, -1),
                     theta.to(images.device).transpose(1, 2) / half_size(height, width, images.device))
    return F.grid_sample(images, grid.view(len(images), height, width, 2), mode="nearest", padding_mode="zeros",
                         align_corners=False)


@functools.lru_cache
def pixel_centres(height, width, device):
    """(1, H * W, 3): each pixel's centre (x, y, 1) in pixel units from the image centre."""
    xs = torch.linspace((1.0 - width) / 2, (width - 1.0) / 2, width, device=device)
    ys = torch.linspace((1.0 - height) / 2, (height - 1.0) / 2, height, device=device)
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1] + (torch.ones(height, width, device=device),), -1)
    return grid.view(1, height * width, 3)


@functools.lru_cache
def half_size(height, width, device):
    """(x, y) half-extents that scale pixel units to grid_sample's [-1, 1], made once per device: built for every
    slice, it would be a blocking host-to-device copy inside the epoch's preparation on a side stream."""
    return torch.tensor([0.5 * width, 0.5 * height], device=device)


def grayscale(images):
    """(B, 1, H, W) luma, summed in torchvision's order (so the float rounding, and the uint8 floor, agree)."""
    red, green, blue = images.unbind(1)
    return red.mul(GRAYSCALE_WEIGHTS[0]).add_(green, alpha=GRAYSCALE_WEIGHTS[1]).add_(
        blue, alpha=GRAYSCALE_WEIGHTS[2]).unsqueeze(1)


def blend(images, other, factor, complement):
    """factor * images + (1 - factor) * other, clamped and truncated to whole grey levels (torchvision's uint8 blend)."""
    return fused_add(images * factor, complement, other).clamp(0, 255).trunc()


def fused_add(base, scale, other):
    """base + scale * other in float32, rounded once, as torch's add with alpha rounds it: the float64 sum of these
    float32 values is exact, so its one rounding is the fused one."""
    return (base.double() + scale.double() * other.double()).float()


def sharpen(images, complement):
    """Blend each image's interior with its smoothed, rounded self by 1 - factor; the border pixels are kept.

    The smoothing filter weighs the centre 5 and its 8 neighbours 1, over 13: summed in whole numbers (exact)
    and then divided, it rounds as torchvision's convolution does, since k / 13 is never half-way."""
    neighbourhood = F.avg_pool2d(images, 3, stride=1, divisor_override=1)  # the 3 x 3 sums
    inner = images[..., 1:-1, 1:-1]
    smooth = ((neighbourhood + 4 * inner) / 13).round()
    sharpened = fused_add(inner, complement, smooth - inner).clamp(0, 255).trunc()
    return F.pad(sharpened, (1, 1, 1, 1)) + images * border_mask(images.shape[-2:], images.device)


@functools.lru_cache
def border_mask(size, device):
    mask = torch.ones(size, device=device)
    mask[1:-1, 1:-1] = 0
    return mask


def autocontrast(images):
    """Stretch each channel to [0, 255] (a flat channel is kept), truncated to whole grey levels."""
    low, high = images.amin((2, 3), keepdim=True), images.amax((2, 3), keepdim=True)
    flat = high == low
    scale = torch.where(flat, 1.0, (high - low) * (1.0 / 255))
    return ((images - torch.where(flat, 0.0, low)) / scale).clamp(0, 255).trunc()


def equalize(images):
    """PIL's histogram equalisation of each channel: a grey level maps to the share of pixels below it, in steps of
    (pixels - those at the top level) / 255; a channel whose step would be 0 is kept. Histograms by scatter-add."""
    levels = images.flatten(2).long()  # (B, C, H * W)
    counts = torch.zeros(*levels.shape[:2], 256, dtype=torch.int32, device=images.device)
    counts.scatter_add_(2, levels, torch.ones_like(levels, dtype=torch.int32))
    at_top = counts.gather(2, levels.amax(2, keepdim=True))
    step = (levels.shape[2] - at_top) // 255
    below = counts.cumsum(2) - counts
    table = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    equalized = torch.where(step > 0, table.gather(2, levels), levels)
    return equalized.view(images.shape).to(images.dtype)
