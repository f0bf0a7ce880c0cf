"""Crash-safe file writes: a reader, or a server restarted after a SIGKILL, sees the old file or the new one,
never half of one."""

import contextlib
import fcntl
import glob
import logging
import os
import shutil
import tempfile
from typing import Callable

logger = logging.getLogger(__name__)

# Temporary files are written beside their destination (os.replace is atomic only within one file system) and
# named so that no datastore extension pattern (*.nii.gz, *.nrrd, ...) matches them.
PARTIAL_PREFIX = ".partial-"
PARTIAL_SUFFIX = ".tmp"


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# What a file created in the datastore would get (mkstemp's temporary files are 0600, readable by no one else).
NEW_FILE_MODE = _new_file_mode()


def atomic_write(path: str, write: Callable, mode: str = "wb") -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, flush it to disk, rename it into place and
    flush the folder entry. The file keeps the mode of the one it replaces (a new one gets the umask's)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=PARTIAL_PREFIX, suffix=PARTIAL_SUFFIX)
    try:
        os.fchmod(fd, os.stat(path).st_mode & 0o7777 if os.path.exists(path) else NEW_FILE_MODE)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    sync_folder(folder)


def atomic_copy(source: str, path: str) -> None:
    atomic_write(path, lambda f: _copy_into(source, f))


def _copy_into(source: str, f) -> None:
    with open(source, "rb") as src:
        shutil.copyfileobj(src, f, length=1 << 20)


def sync_folder(folder: str) -> None:
    """Make a rename in ``folder`` survive a power cut, not only a killed process (POSIX only)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def claimed(path: str):
    """Hold an exclusive lock on ``path`` (a file or folder being written) so that ``remove_partial_files`` in
    another process leaves it alone; the lock dies with the process (POSIX only)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        os.close(fd)


def is_claimed(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True  # renamed into place meanwhile: not ours to remove
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def remove_partial_files(folder: str) -> int:
    """Delete temporary files (or folders) left in ``folder`` by a writer that was killed; returns how many.

    Callers make sure no writer is at work: datastore writes happen under the datastore's lock, which the caller
    holds, and downloads hold a claim on their folder."""
    stale = [p for p in glob.glob(os.path.join(glob.escape(folder), f"{PARTIAL_PREFIX}*{PARTIAL_SUFFIX}"))
             if not is_claimed(p)]
    for path in stale:
        logger.warning(f"removing {path}: left by a write that was interrupted")
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    return len(stale)
