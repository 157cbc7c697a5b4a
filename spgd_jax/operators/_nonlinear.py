"""The two nonlinear operators of the reference: phase retrieval and HDR."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def phase_retrieval(x: jax.Array, oversample: float = 2.0) -> jax.Array:
    """Fourier magnitude of one image x (H, W, C) in [-1, 1], as DPS/DAPS measure it.

    The image is mapped to [0, 1] ((x + 1) / 2), zero-padded by int(oversample / 8 * H) rows
    (and int(oversample / 8 * W) columns) on each side, and transformed with an orthonormal,
    centred 2-D FFT per channel; the result is |FFT|, float32 of shape
    (H + 2 * pad_h, W + 2 * pad_w, C), zero frequency at the centre. Differentiable (JAX
    takes the gradient of |z| at z = 0 as 0).
    """
    if x.ndim != 3:
        raise ValueError(f"phase_retrieval expects one image (H, W, C), got shape {x.shape}; vmap it for batches")
    if oversample < 0:
        raise ValueError(f"oversample must be >= 0, got {oversample}")
    pad_h = int(oversample / 8.0 * x.shape[0])
    pad_w = int(oversample / 8.0 * x.shape[1])
    padded = jnp.pad((x + 1) / 2, ((pad_h, pad_h), (pad_w, pad_w), (0, 0)))
    spectrum = jnp.fft.fft2(padded, axes=(0, 1), norm="ortho")
    return jnp.abs(jnp.fft.fftshift(spectrum, axes=(0, 1))).astype(x.dtype)


def hdr(x: jax.Array, scale: float = 2.0) -> jax.Array:
    """High-dynamic-range reconstruction's forward model: clip(scale * x, -1, 1), same shape as x."""
    return jnp.clip(scale * x, -1.0, 1.0)
