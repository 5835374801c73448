"""What differs between Linux, macOS and Windows: the run folder's lock, making a rename durable, and whether a
process is alive. Linux and macOS use fcntl's flock and fsync a folder; Windows, which has neither, locks a byte
of the lock file with msvcrt and relies on NTFS to journal a rename."""
import os

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

# The lock file is opened read-only where flock needs no more (a read-only remount still lets the run stop
# cleanly); msvcrt.locking needs a file open for writing.
LOCK_FILE_FLAGS = (os.O_RDONLY if fcntl is not None else os.O_RDWR) | os.O_CREAT


def lock_exclusively(descriptor):
    """Take the file's lock without waiting; raises BlockingIOError when another process holds it."""
    if fcntl is not None:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    try:
        msvcrt.locking(descriptor, msvcrt.LK_NBLCK, 1)  # the first byte, from the file's start
    except OSError as err:  # Windows says EACCES or EDEADLOCK for a byte someone else has locked
        raise BlockingIOError(err.errno, "locked by another process") from None


def release_lock(descriptor, path, remove):
    """Give the lock on `path` back, and remove the file if `remove`: on Linux and macOS while still holding it (no
    run can take a file about to go), on Windows once it is closed (an open file cannot be removed there)."""
    if fcntl is not None:
        if remove:
            os.unlink(path)
        os.close(descriptor)
        return
    try:
        os.lseek(descriptor, 0, os.SEEK_SET)
        msvcrt.locking(descriptor, msvcrt.LK_UNLCK, 1)
    finally:
        os.close(descriptor)
    if remove:
        os.unlink(path)


def sync_folder(path):
    """Make a rename inside the folder `path` durable (POSIX); Windows cannot open a folder to fsync it."""
    if fcntl is None:
        return
    folder = os.open(path, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def process_exists(pid):
    """Whether process `pid` runs; on Windows asked of the kernel, since os.kill(pid, 0) would end it there."""
    if os.name == "nt":
        import ctypes
        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return kernel32.GetLastError() == 5  # access denied: it exists, another user's
        kernel32.CloseHandle(handle)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True
