"""MCG (Chung et al. 2022, "Improving diffusion models for inverse problems using manifold constraints").

Per step i = 0..T-1 on ddpm_sigmas(T) (guided-diffusion's 1000-step ancestral sampler, as released), per image:
  x0_hat = D(x_i; t_i)                                                       (Tweedie, paper Eq. 10)
  x'_{i+1} = (1 - r) x0_hat + r x_i + t_{i+1} sqrt(1 - r) z,  r = t_{i+1}^2 / t_i^2   (ancestral step, Eq. 12)
  x''_{i+1} = x'_{i+1} - alpha sqrt((1 + t_i^2)(1 + t_{i+1}^2)) grad_{x_i} ||y - A x0_hat||   (MCG step, Eq. 13)
  x_{i+1} = the point of {x : A x = y + t_{i+1} A n} closest to x''_{i+1},  n ~ N(0, I)   (projection, Eq. 14)
The projection puts the measurement noised to the next level (the noisy y_i of Eq. 14; for inpainting it
replaces the kept pixels by y + t_{i+1} n, as the release's q_sample(y) * mask; the last step projects onto
A x = y exactly). It is computed by conjugate gradients (operators.project), so A must be linear.
The gradient is of the norm, not of its square as Eq. 13 writes it, as in the release (th.norm, unit step)
and in the DPS release's 'mcg' method; W = I. alpha is in the release's VP units (x_vp = x / sqrt(1 + t^2)),
converted to ours by the factor (spgd_jax.samplers.schedule.vp_step_factors).
Departures: the DDPM posterior variance instead of the release network's learned one; x0_hat not clamped to
[-1, 1]; the release noises y to the current level t_i (q_sample(y, t)) where Eq. 14 and we use t_{i+1}.
T denoiser evaluations (each with its backward pass).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from spgd_jax import operators
from spgd_jax.denoisers import trained_timesteps
from spgd_jax.samplers._checks import check_int, check_step_size, check_trajectory_every
from spgd_jax.samplers._registry import Sampler, Schedule, register_sampler
from spgd_jax.samplers.guidance import residual_norm_and_grad
from spgd_jax.samplers.schedule import ancestral_step, ddpm_sigmas, vp_step_factors

__all__ = ["MCG", "MCGConfig", "get_step_fn", "noised_projection", "schedule"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MCGConfig:
    """MCG settings. alpha: the manifold-constraint step size in the release's VP units (1.0: the MCG release's
    unit step, also the DPS release's default for its 'mcg' method). steps: T ancestral steps on
    ddpm_sigmas(steps), 2..1000 (1000 = the release's NFEs). cg_iterations: conjugate-gradient iterations of
    each projection (exact for inpainting after one). trajectory_every: k > 0 also returns x0_hat every k
    steps. sigma_max (a property): the DDPM schedule's first level, 157.4."""

    alpha: float = 1.0
    steps: int = 1000
    cg_iterations: int = 30
    trajectory_every: int = 0

    def __post_init__(self):
        ddpm_sigmas(self.steps)  # ValueError naming steps if out of [2, 1000]
        check_step_size("MCGConfig", "alpha", self.alpha)
        check_int("MCGConfig", "cg_iterations", self.cg_iterations, meaning="conjugate-gradient iterations of "
                  "the projection")
        check_trajectory_every(self.trajectory_every)

    @property
    def sigma_max(self) -> float:
        return float(ddpm_sigmas(self.steps)[0])


def noised_projection(forward: Callable, params: Any, y: jax.Array, x: jax.Array, sigma_next: jax.Array,
                      key: jax.Array, iterations: int) -> jax.Array:
    """The point closest to x (H, W, C) with A x = y + sigma_next A z, z ~ N(0, I) of x's shape from key: the
    measurement of a sample at level sigma_next whose clean image fits y (for inpainting, the kept pixels
    become y + sigma_next z). Needs a linear A (ValueError otherwise); `iterations` CG iterations."""
    noise = jax.random.normal(key, x.shape, x.dtype)
    return operators.project(forward, params, y + sigma_next * forward(noise, params), x, iterations)


def schedule(config: MCGConfig) -> Schedule:
    """ddpm_sigmas(T) and the per-step alpha converted from VP units; ancestral steps draw noise."""
    sigmas = ddpm_sigmas(config.steps)
    alphas = jnp.full((config.steps,), config.alpha, jnp.float32)
    return Schedule(sigmas, alphas * jnp.asarray(vp_step_factors(sigmas), jnp.float32), stochastic=True)


def get_step_fn(denoiser, forward, config: MCGConfig):
    """The per-image MCG step; step.inputs is alpha * sqrt((1 + t_i^2)(1 + t_{i+1}^2))."""
    denoiser = trained_timesteps(denoiser)  # the network sees the trained integer DDPM timesteps, as released
    norm_and_grad = residual_norm_and_grad(denoiser, forward)

    def step(x, step, key, image):
        y, params = image
        (norm, x0_hat), grad = norm_and_grad(x, step.sigma, y, params)
        ancestral_key, measurement_key = jax.random.split(key)
        x_next = ancestral_step(x, x0_hat, step.sigma, step.sigma_next, ancestral_key) - step.inputs * grad
        x_next = noised_projection(forward, params, y, x_next, step.sigma_next, measurement_key,
                                   config.cg_iterations)
        return x_next, x0_hat, norm

    return step


# PAPER: the release's unit step (MCGConfig's defaults). TUNED: deblurring with 5 projection CG iterations, as
# Score-SDE (spgd_jax/samplers/score_sde.py says why), and the alpha picked by the Table 1 job
# (benchmarks/table1_cpu.sh; benchmarks/results/quality_cpu-2core-table1-8img.md, its sweep table) on 4 tuning
# faces: twice the release's on inpainting (27.89 dB against 27.49 at 1; 25.95 on the 8 test faces), 1/16 of it on
# both deblurrings, each grid widened the most three times, the edge still ahead by 0.03 / 0.05 dB (Gaussian 31.90
# against 31.42, 30.85 on the test faces; motion 29.83 against 29.08, 29.17 on the test faces): the manifold-
# constraint step only costs there, and the projections carry the measurement (Score-SDE, the same projections
# without the step: 30.88 and 29.22 on the test faces). SR x4 keeps the release's 1: 2 led it by 0.03 dB (24.95
# against 24.92; 23.03 on the test faces at 2), too little to change a preset on 4 faces. Box inpainting, not
# measured, keeps it too.
MCG = register_sampler(Sampler(
    "mcg", MCGConfig, schedule, get_step_fn, step_size="alpha", linear_only=True,
    tuned={"inpaint": {"alpha": 2.0}, "gauss_deblur": {"cg_iterations": 5, "alpha": 0.0625},
           "motion_deblur": {"cg_iterations": 5, "alpha": 0.0625}}))
