"""Unconditional sampling: Euler steps of the probability-flow ODE on the EDM schedule (SPEC section 2).

x_{i+1} = x_i + (1 - t_{i+1}/t_i) * (D(x_i; t_i) - x_i), i = 0..T-1; T denoiser evaluations.
"""

from __future__ import annotations

import dataclasses

from spgd_jax.samplers._checks import check_trajectory_every
from spgd_jax.samplers._registry import Sampler, Schedule, register_sampler
from spgd_jax.samplers.schedule import check_schedule, edm_sigmas, euler_step

__all__ = ["EULER", "EulerConfig", "get_step_fn", "schedule"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class EulerConfig:
    """Unconditional Euler sampler settings: the EDM schedule and an optional x0_hat trajectory every k steps."""

    steps: int = 100
    sigma_max: float = 100.0
    sigma_min: float = 0.1
    rho: float = 7.0
    trajectory_every: int = 0

    def __post_init__(self):
        check_schedule(self.steps, self.sigma_max, self.sigma_min, self.rho)
        check_trajectory_every(self.trajectory_every)


def schedule(config: EulerConfig) -> Schedule:
    """The EDM noise levels; deterministic."""
    return Schedule(edm_sigmas(config.steps, config.sigma_max, config.sigma_min, config.rho))


def get_step_fn(denoiser, forward, config: EulerConfig):
    """The per-image Euler step (forward is None: unconditional)."""

    def step(x, step, _key, _image):
        x0_hat = denoiser(x[None], step.sigma[None])[0]
        return euler_step(x, x0_hat, step.coefficient), x0_hat, None

    return step


EULER = register_sampler(Sampler("euler", EulerConfig, schedule, get_step_fn, conditional=False))
