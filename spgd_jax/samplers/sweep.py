"""Learning-rate sweeps: SPGD at several learning rates in one compiled call.

    result = spgd_jax.sweep_lr(denoiser, op.forward, y, key, config, [0.5, 1, 2, 4], params, x_shape=(64, 64, 3))
    result.x[k]              # (B, H, W, C), the restoration at lrs[k]
    result.diverged[k]       # (B,) which images diverged at lrs[k]

Every learning rate starts from the same initial noise (the same key) and measurements, so the runs
differ only in eta: result.x[k] equals `sample(..., dataclasses.replace(config, lr=lrs[k]))` (to
float32 rounding of the batched network). The learning rate is a traced value (`jax.vmap` over it),
so one compilation serves every list of the same length.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from spgd_jax.samplers._loop import SampleResult
from spgd_jax.samplers._sample import as_traceable, check_measurements, check_x_shape, initial_noise
from spgd_jax.samplers.spgd import SPGDConfig, spgd

__all__ = ["check_lrs", "sweep_lr"]


def check_lrs(lrs: Sequence[float]) -> tuple[float, ...]:
    """The learning rates as a tuple of floats; ValueError unless a non-empty list of finite numbers > 0."""
    try:
        values = tuple(float(v) for v in lrs)
    except (TypeError, ValueError):
        raise ValueError(f"learning rates must be a list of numbers, e.g. [0.5, 1, 2, 4]; got {lrs!r}") from None
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if not values or bad:
        raise ValueError(f"learning rates must be finite and > 0 (at least one); got {list(values)}")
    return values


def sweep_lr(
    denoiser: Callable[[jax.Array, jax.Array], jax.Array],
    forward: Callable[[jax.Array, Any], jax.Array],
    y: jax.Array,
    key: jax.Array,
    config: SPGDConfig,
    lrs: Sequence[float] | jax.Array,
    params: Any = None,
    *,
    x_shape: tuple[int, int, int],
    progress: Callable[[int], None] | None = None,
) -> SampleResult:
    """SPGD for each learning rate in lrs (L values; config.lr is ignored), batched over images and rates.

    Arguments as spgd_jax.sample. Returns a SampleResult whose every array has a leading axis L:
    x (L, B, H, W, C), diverged (L, B), diverged_step (L, B), trajectory (L, B, K, H, W, C) or None,
    losses (L, B, T, N), diagnostics {name: (L, B, T)} or None. progress(i) may be called once per
    learning rate for each outer step i.
    """
    if not isinstance(config, SPGDConfig):
        raise TypeError(f"sweep_lr sweeps SPGD's learning rate: config must be an SPGDConfig, "
                        f"got {type(config).__name__}")
    lrs = jnp.asarray(check_lrs(lrs), jnp.float32)
    return _sweep(as_traceable(denoiser), forward, y, key, config, lrs, params, check_x_shape(x_shape), progress)


@functools.partial(jax.jit, static_argnums=(1, 4, 7, 8))
def _sweep(denoiser, forward, y, key, config, lrs, params, x_shape, progress) -> SampleResult:
    check_measurements(forward, y, params, y.shape[0], x_shape)
    x_init = initial_noise(key, y.shape[0], x_shape, config.sigma_max)
    return jax.vmap(lambda lr: spgd(denoiser, forward, y, x_init, config, params, progress, lr=lr))(lrs)
