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
from typing import Any, Callable

import jax

from spgd_jax.denoisers import trained_timesteps
from spgd_jax.samplers._ancestral import ancestral_step, noised_projection, require_keys
from spgd_jax.samplers._loop import SampleResult, check_trajectory_every, run_schedule
from spgd_jax.samplers.mcg import check_cg_iterations
from spgd_jax.samplers.schedule import ddpm_sigmas

__all__ = ["ScoreSDEConfig", "get_step_fn", "score_sde"]


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
        check_cg_iterations("ScoreSDEConfig", self.cg_iterations)
        check_trajectory_every(self.trajectory_every)

    @property
    def sigma_max(self) -> float:
        return float(ddpm_sigmas(self.steps)[0])


def get_step_fn(denoiser, forward, cg_iterations: int):
    """The per-image Score-SDE step for loop.run_schedule (no loss: the method has no objective)."""

    def step(x, step, key, image):
        y, params = image
        x0_hat = denoiser(x[None], step.sigma[None])[0]
        ancestral_key, measurement_key = jax.random.split(key)
        x_next = ancestral_step(x, x0_hat, step.sigma, step.sigma_next, ancestral_key)
        x_next = noised_projection(forward, params, y, x_next, step.sigma_next, measurement_key, cg_iterations)
        return x_next, x0_hat, None

    return step


def score_sde(
    denoiser: Callable[[jax.Array, jax.Array], jax.Array],
    forward: Callable[[jax.Array, Any], jax.Array],
    y: jax.Array,
    x_init: jax.Array,
    config: ScoreSDEConfig,
    params: Any = None,
    progress: Callable[[int], None] | None = None,
    *,
    keys: jax.Array | None = None,
) -> SampleResult:
    """Score-SDE from the initial noise x_init (B, H, W, C) ~ N(0, sigma_max^2 I); see
    spgd_jax.samplers._sample.sample. forward must be linear (ValueError otherwise); keys: (B,) per-image
    PRNG keys (required). losses is None."""
    keys = require_keys(keys, "Score-SDE")
    step = get_step_fn(trained_timesteps(denoiser), forward, config.cg_iterations)  # integer DDPM timesteps
    return run_schedule(step, x_init, ddpm_sigmas(config.steps), None, (y, params), config.trajectory_every,
                        progress, keys=keys)
