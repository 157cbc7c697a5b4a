"""Image files <-> arrays in [-1, 1], HWC float32.

Loading converts any mode Pillow reads (greyscale, RGBA, palette, 16-bit) to
RGB and reports the conversion through `notices`; images are centre-cropped to a
square (or cut to a given box) and resized to the model's size with a notice.
`load_demo` loads the demo photo cut to its face, framed as the default prior's
training faces. Writing is atomic: a file
is written beside its target under a temporary name and renamed, so an error or
Ctrl-C never leaves a half-written PNG.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from spgd_jax.io.files import atomic_write

__all__ = [
    "DEMO_FACE_BOX",
    "IMAGE_SUFFIXES",
    "demo_image_path",
    "load_demo",
    "find_images",
    "load_image",
    "save_png",
    "to_uint8",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


# The face of the demo photo (512x600 px) as (left, top, right, bottom) pixels: a 380 px square framed like
# the default prior's training faces. Those are CelebA's aligned faces (and UTKFace's crops, framed tighter)
# centre-cropped to a square: in CelebA's mean landmarks the eyes lie at 51 % of the height, 22 % of the
# side apart, the mouth at 74 %. Grace Hopper's eyes are at (221, 189) and (304, 186), 83 px apart, her
# mouth at y = 276, so the CelebA framing is a 380 px square centred on x = 262 with the eyes at y = 194:
# it would start at y = -6, so it is moved down to the photo's top edge (eyes at 49 % of the height).
DEMO_FACE_BOX = (72, 0, 452, 380)


def demo_image_path() -> Path:
    """Grace Hopper's public-domain portrait, shipped by matplotlib (the whole photo: uniform, flag)."""
    import matplotlib.cbook

    return Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def load_demo(size: int, notices: list[str] | None = None) -> np.ndarray:
    """The demo photo cut to its face (DEMO_FACE_BOX) as (size, size, 3) float32 in [-1, 1].

    The default prior learnt 64 px faces that fill the frame (aligned face crops); the whole
    photo, or its centre square, shows a small face over a uniform and a flag, far from what the prior
    knows, and SPGD then restores it worse than bicubic upsampling does. The face box frames her face
    as the training faces are framed (see DEMO_FACE_BOX), so the demo shows what the prior can do.
    """
    return load_image(demo_image_path(), size, notices, box=DEMO_FACE_BOX)


def find_images(spec: str) -> list[Path]:
    """Image paths from one file, a folder (its image files, sorted) or a glob pattern.

    Raises FileNotFoundError naming `spec` when nothing matches.
    """
    path = Path(spec)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise FileNotFoundError(
                f"folder {spec!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); point --input at image files"
            )
        return found
    if path.is_file():
        return [path]
    found = sorted(Path(p) for p in glob.glob(spec) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise FileNotFoundError(f"no image file, folder or glob match for {spec!r}; check the path")
    return found


def _to_rgb(image: Image.Image, notices: list[str], name: str) -> np.ndarray:
    """uint8 RGB array from any Pillow mode, noting what was converted."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        notices.append(f"{name}: {mode} ({'16' if peak > 255 else '32'}-bit) converted to 8-bit RGB")
        array = np.round(array / peak * 255.0).clip(0, 255).astype(np.uint8)
        return np.repeat(array[..., None], 3, axis=-1)
    if mode == "RGB":
        return np.asarray(image)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        notices.append(f"{name}: {mode} with transparency composited on white and converted to RGB")
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    notices.append(f"{name}: {mode} image converted to RGB")
    return np.asarray(image.convert("RGB"))


def load_image(path: str | os.PathLike, size: int, notices: list[str] | None = None,
               box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Load an image as (size, size, 3) float32 in [-1, 1].

    box: (left, top, right, bottom) pixels, a square inside the image, to cut out first (with a
    notice); else non-square images are centre-cropped. Other sizes are resized (bicubic, Pillow's
    antialiasing) with a notice appended to `notices`. A corrupt, truncated or non-image file raises
    ValueError naming the file; a box that is not a square inside the image raises ValueError.
    """
    notices = [] if notices is None else notices
    name = str(path)
    try:
        with Image.open(path) as image:
            image.load()
            rgb = _to_rgb(image, notices, name)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(
            f"{name} is not a readable image ({error}); the file may be corrupt or truncated, "
            "re-export it as PNG or JPEG"
        ) from None
    height, width = rgb.shape[:2]
    if box is not None:
        left, top, right, bottom = (int(v) for v in box)
        if not (0 <= left < right <= width and 0 <= top < bottom <= height and right - left == bottom - top):
            raise ValueError(f"box {tuple(box)} is not a square inside {name} ({width}x{height}); "
                             "give (left, top, right, bottom) with right - left == bottom - top")
        rgb = rgb[top:bottom, left:right]
        notices.append(f"{name}: cut to the {right - left}x{bottom - top} box at ({left}, {top})")
    elif height != width:
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        rgb = rgb[top : top + side, left : left + side]
        notices.append(f"{name}: {width}x{height} centre-cropped to {side}x{side}")
    if rgb.shape[0] != size:
        notices.append(f"{name}: resized from {rgb.shape[0]}x{rgb.shape[0]} to {size}x{size}")
        rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BICUBIC, reducing_gap=None))
    return rgb.astype(np.float32) / 127.5 - 1.0


def to_uint8(x: np.ndarray) -> np.ndarray:
    """(..., C) in [-1, 1] -> uint8 in [0, 255], clipped and rounded."""
    return np.round((np.clip(np.asarray(x, dtype=np.float32), -1, 1) + 1) * 127.5).astype(np.uint8)


def save_png(path: str | os.PathLike, x: np.ndarray) -> None:
    """Write (H, W, 3) in [-1, 1] (or uint8) to `path` atomically."""
    array = x if np.asarray(x).dtype == np.uint8 else to_uint8(x)
    atomic_write(path, lambda stream: Image.fromarray(np.asarray(array)).save(stream, format="PNG"))
