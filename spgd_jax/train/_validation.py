"""The validation loss: the training loss on held-out images at a fixed (t, noise), no flips, no dropout.

Fixed inputs make the number comparable across steps, runs and resumes.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spgd_jax.train._diffusion import Diffusion


class Validation(NamedTuple):
    images: np.ndarray       # uint8 (N, S, S, C)
    t: np.ndarray            # int32 (N,), evenly spread over [0, T)
    noise: np.ndarray        # float32 (N, S, S, C) from PRNGKey(0)


def make_validation(images: np.ndarray, diffusion: Diffusion) -> Validation:
    n = len(images)
    t = np.floor((np.arange(n) + 0.5) * diffusion.num_timesteps / n).astype(np.int32)
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(0), images.shape, jnp.float32))
    return Validation(images=images, t=t, noise=noise)


def validation_loss(loss_batch: Callable, params, val: Validation, batch_size: int,
                    put: Callable = lambda x: x) -> float:
    """Mean per-image loss over the whole validation set (chunks padded to batch_size).

    loss_batch: (params, images uint8, t, noise) -> per-image loss (B,); put: places a chunk on the
    devices (e.g. split over them)."""
    n = len(val.images)
    total = 0.0
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size) % n
        losses = np.asarray(loss_batch(params, put(val.images[idx]), put(val.t[idx]), put(val.noise[idx])))
        keep = min(batch_size, n - start)
        total += float(np.sum(losses[:keep], dtype=np.float64))
    return total / n
