"""EDM's VP preconditioning: a DDPM noise predictor (guided-diffusion's eps-network) as D(x; sigma).

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

from typing import Callable

import jax
import jax.numpy as jnp

from spgd_jax.denoisers._checks import check_inputs, first_channels
__all__ = ["BETA_D", "BETA_MIN", "M", "EpsFn", "sigma_to_timestep", "vp_preconditioning"]

BETA_D = 19.9
BETA_MIN = 0.1
M = 1000

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
    x, sigma = check_inputs(x, sigma)
    c_in = 1 / jnp.sqrt(sigma**2 + 1)
    eps = first_channels(eps_fn(c_in[:, None, None, None] * x, sigma_to_timestep(sigma)), x)
    return x - sigma[:, None, None, None] * eps
