"""Noise schedules and the steps every sampler shares (SPEC section 2).

Schedules are computed on the host in float64 (NumPy); samplers pass them to the device as float32
arrays. All samplers work in the variance-exploding coordinates x = x0 + sigma * n of the denoiser
D(x; sigma); a DDPM state x_vp at timestep k is x = x_vp / sqrt(abar_k) with sigma_k = sqrt(1/abar_k - 1).
- edm_sigmas: EDM's time steps (sigma(t) = t), SPGD's schedule.
- ddpm_sigmas: the linear-beta DDPM schedule of the guided-diffusion checkpoints (1000 steps), respaced to
  fewer steps as guided-diffusion's space_timesteps does: DPS, DDRM, DiffPIR, MCG, Score-SDE use it.
- euler_step: the probability-flow ODE step; ddim_step: DDIM's step with its eta (eta = 1: the
  DDPM ancestral step with the posterior variance, eta = 0: deterministic); ancestral_step: ddim_step with
  eta = 1 and its noise from a key (DPS, MCG, Score-SDE).
- vp_step_factors: the factor that turns a step size of the released VP-coordinate code into ours.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["DDPM_STEPS", "ancestral_step", "check_schedule", "ddim_step", "ddpm_sigmas", "edm_sigmas", "euler_coefficients",
           "euler_step", "vp_step_factors"]

DDPM_STEPS = 1000  # guided-diffusion: linear betas from 1e-4 to 0.02 over 1000 steps


def check_schedule(steps: int, sigma_max: float, sigma_min: float, rho: float) -> None:
    """Raises TypeError/ValueError naming the problem when the EDM schedule settings are unusable."""
    if not isinstance(steps, int) or isinstance(steps, bool):
        raise TypeError(f"steps must be an int, got {steps!r}")
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (the EDM schedule divides by steps - 1), got {steps}")
    for name, value in (("sigma_max", sigma_max), ("sigma_min", sigma_min), ("rho", rho)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise TypeError(f"{name} must be a finite number, got {value!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")


def edm_sigmas(steps: int, sigma_max: float = 100.0, sigma_min: float = 0.1, rho: float = 7.0) -> np.ndarray:
    """EDM noise levels t_0 > ... > t_{T-1} followed by t_T = 0; float64, shape (steps + 1,).

    t_i = (sigma_max^(1/rho) + i/(T-1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.
    """
    check_schedule(steps, sigma_max, sigma_min, rho)
    ramp = np.arange(steps, dtype=np.float64) / (steps - 1)
    inv_max, inv_min = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    sigmas = (inv_max + ramp * (inv_min - inv_max)) ** rho
    return np.append(sigmas, 0.0)


def euler_coefficients(sigmas: np.ndarray) -> np.ndarray:
    """Euler step sizes 1 - t_{i+1} / t_i, float64, shape (T,), from edm_sigmas' (T + 1,) output.

    The last one is 1 (the step to sigma = 0 lands on the Tweedie estimate).
    """
    sigmas = np.asarray(sigmas, dtype=np.float64)
    return 1.0 - sigmas[1:] / sigmas[:-1]


def euler_step(x: jax.Array, x0_hat: jax.Array, coefficient: jax.Array) -> jax.Array:
    """One Euler step of the probability-flow ODE: x + (1 - t_{i+1}/t_i) * (D(x; t_i) - x).

    x and x0_hat = D(x; t_i) have the same shape; coefficient = euler_coefficients(...)[i] (scalar).
    """
    return x + coefficient * (x0_hat - x)


def ddpm_sigmas(steps: int = DDPM_STEPS) -> np.ndarray:
    """The DDPM noise levels sigma_k = sqrt(1/abar_k - 1) of `steps` timesteps k respaced evenly over
    999..0 (guided-diffusion's space_timesteps(1000, [steps]): k = round(j * 999 / (steps - 1))), from the
    noisiest, followed by 0; float64, shape (steps + 1,). betas = linspace(1e-4, 0.02, 1000), so
    sigma runs from 157.4 (k = 999) to 0.0100 (k = 0)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 2 <= steps <= DDPM_STEPS:
        raise ValueError(f"steps must be an int in [2, {DDPM_STEPS}] (timesteps of the 1000-step DDPM), got {steps!r}")
    alpha_bar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, DDPM_STEPS, dtype=np.float64))
    timesteps = np.round(np.arange(steps) * (DDPM_STEPS - 1) / (steps - 1)).astype(int)[::-1]
    return np.append(np.sqrt(1.0 / alpha_bar[timesteps] - 1.0), 0.0)


def ddim_step(x: jax.Array, x0_hat: jax.Array, sigma: jax.Array, sigma_next: jax.Array, eta: jax.Array | float,
              noise: jax.Array) -> jax.Array:
    """DDIM's step from noise level sigma to sigma_next in the denoiser's coordinates (Song et al. 2021a, Eq. 12):

      x_next = x0_hat + sqrt(sigma_next^2 - c^2) * (x - x0_hat) / sigma + c * noise,
      c = eta * sigma_next * sqrt(1 - sigma_next^2 / sigma^2)

    noise ~ N(0, I) of x's shape. eta = 1 is the DDPM ancestral step with the posterior variance (the
    guided-diffusion sampler of DPS, MCG), eta = 0 the deterministic DDIM (= euler_step). At sigma_next = 0 it
    returns x0_hat."""
    c = eta * sigma_next * jnp.sqrt(jnp.maximum(1.0 - (sigma_next / sigma) ** 2, 0.0))
    return x0_hat + jnp.sqrt(jnp.maximum(sigma_next**2 - c**2, 0.0)) * (x - x0_hat) / sigma + c * noise


def ancestral_step(x: jax.Array, x0_hat: jax.Array, sigma: jax.Array, sigma_next: jax.Array,
                   key: jax.Array) -> jax.Array:
    """One ancestral DDPM step from level sigma to sigma_next (guided-diffusion's p_sample):

      x_next = (1 - r) x0_hat + r x + sigma_next sqrt(1 - r) z,   r = sigma_next^2 / sigma^2,  z ~ N(0, I) from key,

    the posterior q(x_next | x, x0_hat) in our coordinates (DDPM's posterior mean and variance beta_tilde,
    scaled by sqrt(1 + sigma_next^2)). x, x0_hat: (H, W, C). Returns x0_hat at sigma_next = 0."""
    noise = jax.random.normal(key, x.shape, x.dtype)
    return ddim_step(x, x0_hat, sigma, sigma_next, 1.0, noise)


def vp_step_factors(sigmas: np.ndarray) -> np.ndarray:
    """(T,) float64 sqrt((1 + t_i^2)(1 + t_{i+1}^2)) for the (T + 1,) levels t_i: a step of size zeta on the
    gradient in guided-diffusion's coordinates is a step of zeta times this in ours.

    Derivation: x_vp = x / sqrt(1 + t^2), so grad_{x_vp} f = sqrt(1 + t_i^2) grad_x f at step i, and
    x_vp' = a_vp - zeta grad_{x_vp} f maps to x' = sqrt(1 + t_{i+1}^2) x_vp' = a - zeta sqrt(1 + t_i^2)
    sqrt(1 + t_{i+1}^2) grad_x f, where a is the same unguided update in our coordinates."""
    sigmas = np.asarray(sigmas, np.float64)
    return np.sqrt((1.0 + sigmas[:-1] ** 2) * (1.0 + sigmas[1:] ** 2))
