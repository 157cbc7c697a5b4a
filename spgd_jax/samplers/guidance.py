"""Likelihood guidance: the residual norm ||A(D(x; sigma)) - y|| and its gradient through the denoiser,
for ONE image, as DPS, MCG and DPPS release it (the norm, not its square)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

__all__ = ["residual_norm", "residual_norm_and_grad"]


def residual_norm(residual: jax.Array) -> jax.Array:
    """||residual||_2 with gradient 0 (not NaN) at residual = 0, as torch.linalg.norm."""
    squared = jnp.sum(residual**2)
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def residual_norm_and_grad(denoiser: Callable, forward: Callable) -> Callable:
    """f(x (H,W,C), sigma (), y, params) -> ((||A(D(x; sigma)) - y||, x0_hat = D(x; sigma)), its gradient in x).

    One denoiser evaluation (and its backward pass)."""

    def norm(x, sigma, y, params):
        x0_hat = denoiser(x[None], sigma[None])[0]
        return residual_norm(forward(x0_hat, params) - y), x0_hat

    return jax.value_and_grad(norm, has_aux=True)
