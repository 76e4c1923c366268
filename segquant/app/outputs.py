"""Output folders that never lose anything: checked before any heavy work, written in a staging sibling and
moved into place only when complete.

- ``--out`` may not be an input (the model folder) nor lie inside one, nor contain one.
- A folder that exists and holds files is replaced only when it is an earlier output of the same command
  (its ``.segquant-output`` file names that command) or with ``--overwrite``.
- ``staged_output`` yields a hidden sibling folder to write into; on success the old folder is swapped out and
  the new one renamed into place; on any failure or Ctrl-C the staging folder is removed and the old output
  is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from segquant import SegQuantError


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


OWNER_FILE = ".segquant-output"


def written_by(folder: Path, command: str) -> bool:
    """Whether ``folder`` is an earlier output of ``command`` (``segquant quantize``, ``segquant run``)."""
    try:
        return (folder / OWNER_FILE).read_text(encoding="utf-8").strip() == command
    except (OSError, UnicodeDecodeError):
        return False


def check_output_folder(out: str | Path, inputs: Iterable[str | Path], command: str, overwrite: bool) -> Path:
    """Raise ``SegQuantError`` unless ``out`` may receive ``command``'s output; returns it resolved.

    Args:
        out: the output folder.
        inputs: local folders or files the command reads (hub ids that are no local path are skipped).
        command: what writes the folder (``segquant quantize``): an earlier output of it is replaced without
            ``overwrite``.
        overwrite: replace a non-empty folder that is not an earlier output.
    """
    out = Path(out).expanduser().resolve()
    for given in inputs:
        path = Path(given).expanduser()
        if not path.exists():
            continue
        path = path.resolve()
        if _inside(out, path) or _inside(path, out):
            raise SegQuantError(f"--out {out} {'is' if out == path else 'overlaps'} the input {path}: choose a "
                                "folder outside the model")
    if out.exists() and not out.is_dir():
        raise SegQuantError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not written_by(out, command) and not overwrite:
        raise SegQuantError(f"--out {out} holds files this command did not write; choose an empty or new folder, "
                            "or pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise SegQuantError(f"--out {out}: its parent folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise SegQuantError(f"--out {out}: cannot write in {out.parent}")
    return out


@contextlib.contextmanager
def staged_output(out: str | Path, command: str) -> Iterator[Path]:
    """Yield a staging folder beside ``out`` (holding only the owner file naming ``command``); move it into place
    as ``out`` when the block completes."""
    out = Path(out).resolve()
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    (stage / OWNER_FILE).write_text(command + "\n", encoding="utf-8")
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(stage, out)
    except BaseException:
        if old.exists() and not out.exists():
            os.replace(old, out)
        shutil.rmtree(stage, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
