"""Classical (prior-free) restorations, the yardstick for the diffusion samplers.

- random inpainting: harmonic interpolation of the kept pixels (Laplace's equation with the
  kept pixels fixed, solved by Jacobi iterations from a normalised-convolution start);
- Gaussian and motion deblurring: Wiener deconvolution with the known kernel (reflect-padded
  FFT, a constant noise-to-signal ratio);
- super-resolution: bicubic upsampling of the low-resolution image.

`naive_inverse` is the floor below them: the measurement itself as an image, which every preset must beat
(tests/test_presets_restore.py, and the quality benchmark's sweep table on the tuning faces).

Each takes one measurement y and that image's operator parameters and returns one image
(H, W, C) in [-1, 1]; `restorer(operator, image_size)` picks the one for a registered task.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from spgd_jax.operators import Operator, gaussian_kernel

__all__ = ["harmonic_inpaint", "wiener_deconvolve", "bicubic_upsample", "restorer", "naive_inverse", "CLASSICAL_TASKS",
           "NAIVE_TASKS"]

CLASSICAL_TASKS = ("inpaint", "gauss_deblur", "motion_deblur", "sr4")
# Wiener noise-to-signal ratios that maximise PSNR at 64 px with the registry's defaults and
# sigma_y = 0.01, chosen from {1, 2, 5, 10, 20, 50} x 1e-3 on validation images 50-81 (the
# quality benchmark reports images 0-49).
WIENER_NSR = {"gauss_deblur": 5e-3, "motion_deblur": 2e-2}
NAIVE_TASKS = ("sr4", "inpaint", "inpaint_box", "gauss_deblur", "motion_deblur", "hdr")


def harmonic_inpaint(y: jax.Array, mask: jax.Array, iterations: int = 300) -> jax.Array:
    """Fill the removed pixels of y (H, W, C) (mask (H, W, 1): 1 = kept) with a harmonic function.

    Starts from a normalised convolution (a Gaussian-weighted mean of the kept pixels) and runs
    `iterations` Jacobi sweeps of the 4-neighbour Laplacian with replicated borders.
    """
    mask = jnp.broadcast_to(mask.astype(y.dtype), y.shape)
    taps = jnp.exp(-0.5 * jnp.arange(-4.0, 5.0) ** 2 / 2.0**2)

    def smooth(image):  # separable Gaussian (std 2 px), replicated borders
        padded = jnp.pad(image, ((4, 4), (4, 4), (0, 0)), mode="edge")
        rows = sum(t * padded[i : i + image.shape[0]] for i, t in enumerate(taps))
        return sum(t * rows[:, i : i + image.shape[1]] for i, t in enumerate(taps))

    start = smooth(y * mask) / jnp.maximum(smooth(mask), 1e-6)
    x = jnp.where(mask > 0, y, start)

    def sweep(_, x):
        padded = jnp.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
        mean = (padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]) / 4.0
        return jnp.where(mask > 0, y, mean)

    return jnp.clip(jax.lax.fori_loop(0, iterations, sweep, x), -1.0, 1.0)


def wiener_deconvolve(y: jax.Array, kernel: jax.Array, noise_to_signal: float = 1e-3) -> jax.Array:
    """Wiener deconvolution of y (H, W, C) blurred by `kernel` (k, k) (cross-correlation, as the operator).

    y is reflect-padded by k on each side to soften the FFT's wrap-around; the filter is
    conj(K) / (|K|^2 + noise_to_signal).
    """
    height, width, _ = y.shape
    k = kernel.shape[0]
    pad = min(k, height - 1, width - 1)
    padded = jnp.pad(y, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    shape = padded.shape[:2]
    # Cross-correlation with kernel = convolution with the flipped kernel, centred at the origin.
    flipped = kernel[::-1, ::-1]
    psf = jnp.zeros(shape, y.dtype).at[:k, :k].set(flipped)
    psf = jnp.roll(psf, (-(k // 2), -(k // 2)), axis=(0, 1))
    transfer = jnp.fft.fft2(psf)
    wiener = jnp.conj(transfer) / (jnp.abs(transfer) ** 2 + noise_to_signal)
    restored = jnp.real(jnp.fft.ifft2(jnp.fft.fft2(padded, axes=(0, 1)) * wiener[:, :, None], axes=(0, 1)))
    return jnp.clip(restored[pad : pad + height, pad : pad + width], -1.0, 1.0)


def bicubic_upsample(y: jax.Array, size: int) -> jax.Array:
    """Bicubic upsampling of a low-resolution image y (h, w, C) to (size, size, C)."""
    return jnp.clip(jax.image.resize(y, (size, size, y.shape[-1]), method="bicubic"), -1.0, 1.0)


def restorer(operator: Operator, image_size: int, noise_to_signal: float | None = None) -> Callable[[jax.Array, Any], jax.Array]:
    """The classical restoration of a registered task: restore(y_i, params_i) -> (H, W, C).

    noise_to_signal: the Wiener filter's ratio for the deblurring tasks (default WIENER_NSR).
    """
    settings = dict(operator.settings)
    noise_to_signal = WIENER_NSR.get(operator.name, 1e-3) if noise_to_signal is None else noise_to_signal
    if operator.name == "inpaint":
        return lambda y, params: harmonic_inpaint(y, params["mask"])
    if operator.name == "gauss_deblur":
        kernel = jnp.asarray(gaussian_kernel(settings["kernel_size"], settings["std"], settings["truncate"]))
        return lambda y, params: wiener_deconvolve(y, kernel, noise_to_signal)
    if operator.name == "motion_deblur":
        return lambda y, params: wiener_deconvolve(y, params["kernel"], noise_to_signal)
    if operator.name == "sr4":
        return lambda y, params: bicubic_upsample(y, image_size)
    raise ValueError(f"no classical baseline for task {operator.name!r}; there is one for {', '.join(CLASSICAL_TASKS)}")


def naive_inverse(task: str, y: jax.Array, image_size: int) -> jax.Array:
    """The measurements y (B, ...) as images (B, image_size, image_size, C) in [-1, 1], without a prior,
    interpolation or deconvolution: y itself where it has the image's shape (inpainting: the removed pixels
    grey; deblurring: the blurred image), nearest-neighbour upsampling (super-resolution), y / 2 (HDR: the
    clip's inverse where it did not clip). ValueError for other tasks (NAIVE_TASKS lists these)."""
    if task not in NAIVE_TASKS:
        raise ValueError(f"no naive inverse for task {task!r}; there is one for {', '.join(NAIVE_TASKS)}")
    if task == "sr4":
        factor = image_size // y.shape[1]
        y = jnp.repeat(jnp.repeat(y, factor, axis=1), factor, axis=2)
    return jnp.clip(y / 2 if task == "hdr" else y, -1.0, 1.0)
