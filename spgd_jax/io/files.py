"""Atomic file writes: a file appears complete, with the user's umask mode, or not at all.

Every output file of the command lines goes through `atomic_write`: the content is written into a
hidden temporary file beside the target and renamed over it, so an error or Ctrl-C leaves the earlier
file (or nothing), never half a file, and no temporary file. The file gets the mode a plain
`open(path, "w")` would give: 0666 minus the process umask.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

__all__ = ["atomic_write", "write_json", "write_npz", "write_text"]


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Calls write(stream) on a temporary file beside `path`, then renames it to `path`.

    The folder of `path` must exist. On any error (or KeyboardInterrupt) the temporary file is removed and
    an existing `path` is left as it was.
    """
    path = Path(path)
    # The name is chosen before the file is made, so that a Ctrl-C arriving at any point after (even between
    # the file's creation and the assignment of its handle) finds a name to remove.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        handle = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        with os.fdopen(handle, "wb") as stream:  # mode 0o666 minus the umask, as open(path, "w") gives
            write(stream)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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
