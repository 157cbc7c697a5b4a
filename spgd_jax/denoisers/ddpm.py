"""The VP preconditioning with the trained DDPM timesteps: what the official DDPM-schedule samplers feed
the network.

guided-diffusion's samplers (DPS, DDRM, DiffPIR, MCG, Score-SDE, DPPS, RED-Diff releases) give the
eps-network the integer timestep k of the 1000-step linear-beta schedule. `vp_preconditioning` maps sigma to
EDM's continuous timestep instead, which at the DDPM levels sigma_k is k + 0.5 to k + 3.4 (0.92 at k = 0,
1002.4 at k = 999, outside the trained 0..999): at the timestep it gets, the network was trained for a noise
level 43 % too high at k = 0, 8 % at k = 5, 2.6 % at k = 900. Here

  c_noise = the timestep at sigma by linear interpolation in log sigma between the levels (sigma_k, k),
            k = 0..999, clamped to [0, 999] outside [sigma_0, sigma_999] = [0.0100, 157.4],

so a sampler stepping on the DDPM levels gives the network exactly the integer k, and any level between two
of them a timestep between theirs. c_in and the output are those of the VP preconditioning. SPGD and DAPS
keep the continuous map (their official code uses it): `trained_timesteps` is applied by the DDPM-schedule
samplers only.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from spgd_jax.denoisers._checks import check_inputs, first_channels
from spgd_jax.denoisers.vp import M, EpsFn

__all__ = ["DDPM_SIGMAS", "ddpm_timestep", "trained_timesteps", "vp_ddpm_preconditioning"]

# sigma_k = sqrt(1 / abar_k - 1) of guided-diffusion's linear betas (1e-4 to 0.02 over M = 1000 steps), float64
DDPM_SIGMAS = np.sqrt(1.0 / np.cumprod(1.0 - np.linspace(1e-4, 0.02, M, dtype=np.float64)) - 1.0)


def ddpm_timestep(sigma: jax.Array) -> jax.Array:
    """The DDPM timestep in [0, 999] of the noise level sigma >= 0 (any shape): k at sigma = sigma_k (as
    float32 values, exactly), linear in log sigma between levels, 0 below sigma_0 and 999 above sigma_999."""
    sigma = jnp.asarray(sigma)
    log_levels = jnp.log(jnp.asarray(DDPM_SIGMAS, sigma.dtype))
    log_sigma = jnp.log(jnp.maximum(sigma, DDPM_SIGMAS[0]))
    return jnp.interp(log_sigma, log_levels, jnp.arange(M, dtype=sigma.dtype))


def vp_ddpm_preconditioning(eps_fn: EpsFn, x: jax.Array, sigma: jax.Array) -> jax.Array:
    """x0_hat = x - sigma * eps(c_in x, ddpm_timestep(sigma)); x (B, H, W, C), sigma (B,) noise std >= 0.

    As spgd_jax.denoisers.vp.vp_preconditioning but with the trained integer timesteps (module docstring)."""
    x, sigma = check_inputs(x, sigma)
    c_in = 1 / jnp.sqrt(sigma**2 + 1)
    eps = first_channels(eps_fn(c_in[:, None, None, None] * x, ddpm_timestep(sigma)), x)
    return x - sigma[:, None, None, None] * eps


def trained_timesteps(denoiser):
    """The denoiser the DDPM-schedule samplers run: a Denoiser with the 'vp' preconditioning becomes the
    same Denoiser with 'vp_ddpm' (vp_ddpm_preconditioning); any other denoiser (another preconditioning,
    a plain function D(x, sigma)) is returned unchanged."""
    if getattr(denoiser, "preconditioning", None) == "vp" and dataclasses.is_dataclass(denoiser):
        return dataclasses.replace(denoiser, preconditioning="vp_ddpm")
    return denoiser
