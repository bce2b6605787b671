"""Atomic file writes: a reader, or a run killed mid-write, sees the old file or the complete new one.

Every artifact the toolkit writes (checkpoints, ONNX models, TensorRT engines, sidecar/parity JSON, the int8
calibration cache) goes through ``atomic_write``: a uniquely named temporary file in the destination folder
(so two writers never share it, and the rename stays on one file system), flushed and fsynced, then
``os.replace``d over the destination.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

# mkstemp creates files readable by the owner only; the finished file gets the usual umask-derived mode, so
# that e.g. a serving container running as another user can read an exported model. Read once: os.umask can
# only be read by setting it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


# The temporary names atomic_write makes: "." + the destination's name + "." + mkstemp's 8 random characters +
# ".tmp". A process killed between mkstemp and the rename (kill -9, a lost node) leaves one behind.
TEMPORARY_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Calls ``write(file)`` on a temporary file beside ``path``, then renames it to ``path``.

    Args:
        path: the destination; parent folders are created.
        write: writes the content to the binary file object it is given.
    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)  # reopened by name: some writers (onnx.save_model) read ``f.name`` as a path
    try:
        with open(tmp_name, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o666 & ~_UMASK)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically (see ``atomic_write``); returns the path."""
    return atomic_write(path, lambda f: f.write(data))


def sweep_temporaries(folder: str | Path) -> int:
    """Removes the temporary files killed writers left under ``folder`` (recursively); returns how many.

    Only for a folder no one is writing to now (bulk prediction holds its run lock first): a live writer's
    temporary file would go with the dead ones.
    """
    removed = 0
    for root, _, names in os.walk(folder):
        for name in names:
            if TEMPORARY_NAME.match(name):
                try:
                    os.unlink(os.path.join(root, name))
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed
