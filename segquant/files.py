"""Writing files so that nothing is lost: a file is written to a temporary sibling and renamed into place, so
an interrupted or failed write leaves the previous complete file (or none), never a fragment."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import SegQuantError


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (same folder, ``os.replace``).

    Raises:
        SegQuantError: ``path`` is a folder, or its folder does not exist or is not writable.
    """
    path = Path(path)
    if path.is_dir():
        raise SegQuantError(f"{path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise SegQuantError(f"cannot write {path}: the folder {path.parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise SegQuantError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
