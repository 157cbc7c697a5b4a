"""DPS (Chung et al. 2023) on the EDM schedule with the same denoiser (SPEC section 5, last paragraph).

Per outer step i, per image:  x0_hat = D(x_i; t_i);  x'_{i+1} = x_i + (1 - t_{i+1}/t_i)(x0_hat - x_i);
x_{i+1} = x'_{i+1} - zeta * grad_{x_i} ||A(x0_hat) - y||   (the norm, not its square). T denoiser evaluations.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from spgd_jax.samplers._loop import SampleResult, check_trajectory_every, run_schedule
from spgd_jax.samplers.schedule import check_schedule, edm_sigmas, euler_step

__all__ = ["DPSConfig", "get_step_fn", "dps"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPSConfig:
    """DPS settings. `zeta` is per task (DPS release: 0.5 inpainting, 0.3 deblurring and SR x4, 1.0 phase
    retrieval, tuned for 1000 ancestral DDPM steps). steps: T outer steps (1000 = the DPS release's NFEs).
    sigma_max, sigma_min, rho: the EDM schedule. trajectory_every: k > 0 also returns x0_hat every k steps."""

    zeta: float
    steps: int = 1000
    sigma_max: float = 100.0
    sigma_min: float = 0.1
    rho: float = 7.0
    trajectory_every: int = 0

    def __post_init__(self):
        check_schedule(self.steps, self.sigma_max, self.sigma_min, self.rho)
        if not isinstance(self.zeta, (int, float)) or isinstance(self.zeta, bool) or not math.isfinite(self.zeta):
            raise TypeError(f"DPSConfig.zeta must be a finite number, got {self.zeta!r}")
        if self.zeta <= 0:
            raise ValueError(f"DPSConfig.zeta must be > 0, got {self.zeta}")
        check_trajectory_every(self.trajectory_every)


def _norm(residual: jax.Array) -> jax.Array:
    """||residual||_2 with gradient 0 (not NaN) at residual = 0, as torch.linalg.norm."""
    squared = jnp.sum(residual**2)
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def get_step_fn(denoiser, forward):
    """The per-image DPS step for loop.run_schedule; step.inputs is the step's zeta."""

    def residual_norm(x, sigma, y, params):
        x0_hat = denoiser(x[None], sigma[None])[0]
        return _norm(forward(x0_hat, params) - y), x0_hat

    residual_norm_and_grad = jax.value_and_grad(residual_norm, has_aux=True)

    def step(x, step, _key, image):
        y, params = image
        (norm, x0_hat), grad = residual_norm_and_grad(x, step.sigma, y, params)
        return euler_step(x, x0_hat, step.coefficient) - step.inputs * grad, x0_hat, norm

    return step


def dps(
    denoiser: Callable[[jax.Array, jax.Array], jax.Array],
    forward: Callable[[jax.Array, Any], jax.Array],
    y: jax.Array,
    x_init: jax.Array,
    config: DPSConfig,
    params: Any = None,
    progress: Callable[[int], None] | None = None,
    *,
    keys: jax.Array | None = None,
    zeta: jax.Array | float | None = None,
) -> SampleResult:
    """DPS from the initial noise x_init (B, H, W, C) ~ N(0, sigma_max^2 I); see spgd_jax.samplers._sample.sample.

    zeta: a scalar that replaces config.zeta and may be traced (a sweep vmaps over it)."""
    sigmas = edm_sigmas(config.steps, config.sigma_max, config.sigma_min, config.rho)
    zetas = jnp.full((config.steps,), config.zeta if zeta is None else zeta, jnp.float32)
    step = get_step_fn(denoiser, forward)
    return run_schedule(step, x_init, sigmas, zetas, (y, params), config.trajectory_every, progress)
