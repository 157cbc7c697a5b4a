"""Atomic file writes: a file appears complete, with the user's umask mode, or not at all.

Every output file of the command lines goes through `atomic_write`: the content is written into a
hidden temporary file beside the target and renamed over it, so an error or Ctrl-C leaves the earlier
file (or nothing), never half a file. The temporary file is created private (mode 0600), so its mode
is set to what a plain `open(path, "w")` would give: 0666 minus the process umask.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

__all__ = ["atomic_write", "file_mode", "write_json", "write_npz", "write_text"]


def file_mode() -> int:
    """The mode a newly created file gets under the current umask (0o666 & ~umask), e.g. 0o644."""
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Calls write(stream) on a temporary file beside `path`, then renames it to `path`.

    The folder of `path` must exist. On any error (or KeyboardInterrupt) the temporary file is removed and
    an existing `path` is left as it was.
    """
    path = Path(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, file_mode())
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically."""
    atomic_write(path, lambda stream: stream.write(text.encode()))


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Writes `data` as indented JSON to `path` atomically."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Writes the named arrays as an uncompressed .npz to `path` atomically."""
    atomic_write(path, lambda stream: np.savez(stream, **arrays))
