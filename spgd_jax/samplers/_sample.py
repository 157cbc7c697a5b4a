"""The public sampling entry point: `sample(denoiser, forward, y, key, config, params, x_shape=...)`.

It draws the initial noise x_T ~ N(0, sigma_max^2 I) (one key per image) and runs the sampler registered
for the config's type (spgd_jax.samplers._registry). The whole run is one `jax.jit`, with the denoiser's
parameters as traced arguments (a second checkpoint of the same config reuses the compilation); `sample`
also works inside the caller's own jit, vmap and grad.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

import numpy as np

from spgd_jax.samplers._loop import SampleResult, step_keys
from spgd_jax.samplers._registry import sampler_for, split_step_size

__all__ = ["as_traceable", "check_measurements", "check_x_shape", "image_keys", "initial_noise", "run_sampler", "sample"]


def sample(
    denoiser: Callable[[jax.Array, jax.Array], jax.Array],
    forward: Callable[[jax.Array, Any], jax.Array] | None,
    y: jax.Array | None,
    key: jax.Array,
    config: Any,
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
    config:   a registered sampler's config: SPGDConfig, DPSConfig, EulerConfig, ... (spgd_jax.samplers.SAMPLERS).
    params:   per-image operator parameters, a pytree with leading axis B, or None (forward gets None).
    x_shape:  (H, W, C) of ONE restored image (differs from y's shape for e.g. super-resolution).
    progress: optional host function called with i once per outer step i (order not guaranteed), from inside
              the compiled loop (a host callback, so JAX's persistent cache does not keep that program; the
              command lines' `spgd_jax.sharding.sample_sharded` runs in segments instead); it does not
              change the result. forward and progress are static: pass the same objects across calls to
              reuse the compiled computation. A `spgd_jax.denoisers.Denoiser` (or any pytree of arrays that
              is callable) is traced; another function is static (compared by identity).
    Returns SampleResult(x (B,H,W,C), diverged (B,) bool, diverged_step (B,) int32, trajectory or None).
    """
    static, step_size = split_step_size(config)  # a TypeError naming the registered configs, before tracing
    return _sample(as_traceable(denoiser), forward, y, key, static, step_size, params, check_x_shape(x_shape),
                   progress)


def as_traceable(denoiser: Callable) -> Any:
    """The denoiser as a jit argument: a pytree whose leaves are all arrays (a Denoiser) as it is, any other
    callable wrapped in jax.tree_util.Partial (the function becomes static, compared by identity)."""
    leaves = jax.tree_util.tree_leaves(denoiser)
    if leaves and all(isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves):
        return denoiser
    return jax.tree_util.Partial(denoiser)


def check_x_shape(x_shape) -> tuple[int, int, int]:
    """x_shape as a tuple; ValueError unless (H, W, C), three positive ints."""
    shape_ok = isinstance(x_shape, (tuple, list)) and len(x_shape) == 3
    if not (shape_ok and all(isinstance(d, int) and d > 0 for d in x_shape)):
        raise ValueError(f"x_shape must be (H, W, C) of one image, three positive ints, got {x_shape!r}")
    return tuple(x_shape)


@functools.partial(jax.jit, static_argnums=(1, 4, 7, 8))
def _sample(denoiser, forward, y, key, config, step_size, params, x_shape, progress) -> SampleResult:
    return run_sampler(denoiser, forward, y, key, config, step_size, params, x_shape, progress)


def run_sampler(denoiser, forward, y, key, config, step_size, params, x_shape, progress) -> SampleResult:
    """The body of `sample` (traceable): initial noise, then the registered sampler of `config` with
    `step_size` (a scalar, possibly traced) in place of its step-size field (see split_step_size).

    Image b's key draws its x_T; fold_in(key_b, 1) is its loop key (spgd_jax.samplers._loop.step_keys), so
    a stochastic sampler's per-step noise depends on the image's own key only."""
    sampler = sampler_for(config)
    if not sampler.conditional:
        if forward is not None or y is not None:
            raise ValueError(f"{type(config).__name__} samples unconditionally: pass forward=None and y=None "
                             "(and a batch of keys)")
        keys = image_keys(key, None)
        return sampler.run(denoiser, initial_noise(keys, None, x_shape, config.sigma_max), config, progress,
                           keys=step_keys(keys))
    if forward is None or y is None:
        raise ValueError(f"{type(config).__name__} needs a forward operator and measurements y; got None")
    batch = y.shape[0]
    check_measurements(forward, y, params, batch, x_shape)
    keys = image_keys(key, batch)
    x_init = initial_noise(keys, batch, x_shape, config.sigma_max)
    step = {} if sampler.step_size is None else {sampler.step_size: step_size}
    return sampler.run(denoiser, forward, y, x_init, config, params, progress, keys=step_keys(keys), **step)


def image_keys(key: jax.Array, batch: int | None) -> jax.Array:
    """(B,) typed PRNG keys, one per image: `key` split into `batch` keys, or `key` itself when it is a
    batch of keys (then batch may be None). Raw uint32 keys are wrapped. TypeError/ValueError otherwise."""
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.dtype != jnp.uint32:
            raise TypeError(f"key must be a PRNG key (jax.random.key or PRNGKey), got dtype {key.dtype}")
        key = jax.random.wrap_key_data(key)
    if key.ndim == 0:
        if batch is None:
            raise ValueError("without measurements y the batch size comes from the key: pass a batch of B keys")
        return jax.random.split(key, batch)
    if key.ndim == 1 and batch in (None, key.shape[0]):
        return key
    raise ValueError(f"key must be one key or a batch of {batch} keys (one per image), got key shape {key.shape}")


def initial_noise(key: jax.Array, batch: int | None, x_shape: tuple[int, ...], sigma_max: float) -> jax.Array:
    """x_T = sigma_max * N(0, I) of shape (B,) + x_shape, image b drawn from its own key.

    key: one key (split into `batch` keys) or a batch of keys (then batch may be None); see image_keys.
    """
    keys = image_keys(key, batch)
    noise = jax.vmap(lambda k: jax.random.normal(k, x_shape, jnp.float32))(keys)
    return sigma_max * noise


def check_measurements(forward, y, params, batch: int, x_shape: tuple[int, ...]) -> None:
    """ValueError unless every params leaf has the batch axis and forward maps one image of x_shape to y[0]'s shape."""
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
