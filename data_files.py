"""Where CIFAR-100's files are: the folder's layout, what the folder alone says is wrong with it (asked before
torch loads, so that a wrong --data-dir answers at once), and the official archive's download and unpacking.
Imports nothing heavy."""
import contextlib
import hashlib
import os
import shutil
import sys
import tarfile
import urllib.request
from pathlib import Path

# The official python-version archive (about 161 MB) and the folder it unpacks to.
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE_NAME = "cifar-100-python.tar.gz"
ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
FOLDER_NAME = "cifar-100-python"
SPLIT_FILES = ("train", "test", "meta")


class DataError(RuntimeError):
    """The data set is missing, unreadable or not in the CIFAR-100 layout."""


def describe(err):
    return f"{type(err).__name__}: {err}".splitlines()[0][:200]


def check_data_dir(data_dir, download):
    """What the folder alone tells: a --data-dir that is a file, the inner folder given for its parent, entries that
    are no files, and no data where nothing may be downloaded."""
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
    extracted = all((folder / name).is_file() for name in SPLIT_FILES)
    if not extracted and not download and not (root / ARCHIVE_NAME).is_file():
        raise DataError(f"CIFAR-100 not found: put {ARCHIVE_NAME} ({ARCHIVE_URL}) or its extracted "
                        f"{FOLDER_NAME}/ folder in {root.resolve()}, or drop --no-download")


def fetch_archive(root):
    """Unpack `root/cifar-100-python.tar.gz`, downloading it first if it is missing (`check_data_dir` has said
    whether that is allowed)."""
    archive = root / ARCHIVE_NAME
    if not archive.is_file():
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
