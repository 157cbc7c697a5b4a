"""Calibrate operator defaults for 64 and 128 px images against the reference's 256 px difficulty.

Difficulty = mean PSNR (dB, [0, 1] images) of the noiseless degraded image against the
original, with the degraded image brought back to the original's size and domain:
  blur: the blurred image itself; inpainting: the masked image (removed pixels read 0, i.e.
  mid-grey); SR xK: downsampled by K then bicubic-upsampled by K (the same MATLAB-style
  resize); HDR: clip(2x, -1, 1). Phase retrieval is left out (its measurement is a Fourier
  magnitude, not an image).

Targets come from the reference settings at 256 px on the FFHQ demo images (ffhq256/, 10
images; motion blur averages 10 kernels per image). Other sizes are measured on the held-out
split of the face folders (faces/, centre-crop + resize; the first 200 validation images)
and, as a cross-check, on the FFHQ images resized down. For each size the Gaussian std is
found by bisection (kernel size scaled from 61 and made odd) and the motion kernel size
by a scan over odd sizes (intensity 0.5); box inpainting keeps the box at half the image
side. Results go to benchmarks/results/operator_calibration.md.

    python benchmarks/operator_calibration.py --data ../shared/data

(spgd_jax's public API alone; run it with the package installed, pip install -e .)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from spgd_jax import metrics
from spgd_jax.io.images import load_image
from spgd_jax.train import Split, list_images, split_names
from spgd_jax.operators import blur, box_mask, gaussian_kernel, hdr, inpaint, motion_kernels, random_mask, resize

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
SIZES = (64, 128)
MOTION_DRAWS_256 = 10  # motion kernels per FFHQ image at 256 px
NOTES = [
    "Defaults are chosen on `faces`, the data of the project's own priors; `ffhq` is a cross-check. "
    "Half of `faces` are 89 px CelebA crops, upsampled at 128 px, so blur costs them less PSNR than "
    "FFHQ there.",
    "SR keeps factor 4 at every size (the task is sr4); at 64 px x4 is much harder than at 256 px and "
    "x2 matches it: use `get('sr4', 64, factor=2)` for comparable difficulty.",
    "Random inpainting, box inpainting (box half the side, margin side / 8) and HDR are scale-free and "
    "match without tuning; phase retrieval is not measured.",
    "Sizes other than 64, 128 and 256 interpolate std and motion kernel size log-log between these, "
    "and scale them proportionally outside [64, 256]; the Gaussian kernel is odd(61 * size / 256).",
]


def load(folder: Path, names: list[str], size: int) -> jax.Array:
    return jnp.asarray(np.stack([load_image(folder / n, size) for n in names]))


def mean_psnr(degraded: jax.Array, images: jax.Array) -> float:
    return float(jnp.mean(metrics.psnr(degraded, images)))


_blur_each = jax.jit(jax.vmap(blur, in_axes=(0, 0)))
_blur_shared = jax.jit(jax.vmap(blur, in_axes=(0, None)))


def gauss_psnr(images: jax.Array, size: int, std: float) -> float:
    return mean_psnr(_blur_shared(images, jnp.asarray(gaussian_kernel(size, std))), images)


def motion_psnr(images: jax.Array, size: int, key: jax.Array, draws: int = 1) -> float:
    values = []
    for k in jax.random.split(key, draws):
        kernels = jnp.asarray(motion_kernels(k, images.shape[0], size, 0.5))
        values.append(mean_psnr(_blur_each(images, kernels), images))
    return float(np.mean(values))


def sr_psnr(images: jax.Array, factor: int) -> float:
    roundtrip = jax.vmap(lambda x: resize(resize(x, 1.0 / factor), float(factor)))
    return mean_psnr(roundtrip(images), images)


def random_inpaint_psnr(images: jax.Array, key: jax.Array) -> float:
    n, side = images.shape[0], images.shape[1]
    masks = jax.vmap(lambda k: random_mask(k, side, side, 0.2))(jax.random.split(key, n))
    return mean_psnr(jax.vmap(inpaint)(images, masks), images)


def box_psnr(images: jax.Array, key: jax.Array, box: int, margin: int) -> float:
    n, side = images.shape[0], images.shape[1]
    masks = jax.vmap(lambda k: box_mask(k, side, side, box, margin))(jax.random.split(key, n))
    return mean_psnr(jax.vmap(inpaint)(images, masks), images)


def odd(value: float) -> int:
    return 2 * int(round((value - 1) / 2)) + 1


def fit_std(images: jax.Array, size: int, target: float, lo: float = 0.2, hi: float | None = None) -> float:
    """Bisection on std (PSNR falls as std grows) to within 0.005."""
    hi = size / 4 if hi is None else hi
    while hi - lo > 0.005:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gauss_psnr(images, size, mid) > target else (lo, mid)
    return (lo + hi) / 2


def reference_targets(ffhq256: jax.Array, keys: jax.Array) -> tuple[dict[str, float], list[str]]:
    """The 256 px difficulties of the reference settings, {task: mean PSNR dB}, and their markdown table.
    ffhq256: (N, 256, 256, 3) in [-1, 1]; keys (4,): the run's keys (motion, inpaint, box, motion scan)."""
    target = {
        "gauss": gauss_psnr(ffhq256, 61, 3.0),
        "motion": motion_psnr(ffhq256, 61, keys[0], MOTION_DRAWS_256),
        "sr4": sr_psnr(ffhq256, 4),
        "inpaint": random_inpaint_psnr(ffhq256, keys[1]),
        "box": box_psnr(ffhq256, keys[2], 128, 32),
        "hdr": mean_psnr(hdr(ffhq256, 2.0), ffhq256),
    }
    print("256 px targets:", {k: round(v, 2) for k, v in target.items()})
    lines = ["## 256 px: the reference settings (targets)", "",
             "| task | setting | ffhq 256 |", "|---|---|---|",
             f"| Gaussian blur | 61x61, std 3.0 | {target['gauss']:.2f} |",
             f"| motion blur | 61x61, intensity 0.5 | {target['motion']:.2f} |",
             f"| SR x4 (down, bicubic up) | factor 4 | {target['sr4']:.2f} |",
             f"| random inpainting | keep 20% | {target['inpaint']:.2f} |",
             f"| box inpainting | 128x128, margin 32 | {target['box']:.2f} |",
             f"| HDR | clip(2x) | {target['hdr']:.2f} |", ""]
    return target, lines


def calibrate(size: int, faces: jax.Array, ffhq: jax.Array, target: dict[str, float],
              keys: jax.Array) -> tuple[dict, list[str]]:
    """The settings chosen at `size` px (Gaussian kernel and std, motion kernel, box and margin) to match
    the 256 px targets on the faces, and the section that shows them; faces, ffhq: (N, size, size, 3) in [-1, 1]."""
    gauss_size = odd(61 * size / 256)
    std = round(fit_std(faces, gauss_size, target["gauss"]), 2)
    plain_std = 3.0 * size / 256
    motion_rows = []
    for m in range(5, odd(61 * size / 256 * 1.6) + 1, 2):
        motion_rows.append((m, motion_psnr(faces, m, keys[3]), motion_psnr(ffhq, m, keys[3], 3)))
    motion_size = min(motion_rows, key=lambda r: abs(r[1] - target["motion"]))[0]
    if motion_size == motion_rows[-1][0]:
        print(f"notice: at {size} px the largest scanned motion kernel was chosen; widen the scan")
    box, margin = size // 2, size // 8
    chosen = dict(gauss_size=gauss_size, std=std, motion_size=motion_size, box=box, margin=margin)
    print(f"{size} px: {chosen}")
    lines = [f"## {size} px", "",
             "| task | setting | faces | ffhq | target (256) |", "|---|---|---|---|---|",
             f"| Gaussian blur, chosen | {gauss_size}x{gauss_size}, std {std} | "
             f"{gauss_psnr(faces, gauss_size, std):.2f} | {gauss_psnr(ffhq, gauss_size, std):.2f} | "
             f"{target['gauss']:.2f} |",
             f"| Gaussian blur, plain scaling | {gauss_size}x{gauss_size}, std {plain_std:g} | "
             f"{gauss_psnr(faces, gauss_size, plain_std):.2f} | {gauss_psnr(ffhq, gauss_size, plain_std):.2f} | "
             f"{target['gauss']:.2f} |"]
    for m, p_faces, p_ffhq in motion_rows:
        mark = ", chosen" if m == motion_size else ""
        lines.append(f"| motion blur{mark} | {m}x{m}, intensity 0.5 | {p_faces:.2f} | {p_ffhq:.2f} | "
                     f"{target['motion']:.2f} |")
    lines += [f"| SR x4 | factor 4 | {sr_psnr(faces, 4):.2f} | {sr_psnr(ffhq, 4):.2f} | {target['sr4']:.2f} |",
              f"| SR x2 (for comparison) | factor 2 | {sr_psnr(faces, 2):.2f} | {sr_psnr(ffhq, 2):.2f} | "
              f"{target['sr4']:.2f} |",
              f"| random inpainting | keep 20% | {random_inpaint_psnr(faces, keys[1]):.2f} | "
              f"{random_inpaint_psnr(ffhq, keys[1]):.2f} | {target['inpaint']:.2f} |",
              f"| box inpainting | {box}x{box}, margin {margin} | {box_psnr(faces, keys[2], box, margin):.2f} | "
              f"{box_psnr(ffhq, keys[2], box, margin):.2f} | {target['box']:.2f} |",
              f"| HDR | clip(2x) | {mean_psnr(hdr(faces, 2.0), faces):.2f} | {mean_psnr(hdr(ffhq, 2.0), ffhq):.2f} | "
              f"{target['hdr']:.2f} |", ""]
    return chosen, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="data root holding faces/ and ffhq256/ (default: %(default)s)")
    parser.add_argument("--num-faces", type=int, default=200, help="held-out face images per size")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "operator_calibration.md")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="sizes to calibrate")
    args = parser.parse_args(argv)
    faces_dir, ffhq_dir = args.data / "faces", args.data / "ffhq256"
    for folder in (faces_dir, ffhq_dir):
        if not folder.is_dir():
            parser.error(f"{folder} not found: pass --data with the folder that holds faces/ and ffhq256/")
    start = time.time()
    key = jax.random.key(args.seed)
    ffhq_names = list_images(ffhq_dir)
    _, held_out = split_names(list_images(faces_dir), Split())
    stride = max(1, len(held_out) // args.num_faces)
    face_names = held_out[::stride][: args.num_faces]
    print(f"{len(ffhq_names)} FFHQ images, {len(face_names)} held-out faces")

    lines = ["# Operator calibration", "",
             f"`python benchmarks/operator_calibration.py --data {args.data}` (seed {args.seed}).", "",
             "Mean PSNR (dB) of the noiseless degraded image against the original, [0, 1] range, "
             "degraded image brought back to the original size (see the script's docstring). "
             f"`ffhq` = the {len(ffhq_names)} FFHQ demo images (resized for 64/128 px), "
             f"`faces` = {len(face_names)} held-out CelebA/UTKFace images (validation split, "
             "centre-crop, bicubic resize). Motion blur: intensity 0.5, one random kernel per image "
             f"({MOTION_DRAWS_256} per image at 256 px).", ""]
    keys = jax.random.split(key, 4)
    target, section = reference_targets(load(ffhq_dir, ffhq_names, 256), keys)
    lines += section
    chosen = {}
    for size in args.sizes:
        chosen[size], section = calibrate(size, load(faces_dir, face_names, size), load(ffhq_dir, ffhq_names, size),
                                          target, keys)
        lines += section

    lines += ["## Chosen defaults (baked into `spgd_jax/operators/_registry.py`)", "",
              "| size | Gaussian blur | motion blur | box |", "|---|---|---|---|",
              "| 256 | 61x61, std 3.0 | 61x61, intensity 0.5 | 128, margin 32 |"]
    for size, c in chosen.items():
        lines.append(f"| {size} | {c['gauss_size']}x{c['gauss_size']}, std {c['std']} | "
                     f"{c['motion_size']}x{c['motion_size']}, intensity 0.5 | {c['box']}, margin {c['margin']} |")
    lines += ["", *(f"- {note}" for note in NOTES), "", f"Run time {time.time() - start:.0f} s on {jax.devices()[0].platform}."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
