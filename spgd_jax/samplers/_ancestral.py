"""Pieces shared by the samplers that run guided-diffusion's ancestral DDPM sampler (DPS with
schedule="ddpm", MCG, Score-SDE, DPPS), all for ONE image in the denoiser's coordinates x = x0 + sigma * n.

- ancestral_step: x_{i+1} ~ q(x_{i+1} | x_i, x0_hat), the DDPM step with the posterior variance
  (ddim_step with eta = 1), its noise drawn from the image's own key.
- residual_norm_and_grad: ||A(x0_hat(x)) - y|| (the norm, not its square, as DPS, MCG and DPPS release it)
  and its gradient through the denoiser.
- vp_step_factors: the factor that turns a step size of the released VP-coordinate code into ours.
- noised_projection: the projection onto the measurement set at the next noise level (MCG, Score-SDE).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from spgd_jax import operators
from spgd_jax.samplers.schedule import ddim_step

__all__ = ["ancestral_step", "check_positive", "noised_projection", "require_keys", "residual_norm",
           "residual_norm_and_grad", "vp_step_factors"]


def check_positive(owner: str, name: str, value: Any) -> None:
    """TypeError/ValueError naming `owner.name` unless value is a finite number > 0."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value):
        raise TypeError(f"{owner}.{name} must be a finite number, got {value!r}")
    if value <= 0:
        raise ValueError(f"{owner}.{name} must be > 0, got {value}")


def require_keys(keys: jax.Array | None, method: str) -> jax.Array:
    """keys, or a ValueError saying that `method` draws noise in its loop and needs one key per image."""
    if keys is None:
        raise ValueError(f"{method} draws noise at every step: pass keys=(B,) PRNG keys, one per image "
                         "(spgd_jax.samplers.sample does)")
    return keys


def ancestral_step(x: jax.Array, x0_hat: jax.Array, sigma: jax.Array, sigma_next: jax.Array,
                   key: jax.Array) -> jax.Array:
    """One ancestral DDPM step from level sigma to sigma_next (guided-diffusion's p_sample):

      x_next = (1 - r) x0_hat + r x + sigma_next sqrt(1 - r) z,   r = sigma_next^2 / sigma^2,  z ~ N(0, I) from key,

    the posterior q(x_next | x, x0_hat) in our coordinates (DDPM's posterior mean and variance beta_tilde,
    scaled by sqrt(1 + sigma_next^2)). x, x0_hat: (H, W, C). Returns x0_hat at sigma_next = 0."""
    noise = jax.random.normal(key, x.shape, x.dtype)
    return ddim_step(x, x0_hat, sigma, sigma_next, 1.0, noise)


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


def vp_step_factors(sigmas: np.ndarray) -> np.ndarray:
    """(T,) float64 sqrt((1 + t_i^2)(1 + t_{i+1}^2)) for the (T + 1,) levels t_i: a step of size zeta on the
    gradient in guided-diffusion's coordinates is a step of zeta times this in ours.

    Derivation: x_vp = x / sqrt(1 + t^2), so grad_{x_vp} f = sqrt(1 + t_i^2) grad_x f at step i, and
    x_vp' = a_vp - zeta grad_{x_vp} f maps to x' = sqrt(1 + t_{i+1}^2) x_vp' = a - zeta sqrt(1 + t_i^2)
    sqrt(1 + t_{i+1}^2) grad_x f, where a is the same unguided update in our coordinates."""
    sigmas = np.asarray(sigmas, np.float64)
    return np.sqrt((1.0 + sigmas[:-1] ** 2) * (1.0 + sigmas[1:] ** 2))


def noised_projection(forward: Callable, params: Any, y: jax.Array, x: jax.Array, sigma_next: jax.Array,
                      key: jax.Array, iterations: int) -> jax.Array:
    """The point closest to x (H, W, C) with A x = y + sigma_next A z, z ~ N(0, I) of x's shape from key: the
    measurement of a sample at level sigma_next whose clean image fits y (for inpainting, the kept pixels
    become y + sigma_next z). Needs a linear A (ValueError otherwise); `iterations` CG iterations."""
    noise = jax.random.normal(key, x.shape, x.dtype)
    return operators.project(forward, params, y + sigma_next * forward(noise, params), x, iterations)
