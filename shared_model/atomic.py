"""Atomic file writes: a temporary file in the target folder, then ``os.replace``.

A reader never sees a half-written file, and a crash mid-write leaves the old
file (if any) in place and no temporary file behind. The file gets the mode a plain
``open(path, "w")`` would give it: the mode of the file it replaces, else 0666 less the
process umask (``tempfile.mkstemp`` alone would leave every result 0600, unreadable to a
colleague or a service account on a shared machine).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``);
    elsewhere set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # the briefest window, and a strict one, for other threads
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode a new file (0666) or folder (0777) gets from ``open`` / ``mkdir`` under the umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


@contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        try:  # mkstemp makes it 0600: give it the mode the file it replaces has, else the umask's
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = default_mode()
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (flushed and fsynced before the rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)
