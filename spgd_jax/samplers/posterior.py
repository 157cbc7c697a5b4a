"""K posterior samples per image: their keys, and their mean leaving out the samples that diverged.

One run is one draw from the posterior; the mean of K draws from independent noise estimates the
posterior mean (the MMSE restoration: higher PSNR, smoother, K times the work). The command line and the
quality benchmark both draw them this way, so the same seed gives the same samples:

    keys = posterior_keys(image_keys(key, B), K)            # (B * K,), image-major
    result = sample(denoiser, forward, jnp.repeat(y, K, axis=0), keys, config, repeated params, ...)
    mean, all_diverged = posterior_mean(result.x.reshape(B, K, H, W, C), result.diverged.reshape(B, K))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["posterior_keys", "posterior_mean"]


def posterior_keys(keys: jax.Array, samples: int) -> jax.Array:
    """(B * samples,) typed keys, image-major (image b's samples in a row): with samples = 1 the image keys
    (B,) themselves, else jax.random.split(keys[b], samples) for each image b."""
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"samples must be an int >= 1 (posterior samples per image), got {samples!r}")
    if samples == 1:
        return keys
    return jax.vmap(lambda key: jax.random.split(key, samples))(keys).reshape(-1)


def posterior_mean(samples: jax.Array, diverged: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean, all_diverged) of samples (..., K, H, W, C) with diverged (..., K) bool.

    mean (..., H, W, C): the mean of the samples that did not diverge (of all K when every one did, so
    the result is still the mean of their last finite states); all_diverged (...,): every sample diverged.
    """
    samples, diverged = jnp.asarray(samples), jnp.asarray(diverged)
    if diverged.shape != samples.shape[:-3]:
        raise ValueError(f"diverged {diverged.shape} must be the leading axes of samples {samples.shape} "
                         "(..., K, H, W, C)")
    everyone = diverged.all(axis=-1, keepdims=True)
    use = jnp.where(everyone, True, ~diverged)[..., None, None, None]
    mean = jnp.sum(jnp.where(use, samples, 0.0), axis=-4) / jnp.sum(use, axis=-4)
    return mean, everyone[..., 0]
