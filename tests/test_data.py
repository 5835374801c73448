import io
import math
import os
import pickle
import zipfile
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import auto_augment
import data_files
import dataset_utils
from auto_augment import grayscale
from augment import (CIFAR100_MEAN, CIFAR100_STD, augment, color_jitter, cutmix_boxes, cutout, horizontal_flip,
                     plan_epoch, random_crop, rotate)
from config import Augmentation
from conftest import run_settings
from data_files import ARCHIVE_MD5, ARCHIVE_NAME
from dataset_utils import (DataError, EvalLoader, TrainLoader, load_cifar100, normalize,
                           read_cifar100, split_validation, training_subset)
from device_utils import Runtime

CPU = Runtime(torch.device("cpu"))


def random_batch(size=8, seed=0):
    return torch.rand(size, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ---- reading ----


def test_reader_reads_the_pickle_layout(cifar_dir):
    arrays = read_cifar100(cifar_dir, download=False)
    assert arrays.train_images.shape == (64, 3, 32, 32) and arrays.train_images.dtype == torch.uint8
    assert arrays.test_images.shape == (32, 3, 32, 32)
    assert arrays.train_labels.dtype == torch.int64 and set(arrays.train_labels.tolist()) == set(range(10))
    assert arrays.classes[:2] == ["class_0", "class_1"] and len(arrays.classes) == 100


@pytest.mark.parametrize("labels_as", ["list", "numpy"])
def test_a_subset_pickled_by_python_3_with_bytes_keys_is_read(cifar_dir, tmp_path, labels_as):
    """As a user makes one: pickle.load(..., encoding="bytes") of the official (Python 2) files gives keys as bytes
    (b"data") and the class names as bytes; the subset is pickled back from that."""
    folder = cifar_dir / "cifar-100-python"
    subset = tmp_path / "subset" / "cifar-100-python"
    subset.mkdir(parents=True)
    for name in ("train", "test", "meta"):
        entry = pickle.loads((folder / name).read_bytes())
        if name == "meta":
            entry = {b"fine_label_names": [label.encode() for label in entry["fine_label_names"]]}
        else:
            labels = entry["fine_labels"][:24]
            entry = {b"data": entry["data"][:24], b"fine_labels": labels if labels_as == "list" else np.array(labels)}
        (subset / name).write_bytes(pickle.dumps(entry))
    whole, part = read_cifar100(cifar_dir, download=False), read_cifar100(subset.parent, download=False)
    assert torch.equal(part.train_images, whole.train_images[:24]) and torch.equal(part.test_labels, whole.test_labels[:24])
    assert part.classes == whole.classes and isinstance(part.classes[0], str)


def test_reader_keeps_pixels_in_channel_order(cifar_dir):
    with open(cifar_dir / "cifar-100-python" / "train", "rb") as handle:
        raw = pickle.load(handle)["data"]
    arrays = read_cifar100(cifar_dir, download=False)
    assert torch.equal(arrays.train_images[5].reshape(-1), torch.from_numpy(raw[5]))


def test_missing_data_without_download_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError, match="CIFAR-100 not found: put cifar-100-python.tar.gz"):
        read_cifar100(tmp_path, download=False)


def test_failed_download_says_where_to_put_the_data_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(data_files, "ARCHIVE_URL", "http://127.0.0.1:9/cifar-100-python.tar.gz")  # nothing listens
    with pytest.raises(DataError, match="could not download CIFAR-100 .*fetch http.*cifar-100-python.tar.gz elsewhere"):
        read_cifar100(tmp_path / "data" / "cifar", download=True)
    assert list(tmp_path.iterdir()) == []  # no empty data folder, no partial archive


def test_a_damaged_archive_is_named_with_both_md5_sums_and_never_downloaded_again(tmp_path, monkeypatch):
    (tmp_path / ARCHIVE_NAME).write_bytes(b"the first megabyte of a download that broke off")
    monkeypatch.setattr(data_files, "download_archive", lambda archive: pytest.fail("reached for the network"))
    for download in (True, False):
        with pytest.raises(DataError) as refused:
            read_cifar100(tmp_path, download=download)
        message = str(refused.value)
        assert f"{tmp_path / ARCHIVE_NAME} is damaged (md5 " in message and ARCHIVE_MD5 in message
        assert "delete it" in message and "\n" not in message


def test_a_meta_file_that_would_run_code_is_refused_unrun(cifar_dir, tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    path = cifar_dir / "cifar-100-python" / "meta"
    path.write_bytes(pickle.dumps({"fine_label_names": Payload()}))
    with pytest.raises(DataError, match=f"{path}: unreadable CIFAR-100 meta file .*never holds"):
        read_cifar100(cifar_dir, download=False)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("labels", [["3"] * 64, [3.7] * 64])
def test_labels_that_are_not_whole_numbers_are_refused(cifar_dir, labels):
    path = cifar_dir / "cifar-100-python" / "train"
    rewrite_split(path, fine_labels=labels)
    with pytest.raises(DataError, match=f"{path}: expected 'fine_labels' as a list of whole numbers"):
        read_cifar100(cifar_dir, download=False)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_split_file_is_named(cifar_dir, damage):
    path = cifar_dir / "cifar-100-python" / "train"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00not a pickle" * 50, "empty": b""}[damage])
    with pytest.raises(DataError, match=f"{path}: unreadable CIFAR-100 file"):
        read_cifar100(cifar_dir, download=False)


def test_corrupt_meta_file_is_named(cifar_dir):
    path = cifar_dir / "cifar-100-python" / "meta"
    path.write_bytes(b"garbage")
    with pytest.raises(DataError, match=f"{path}: unreadable CIFAR-100 meta file"):
        read_cifar100(cifar_dir, download=False)


def rewrite_split(path, **changes):
    with open(path, "rb") as handle:
        entry = pickle.load(handle)
    entry.update(changes)
    with open(path, "wb") as handle:
        pickle.dump(entry, handle)
    return entry


def test_a_cache_abandoned_by_a_killed_writer_is_removed_by_the_next_read_and_a_live_writers_kept(cifar_dir):
    import subprocess
    import sys
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder = cifar_dir / "cifar-100-python"
    abandoned = folder / f".train.uint8.npz.tmp{int(finished.stdout)}"  # its writer has exited
    being_written = folder / f".train.uint8.npz.tmp{os.getppid()}"  # a live process's (this one writes its own)
    users = folder / ".train.uint8.npz.tmp-notes"  # not a writer's: no process id
    for path in (abandoned, being_written, users):
        path.write_bytes(b"half a cache")
    read_cifar100(cifar_dir, download=False)
    assert not abandoned.exists() and being_written.exists() and users.exists()


def test_labels_outside_0_to_99_are_refused(cifar_dir):
    path = cifar_dir / "cifar-100-python" / "test"
    rewrite_split(path, fine_labels=[100] * 32)
    with pytest.raises(DataError, match=f"{path}: labels must lie in 0..99"):
        read_cifar100(cifar_dir, download=False)


def test_wrong_image_shapes_are_refused(cifar_dir):
    path = cifar_dir / "cifar-100-python" / "train"
    entry = rewrite_split(path)
    rewrite_split(path, data=entry["data"][:, :1000])
    with pytest.raises(DataError, match=str(path)):
        read_cifar100(cifar_dir, download=False)


def test_label_count_must_match_image_count(cifar_dir):
    path = cifar_dir / "cifar-100-python" / "train"
    rewrite_split(path, fine_labels=[0] * 10)
    with pytest.raises(DataError, match=f"{path}: 64 images but 10 labels"):
        read_cifar100(cifar_dir, download=False)


# ---- augmentation ops ----


def test_flip_mirrors_exactly_the_masked_images():
    images = random_batch()
    mask = torch.tensor([True, False] * 4)
    flipped = horizontal_flip(images, mask)
    assert torch.equal(flipped[mask], images[mask].flip(-1))
    assert torch.equal(flipped[~mask], images[~mask])


def test_crop_at_the_centre_offset_is_identity_and_others_shift():
    images = random_batch()
    centre = torch.full((8, 2), 4)
    assert torch.equal(random_crop(images, centre), images)
    shifted = random_crop(images, torch.tensor([[0, 8]] * 8))  # 4 rows up, 4 columns right of centre
    assert torch.equal(shifted[:, :, 4:, :28], images[:, :, :28, 4:])
    assert (shifted[:, :, :4] == 0).all() and (shifted[:, :, :, 28:] == 0).all()


def test_crops_stay_within_the_padded_image():
    images = torch.ones(4, 3, 32, 32)
    corners = torch.tensor([[0, 0], [0, 8], [8, 0], [8, 8]])
    cropped = random_crop(images, corners)
    # Each extreme crop keeps a 28x28 block of the image and exactly 4 rows and 4 columns of padding.
    assert cropped.shape == images.shape
    assert (cropped.sum((1, 2, 3)) == 3 * 28 * 28).all()


def test_rotation_by_zero_is_identity_and_by_90_turns_the_image():
    images = random_batch(4)
    assert torch.equal(rotate(images, torch.zeros(4)), images)
    quarter = rotate(images, torch.full((4,), 90.0))
    assert torch.allclose(quarter, images.rot90(1, dims=(-2, -1))) or torch.allclose(
        quarter, images.rot90(-1, dims=(-2, -1)))


def test_rotation_keeps_pixel_values_and_fills_corners_with_zero():
    images = random_batch(2) + 1  # every pixel > 0
    rotated = rotate(images, torch.tensor([15.0, -15.0]))
    assert (rotated[:, :, 0, 0] == 0).all()  # a corner leaves the frame at 15 degrees
    inside = rotated[rotated > 0]
    assert torch.isin(inside, images).all()  # nearest neighbour: no new values


def jitter_one_op(images, op, factor):
    """color_jitter with every factor 1 (no change) but `op`'s, in one of the six orders."""
    factors = torch.ones(len(images), 3)
    factors[:, op] = factor
    return color_jitter(images, factors, torch.tensor([2, 0, 1]))


def test_each_jitter_op_blends_towards_black_mean_grey_or_grey():
    images = random_batch(4)
    factors = torch.tensor([0.8, 1.0, 1.2, 1.1])
    brighter = jitter_one_op(images, 0, factors)
    assert torch.allclose(brighter, (images * factors[:, None, None, None]).clamp(0, 1))
    flat = jitter_one_op(images, 1, torch.zeros(4))
    assert torch.allclose(flat, grayscale(images).mean((1, 2, 3), keepdim=True).expand_as(flat))
    gray = jitter_one_op(images, 2, torch.zeros(4))
    assert torch.allclose(gray, grayscale(images).expand_as(gray))


def test_jitter_with_unit_factors_is_identity_in_any_order():
    images = random_batch(4)
    for order in ([0, 1, 2], [2, 0, 1]):
        assert torch.allclose(color_jitter(images, torch.ones(4, 3), torch.tensor(order)), images)


def test_jitter_applies_each_images_own_order():
    images, factors = random_batch(6), 0.8 + 0.4 * torch.rand(6, 3, generator=torch.Generator().manual_seed(1))
    orders = torch.tensor([[0, 1, 2], [2, 1, 0], [1, 0, 2], [0, 2, 1], [2, 0, 1], [1, 2, 0]])
    together = color_jitter(images, factors, orders)
    for i in range(6):
        alone = color_jitter(images[i:i + 1], factors[i:i + 1], orders[i])
        assert torch.allclose(together[i:i + 1], alone, atol=1e-6), orders[i]
    assert not torch.allclose(together, color_jitter(images, factors, orders[0]))  # the order matters


def test_normalize_uses_cifar100_mean_and_std():
    images = torch.tensor(CIFAR100_MEAN)[None, :, None, None].expand(2, 3, 32, 32)
    assert torch.allclose(normalize(images), torch.zeros(2, 3, 32, 32), atol=1e-6)
    ones = normalize(torch.ones(1, 3, 1, 1)).flatten()
    expected = [(1 - m) / s for m, s in zip(CIFAR100_MEAN, CIFAR100_STD)]
    assert torch.allclose(ones, torch.tensor(expected))


def test_epoch_plan_draws_in_the_specified_ranges():
    plan = plan_epoch(5000, steps=10, seed=3, epoch=1)
    assert sorted(plan.order.tolist()) == list(range(5000))
    assert plan.crop_offsets.min() == 0 and plan.crop_offsets.max() == 8
    assert 0.45 < plan.flip.float().mean() < 0.55
    assert plan.degrees.abs().max() <= 15 and plan.degrees.abs().max() > 14.5
    assert plan.jitter_factors.min() >= 0.8 and plan.jitter_factors.max() <= 1.2
    assert all(sorted(order.tolist()) == [0, 1, 2] for order in plan.jitter_order)


def test_epoch_plan_depends_only_on_seed_and_epoch():
    first, again = plan_epoch(100, 4, 7, 2), plan_epoch(100, 4, 7, 2)
    other_epoch = plan_epoch(100, 4, 7, 3)
    assert torch.equal(first.order, again.order) and torch.equal(first.degrees, again.degrees)
    assert not torch.equal(first.order, other_epoch.order)


class HostToDeviceCopies(TorchFunctionMode):
    """Counts the copies of host data to another device: tensors made there from Python values, and CPU tensors
    moved or copied there. On CUDA each one from pageable memory blocks the host."""

    MAKERS = (torch.tensor, torch.as_tensor, torch.asarray)

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func in self.MAKERS:
            self.count += result.device.type != "cpu"
        elif func in (torch.Tensor.to, torch.Tensor.cuda):
            self.count += args[0].device.type == "cpu" and result.device.type != "cpu"
        elif func is torch.Tensor.copy_:
            self.count += args[1].device.type == "cpu" and args[0].device.type != "cpu"
        return result


@pytest.mark.parametrize("augmentation", [
    Augmentation(), Augmentation(auto_augment="ta_wide", cutout=8),
    Augmentation(auto_augment="ra", mixup=0.2, cutmix=1.0)],
    ids=["default", "ta_wide", "ra-mixing"])
def test_preparing_an_epoch_copies_only_its_plan_to_the_device_whatever_its_size(augmentation, monkeypatch):
    """The epoch's plan goes to the device once; no chunk or policy slice adds a copy of its own. The "meta" device
    stands in for a GPU: every op runs there, shapes only."""
    monkeypatch.setattr(auto_augment, "SLICE_IMAGES", 64)
    monkeypatch.setattr(dataset_utils, "AUGMENT_CHUNK_IMAGES", 128)

    def copies_of_prepare(images):
        loader = TrainLoader(torch.empty(images, 3, 32, 32, dtype=torch.uint8, device="meta"),
                             torch.empty(images, dtype=torch.long, device="meta"), 32, augmentation=augmentation)
        with HostToDeviceCopies() as copies:
            loader.prepare(0)
        assert loader.prepared.images.shape == (images, 3, 32, 32)
        return copies.count

    copies_of_prepare(64)  # constants made once per device
    plan = plan_epoch(64, 2, 0, 0, augmentation=augmentation, batch_size=32)
    plan_tensors = sum(isinstance(value, torch.Tensor) for part in (plan, plan.mixing, plan.policy) if part is not None
                       for value in vars(part).values())
    assert copies_of_prepare(256) == copies_of_prepare(1024) == plan_tensors


def test_alternating_flip_mirrors_as_airbench_and_leaves_every_other_draw():
    """The reference scheme (airbench's loader): mirror a random half of the data set once, then mirror the whole
    set again in every odd epoch. Here the random half is the one epoch 0 draws."""
    images = random_batch(500, seed=4)
    alternate = Augmentation(flip="alternate")
    plans = [plan_epoch(500, 5, 3, epoch, augmentation=alternate) for epoch in range(4)]
    first_half = torch.empty(500, dtype=torch.bool)
    first_half[plans[0].order] = plans[0].flip
    assert 0.4 < first_half.float().mean() < 0.6
    pre_flipped = horizontal_flip(images, first_half)
    for epoch, plan in enumerate(plans):
        reference = pre_flipped.flip(-1) if epoch % 2 else pre_flipped
        assert torch.equal(horizontal_flip(images[plan.order], plan.flip), reference[plan.order])
        random_flip = plan_epoch(500, 5, 3, epoch)
        assert torch.equal(plan.order, random_flip.order) and torch.equal(plan.degrees, random_flip.degrees)
    other_seed = plan_epoch(500, 5, 4, 0, augmentation=alternate)
    assert not torch.equal(plans[0].flip[plans[0].order.argsort()], other_seed.flip[other_seed.order.argsort()])


# ---- loaders ----


def test_loaders_yield_normalised_channels_last_batches(cifar_dir):
    train, _, test = load_cifar100(run_settings(cifar_dir, "--batch-size", 16, "--test-batch-size", 10), CPU)
    batches = list(train.batches(epoch=0))
    assert len(batches) == train.steps_per_epoch == 4
    images, labels = batches[0]
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.is_contiguous(memory_format=torch.channels_last)
    test_batches = list(test)
    assert [len(labels) for _, labels in test_batches] == [10, 10, 10, 2] and len(test) == 4
    all_test = torch.cat([images for images, _ in test_batches])
    raw = read_cifar100(cifar_dir, download=False).test_images.float() / 255
    assert torch.allclose(all_test, normalize(raw))


def test_training_epoch_visits_each_image_once_in_a_seeded_order(cifar_dir):
    arrays = read_cifar100(cifar_dir, download=False)
    loader = TrainLoader(arrays.train_images, torch.arange(64), batch_size=16, augmentation=Augmentation(seed=5))
    seen = torch.cat([labels for _, labels in loader.batches(epoch=0)])
    assert sorted(seen.tolist()) == list(range(64)) and seen.tolist() != list(range(64))
    again = torch.cat([labels for _, labels in loader.batches(epoch=0)])
    assert torch.equal(seen, again)


def test_ranks_take_disjoint_slices_of_each_global_batch(cifar_dir):
    arrays = read_cifar100(cifar_dir, download=False)
    whole = TrainLoader(arrays.train_images, torch.arange(64), batch_size=16, augmentation=Augmentation(seed=1))
    ranks = [TrainLoader(arrays.train_images, torch.arange(64), batch_size=16, augmentation=Augmentation(seed=1),
                         shard=(r, 2))
             for r in range(2)]
    for (whole_images, whole_labels), (images0, labels0), (images1, labels1) in zip(
            whole.batches(0), ranks[0].batches(0), ranks[1].batches(0)):
        assert set(labels0.tolist()).isdisjoint(labels1.tolist())
        assert torch.equal(torch.cat([labels0, labels1]), whole_labels)
        assert torch.equal(torch.cat([images0, images1]), whole_images)  # same augmentation per image


def test_test_shards_cover_the_test_set_once(cifar_dir):
    arrays = read_cifar100(cifar_dir, download=False)
    labels = torch.arange(32)
    shards = [torch.cat([y for _, y in EvalLoader(arrays.test_images, labels, 5, shard=(r, 2))])
              for r in range(2)]
    assert sorted(torch.cat(shards).tolist()) == list(range(32))


@pytest.mark.parametrize("augmentation", [Augmentation(), Augmentation(mixup=0.5, cutmix=1.0, cutmix_prob=0.5),
                                          Augmentation(auto_augment="ra", cutout=16)])
def test_resuming_mid_epoch_serves_the_remaining_batches(cifar_dir, augmentation):
    arrays = read_cifar100(cifar_dir, download=False)
    loader = TrainLoader(arrays.train_images, arrays.train_labels, batch_size=16,
                         augmentation=replace(augmentation, seed=2))
    full = list(loader.batches(epoch=3))
    rest = list(loader.batches(epoch=3, start_step=2))
    assert len(rest) == 2
    for (a, y), (b, z) in zip(full[2:], rest):
        assert torch.equal(a, b) and torch.equal(y, z)


def test_a_prepared_epoch_is_served_as_it_would_be_augmented_on_demand(cifar_dir, monkeypatch):
    arrays = read_cifar100(cifar_dir, download=False)

    def loader():
        return TrainLoader(arrays.train_images, arrays.train_labels, batch_size=16,
                           augmentation=Augmentation(seed=2, mixup=0.5, cutmix=1.0, cutmix_prob=0.5,
                                                     auto_augment="ta_wide"))

    expected = list(loader().batches(epoch=2))

    def served(prepared_epoch, start_step):
        """The batches of epoch 2 from start_step, after preparing `prepared_epoch`, and how many were augmented."""
        ahead, augmented = loader(), []
        ahead.prepare(prepared_epoch)
        augment_epoch = ahead.augment_epoch
        monkeypatch.setattr(ahead, "augment_epoch", lambda *args: augmented.append(args) or augment_epoch(*args))
        return list(ahead.batches(epoch=2, start_step=start_step)), len(augmented), ahead.prepared

    for prepared_epoch, start_step, augmented_anew in ((2, 0, 0), (2, 3, 0), (3, 0, 1)):
        batches, augmented, left = served(prepared_epoch, start_step)
        assert augmented == augmented_anew and left is None  # another epoch's preparation is dropped, not kept
        assert len(batches) == len(expected) - start_step
        for (images, targets), (expected_images, expected_targets) in zip(batches, expected[start_step:]):
            assert torch.equal(images, expected_images) and torch.equal(targets, expected_targets)


def test_batch_larger_than_the_data_is_refused(cifar_dir):
    with pytest.raises(DataError, match="larger than the 64 training images"):
        load_cifar100(run_settings(cifar_dir, "--batch-size", 128), CPU)


def test_augmented_batches_keep_shape_dtype_and_plausible_statistics():
    images = (torch.rand(512, 3, 32, 32) * 255).to(torch.uint8)
    loader = TrainLoader(images, torch.zeros(512, dtype=torch.int64), batch_size=512)
    batch, _ = next(loader.batches(0))
    assert batch.shape == (512, 3, 32, 32) and batch.dtype == torch.float32
    assert math.isfinite(batch.sum().item())
    # Uniform pixels normalise to about (0.5 - mean) / std; padding and rotation pull a little towards black.
    black = normalize(torch.zeros(1, 3, 1, 1))
    assert (batch >= black - 1e-5).all()


def test_an_epoch_augmented_at_once_equals_batch_by_batch_augmentation(monkeypatch):
    images = (torch.rand(96, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8)
    monkeypatch.setattr(dataset_utils, "AUGMENT_CHUNK_IMAGES", 32)  # several chunks, each with several jitter orders
    loader = TrainLoader(images, torch.arange(96), batch_size=8, augmentation=Augmentation(seed=4, cutout=8))
    plan = plan_epoch(96, loader.steps_per_epoch, 4, 2, augmentation=loader.augmentation)
    for step, (batch, labels) in enumerate(loader.batches(epoch=2)):
        positions = loader.positions(range(step, step + 1))[0]
        expected = augment(images[plan.order[positions]], plan, positions, plan.jitter_order[step], cutout_size=8)
        assert torch.equal(batch, expected.contiguous(memory_format=torch.channels_last)), step
        assert torch.equal(labels, plan.order[positions])


def test_cutout_zeroes_one_square_clipped_at_the_border():
    images = torch.ones(3, 3, 32, 32)
    centres = torch.tensor([[16, 16], [0, 0], [31, 20]])
    cut = cutout(images, centres, 8)
    zeroed = (cut == 0).all(1)  # (3, 32, 32): where every channel was zeroed
    assert zeroed.sum((1, 2)).tolist() == [64, 16, 40]  # whole, quarter (corner), five rows of eight (bottom edge)
    assert zeroed[0, 12:20, 12:20].all() and zeroed[1, :4, :4].all() and zeroed[2, 27:, 16:24].all()
    assert torch.equal(cut[~zeroed[:, None].expand_as(cut)], images[~zeroed[:, None].expand_as(cut)])


def reference_cutout_mask(centre, length, size=32):
    """The Cutout paper's code (uoguelph-mlrg/Cutout, util/cutout.py): y - length // 2 to y + length // 2, clipped."""
    mask = np.ones((size, size), np.float32)
    y, x = centre
    mask[np.clip(y - length // 2, 0, size):np.clip(y + length // 2, 0, size),
         np.clip(x - length // 2, 0, size):np.clip(x + length // 2, 0, size)] = 0.0
    return torch.from_numpy(mask)


@pytest.mark.parametrize("length", [1, 7, 8, 16, 17])
def test_cutout_cuts_what_the_papers_code_cuts(length):
    centres = torch.tensor([[16, 16], [0, 0], [31, 20], [3, 29]])
    cut = cutout(torch.ones(4, 3, 32, 32), centres, length)
    for image, centre in zip(cut, centres.tolist()):
        assert torch.equal(image, reference_cutout_mask(centre, length).expand(3, 32, 32))


def test_cutout_fills_with_the_mean_colour_after_normalisation():
    images = (torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    plan = plan_epoch(8, 1, 0, 0, augmentation=Augmentation(cutout=16))
    positions = torch.arange(8)
    with_hole = augment(images[plan.order], plan, positions, plan.jitter_order[0], cutout_size=16)
    without = augment(images[plan.order], plan, positions, plan.jitter_order[0])
    hole = with_hole != without
    assert hole.any() and (with_hole[hole] == 0).all()  # 0 after normalising: the data set's mean, not black


def test_cutout_centres_cover_the_whole_image():
    plan = plan_epoch(20_000, 1, 0, 0)
    assert plan.cutout_centres.min() == 0 and plan.cutout_centres.max() == 31


def test_the_validation_split_is_class_balanced_fixed_and_disjoint():
    labels = torch.arange(1000) % 10
    train, val = split_validation(labels, 105)
    assert len(val) == 105 and len(train) == 895
    assert set(train.tolist()).isdisjoint(val.tolist()) and len(set(train.tolist()) | set(val.tolist())) == 1000
    per_class = torch.bincount(labels[val], minlength=10)
    assert per_class.max() - per_class.min() <= 1
    assert torch.equal(split_validation(labels, 105)[1], val)  # the same split every time, whatever the run's seed
    with pytest.raises(DataError, match="asks for 11 images of class 0, which has only 10"):
        split_validation(torch.arange(100) % 10, 101)


def test_load_cifar100_holds_the_validation_images_out_of_training(cifar_dir):
    train, val, test = load_cifar100(run_settings(cifar_dir, "--batch-size", 8, "--val-size", 20), CPU)
    assert len(train.images) == 44 and len(val.images) == 20 and len(test.images) == 32
    arrays = read_cifar100(cifar_dir, download=False)
    _, val_indices = split_validation(arrays.train_labels, 20)
    expected = normalize(arrays.train_images[val_indices].float() / 255)
    assert torch.allclose(torch.cat([images for images, _ in val]), expected)


def test_the_training_subset_is_class_balanced_fixed_and_within_the_images_given():
    labels = torch.arange(1000) % 10
    subset = training_subset(labels, 95, val_size=0)
    assert len(subset) == 95 and len(set(subset.tolist())) == 95 and subset.max() < 1000
    assert torch.bincount(labels[subset], minlength=10).tolist() == [10] * 5 + [9] * 5
    assert torch.equal(training_subset(labels, 95, val_size=0), subset)  # the same N images every time
    assert set(training_subset(labels, 50, val_size=0).tolist()) != set(subset[:50].tolist())  # its own draw
    with pytest.raises(DataError, match="^--train-images 1001 asks for more than the 1,000 training images there "
                                        "are beside --val-size 20$"):
        training_subset(labels, 1001, val_size=20)


def test_load_cifar100_trains_on_the_subset_beside_the_validation_split(cifar_dir):
    train, val, test = load_cifar100(run_settings(cifar_dir, "--batch-size", 8, "--val-size", 20,
                                                  "--train-images", 30), CPU)
    assert len(train.images) == 30 and len(val.images) == 20 and len(test.images) == 32
    assert torch.bincount(train.labels, minlength=10).tolist() == [3] * 10
    arrays = read_cifar100(cifar_dir, download=False)
    remaining, val_indices = split_validation(arrays.train_labels, 20)
    chosen = remaining[training_subset(arrays.train_labels[remaining], 30, val_size=20)]
    assert torch.equal(train.images, arrays.train_images[chosen])  # the subset, never a held-out image
    assert set(chosen.tolist()).isdisjoint(val_indices.tolist())
    with pytest.raises(DataError, match="asks for more than the 44 training images there are beside --val-size 20"):
        load_cifar100(run_settings(cifar_dir, "--val-size", 20, "--train-images", 45), CPU)


# ---- mixup and CutMix ----

STEPS, BATCH = 8, 8


def mixed_and_plain_epochs(**mixing):
    """One epoch augmented with and without mixing, from the same draws: (mixed, plain, plan), batches (steps, B)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (STEPS * BATCH, 3, 32, 32), dtype=torch.uint8, generator=generator)
    loader = TrainLoader(images, torch.randint(0, 100, (STEPS * BATCH,), generator=generator), BATCH,
                         augmentation=Augmentation(seed=3))
    plan = plan_epoch(STEPS * BATCH, STEPS, 3, 0, augmentation=Augmentation(**mixing), batch_size=BATCH)
    plain_plan = plan_epoch(STEPS * BATCH, STEPS, 3, 0)  # mixing is drawn last: every other draw is the same
    mixed, plain = loader.augment_epoch(plan), loader.augment_epoch(plain_plan)
    shape = (STEPS, BATCH, 3, 32, 32)
    return mixed.view(shape), plain.view(shape), plan, loader.epoch_targets(plan), loader.epoch_targets(plain_plan)


def partners_of(batches, partners):
    return torch.stack([batch[order] for batch, order in zip(batches, partners)])


def assert_targets_share_by_weight(targets, labels, mixing):
    assert torch.allclose(targets.sum(-1), torch.ones(STEPS, BATCH))
    for step in range(STEPS):
        for i in range(BATCH):
            own, partner = labels[step, i], labels[step, mixing.partners[step, i]]
            if own != partner:
                assert targets[step, i, own] == pytest.approx(mixing.weights[step].item())
                assert targets[step, i, partner] == pytest.approx(1 - mixing.weights[step].item())
                assert (targets[step, i] > 0).sum() == 2


def test_each_batch_pairs_its_images_by_its_own_random_permutation():
    plan = plan_epoch(64 * 50, 50, 0, 0, augmentation=Augmentation(mixup=1.0), batch_size=64)
    partners = plan.mixing.partners
    assert all(sorted(row.tolist()) == list(range(64)) for row in partners)
    assert len({tuple(row.tolist()) for row in partners}) == 50  # a new pairing each batch
    mutual = (partners.gather(1, partners) == torch.arange(64)).float().mean()
    assert mutual < 0.2  # a reversed batch pairs every image both ways; a random permutation seldom does


def test_mixup_blends_each_image_with_its_partner_and_the_targets_by_the_same_weight():
    mixed, plain, plan, targets, labels = mixed_and_plain_epochs(mixup=1.0)
    weights = plan.mixing.weights
    assert (weights > 0).all() and (weights < 1).all() and weights.std() > 0.1  # Beta(1, 1): uniform
    share = weights[:, None, None, None, None]
    assert torch.allclose(mixed, share * plain + (1 - share) * partners_of(plain, plan.mixing.partners), atol=1e-5)
    assert_targets_share_by_weight(targets, labels, plan.mixing)


def test_cutmix_pastes_one_box_of_the_partner_and_weights_the_targets_by_its_area():
    mixed, plain, plan, targets, labels = mixed_and_plain_epochs(cutmix=1.0)
    partners = partners_of(plain, plan.mixing.partners)
    for step in range(STEPS):
        top, left, bottom, right = plan.mixing.boxes[step].tolist()
        assert 0 <= top <= bottom <= 32 and 0 <= left <= right <= 32
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[top:bottom, left:right] = True
        assert torch.equal(mixed[step][..., inside], partners[step][..., inside])
        assert torch.equal(mixed[step][..., ~inside], plain[step][..., ~inside])
        assert plan.mixing.weights[step].item() == pytest.approx(1 - inside.sum().item() / 1024)
    assert_targets_share_by_weight(targets, labels, plan.mixing)


def reference_rand_bbox(size, lam, cx, cy):
    """The CutMix authors' rand_bbox (clovaai/CutMix-PyTorch train.py), its random centre given."""
    cut_rat = np.sqrt(1.0 - lam)
    cut_w, cut_h = int(size * cut_rat), int(size * cut_rat)
    bbx1, bby1 = np.clip(cx - cut_w // 2, 0, size), np.clip(cy - cut_h // 2, 0, size)
    bbx2, bby2 = np.clip(cx + cut_w // 2, 0, size), np.clip(cy + cut_h // 2, 0, size)
    return bbx1, bby1, bbx2, bby2


def test_cutmix_boxes_are_cut_as_the_cutmix_authors_code_cuts_them():
    rng = np.random.default_rng(0)
    shares, centres = rng.beta(1.0, 1.0, 2000), rng.integers(0, 32, (2000, 2))
    shares[:3] = 0.0, 1.0, 0.75  # the whole image, none of it, a side of exactly 16
    boxes = cutmix_boxes(shares, centres)
    for box, share, (row, col) in zip(boxes.tolist(), shares, centres):
        assert box == list(reference_rand_bbox(32, share, row, col))
    pasted = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / 1024
    assert pasted.mean() == pytest.approx(0.30, abs=0.01)  # Beta(1, 1): about 0.30, clipped by the border


def test_cutmix_prob_leaves_the_other_batches_unmixed_or_mixes_them_up():
    alone = plan_epoch(4000, 400, 0, 0, augmentation=Augmentation(cutmix=1.0, cutmix_prob=0.5), batch_size=10).mixing
    is_cutmix = alone.boxes.any(1)  # a box of side 0 or 1 cuts nothing, and an unmixed step has none at all
    assert 0.4 < is_cutmix.float().mean() < 0.6
    assert (alone.weights[~is_cutmix] == 1).all() and (alone.blend == 1).all()  # the others: left as they are
    both = plan_epoch(4000, 400, 0, 0, augmentation=Augmentation(mixup=0.2, cutmix=1.0, cutmix_prob=0.5),
                      batch_size=10).mixing
    is_cutmix = both.boxes.any(1)
    assert 0.4 < is_cutmix.float().mean() < 0.6
    assert (both.blend[is_cutmix] == 1).all() and (both.boxes[~is_cutmix] == 0).all()
    assert torch.equal(both.weights[~is_cutmix], both.blend[~is_cutmix])
    assert (both.blend[~is_cutmix] < 0.999).float().mean() > 0.8  # mixed up (Beta(0.2, 0.2) piles up near 0 and 1)


def test_the_validation_fingerprint_changes_with_the_held_out_images_alone(cifar_dir):
    def fingerprint():
        return load_cifar100(run_settings(cifar_dir, "--batch-size", 8, "--val-size", 20), CPU)[1].fingerprint

    before = fingerprint()
    _, held_out = split_validation(read_cifar100(cifar_dir, download=False).train_labels, 20)
    kept = sorted(set(range(64)) - set(held_out.tolist()))
    path = cifar_dir / "cifar-100-python" / "train"
    data = rewrite_split(path)["data"].copy()
    data[kept[0], 0] ^= 1  # a training image changes: the split is the same
    rewrite_split(path, data=data)
    assert fingerprint() == before
    data[held_out[0], 0] ^= 1  # a held-out image changes: the old validation history means something else now
    rewrite_split(path, data=data)
    assert fingerprint() != before


def test_a_data_dir_that_is_a_file_is_one_line_even_when_downloads_are_allowed(tmp_path):
    path = tmp_path / "data"
    path.write_text("not a folder")
    for download in (True, False):
        with pytest.raises(DataError, match=f"--data-dir {path} is a file, not a folder"):
            read_cifar100(path, download=download)


def test_a_label_beyond_int64_is_refused_in_one_line(cifar_dir):
    path = cifar_dir / "cifar-100-python" / "train"
    rewrite_split(path, fine_labels=[2**70] + [0] * 63)
    with pytest.raises(DataError, match=f"{path}: labels must lie in 0..99"):
        read_cifar100(cifar_dir, download=False)


def test_a_data_dir_naming_the_extracted_folder_itself_points_at_its_parent(cifar_dir):
    folder = cifar_dir / "cifar-100-python"
    with pytest.raises(DataError, match=f"{folder} is the cifar-100-python folder itself: point --data-dir at its "
                                        f"parent, {cifar_dir}"):
        read_cifar100(folder, download=False)


# ---- the cache beside the pickles ----


def test_the_first_read_caches_each_split_and_later_reads_take_it(cifar_dir, monkeypatch):
    first = read_cifar100(cifar_dir, download=False)
    folder = cifar_dir / "cifar-100-python"
    assert (folder / ".train.uint8.npz").is_file() and (folder / ".test.uint8.npz").is_file()
    real_unpickle = dataset_utils.unpickle
    monkeypatch.setattr(dataset_utils, "unpickle", lambda path, what: real_unpickle(path, what) if what == "meta file"
                        else pytest.fail(f"unpickled {path}"))
    again = read_cifar100(cifar_dir, download=False)
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(first, name), getattr(again, name)) and getattr(again, name).dtype == \
            getattr(first, name).dtype


def test_a_cache_of_other_bytes_or_a_damaged_one_is_never_taken(cifar_dir):
    read_cifar100(cifar_dir, download=False)
    path = cifar_dir / "cifar-100-python" / "train"
    data = rewrite_split(path)["data"].copy()
    data[3, 7] ^= 255  # the same size, within the same instant: the cache no longer describes the file
    rewrite_split(path, data=data)
    assert read_cifar100(cifar_dir, download=False).train_images[3].flatten()[7] == data[3, 7]
    (cifar_dir / "cifar-100-python" / ".test.uint8.npz").write_bytes(b"not an archive")
    expected = pickle.loads((cifar_dir / "cifar-100-python" / "test").read_bytes())["data"].reshape(-1, 3, 32, 32)
    assert torch.equal(read_cifar100(cifar_dir, download=False).test_images, torch.from_numpy(expected))


def rewrite_cache(cache, **changes):
    with np.load(cache, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    arrays.update(changes)
    with open(cache, "wb") as handle:
        np.savez(handle, **arrays)


def assert_ignored_once_and_rebuilt(cifar_dir, capsys, cache, reason):
    expected = pickle.loads((cifar_dir / "cifar-100-python" / "train").read_bytes())["data"].reshape(-1, 3, 32, 32)
    capsys.readouterr()
    assert torch.equal(read_cifar100(cifar_dir, download=False).train_images, torch.from_numpy(expected))
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 1 and notes[0].startswith(f"note: {cache} ignored (") and reason in notes[0], notes
    assert torch.equal(read_cifar100(cifar_dir, download=False).train_images, torch.from_numpy(expected))
    assert capsys.readouterr().err == ""  # the rebuilt cache is taken in silence


@pytest.mark.parametrize("forgery", ["cut to a tenth", "one pixel changed"])
def test_a_cache_whose_arrays_changed_under_a_matching_source_stamp_is_ignored_and_rebuilt(cifar_dir, capsys,
                                                                                            forgery):
    read_cifar100(cifar_dir, download=False)
    cache = cifar_dir / "cifar-100-python" / ".train.uint8.npz"
    with np.load(cache) as archive:
        images, labels = archive["images"].copy(), archive["labels"]
    if forgery == "cut to a tenth":
        rewrite_cache(cache, images=images[: len(images) // 10], labels=labels[: len(labels) // 10])
    else:
        images[5, 1, 2, 3] ^= 255
        rewrite_cache(cache, images=images)
    assert_ignored_once_and_rebuilt(cifar_dir, capsys, cache, "not the ones it was written with")


def test_a_cache_whose_header_claims_more_than_memory_is_ignored_and_rebuilt(cifar_dir, capsys):
    read_cifar100(cifar_dir, download=False)
    cache = cifar_dir / "cifar-100-python" / ".train.uint8.npz"
    with np.load(cache) as archive:
        kept = {name: archive[name] for name in ("source", "contents", "labels")}
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (10 ** 12, 3, 32, 32)})  # 3 PB
    with zipfile.ZipFile(cache, "w") as archive:
        for name, array in kept.items():
            with archive.open(f"{name}.npy", "w") as member:
                np.lib.format.write_array(member, array)
        archive.writestr("images.npy", header.getvalue() + bytes(3072))
    assert_ignored_once_and_rebuilt(cifar_dir, capsys, cache, "claims arrays larger than memory")


def test_a_cache_an_older_version_wrote_is_ignored_and_rebuilt(cifar_dir, capsys):
    read_cifar100(cifar_dir, download=False)
    cache = cifar_dir / "cifar-100-python" / ".train.uint8.npz"
    with np.load(cache) as archive:
        arrays = {name: archive[name] for name in ("source", "images", "labels")}  # no contents stamp
    with open(cache, "wb") as handle:
        np.savez(handle, **arrays)
    assert_ignored_once_and_rebuilt(cifar_dir, capsys, cache, "not a cache this version writes")


def test_a_folder_that_cannot_take_the_cache_is_left_as_it_was(cifar_dir, monkeypatch):
    import errno

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(dataset_utils.np, "savez", disk_full)
    folder = cifar_dir / "cifar-100-python"
    before = sorted(path.name for path in folder.iterdir())
    read_cifar100(cifar_dir, download=False)
    assert sorted(path.name for path in folder.iterdir()) == before
