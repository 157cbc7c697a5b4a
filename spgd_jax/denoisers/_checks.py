"""Shape checks shared by the preconditionings: clear errors instead of broadcasting surprises."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["check_inputs", "first_channels"]


def check_inputs(x: jax.Array, sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x, sigma in x's dtype) after checking x is (B, H, W, C) and sigma is (B,)."""
    x, sigma = jnp.asarray(x), jnp.asarray(sigma)
    if x.ndim != 4:
        raise ValueError(f"x must be a (B, H, W, C) batch, got shape {x.shape}")
    if sigma.shape != (x.shape[0],):
        raise ValueError(
            f"sigma must have shape (B,) = ({x.shape[0]},) for x of shape {x.shape}, got {sigma.shape}; "
            "for one noise level use jnp.full((B,), sigma)"
        )
    return x, sigma.astype(x.dtype)


def first_channels(out: jax.Array, x: jax.Array) -> jax.Array:
    """The first C channels of a network output (B, H, W, >= C) for x (B, H, W, C), in x's dtype."""
    channels = x.shape[-1]
    if out.ndim != 4 or out.shape[:3] != x.shape[:3] or out.shape[-1] < channels:
        raise ValueError(
            f"the network returned shape {out.shape}; expected (B, H, W, >= {channels}) for x of shape {x.shape}"
        )
    return out[..., :channels].astype(x.dtype)
