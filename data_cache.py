"""The uint8 arrays of a CIFAR-100 split, kept beside its pickle (`.train.uint8.npz`): a later run reads them in a
fraction of the unpickling time.

A cache is taken only if it describes this very pickle (the pickle's size and CRC-32) and still holds the arrays it
was written with (their count and CRC-32). Any other, made from other bytes, damaged, cut short or with a header
that claims more than memory holds, is ignored with one note and rebuilt from the pickle.
"""
import contextlib
import os
import sys
import zipfile
import zlib

import numpy as np
import torch

from launch import is_first_on_its_node
from system import process_exists

IMAGE_SHAPE = (3, 32, 32)


class IgnoredCache(Exception):
    """Why a cache does not describe its pickle."""


def cached_split(path, num_classes):
    """The split's (images, labels) tensors from the cache beside the pickle at `path`, or None: no cache yet, or
    one that is ignored (said in one note); the caller then reads the pickle and `write_cache`s it."""
    cache = cache_path(path)
    remove_abandoned_caches(cache)
    if not cache.exists():
        return None
    try:
        images, labels = read_cache(cache, path, num_classes)
    except IgnoredCache as reason:
        if is_first_on_its_node():  # under torchrun, a machine's ranks all read this folder
            print(f"note: {cache} ignored ({reason}): rebuilt from {path.name}", file=sys.stderr, flush=True)
        return None
    return torch.from_numpy(images), torch.from_numpy(labels)


def cache_path(path):
    return path.with_name(f".{path.name}.uint8.npz")


def read_cache(cache, path, num_classes):
    try:
        with np.load(cache, allow_pickle=False) as archive:
            source, contents = archive["source"], archive["contents"]
            images, labels = archive["images"], archive["labels"]
    except KeyError:
        raise IgnoredCache("not a cache this version writes") from None
    except MemoryError:  # np.load allocates what the header claims before it reads
        raise IgnoredCache("its header claims arrays larger than memory") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise IgnoredCache(f"unreadable: {err}") from None
    if not np.array_equal(source, source_stamp(path)):
        raise IgnoredCache(f"made from other bytes than {path.name}")
    if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE or labels.dtype != np.int64 \
            or labels.shape != (len(images),) or not len(labels):
        raise IgnoredCache("its arrays are not uint8 images and int64 labels, one label an image")
    if not np.array_equal(contents, contents_stamp(images, labels)):
        raise IgnoredCache("its arrays are not the ones it was written with")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise IgnoredCache(f"its labels lie outside 0..{num_classes - 1}")
    return images, labels


def source_stamp(path):
    """The pickle's size and CRC-32: a cache made from other bytes, however recently, is never taken for it."""
    checksum, size = 0, 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            checksum, size = zlib.crc32(block, checksum), size + len(block)
    return np.array([size, checksum], dtype=np.int64)


def contents_stamp(images, labels):
    """The arrays' count and CRC-32: a cache whose arrays were changed or swapped under a copied source stamp
    is never taken."""
    return np.array([len(images), crc32_of(images, labels)], dtype=np.int64)


def crc32_of(*arrays):
    """One CRC-32 over the arrays' bytes, in order."""
    checksum = 0
    for array in arrays:
        checksum = zlib.crc32(np.ascontiguousarray(array), checksum)
    return checksum


def remove_abandoned_caches(cache):
    """What a writer killed mid-write left beside `cache` (`.train.uint8.npz.tmp1234`, 150 MB for the real training
    split): removed once the process that wrote it is gone. A run writing it now keeps its own."""
    for entry in cache.parent.glob(cache.name + ".tmp*"):
        writer = entry.name.rsplit(".tmp", 1)[1]
        if writer.isdigit() and not process_exists(int(writer)):
            with contextlib.suppress(OSError):
                entry.unlink()


def write_cache(path, images, labels):
    """Keep the split's arrays beside its pickle for the next run; a folder that cannot take them is left as it
    was (nothing half-written stays)."""
    cache = cache_path(path)
    temporary = cache.with_name(cache.name + f".tmp{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            np.savez(handle, source=source_stamp(path), contents=contents_stamp(images, labels), images=images,
                     labels=labels)
        os.replace(temporary, cache)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
