"""Step-size sweeps: a sampler at several values of its step size in one compiled call.

    result = spgd_jax.sweep(denoiser, op.forward, y, key, config, [0.5, 1, 2, 4], params, x_shape=(64, 64, 3))
    result.x[k]              # (B, H, W, C), the restoration at values[k]
    result.diverged[k]       # (B,) which images diverged at values[k]

The step size is the registered sampler's (`Sampler.step_size`: SPGD's lr, DPS's zeta). Every value starts
from the same initial noise (the same key) and measurements, so the runs differ only in it: result.x[k]
equals `sample(..., dataclasses.replace(config, lr=values[k]))` (to float32 rounding of the batched
network). The step size is a traced value (`jax.vmap` over it), so one compilation serves every list of
the same length.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from spgd_jax.samplers._loop import SampleResult
from spgd_jax.samplers._registry import sampler_for, split_step_size
from spgd_jax.samplers._sample import as_traceable, check_x_shape, run_sampler

__all__ = ["check_step_sizes", "sweep"]


def check_step_sizes(values: Sequence[float]) -> tuple[float, ...]:
    """The step sizes as a tuple of floats; ValueError unless a non-empty list of finite numbers > 0."""
    try:
        values = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"step sizes must be a list of numbers, e.g. [0.5, 1, 2, 4]; got {values!r}") from None
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if not values or bad:
        raise ValueError(f"step sizes must be finite and > 0 (at least one); got {list(values)}")
    return values


def sweep(
    denoiser: Callable[[jax.Array, jax.Array], jax.Array],
    forward: Callable[[jax.Array, Any], jax.Array],
    y: jax.Array,
    key: jax.Array,
    config: Any,
    values: Sequence[float] | jax.Array,
    params: Any = None,
    *,
    x_shape: tuple[int, int, int],
    progress: Callable[[int], None] | None = None,
) -> SampleResult:
    """The sampler of `config` at each of the L step sizes in `values` (the config's own is ignored),
    batched over images and values.

    Arguments as spgd_jax.sample. Returns a SampleResult whose every array has a leading axis L:
    x (L, B, H, W, C), diverged (L, B), diverged_step (L, B), trajectory (L, B, K, H, W, C) or None,
    losses (L, B, ...), diagnostics {name: (L, B, T)} or None. progress(i) may be called once per
    value for each outer step i.
    """
    name = sampler_for(config).step_size
    if name is None or not sampler_for(config).conditional:
        raise TypeError(f"{type(config).__name__} has no step size to sweep")
    if isinstance(values, jax.core.Tracer):  # inside the caller's jit: checked by whoever made them
        if values.ndim != 1:
            raise ValueError(f"step sizes must be one value per run, shape (L,); got shape {values.shape}")
        values = values.astype(jnp.float32)
    else:
        values = jnp.asarray(check_step_sizes(values), jnp.float32)
    static, _ = split_step_size(config)
    return _sweep(as_traceable(denoiser), forward, y, key, static, values, params, check_x_shape(x_shape), progress)


@functools.partial(jax.jit, static_argnums=(1, 4, 7, 8))
def _sweep(denoiser, forward, y, key, config, values, params, x_shape, progress) -> SampleResult:
    run = lambda value: run_sampler(denoiser, forward, y, key, config, value, params, x_shape, progress)
    return jax.vmap(run)(values)
