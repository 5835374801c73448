"""Per-image TrivialAugment-Wide and RandAugment against torchvision.transforms.v2, image by image, on uint8 images."""
import pytest
import torch
from torchvision.transforms import v2

import auto_augment
from auto_augment import NUM_BINS, OPS, SIGNED, apply_policy, draw_policy, magnitude_table, plan_policy

# Our op names in torchvision's spelling, in the order both tables list them.
TORCHVISION_NAMES = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
                     "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
REFERENCES = {"ta_wide": v2.TrivialAugmentWide(), "ra": v2.RandAugment()}


def sample_images():
    """Noise, smooth ramps, low-contrast and flat images: every op's corner cases (flat channels, narrow histograms)."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=generator)
    ramp = torch.arange(32)
    smooth = ((ramp[:, None] * 4 + ramp[None, :] * 3) % 256).expand(3, 3, 32, 32).to(torch.uint8)
    narrow = noise[:3] // 8 + 100
    flat = torch.full((2, 3, 32, 32), 77, dtype=torch.uint8)
    return torch.cat([noise, smooth, narrow, flat])


def torchvision_applies(policy, image, op, magnitude):
    """torchvision's own dispatch from an op's name and magnitude to v2.functional, with the policy's defaults."""
    reference = REFERENCES[policy]
    return reference._apply_image_or_video_transform(image, TORCHVISION_NAMES[op], float(magnitude),
                                                     interpolation=reference.interpolation, fill=reference._fill)


@pytest.mark.parametrize("policy", ["ta_wide", "ra"])
def test_the_op_set_bins_and_signs_are_torchvisions(policy):
    space = REFERENCES[policy]._AUGMENTATION_SPACE
    assert tuple(space) == TORCHVISION_NAMES and len(OPS) == len(space)
    table = magnitude_table(policy)
    for op, (magnitudes_of, signed) in enumerate(space.values()):
        assert signed == (op in SIGNED), OPS[op]
        expected = magnitudes_of(NUM_BINS, 32, 32)
        if expected is None:
            assert (table[op] == 0).all(), OPS[op]
        else:
            assert torch.equal(table[op], expected.double()), OPS[op]


@pytest.mark.parametrize("policy", ["ta_wide", "ra"])
@pytest.mark.parametrize("op", range(len(OPS)), ids=OPS)
def test_each_op_at_several_magnitudes_equals_torchvision_image_by_image(policy, op):
    images = sample_images()
    bins = (0, 1, 9, 15, 20, 30)
    signs = (1, -1) if op in SIGNED else (1,)
    cases = [(sign * magnitude_table(policy)[op, b], image) for b in bins for sign in signs for image in images]
    magnitudes = torch.tensor([magnitude for magnitude, _ in cases], dtype=torch.float64)
    batch = torch.stack([image for _, image in cases])
    ours = apply_policy(batch.float(), plan_policy(torch.full((len(cases), 1), op), magnitudes[:, None]))
    for result, (magnitude, image) in zip(ours, cases):  # exact: every op, including the resampling ones
        assert torch.equal(result, torchvision_applies(policy, image, op, magnitude).float()), float(magnitude)


@pytest.mark.parametrize("policy", ["ta_wide", "ra"])
def test_each_image_gets_its_own_ops_in_one_batch(policy, monkeypatch):
    monkeypatch.setattr(auto_augment, "SLICE_IMAGES", 7)  # large batches go through in slices: uneven ones here
    images = sample_images().repeat(4, 1, 1, 1)
    op, magnitude = draw_policy(len(images), policy, torch.Generator().manual_seed(1))
    assert len(set(op[:, 0].tolist())) > 8  # many different ops in the one batch
    ours = apply_policy(images.float(), plan_policy(op, magnitude))
    for result, image, ops, magnitudes in zip(ours, images, op, magnitude):
        expected = image
        for one_op, one_magnitude in zip(ops.tolist(), magnitudes.tolist()):  # RandAugment: one after the other
            expected = torchvision_applies(policy, expected, one_op, one_magnitude)
        assert torch.equal(result, expected.float()), (ops, magnitudes)


def test_trivial_augment_draws_ops_bins_and_signs_uniformly_per_image():
    count = 140_000
    op, magnitude = draw_policy(count, "ta_wide", torch.Generator().manual_seed(0))
    assert op.shape == magnitude.shape == (count, 1)
    shares = torch.bincount(op[:, 0], minlength=len(OPS)) / count
    assert (shares - 1 / len(OPS)).abs().max() < 0.005
    table = magnitude_table("ta_wide")
    rotations = magnitude[op == OPS.index("rotate")]
    bins = torch.bucketize(rotations.abs(), table[OPS.index("rotate")])  # the bin each rotation came from
    assert ((torch.bincount(bins, minlength=NUM_BINS) / len(bins)) - 1 / NUM_BINS).abs().max() < 0.01
    for index in SIGNED:
        values = magnitude[op == index]
        nonzero = values[values != 0]  # bin 0 is 0 whatever the sign
        assert 0.47 < (nonzero < 0).float().mean() < 0.53, OPS[index]
    assert (magnitude[torch.isin(op, torch.tensor(SIGNED), invert=True)] >= 0).all()


def test_rand_augment_draws_num_ops_ops_at_its_magnitude():
    op, magnitude = draw_policy(20_000, "ra", torch.Generator().manual_seed(0), num_ops=3, magnitude=20)
    assert op.shape == (20_000, 3)
    table = magnitude_table("ra")
    assert torch.equal(magnitude.abs(), table[op, 20])
    assert (op[:, 0] != op[:, 1]).float().mean() > 0.9  # drawn independently for each position
