"""The posterior mean of several samples of each image, leaving out the samples that diverged.

One SPGD (or DPS) run is one draw from the posterior; the mean of K draws from independent noise
estimates the posterior mean (the MMSE restoration: higher PSNR, smoother, K times the work).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["posterior_mean"]


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
