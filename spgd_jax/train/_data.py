"""Image-folder loading for training: list, split, decode once, cache, order, augment on device.

Images on the host are uint8 (N, S, S, 3) in [0, 255]; on the device they become float32
(B, S, S, 3) in [-1, 1] (NHWC, the project convention).

One file is preprocessed by `spgd_jax.io.images.load_image`: any mode to RGB (alpha composited on
white), centre-crop to the largest square, bicubic antialiased resize to S x S.  Decoding is slow
on a small CPU, so `load_folder` caches the result as a .npy (plus a .json with the file names)
keyed by the file list and the size (written atomically: `spgd_jax.io.files`).  The batch of update s
is a function of (seed, s) alone (`batch_indices`).
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from spgd_jax.io.files import atomic_write, write_json
from spgd_jax.io.images import IMAGE_SUFFIXES, load_image, to_uint8

CACHE_VERSION = 1  # bump when preprocessing changes: old caches are then ignored


@dataclass(frozen=True)
class Split:
    """Deterministic held-out split: file k (in sorted order) is validation iff k % every == offset."""

    every: int = 50
    offset: int = 7

    def __post_init__(self):
        if self.every < 2 or not 0 <= self.offset < self.every:
            raise ValueError(f"Split needs every >= 2 and 0 <= offset < every, got every={self.every}, "
                             f"offset={self.offset}")


def list_images(folder: str | os.PathLike) -> list[str]:
    """Relative POSIX paths of all image files under `folder` (recursive, `IMAGE_SUFFIXES`), sorted."""
    root = Path(folder)
    if not root.exists():
        raise ValueError(f"data folder {str(root)!r} does not exist; pass --data with a folder of "
                         f"images (jpg/png)")
    if not root.is_dir():
        raise ValueError(f"data path {str(root)!r} is not a folder; pass --data with a folder of images")
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not names:
        raise ValueError(f"data folder {str(root)!r} contains no images with extensions "
                         f"{', '.join(IMAGE_SUFFIXES)} (searched recursively)")
    return names


def split_names(names: list[str], split: Split = Split()) -> tuple[list[str], list[str]]:
    """(train, validation) lists from the sorted `names`; the split depends only on the sorted order."""
    names = sorted(names)
    val = [n for k, n in enumerate(names) if k % split.every == split.offset]
    train = [n for k, n in enumerate(names) if k % split.every != split.offset]
    return train, val


def source_counts(names: list[str]) -> dict[str, int]:
    """{top-level folder: number of names in it} ("." for files at the top), sorted by folder."""
    counts: dict[str, int] = {}
    for n in names:
        top = n.split("/", 1)[0] if "/" in n else "."
        counts[top] = counts.get(top, 0) + 1
    return dict(sorted(counts.items()))


def _cache_key(root: Path, names: list[str], size: int) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION} size={size}\n".encode())
    for n in names:
        st = (root / n).stat()
        h.update(f"{n}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def load_folder(folder: str | os.PathLike, names: list[str], size: int,
                cache_dir: str | os.PathLike | None = None, log=print) -> tuple[np.ndarray, list[str]]:
    """Decode `names` (relative to `folder`) to uint8 (N, size, size, 3); unreadable files are skipped.

    Returns (images, kept_names).  Skipped files are reported through `log` one by one and as a count.
    With `cache_dir`, the result is stored there as <key>.npy + <key>.json and reused when the file
    list, file sizes/mtimes and `size` are unchanged.
    """
    if size < 1:
        raise ValueError(f"image size must be positive, got {size}")
    root = Path(folder)
    if not names:
        raise ValueError(f"no image names given to load from {str(root)!r}")
    cache_npy = cache_json = None
    if cache_dir is not None:
        key = _cache_key(root, names, size)
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        cache_npy = Path(cache_dir) / f"{key}.npy"
        cache_json = Path(cache_dir) / f"{key}.json"
        if cache_npy.exists() and cache_json.exists():
            kept = json.loads(cache_json.read_text())["names"]
            images = np.load(cache_npy)
            if images.shape == (len(kept), size, size, 3):
                log(f"loaded {len(kept)} cached images from {cache_npy}")
                return images, kept
    def decode(name: str) -> np.ndarray | ValueError:
        try:
            return to_uint8(load_image(root / name, size))
        except ValueError as e:
            return e

    images, kept, skipped = [], [], []
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # PIL decodes without the GIL
        for k, (n, result) in enumerate(zip(names, pool.map(decode, names))):
            if isinstance(result, ValueError):
                skipped.append(n)
                log(f"notice: skipping unreadable image: {result}")
            else:
                images.append(result)
                kept.append(n)
            if (k + 1) % 5000 == 0:
                log(f"decoded {k + 1}/{len(names)} images")
    if skipped:
        log(f"notice: skipped {len(skipped)} unreadable image(s) of {len(names)}")
    if not kept:
        raise ValueError(f"none of the {len(names)} image files in {str(root)!r} could be read")
    out = np.stack(images)
    if cache_npy is not None:
        atomic_write(cache_npy, lambda stream: np.save(stream, out))
        write_json(cache_json, {"folder": str(root.resolve()), "size": size, "names": kept, "skipped": skipped})
    return out, kept


def save_resized_copies(folder: str | os.PathLike, out: str | os.PathLike, size: int, suffix: str = ".webp",
                        quality: int = 88, log=print) -> list[str]:
    """Writes every image under `folder`, preprocessed as `load_folder` does (size x size RGB), to
    out/<its relative path with `suffix`>: a compact copy of a data set to carry to another machine
    (64x64 WebP at quality 88: about 1.25 kB a face, as close to the source as JPEG at quality 92 at
    about 2.3 kB).  The sorted order, hence the split, is that of the source when all names share one
    suffix.  Unreadable files are skipped with a notice; returns the names written."""
    from PIL import Image

    root, out = Path(folder), Path(out)
    names = list_images(root)
    targets = [out / Path(n).with_suffix(suffix) for n in names]
    if len(set(targets)) != len(targets):
        raise ValueError(f"two images in {str(root)!r} differ only in their suffix; they would share one copy")

    def write(pair) -> str | None:
        name, target = pair
        try:
            pixels = to_uint8(load_image(root / name, size))
        except ValueError as e:
            log(f"notice: skipping unreadable image: {e}")
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        fmt = Image.registered_extensions()[suffix]
        extra = {"method": 6} if fmt == "WEBP" else {}  # WebP's slowest, smallest encoding
        atomic_write(target, lambda stream: Image.fromarray(pixels).save(stream, format=fmt, quality=quality, **extra))
        return target.relative_to(out).as_posix()

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        written = [n for n in pool.map(write, zip(names, targets)) if n is not None]
    log(f"wrote {len(written)} {size}x{size} {suffix} copies of the {len(names)} images in {str(root)!r} to {str(out)!r}")
    return written


def batch_indices(seed: int, step: int, num_images: int, batch_size: int) -> np.ndarray:
    """Indices of the batch for update `step`: consecutive slices of a stream of per-epoch
    permutations (epoch e shuffled by numpy's default_rng([seed, e]))."""
    return batch_indices_block(seed, step, 1, num_images, batch_size)[0]


def batch_indices_block(seed: int, step: int, num_steps: int, num_images: int, batch_size: int) -> np.ndarray:
    """int32 (num_steps, batch_size): the batches of updates step .. step + num_steps - 1 (`batch_indices`
    of each), computed at once for one transfer to the device."""
    epoch, offset = np.divmod(np.arange(step * batch_size, (step + num_steps) * batch_size), num_images)
    out = np.empty(epoch.shape, np.int32)
    for e in np.unique(epoch):
        where = epoch == e
        out[where] = _permutation(seed, int(e), num_images)[offset[where]]
    return out.reshape(num_steps, batch_size)


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def to_model_range(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] (..., H, W, C) -> float32 [-1, 1]."""
    return images.astype(jnp.float32) / 127.5 - 1.0


def random_flip(key: jax.Array, x: jax.Array) -> jax.Array:
    """Flip each image of x (B, H, W, C) left-right with probability 1/2 (one coin per image)."""
    flip = jax.random.bernoulli(key, 0.5, (x.shape[0],))
    return jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)
