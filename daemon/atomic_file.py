"""Whole-file replacement for the small files every part keeps (keys, a node's state, a DC's
registry snapshot, a deployment record, the compiled contract): a reader, or the disk after a
crash, sees the old file or the new one and never half of one; and two writers of the same file at
once (two `ntm` commands both refreshing id.json) both succeed, because each writes its own
temporary file: a name shared by every writer let one rename the other's file away."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

PUBLIC_FILE_MODE = 0o644  # what a plain `open()` gives under the usual umask 022
SECRET_FILE_MODE = 0o600  # keys: the owner only


def replace_file(path: Path, data: bytes, mode: int = PUBLIC_FILE_MODE) -> None:
    """Write `data` as the whole of `path` (made with `mode`), durably: the data and the rename are
    on disk when this returns. On an error the old file stays and no temporary file is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)
