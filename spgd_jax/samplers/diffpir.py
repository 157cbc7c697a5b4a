"""DiffPIR (Zhu et al. 2023, "Denoising Diffusion Models for Plug-and-Play Image Restoration", Algorithm 1).

Half-quadratic splitting inside a diffusion sampler: each step denoises, solves the data sub-problem in
closed form around the denoised image, and re-noises with a DDIM-like step. In the denoiser's variance-
exploding coordinates x = x0 + sigma * n (the paper's x_t / sqrt(abar_t), sigma_t = sqrt(1 - abar_t) /
sqrt(abar_t)), per image, for i = 0..T-1 from sigma = t_i to sigma' = t_{i+1}, n ~ N(0, I) from the loop's key:

  x0 = D(x_i; t_i)                                                      (Alg. 1 line 3, Eq. 11)
  if sigma' > 0:
      rho_i = lambda * sigma_n^2 / t_i^2                                (Eq. 13 / line 4)
      x0 <- argmin_x ||A x - y||^2 + rho_i ||x - x0||^2                  (Eq. 12 / line 4: operators.proximal)
      eps = (x_i - x0) / t_i                                            (line 5)
      x_{i+1} = x0 + sigma' (sqrt(1 - zeta) eps + sqrt(zeta) n)         (line 6, the release's eta = 0)
  else: x_{i+1} = x0                                                    (the release skips the data step last)

T denoiser evaluations (20 in the SPGD paper, 20 or 100 in DiffPIR's). Schedule: the release's 'quad'
skip over the 1000-step linear-beta DDPM: seq_j = int(sqrt(j / (T-1)) * 1000), seq_{T-1} = 999, timestep
k_j = 999 - seq_j (999 first, 0 last), then sigma = 0.

Per-task settings (`lam`, `zeta`) from the release's scripts (no table in the paper):
  inpaint:                    lam 1.0, zeta 1.0   (main_ddpir_inpainting.py, noiseless, 20 NFEs)
  gauss_deblur/motion_deblur: lam 7.0, zeta 0.3   (main_ddpir_deblur.py: lambda_ * 7, zeta * 3)
  sr4:                        lam 6.0 (*), zeta 0.25 (main_ddpir_sisr.py sweeps lambda_ over 2..12 at zeta 0.25)
  (*) our pick from the middle of that sweep; the release fixes no single value.

Units and departures, and why:
- sigma_n: the release computes rho with sigma_n = max(0.001, noise_level_img), the noise std in [0, 1]
  units, against sigma_t in [-1, 1] units; we keep its numbers so its lambda values carry over:
  sigma_n = max(sigma_y / 2, 0.001) with our sigma_y in [-1, 1] units (rho is unit-free otherwise).
- The data step is argmin ||Ax - y||^2 + rho ||x - x0||^2 by conjugate gradients (`cg_iterations`, from
  x0; exact after one iteration for inpainting); the release uses FFTs with circular boundaries for blur
  and SR, our operators pad by reflection.
- The release starts from sqrt(abar_999) * (y or its bicubic upsampling) + sqrt(1 - abar_999) * n; we start
  from pure noise sigma_max * n (sample()'s x_init), the y term being 1/157 of the noise std.
- The last step returns D(x; t_{T-1}) (t_{T-1} = 0.0100); the release returns x at that level undenoised.
- `losses` holds ||A x0 - y||^2 per step, x0 after the data step.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from spgd_jax.operators import adjoint, proximal
from spgd_jax.samplers._checks import check_int, check_number, check_step_size, check_trajectory_every
from spgd_jax.samplers._registry import Sampler, Schedule, register_sampler
from spgd_jax.samplers.schedule import DDPM_STEPS

__all__ = ["DIFFPIR", "DiffPIRConfig", "check_linear", "diffpir_sigmas", "get_step_fn", "schedule"]


def diffpir_sigmas(steps: int) -> np.ndarray:
    """DiffPIR's 'quad' noise levels sigma_k = sqrt(1/abar_k - 1), k = 999 - int(sqrt(j/(T-1)) * 1000) for
    j = 0..T-1 (the last k = 0), then 0; float64, shape (steps + 1,)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 2 <= steps <= DDPM_STEPS:
        raise ValueError(f"steps must be an int in [2, {DDPM_STEPS}], got {steps!r}")
    alpha_bar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, DDPM_STEPS, dtype=np.float64))
    seq = np.sqrt(np.linspace(0, DDPM_STEPS**2, steps)).astype(int)
    seq[-1] -= 1
    return np.append(np.sqrt(1.0 / alpha_bar[DDPM_STEPS - 1 - seq] - 1.0), 0.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiffPIRConfig:
    """DiffPIR settings; `lam` (lambda, the step size, may be traced in a sweep) and `zeta` are per task
    (module docstring). steps: T denoiser evaluations (20; DiffPIR's paper also uses 100). sigma_y: the
    measurement noise std in [-1, 1] units (0.01 for the four core tasks). cg_iterations: conjugate-gradient
    iterations of the data step. trajectory_every: k > 0 also returns x0 every k steps. sigma_max
    (property): the first noise level, sigma at k = 999 (157.4)."""

    lam: float
    zeta: float
    steps: int = 20
    sigma_y: float = 0.01
    cg_iterations: int = 30
    trajectory_every: int = 0

    def __post_init__(self):
        diffpir_sigmas(self.steps)  # validates steps
        check_step_size("DiffPIRConfig", "lam", self.lam)
        check_number("DiffPIRConfig", "zeta", self.zeta, 0.0, 1.0)
        check_number("DiffPIRConfig", "sigma_y", self.sigma_y, 0.0)
        check_int("DiffPIRConfig", "cg_iterations", self.cg_iterations)
        check_trajectory_every(self.trajectory_every)

    @property
    def sigma_max(self) -> float:
        return float(diffpir_sigmas(self.steps)[0])


def get_step_fn(denoiser, forward, config: DiffPIRConfig):
    """The per-image DiffPIR step; step.inputs is the step's rho_i."""
    zeta, cg_iterations = config.zeta, config.cg_iterations

    def step(x, step, key, image):
        y, params = image
        sigma, sigma_next = step.sigma, step.sigma_next
        denoised = denoiser(x[None], sigma[None])[0]
        x0 = proximal(forward, params, y, denoised, step.inputs, cg_iterations)
        eps = (x - x0) / sigma
        noise = jax.random.normal(key, x.shape, x.dtype)
        x_next = x0 + sigma_next * (math.sqrt(1.0 - zeta) * eps + math.sqrt(zeta) * noise)
        x0 = jnp.where(sigma_next > 0, x0, denoised)
        x_next = jnp.where(sigma_next > 0, x_next, denoised)
        return x_next, x0, jnp.sum((forward(x0, params) - y) ** 2)

    return step


def schedule(config: DiffPIRConfig) -> Schedule:
    """diffpir_sigmas(T) and rho_i = lam sigma_n^2 / t_i^2, sigma_n = max(sigma_y / 2, 0.001); every step
    re-noises."""
    sigmas = diffpir_sigmas(config.steps)
    sigma_n = max(config.sigma_y / 2.0, 0.001)
    return Schedule(sigmas, config.lam * sigma_n**2 / jnp.asarray(sigmas[:-1], jnp.float32) ** 2, stochastic=True)


def check_linear(denoiser, forward, y, x_init, config, params):
    """x_init, after a ValueError if forward is not linear (its adjoint on the first image's y)."""
    one_params = jax.tree_util.tree_map(lambda p: p[0], params)
    adjoint(forward, one_params, x_init.shape[1:])(y[0])
    return x_init


# The release's settings (module docstring), noiseless, 20 NFE; TUNED: the step size picked per task by
# benchmarks/quality.py on tuning faces 50-57 from 0.25x, 1x and 4x the release's
# (benchmarks/results/quality_cpu-2core-methods-50img.md, its sweep table). Only motion deblurring (lam 28:
# 31.95 dB against 31.31 at 7) gains clearly; the others are within 0.1 dB of their neighbours (inpainting
# identical at every value). The motion pick is at the grid's edge: a wider sweep may gain more.
DIFFPIR = register_sampler(Sampler(
    "diffpir", DiffPIRConfig, schedule, get_step_fn, init=check_linear, step_size="lam", linear_only=True,
    paper={"inpaint": {"lam": 1.0, "zeta": 1.0}, "inpaint_box": {"lam": 1.0, "zeta": 1.0},
           "gauss_deblur": {"lam": 7.0, "zeta": 0.3}, "motion_deblur": {"lam": 7.0, "zeta": 0.3},
           "sr4": {"lam": 6.0, "zeta": 0.25}},
    tuned={"inpaint": {"lam": 0.25, "zeta": 1.0}, "gauss_deblur": {"lam": 28.0, "zeta": 0.3},
           "motion_deblur": {"lam": 28.0, "zeta": 0.3}, "sr4": {"lam": 1.5, "zeta": 0.25}}))
