"""Score-SDE for inverse problems (Song et al. 2021b; Song et al. 2022, "Solving inverse problems in medical
imaging with score-based generative models"), as the SPGD paper runs it (its appendix D.1): data consistency
by a projection after each unconditional ancestral step, configured as MCG recommends (Chung et al. 2022; the
MCG release's 'vanilla' method, the DPS release's 'projection').

Per step i = 0..T-1 on ddpm_sigmas(T), per image:
  x0_hat = D(x_i; t_i)
  x'_{i+1} = (1 - r) x0_hat + r x_i + t_{i+1} sqrt(1 - r) z,  r = t_{i+1}^2 / t_i^2,  z ~ N(0, I)   (predictor)
  x_{i+1} = the point of {x : A x = y + t_{i+1} A n} closest to x'_{i+1},  n ~ N(0, I)     (projection)
MCG without its gradient step (see spgd_jax.samplers.mcg for the projection and the departures it shares: the
DDPM posterior variance, no clamping of x0_hat). Song et al. 2022 also blend the projection with a weight
lambda and add Langevin corrector steps; the SPGD paper's baseline does neither (lambda = 1, no corrector).
T denoiser evaluations, no gradients.
"""

from __future__ import annotations

import dataclasses

import jax

from spgd_jax.samplers._checks import check_int, check_trajectory_every
from spgd_jax.samplers._registry import Sampler, Schedule, register_sampler
from spgd_jax.samplers.mcg import noised_projection
from spgd_jax.samplers.schedule import ancestral_step, ddpm_sigmas

__all__ = ["SCORE_SDE", "ScoreSDEConfig", "get_step_fn", "schedule"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScoreSDEConfig:
    """Score-SDE settings: steps T on ddpm_sigmas(steps), 2..1000 (1000: the NFEs of the MCG and DPS releases'
    projection baselines); cg_iterations of each projection; trajectory_every: k > 0 also returns x0_hat every
    k steps. sigma_max (a property): the DDPM schedule's first level, 157.4. No step size."""

    steps: int = 1000
    cg_iterations: int = 30
    trajectory_every: int = 0

    def __post_init__(self):
        ddpm_sigmas(self.steps)  # ValueError naming steps if out of [2, 1000]
        check_int("ScoreSDEConfig", "cg_iterations", self.cg_iterations, meaning="conjugate-gradient iterations "
                  "of the projection")
        check_trajectory_every(self.trajectory_every)

    @property
    def sigma_max(self) -> float:
        return float(ddpm_sigmas(self.steps)[0])


def schedule(config: ScoreSDEConfig) -> Schedule:
    """ddpm_sigmas(T); ancestral steps and projections draw noise."""
    return Schedule(ddpm_sigmas(config.steps), stochastic=True)


def get_step_fn(denoiser, forward, config: ScoreSDEConfig):
    """The per-image Score-SDE step (no loss: the method has no objective)."""

    def step(x, step, key, image):
        y, params = image
        x0_hat = denoiser(x[None], step.sigma[None])[0]
        ancestral_key, measurement_key = jax.random.split(key)
        x_next = ancestral_step(x, x0_hat, step.sigma, step.sigma_next, ancestral_key)
        x_next = noised_projection(forward, params, y, x_next, step.sigma_next, measurement_key,
                                   config.cg_iterations)
        return x_next, x0_hat, None

    return step


SCORE_SDE = register_sampler(Sampler("score_sde", ScoreSDEConfig, schedule, get_step_fn, linear_only=True))
