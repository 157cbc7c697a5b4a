"""Bicubic resizing with MATLAB ``imresize`` semantics (the DPS ``Resizer``).

Each axis is resized by a dense (out_len, in_len) weight matrix built on the host:
cubic kernel with a = -0.5 (Keys), stretched by 1/scale when downscaling (antialiasing),
weights normalised to sum to one per output pixel, and half-sample symmetric borders
(``d c b a | a b c d | d c b a``, MATLAB's "symmetric" padding). Output length is
ceil(in_len * scale); when in_len * scale is not an integer the output grid is centred
on the input, exactly as the DPS/DAPS ``Resizer`` does.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

_CUBIC_WIDTH = 4.0


def _cubic(t: np.ndarray) -> np.ndarray:
    """Keys cubic convolution kernel with a = -0.5 (MATLAB's 'bicubic')."""
    a = np.abs(t)
    near = (1.5 * a**3 - 2.5 * a**2 + 1.0) * (a <= 1)
    far = (-0.5 * a**3 + 2.5 * a**2 - 4.0 * a + 2.0) * ((a > 1) & (a <= 2))
    return near + far


def output_length(in_len: int, scale: float) -> int:
    """ceil(in_len * scale), ignoring float round-off below 1e-9 (e.g. 192 * (1/3) -> 64)."""
    return int(math.ceil(in_len * scale - 1e-9))


@functools.lru_cache(maxsize=64)
def resize_matrix(in_len: int, scale: float, antialias: bool = True) -> np.ndarray:
    """Dense 1-D bicubic resize matrix, float64 of shape (ceil(in_len*scale), in_len).

    Row o holds the weights that output pixel o gives each input pixel; borders are folded
    in by symmetric reflection, so every row sums to one.
    """
    if in_len < 1 or not scale > 0:
        raise ValueError(f"resize needs in_len >= 1 and scale > 0, got in_len={in_len}, scale={scale}")
    out_len = output_length(in_len, scale)
    if out_len < 1:
        raise ValueError(f"resizing {in_len} pixels by {scale} leaves no output pixel; use a larger scale")
    stretch = antialias and scale < 1
    width = _CUBIC_WIDTH / scale if stretch else _CUBIC_WIDTH
    # 1-based input coordinate of each output pixel centre (MATLAB convention).
    out_pos = np.arange(1, out_len + 1) - (out_len - in_len * scale) / 2
    centre = out_pos / scale + 0.5 * (1 - 1 / scale)
    first = np.floor(centre - width / 2)
    taps = int(math.ceil(width)) + 2
    src = first[:, None] + np.arange(taps)[None, :]  # 1-based source indices
    dist = centre[:, None] - src
    weights = scale * _cubic(scale * dist) if stretch else _cubic(dist)
    totals = weights.sum(axis=1, keepdims=True)
    weights = weights / np.where(totals == 0, 1.0, totals)
    # Half-sample symmetric reflection of the 0-based index into [0, in_len).
    idx = np.mod(src - 1, 2 * in_len).astype(np.int64)
    idx = np.where(idx >= in_len, 2 * in_len - 1 - idx, idx)
    matrix = np.zeros((out_len, in_len))
    np.add.at(matrix, (np.repeat(np.arange(out_len), taps), idx.ravel()), weights.ravel())
    return matrix


def resize(x: jax.Array, scale: float, antialias: bool = True) -> jax.Array:
    """Bicubic resize of one image x (H, W, C) by ``scale`` (<1 shrinks, >1 enlarges).

    Returns (ceil(H*scale), ceil(W*scale), C) in x's dtype. Linear in x, differentiable,
    jit/vmap friendly (the weight matrices are compile-time constants of the shape).
    Rows are resized first, then columns, as in the DPS ``Resizer``.
    """
    if x.ndim != 3:
        raise ValueError(f"resize expects one image (H, W, C), got shape {x.shape}; vmap it for batches")
    rows = jnp.asarray(resize_matrix(x.shape[0], float(scale), antialias), x.dtype)
    cols = jnp.asarray(resize_matrix(x.shape[1], float(scale), antialias), x.dtype)
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,hwc->owc", rows, x, precision=hi)
    return jnp.einsum("pw,owc->opc", cols, x, precision=hi)


def downsample(x: jax.Array, factor: int) -> jax.Array:
    """Antialiased bicubic downsampling of one image (H, W, C) by an integer factor: the SR operator."""
    if int(factor) != factor or factor < 1:
        raise ValueError(f"the super-resolution factor must be a positive integer, got {factor}")
    if x.ndim == 3 and min(x.shape[:2]) < factor:
        raise ValueError(f"image {x.shape[0]}x{x.shape[1]} is smaller than the downsampling factor {factor}")
    return resize(x, 1.0 / factor)
