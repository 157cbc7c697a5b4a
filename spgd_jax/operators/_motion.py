"""Random motion-blur kernels: a seeded port of LeviBorodenko's ``motionblur`` generator.

The DPS/DAPS/SPGD code draws its motion kernels with ``motionblur.Kernel(size, intensity)``
(https://github.com/LeviBorodenko/motionblur, MIT licence). This module reimplements the same
procedure, with the same random draws in the same order, but takes its randomness from an
explicit source instead of NumPy's global state:

1. path length L = 0.75 * D * (U(0,1) + U(0, intensity^2)), D the diagonal of a canvas
   twice the kernel size; step lengths beta(1, 30) * (1 - intensity + 0.1) * D are drawn
   (rejecting any step >= L) until they sum to at least L;
2. a maximal angle U(0, intensity * pi) and a jitter probability beta(2, 20); the first
   angle is U(-max, max), each next one triangular(0, intensity * max, max + 0.1) with the
   previous angle's sign, flipped with the jitter probability;
3. the path (cumulative sum of the steps) is centred on its mean, rotated by U(0, pi) and
   moved to the canvas centre;
4. it is drawn as a white line of width int(D / 150) with Pillow, Gaussian-blurred with
   radius int(0.01 * D), downsized to the kernel size with Lanczos, quantised to 8 bits as
   the original does, and normalised to sum to one.

One deviation: below 54x54 kernels int(D / 150) is 0, Pillow draws nothing and the
original returns an all-NaN kernel; here the line width is at least 1 pixel. For sizes of
54 and more (the reference's 61 included) the kernels are identical to the original's for
the same random draws.

Kernel generation runs on the host (Python loops and Pillow), outside jit: kernels are
operator parameters, drawn once by ``init_params``. A JAX key is turned into a NumPy
Generator seeded with the key's bits, so the same key always gives the same kernel.
"""

from __future__ import annotations

import math

import jax
import numpy as np

_EPS = 0.1  # the original's "tiny error used for numerical stability"


def _path(rng, canvas: int, intensity: float) -> list[tuple[float, float]]:
    """Points (x, y) of a random motion path on a (canvas x canvas) image."""
    diagonal = math.sqrt(2.0) * canvas
    length = 0.75 * diagonal * (rng.uniform() + rng.uniform(0, intensity**2))
    steps: list[float] = []
    while sum(steps) < length:
        step = rng.beta(1, 30) * (1 - intensity + _EPS) * diagonal
        if step < length:
            steps.append(step)

    max_angle = rng.uniform(0, intensity * math.pi)
    jitter = rng.beta(2, 20)
    angles = [rng.uniform(low=-max_angle, high=max_angle)]
    while len(angles) < len(steps):
        angle = rng.triangular(0, intensity * max_angle, max_angle + _EPS)
        sign = np.sign(angles[-1])
        angles.append(angle * (-sign if rng.uniform() < jitter else sign))

    path = np.cumsum(np.asarray(steps) * np.exp(1j * np.asarray(angles)))
    path = path - sum(path) / len(steps)  # sequential sum, as the original
    path = path * np.exp(1j * rng.uniform(0, math.pi))
    path = path + (canvas + 1j * canvas) / 2
    return [(float(p.real), float(p.imag)) for p in path]


def motion_kernel_from_rng(rng, size: int, intensity: float) -> np.ndarray:
    """(size, size) float32 motion kernel summing to one, drawn with ``rng``.

    ``rng`` is a ``numpy.random.Generator`` or ``RandomState``; with
    ``np.random.RandomState(s)`` this reproduces ``motionblur.Kernel`` after ``np.random.seed(s)``.
    """
    if int(size) != size or size < 1:
        raise ValueError(f"the motion kernel size must be a positive integer, got {size}")
    if not 0 <= intensity <= 1:
        raise ValueError(f"the motion-blur intensity must be in [0, 1], got {intensity}")
    from PIL import Image, ImageDraw, ImageFilter  # on use: drawing kernels is the core's only use of Pillow

    canvas = 2 * int(size)  # drawn at twice the size, then downsized for antialiasing
    diagonal = math.sqrt(2.0) * canvas
    image = Image.new("L", (canvas, canvas))
    ImageDraw.Draw(image).line(_path(rng, canvas, float(intensity)), fill=255, width=max(1, int(diagonal / 150)))
    image = image.filter(ImageFilter.GaussianBlur(radius=int(diagonal * 0.01)))
    image = image.resize((int(size), int(size)), resample=Image.LANCZOS)
    kernel = np.asarray(image, dtype=np.float32)
    total = kernel.sum()
    if total == 0:
        raise ValueError(f"a {size}x{size} motion kernel came out empty; use a larger kernel_size")
    return kernel / total


def motion_kernel(key: jax.Array, size: int, intensity: float) -> np.ndarray:
    """(size, size) float32 motion kernel summing to one; the same key always gives the same kernel."""
    seed = np.asarray(jax.random.key_data(key)).astype(np.uint32).ravel().tolist()
    return motion_kernel_from_rng(np.random.default_rng(seed), size, intensity)


def motion_kernels(key: jax.Array, batch: int, size: int, intensity: float) -> np.ndarray:
    """(batch, size, size) float32 kernels, one per image from jax.random.split(key, batch)."""
    keys = jax.random.split(key, batch)
    return np.stack([motion_kernel(k, size, intensity) for k in keys])
