"""EDM's VP preconditioning: a DDPM noise predictor as a denoiser D(x; sigma).

The sampler works in variance-exploding coordinates x = x0 + sigma * n. A
guided-diffusion eps-network trained on the linear-beta DDPM schedule
(1000 steps) becomes the Tweedie estimate of x0 (SPEC section 1):

  sigma_inv(s) = (sqrt(beta_min^2 + 2 beta_d log(1 + s^2)) - beta_min) / beta_d
  c_in    = 1 / sqrt(sigma^2 + 1)
  c_noise = (M - 1) * sigma_inv(sigma)         (continuous timestep, not rounded)
  D(x; sigma) = x - sigma * eps(c_in * x, c_noise)

with beta_d = 19.9, beta_min = 0.1, M = 1000. Outputs of learn_sigma networks
carry 2C channels; only the first C (eps) are used.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from spgd_jax.unet import UNet

__all__ = ["BETA_D", "BETA_MIN", "M", "Denoiser", "sigma_to_timestep", "vp_preconditioning", "make_denoiser"]

BETA_D = 19.9
BETA_MIN = 0.1
M = 1000

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]
"""D(x (B, H, W, C), sigma (B,)) -> x0_hat (B, H, W, C); pure, jit/vmap/grad-able."""

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]
"""eps(x_scaled (B, H, W, C), timesteps (B,) float in [0, M-1]) -> (B, H, W, C or more)."""


def sigma_to_timestep(sigma: jax.Array) -> jax.Array:
    """Continuous DDPM timestep c_noise = (M - 1) * sigma_inv(sigma) for sigma >= 0.

    sigma_inv is evaluated in the algebraically equal form
    2 L / (sqrt(beta_min^2 + 2 beta_d L) + beta_min), L = log(1 + sigma^2), which
    avoids the cancellation of sqrt(...) - beta_min at small sigma (within 3 float32
    ulps of the exact value for sigma in [0.002, 100]).
    """
    log_term = jnp.log1p(sigma**2)
    sigma_inv = 2 * log_term / (jnp.sqrt(BETA_MIN**2 + 2 * BETA_D * log_term) + BETA_MIN)
    return (M - 1) * sigma_inv


def vp_preconditioning(eps_fn: EpsFn, x: jax.Array, sigma: jax.Array) -> jax.Array:
    """x0_hat = x - sigma * eps(c_in x, c_noise); x (B, H, W, C), sigma (B,) noise std >= 0.

    eps_fn may return more than C channels (learn_sigma): the first C are eps.
    """
    x, sigma = jnp.asarray(x), jnp.asarray(sigma)
    if x.ndim != 4:
        raise ValueError(f"x must be a (B, H, W, C) batch, got shape {x.shape}")
    if sigma.shape != (x.shape[0],):
        raise ValueError(
            f"sigma must have shape (B,) = ({x.shape[0]},) for x of shape {x.shape}, got {sigma.shape}; "
            "for one noise level use jnp.full((B,), sigma)"
        )
    sigma = sigma.astype(x.dtype)
    c_in = 1 / jnp.sqrt(sigma**2 + 1)
    eps = eps_fn(c_in[:, None, None, None] * x, sigma_to_timestep(sigma))
    channels = x.shape[-1]
    if eps.ndim != 4 or eps.shape[:3] != x.shape[:3] or eps.shape[-1] < channels:
        raise ValueError(
            f"eps_fn returned shape {eps.shape}; expected (B, H, W, >= {channels}) for x of shape {x.shape}"
        )
    return x - sigma[:, None, None, None] * eps[..., :channels].astype(x.dtype)


def make_denoiser(
    model: UNet,
    params: Any,
    class_labels: jax.Array | None = None,
    dtype: str | None = None,
) -> Denoiser:
    """The denoiser D(x, sigma) of a UNet with its params (the 'params' collection).

    class_labels: (B,) int labels, required iff model.config.class_cond (then the
    denoiser only accepts batches of that size). dtype: optional compute dtype
    override, 'float32' or 'bfloat16' (params stay float32); default: the
    model config's dtype.
    """
    if not isinstance(model, UNet):
        raise TypeError(f"model must be a spgd_jax.unet.UNet, got {type(model).__name__}")
    if isinstance(params, dict) and set(params) == {"params"}:
        raise TypeError("pass the params collection itself (variables['params']), not the variables dict")
    config = model.config if dtype is None else dataclasses.replace(model.config, dtype=dtype)
    model = UNet(config)
    if config.class_cond != (class_labels is not None):
        raise ValueError(
            "class_labels (B,) ints are required for a class-conditional model and must be None otherwise "
            f"(class_cond={config.class_cond})"
        )
    labels = None if class_labels is None else jnp.asarray(class_labels)

    def eps_fn(x: jax.Array, timesteps: jax.Array) -> jax.Array:
        return model.apply({"params": params}, x, timesteps, labels)

    def denoiser(x: jax.Array, sigma: jax.Array) -> jax.Array:
        return vp_preconditioning(eps_fn, x, sigma)

    return denoiser
