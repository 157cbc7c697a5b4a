"""The ``Operator`` record: a forward model, its per-image parameters and its noise level."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

Forward = Callable[[jax.Array, Any], jax.Array]
InitParams = Callable[[jax.Array, int, int], Any]


def no_params(key: jax.Array, batch: int, image_size: int) -> dict:
    """``init_params`` of an operator without per-image parameters: an empty dict."""
    del key, batch, image_size
    return {}


@dataclasses.dataclass(frozen=True)
class Operator:
    """One degradation task.

    name: registry name (or any label for a user's own operator).
    sigma_y: default measurement noise std in [-1, 1] units (the reference config's).
    linear: True when forward is linear in x (its transpose is then jax.linear_transpose).
    forward(x, params) -> y: ONE image x (H, W, C) float32 in [-1, 1] and that image's
        parameters (a pytree slice of init_params' output, {} or None when there are none);
        pure, differentiable in x, jit/vmap friendly.
    init_params(key, batch, image_size) -> params: per-image parameters with a leading batch
        axis (masks, motion kernels); {} for operators without any. A pure function of the
        key (motion kernels are drawn on the host, so do not call it inside jit).
        ``params_per_image`` and ``measure_per_image`` draw from one key per image instead, so
        that an image's parameters and noise do not depend on its batch (a dataset run).
    settings: the resolved hyperparameters as (name, value) pairs, for logs and the CLI.

    A user's own operator: ``Operator("mine", sigma_y=0.01, linear=False, forward=f)``.
    """

    name: str
    sigma_y: float
    linear: bool
    forward: Forward
    init_params: InitParams = no_params
    settings: tuple[tuple[str, Any], ...] = ()

    def measure(self, key: jax.Array, x: jax.Array, params: Any = None, sigma_y: float | None = None) -> jax.Array:
        """y = forward(x_b, params_b) + N(0, sigma_y^2) for each image of x (B, H, W, C).

        sigma_y defaults to the operator's; params is init_params' output (leading axis B),
        or None / {} for operators without parameters. Returns (B, ...) float32.
        """
        x = jnp.asarray(x)
        if x.ndim != 4:
            raise ValueError(f"measure expects a batch x of shape (B, H, W, C), got {x.shape}; add a batch axis")
        noise_std = self.sigma_y if sigma_y is None else sigma_y
        if params is None:
            y = jax.vmap(lambda image: self.forward(image, None))(x)
        else:
            sizes = {leaf.shape[0] if getattr(leaf, "ndim", 0) else None for leaf in jax.tree_util.tree_leaves(params)}
            if sizes and sizes != {x.shape[0]}:
                raise ValueError(
                    f"params must have a leading batch axis of size {x.shape[0]} (one entry per image), "
                    f"got leading sizes {sorted(sizes, key=str)}; build them with init_params(key, {x.shape[0]}, size)"
                )
            y = jax.vmap(self.forward)(x, params)
        return y + noise_std * jax.random.normal(key, y.shape, y.dtype)

    def params_per_image(self, keys: jax.Array, image_size: int) -> Any:
        """Per-image parameters (leading axis B) with image b's drawn from keys[b] alone:
        init_params(keys[b], 1, image_size), stacked. keys: (B,) typed PRNG keys."""
        rows = [self.init_params(key, 1, image_size) for key in keys]
        return jax.tree_util.tree_map(lambda *leaves: jnp.concatenate(leaves), *rows)

    def measure_per_image(self, keys: jax.Array, x: jax.Array, params: Any = None,
                          sigma_y: float | None = None) -> jax.Array:
        """``measure`` one image at a time, image b's noise from keys[b] (B,): y_b depends only on keys[b],
        x_b and params_b, never on the other images of the batch. Returns (B, ...) float32."""
        one = lambda b: jax.tree_util.tree_map(lambda leaf: leaf[b : b + 1], params)
        return jnp.concatenate([self.measure(key, jnp.asarray(x)[b : b + 1], one(b), sigma_y)
                                for b, key in enumerate(keys)])
