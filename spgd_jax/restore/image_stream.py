"""The images of a dataset run: listed by name (sorted), read a batch at a time by a prefetch thread.

    entries = list_images("faces/")                    # ImageEntry(identity, name, path), sorted
    for batch in read_batches(entries, size=64, batch=8):
        batch.identities, batch.truth (b, 64, 64, 3), batch.skipped [(entry, reason)]

The listing holds names only (about a hundred bytes per file); pixels are read `prefetch` batches ahead
of the sampler and no further, so memory does not grow with the number of images. An image's identity
is its path relative to the folder (or to a glob's folder part), with '/' separators: it names the
image in the run's manifest and seeds its randomness, so it must not depend on where the folder lies.
Its output name is that path without the suffix, or with the suffix as '_png' when two files of a
folder share a stem (a.jpg, a.png -> a_jpg, a_png). An unreadable file is reported, not raised.
"""

from __future__ import annotations

import glob
import itertools
import os
import queue
import threading
from pathlib import Path, PurePosixPath
from typing import Iterator, NamedTuple

import numpy as np

from spgd_jax.io import images

__all__ = ["Batch", "ImageEntry", "list_images", "read_batches"]

PREFETCH = 2  # batches read ahead of the one being restored


class ImageEntry(NamedTuple):
    """identity: the path relative to the input folder ('sub/a.png'); name: the outputs' name ('sub/a');
    path: where the file is."""

    identity: str
    name: str
    path: Path


class Batch(NamedTuple):
    """The readable images of a run of entries: entries and truth (b, size, size, 3) float32 in [-1, 1],
    row by row; skipped: (entry, reason) of each unreadable file; notices: conversions (mode, crop, resize)."""

    entries: list[ImageEntry]
    truth: np.ndarray
    skipped: list[tuple[ImageEntry, str]]
    notices: list[str]


def _glob_root(spec: str) -> Path:
    """The leading folders of a glob pattern that hold no wildcard."""
    fixed = list(itertools.takewhile(lambda part: not glob.has_magic(part), Path(spec).parts))
    return Path(*fixed) if fixed else Path(".")


def _output_names(identities: list[str]) -> list[str]:
    """Each identity without its suffix; stems repeated in one folder keep their suffix as '_ext'."""
    stems: dict[str, int] = {}
    for identity in identities:
        stem = str(PurePosixPath(identity).with_suffix(""))
        stems[stem] = stems.get(stem, 0) + 1
    names = []
    for identity in identities:
        path = PurePosixPath(identity)
        stem = str(path.with_suffix(""))
        names.append(stem if stems[stem] == 1 else f"{stem}_{path.suffix[1:]}")
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"input files {', '.join(i for i, n in zip(identities, names) if n == repeated[0])} would "
                         f"write the same output {repeated[0]!r}; rename one of them")
    return names


def list_images(spec: str) -> list[ImageEntry]:
    """The image files of a folder (not its subfolders), a glob pattern or one file, sorted by identity.

    FileNotFoundError naming `spec` when there is none (the message says what --input needs)."""
    path = Path(spec)
    if path.is_dir():
        root = path
        with os.scandir(path) as scan:
            found = [Path(e.path) for e in scan if e.is_file() and Path(e.name).suffix.lower() in images.IMAGE_SUFFIXES]
    elif path.is_file():
        root, found = path.parent, [path]
    else:
        root = _glob_root(spec)
        found = [Path(p) for p in glob.iglob(spec) if Path(p).suffix.lower() in images.IMAGE_SUFFIXES]
    if not found:
        raise FileNotFoundError(f"no image file ({', '.join(images.IMAGE_SUFFIXES)}) in or matching {spec!r}; point "
                                "--input at an image, a folder of images or a glob")
    identities = sorted((p.relative_to(root).as_posix(), p) for p in found)
    names = _output_names([identity for identity, _ in identities])
    return [ImageEntry(identity, name, p) for (identity, p), name in zip(identities, names)]


def _read(entries: list[ImageEntry], size: int) -> Batch:
    truth, kept, skipped, notices = [], [], [], []
    for entry in entries:
        try:
            truth.append(images.load_image(entry.path, size, notices))
            kept.append(entry)
        except (ValueError, OSError) as error:
            skipped.append((entry, str(error)))
    array = np.stack(truth) if truth else np.zeros((0, size, size, 3), np.float32)
    return Batch(kept, array, skipped, notices)


def read_batches(entries: list[ImageEntry], size: int, batch: int, prefetch: int = PREFETCH) -> Iterator[Batch]:
    """The entries in runs of `batch`, each read as a Batch by a background thread at most `prefetch`
    batches ahead. Stopping the iteration early (break, an error) stops the thread."""
    ready: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for start in range(0, len(entries), batch):
                if not put(_read(entries[start : start + batch], size)):
                    return
            put(None)
        except BaseException as error:  # handed to the consumer
            put(error)

    reader = threading.Thread(target=produce, name="spgd-image-reader", daemon=True)
    reader.start()
    try:
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
