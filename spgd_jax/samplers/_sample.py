"""The public sampling entry point: `sample(denoiser, forward, y, key, config, params, x_shape=...)`.

It draws the initial noise x_T ~ N(0, sigma_max^2 I) (one key per image) and dispatches on the config
type: SPGDConfig -> SPGD, DPSConfig -> DPS, EulerConfig -> unconditional Euler. The whole run is one
`jax.jit`; `sample` also works inside the caller's own jit, vmap and grad.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from spgd_jax.dps import DPSConfig, dps
from spgd_jax.loop import SampleResult
from spgd_jax.spgd import SPGDConfig, spgd
from spgd_jax.unconditional import EulerConfig, euler

__all__ = ["sample", "initial_noise", "check_x_shape", "CONFIG_TYPES"]

CONFIG_TYPES = (SPGDConfig, DPSConfig, EulerConfig)


def sample(
    denoiser: Callable[[jax.Array, jax.Array], jax.Array],
    forward: Callable[[jax.Array, Any], jax.Array] | None,
    y: jax.Array | None,
    key: jax.Array,
    config: SPGDConfig | DPSConfig | EulerConfig,
    params: Any = None,
    *,
    x_shape: tuple[int, int, int],
    progress: Callable[[int], None] | None = None,
) -> SampleResult:
    """Restores (or, with EulerConfig, generates) a batch of images.

    denoiser: D(x (B,H,W,C), sigma (B,)) -> x0_hat (B,H,W,C), the Tweedie estimate; pure, differentiable.
    forward:  A(x (H,W,C), params_i) -> y_i for ONE image (differentiable); None for EulerConfig.
    y:        (B, ...) measurements in [-1, 1] space; None for EulerConfig.
    key:      one PRNG key (split into B per-image keys) or a batch of B keys, one per image; an image's
              result then depends only on its own key, y_i and params_i. Typed or raw uint32 keys.
    config:   SPGDConfig, DPSConfig or EulerConfig.
    params:   per-image operator parameters, a pytree with leading axis B, or None (forward gets None).
    x_shape:  (H, W, C) of ONE restored image (differs from y's shape for e.g. super-resolution).
    progress: optional host function called with i once per outer step i (order not guaranteed); it does not
              change the result. denoiser, forward and progress are static: pass the same objects across
              calls to reuse the compiled computation.
    Returns SampleResult(x (B,H,W,C), diverged (B,) bool, diverged_step (B,) int32, trajectory or None).
    """
    if not isinstance(config, CONFIG_TYPES):
        names = ", ".join(t.__name__ for t in CONFIG_TYPES)
        raise TypeError(f"config must be one of {names}, got {type(config).__name__}")
    return _sample(denoiser, forward, y, key, config, params, check_x_shape(x_shape), progress)


def check_x_shape(x_shape) -> tuple[int, int, int]:
    """x_shape as a tuple; ValueError unless (H, W, C), three positive ints."""
    shape_ok = isinstance(x_shape, (tuple, list)) and len(x_shape) == 3
    if not (shape_ok and all(isinstance(d, int) and d > 0 for d in x_shape)):
        raise ValueError(f"x_shape must be (H, W, C) of one image, three positive ints, got {x_shape!r}")
    return tuple(x_shape)


@functools.partial(jax.jit, static_argnums=(0, 1, 4, 6, 7))
def _sample(denoiser, forward, y, key, config, params, x_shape, progress) -> SampleResult:
    if isinstance(config, EulerConfig):
        if forward is not None or y is not None:
            raise ValueError("EulerConfig samples unconditionally: pass forward=None and y=None (and a batch of keys)")
        return euler(denoiser, initial_noise(key, None, x_shape, config.sigma_max), config, progress)
    if forward is None or y is None:
        raise ValueError(f"{type(config).__name__} needs a forward operator and measurements y; got None")
    batch = y.shape[0]
    _check_measurements(forward, y, params, batch, x_shape)
    x_init = initial_noise(key, batch, x_shape, config.sigma_max)
    sampler = spgd if isinstance(config, SPGDConfig) else dps
    return sampler(denoiser, forward, y, x_init, config, params, progress)


def initial_noise(key: jax.Array, batch: int | None, x_shape: tuple[int, ...], sigma_max: float) -> jax.Array:
    """x_T = sigma_max * N(0, I) of shape (B,) + x_shape, image b drawn from its own key.

    key: one key (split into `batch` keys) or a batch of keys (then batch may be None).
    """
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.dtype != jnp.uint32:
            raise TypeError(f"key must be a PRNG key (jax.random.key or PRNGKey), got dtype {key.dtype}")
        key = jax.random.wrap_key_data(key)
    if key.ndim == 0:
        if batch is None:
            raise ValueError("without measurements y the batch size comes from the key: pass a batch of B keys")
        keys = jax.random.split(key, batch)
    elif key.ndim == 1 and batch in (None, key.shape[0]):
        keys = key
    else:
        raise ValueError(f"key must be one key or a batch of {batch} keys (one per image), got key shape {key.shape}")
    noise = jax.vmap(lambda k: jax.random.normal(k, x_shape, jnp.float32))(keys)
    return sigma_max * noise


def _check_measurements(forward, y, params, batch: int, x_shape: tuple[int, ...]) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != batch:
            raise ValueError(
                f"params{jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}; every params leaf needs the "
                f"leading batch axis B = {batch} (y.shape[0])"
            )
    one_params = jax.tree_util.tree_map(lambda p: jax.ShapeDtypeStruct(jnp.shape(p)[1:], jnp.result_type(p)), params)
    try:
        out = jax.eval_shape(forward, jax.ShapeDtypeStruct(x_shape, jnp.float32), one_params)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"forward fails on one image of x_shape {x_shape} with one image's params ({error}); "
            "pass x_shape = the shape of one restored image and params with a leading batch axis"
        ) from error
    if out.shape != y.shape[1:]:
        raise ValueError(
            f"forward maps one image of x_shape {x_shape} to {out.shape}, but y has per-image shape {y.shape[1:]}; "
            "pass x_shape = the shape of one restored image"
        )
