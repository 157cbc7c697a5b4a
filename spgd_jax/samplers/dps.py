"""DPS (Chung et al. 2023, "Diffusion posterior sampling for general noisy inverse problems") in two schedules.

schedule="ddpm", as published (DPS Algorithm 1; the release runs guided-diffusion's 1000-step ancestral DDPM
sampler), per step i = 0..T-1 on ddpm_sigmas(T), per image:
  x0_hat = D(x_i; t_i)                                          (Alg. 1 line 4, Tweedie)
  x'_{i+1} = (1 - r) x0_hat + r x_i + t_{i+1} sqrt(1 - r) z,  r = t_{i+1}^2 / t_i^2,  z ~ N(0, I)   (lines 5-6)
  x_{i+1} = x'_{i+1} - zeta sqrt((1 + t_i^2)(1 + t_{i+1}^2)) grad_{x_i} ||y - A(x0_hat)||          (line 7)
The norm, not its square (the release's torch.linalg.norm; the paper's zeta_i = zeta' / ||y - A(x0_hat)||
applied to the squared norm is the same step up to a factor 2). The release applies zeta to VP states x_vp =
x / sqrt(1 + t^2); the factor converts that step to our coordinates (derivation in
spgd_jax.samplers.schedule.vp_step_factors), so a zeta of the release gives the release's iterates.
Departures: the variance is the DDPM posterior variance beta_tilde, where the release's network also predicts
a variance (learned_range) that our denoiser D does not return; and x0_hat is not clamped to [-1, 1]
(clip_denoised), as no sampler of this library clamps the Tweedie estimate. T denoiser evaluations.

schedule="edm" (this library's original variant, SPEC section 5): on the EDM schedule, deterministic,
  x0_hat = D(x_i; t_i);  x_{i+1} = x_i + (1 - t_{i+1}/t_i)(x0_hat - x_i) - zeta * grad_{x_i} ||A(x0_hat) - y||.
T denoiser evaluations.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from spgd_jax.denoisers import trained_timesteps
from spgd_jax.samplers._checks import check_step_size, check_trajectory_every
from spgd_jax.samplers._registry import Sampler, Schedule, register_sampler
from spgd_jax.samplers.guidance import residual_norm_and_grad
from spgd_jax.samplers.schedule import (ancestral_step, check_schedule, ddpm_sigmas, edm_sigmas, euler_step,
                                        vp_step_factors)

__all__ = ["DPS", "DPSConfig", "DPS_ZETA", "SCHEDULES", "TUNED_ZETA", "get_step_fn", "schedule"]

SCHEDULES = ("edm", "ddpm")
_EDM_DEFAULTS = {"sigma_max": 100.0, "sigma_min": 0.1, "rho": 7.0}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPSConfig:
    """DPS settings. `zeta` is per task (DPS release: 0.5 inpainting, 0.3 deblurring and SR x4, 1.0 phase
    retrieval, tuned for 1000 ancestral DDPM steps, in VP units, which schedule="ddpm" converts).
    schedule: "ddpm" (the published ancestral sampler on ddpm_sigmas(steps), steps <= 1000) or "edm" (Euler
    steps on the EDM schedule, the library's original variant). steps: T outer steps (1000 = the DPS
    release's NFEs). sigma_max: follows the schedule (None: 100 for "edm"; for "ddpm" always the DDPM
    schedule's 157.4). sigma_min, rho: the EDM schedule (None: 0.1 and 7; "ddpm" takes none).
    trajectory_every: k > 0 also returns x0_hat every k steps."""

    zeta: float
    schedule: str = "edm"
    steps: int = 1000
    sigma_max: float | None = None
    sigma_min: float | None = None
    rho: float | None = None
    trajectory_every: int = 0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"DPSConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.schedule == "edm":
            for name, default in _EDM_DEFAULTS.items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, default)
            check_schedule(self.steps, self.sigma_max, self.sigma_min, self.rho)
        else:
            ddpm_max = float(ddpm_sigmas(self.steps)[0])  # ValueError naming steps if out of [2, 1000]
            if self.sigma_min is not None or self.rho is not None:
                raise ValueError("DPSConfig.sigma_min and rho set the EDM schedule; schedule='ddpm' takes none "
                                 "(leave them unset)")
            if self.sigma_max is not None and self.sigma_max != ddpm_max:
                raise ValueError(f"DPSConfig.sigma_max follows the DDPM schedule ({ddpm_max:.4f}) with "
                                 f"schedule='ddpm'; leave it unset (got {self.sigma_max})")
            object.__setattr__(self, "sigma_max", ddpm_max)
        check_step_size("DPSConfig", "zeta", self.zeta)
        check_trajectory_every(self.trajectory_every)

    def sigmas(self):
        """The (steps + 1,) float64 noise levels of the schedule, ending with 0."""
        if self.schedule == "ddpm":
            return ddpm_sigmas(self.steps)
        return edm_sigmas(self.steps, self.sigma_max, self.sigma_min, self.rho)


def schedule(config: DPSConfig) -> Schedule:
    """The config's noise levels and per-step zeta (converted from VP units with schedule="ddpm", whose
    ancestral steps draw noise)."""
    sigmas = config.sigmas()
    zetas = jnp.full((config.steps,), config.zeta, jnp.float32)
    if config.schedule == "ddpm":
        return Schedule(sigmas, zetas * jnp.asarray(vp_step_factors(sigmas), jnp.float32), stochastic=True)
    return Schedule(sigmas, zetas)


def get_step_fn(denoiser, forward, config: DPSConfig):
    """The per-image DPS step; step.inputs is the step's zeta ("edm") or zeta times
    sqrt((1 + t_i^2)(1 + t_{i+1}^2)) ("ddpm", which also needs the loop's key)."""
    if config.schedule == "ddpm":  # the network sees the trained integer DDPM timesteps, as released
        denoiser = trained_timesteps(denoiser)
    norm_and_grad = residual_norm_and_grad(denoiser, forward)

    def step(x, step, key, image):
        y, params = image
        (norm, x0_hat), grad = norm_and_grad(x, step.sigma, y, params)
        if config.schedule == "ddpm":
            unguided = ancestral_step(x, x0_hat, step.sigma, step.sigma_next, key)
        else:
            unguided = euler_step(x, x0_hat, step.coefficient)
        return unguided - step.inputs * grad, x0_hat, norm

    return step


# DPS release (1000 ancestral steps): 0.5 inpainting, 0.3 deblurring and SR, 1.0 phase retrieval. The release
# has no HDR task: hdr's 0.3 is ours (the deblurring value), not the release's.
DPS_ZETA = {
    "inpaint": 0.5,
    "inpaint_box": 0.5,
    "gauss_deblur": 0.3,
    "motion_deblur": 0.3,
    "sr4": 0.3,
    "phase_retrieval": 1.0,
    "hdr": 0.3,
}
# DPS: the release's zetas (tuned for 1000 ancestral steps at 256 px) leave the 64 px default prior's
# samples unguided (random inpainting, 500 EDM steps: 6.0 / 6.4 / 15.3 dB at zeta 0.05 / 0.25 / 1; 22.3 /
# 23.3 / 22.5 dB at 2 / 5 / 12.5, mean of validation faces 1-2); 10x the release value is used for every
# task (benchmarks/results/dps_zeta_probe.md). benchmarks/quality.py re-picks them on faces 50-81.
# SR x4 takes 10: at 3 samples stay partly unguided (demo face 16.4 dB, residual 15 sigma_y, below nearest-
# neighbour upsampling's 16.9; 19.87 +- 4.91 dB over 50 test faces); on tuning faces 50-53, 500 steps:
# 24.32 / 24.46 / 23.87 dB at zeta 5 / 10 / 20 (demo face 18.5 dB at 10).
TUNED_ZETA: dict[str, float] = {
    "inpaint": 5.0,
    "gauss_deblur": 3.0,
    "motion_deblur": 3.0,
    "sr4": 10.0,
}

# DPS's paper row is the published sampler (1000 ancestral DDPM steps, the release's zeta); for the default
# prior it runs on the EDM schedule with 500 steps (SPGD's NFEs at T = 100, N = 5) and TUNED_ZETA.
DPS = register_sampler(Sampler(
    "dps", DPSConfig, schedule, get_step_fn, step_size="zeta",
    paper={task: {"zeta": zeta, "schedule": "ddpm", "steps": 1000} for task, zeta in DPS_ZETA.items()},
    tuned={task: {"zeta": TUNED_ZETA.get(task, zeta), "schedule": "edm", "steps": 500}
           for task, zeta in DPS_ZETA.items()}))
