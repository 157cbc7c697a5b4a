"""DAPS (Zhang et al., CVPR 2025, "Improving diffusion inverse problem solving with decoupled noise annealing").

Official code zhangbingliang2019/DAPS: sampler.py (DAPS.sample), cores/scheduler.py (EDMScheduler,
DiffusionPFODE), cores/mcmc.py (MCMCSampler, mc_algo 'langevin', prior_solver 'gaussian'); the pixel-space
"DAPS-1K" configuration of configs/sampler/edm_daps.yaml and commands/pixel_ffhq.sh (200 annealing steps x 5
ODE steps). From x_T ~ N(0, sigma_max^2 I), per annealing step i = 0..T-1 (sigma_i, then sigma_{i+1}), per image:
  (a) x0_hat = the probability-flow ODE from x_i at sigma_i down to ode_sigma_min, K Euler steps on the EDM
      poly-7 grid s_0 = sigma_i > ... > s_K = ode_sigma_min:  x <- x + (1 - s_{j+1}/s_j)(D(x; s_j) - x)
      (DiffusionPFODE with solver 'euler'; K denoiser evaluations)
  (b) Langevin dynamics in x0 space from x0 = x0_hat, N steps (MCMCSampler.sample, mc_update):
        x0 <- x0 + eta_i * score(x0) + sqrt(2 eta_i) * eps,  eps ~ N(0, I)
        score(x0) = (x0_hat - x0) / sigma_i^2 - grad_x0 ||A(x0) - y||^2 / tau^2
      i.e. p(x0 | x_i) ~ N(x0_hat, r_i^2 I) with r_i = sigma_i (prior_solver 'gaussian'), and the code's data term,
      the gradient of the SUM of squares over tau^2 (operator.gradient of operator.loss): a Gaussian likelihood
      of variance tau^2 / 2. The step size decays linearly: eta_i = lr * (1 + (i / (T + 1)) (lr_min_ratio - 1))
      (MCMCSampler.get_lr with ratio = step / annealing_scheduler.num_steps, num_steps = T + 1).
  (c) x_{i+1} = x0 + sigma_{i+1} * n, n ~ N(0, I) (sigma_T = 0: the result is the last x0).
Annealing levels: sigma_i = (sigma_max^(1/7) + (i / T)(sigma_min^(1/7) - sigma_max^(1/7)))^7, i = 0..T-1 (the
code's EDMScheduler with num_steps = T + 1 grid points, the last, sigma_min itself, dropped), then 0.
NFE per image: T * K (DAPS-1K: 200 * 5 = 1000); the Langevin steps evaluate the forward operator and its
gradient (T * N = 20000 of each), never the denoiser. Works for non-linear forward operators.

Departures from the official code, and why:
- An image whose Langevin chain becomes non-finite is frozen at its last finite state by the shared loop
  (spgd_jax.samplers.driver); mcmc.py instead returns zeros for the whole batch's x0 when any value is NaN.
- Noise: annealing step i of image b draws from fold_in(key_b, i) (split into the Langevin and the forward-
  diffusion noise), so an image's result depends on its own key only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spgd_jax.samplers._checks import check_int, check_number, check_step_size, check_trajectory_every
from spgd_jax.samplers._registry import Sampler, Schedule, register_sampler
from spgd_jax.samplers.schedule import check_schedule, edm_sigmas

__all__ = ["DAPS", "DAPSConfig", "DAPSStep", "annealing_sigmas", "get_step_fn", "langevin", "langevin_rates",
           "ode_sigmas", "schedule"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DAPSConfig:
    """DAPS settings: DAPS-1K of the official pixel-space configs by default. `lr` (the Langevin step size
    eta, traced) is per task, official configs/task/<task>.yaml 'pixel' entries: inpaint (inpainting_rand.yaml)
    1e-4, gauss_deblur (gaussian_blur.yaml) 1e-4, motion_deblur (motion_blur.yaml) 5e-5, sr4
    (down_sampling.yaml) 1e-4; all with num_steps 100, tau 0.01, lr_min_ratio 0.01 (and phase_retrieval 5e-5,
    hdr 2e-5, box inpainting 5e-5). With the default prior, Table 1's sweeps on 4 tuning faces pick these
    values on gauss_deblur, motion_deblur and sr4, and 5e-5 on inpaint by only 0.10 dB; twice them collapses
    the samples on inpaint and both deblurrings (benchmarks/results/quality_cpu-2core-table1-8img.md).

    steps: T annealing steps (edm_daps.yaml annealing_scheduler_config.num_steps 200). ode_steps: K Euler steps
    of the PF-ODE per annealing step (diffusion_scheduler_config.num_steps 5). langevin_steps: N Langevin steps
    per annealing step (100). tau: the data term's noise level (0.01). lr_min_ratio: eta decays to this
    fraction of lr (0.01). sigma_max, sigma_min, rho: the annealing schedule (100, 0.1, poly-7).
    ode_sigma_min: where each ODE solve stops (diffusion_scheduler_config.sigma_min 0.01).
    trajectory_every: k > 0 also returns the ODE's x0_hat every k annealing steps.
    """

    lr: float
    steps: int = 200
    ode_steps: int = 5
    langevin_steps: int = 100
    tau: float = 0.01
    lr_min_ratio: float = 0.01
    sigma_max: float = 100.0
    sigma_min: float = 0.1
    rho: float = 7.0
    ode_sigma_min: float = 0.01
    trajectory_every: int = 0

    def __post_init__(self):
        check_schedule(self.steps, self.sigma_max, self.sigma_min, self.rho)
        check_step_size("DAPSConfig", "lr", self.lr)
        for name in ("tau", "lr_min_ratio", "ode_sigma_min"):
            check_number("DAPSConfig", name, getattr(self, name), 0.0, open_low=True)
        if self.ode_sigma_min >= self.sigma_min:
            raise ValueError(f"DAPSConfig.ode_sigma_min ({self.ode_sigma_min}) must be < sigma_min ({self.sigma_min}): "
                             "each ODE solve runs from the annealing level down to ode_sigma_min")
        check_int("DAPSConfig", "ode_steps", self.ode_steps)
        check_int("DAPSConfig", "langevin_steps", self.langevin_steps)
        check_trajectory_every(self.trajectory_every)


class DAPSStep(NamedTuple):
    """DAPS's per-annealing-step inputs (step.inputs): ode_sigmas (K + 1,) the ODE's grid, lr () the step's eta."""

    ode_sigmas: jax.Array
    lr: jax.Array


def annealing_sigmas(config: DAPSConfig) -> np.ndarray:
    """The official annealing levels sigma_0 > ... > sigma_{T-1} > sigma_min, then 0; float64 (T + 1,)."""
    return np.append(edm_sigmas(config.steps + 1, config.sigma_max, config.sigma_min, config.rho)[:-2], 0.0)


def ode_sigmas(sigma: float, config: DAPSConfig) -> np.ndarray:
    """The PF-ODE grid from sigma down to ode_sigma_min, EDM poly-rho with K + 1 points; float64 (K + 1,)."""
    return edm_sigmas(config.ode_steps + 1, sigma, config.ode_sigma_min, config.rho)[:-1]


def langevin_rates(config: DAPSConfig) -> np.ndarray:
    """eta_i / lr = 1 + (i / (T + 1)) (lr_min_ratio - 1), i = 0..T-1; float64 (T,)."""
    return 1.0 + np.arange(config.steps) / (config.steps + 1) * (config.lr_min_ratio - 1.0)


def langevin(forward, x0_hat: jax.Array, sigma: jax.Array, lr: jax.Array, tau: float, steps: int, y: jax.Array,
             params: Any, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """N Langevin steps in x0 space from x0_hat (H, W, C) for ONE image (the module docstring's step (b)).

    Returns (x0, ||A(x0) - y||^2 at the last step's start). Step j's noise is normal(fold_in(key, j))."""
    loss_and_grad = jax.value_and_grad(lambda x: jnp.sum((forward(x, params) - y) ** 2))

    def body(j, carry):
        x, _ = carry
        loss, grad = loss_and_grad(x)
        score = (x0_hat - x) / sigma**2 - grad / tau**2
        noise = jax.random.normal(jax.random.fold_in(key, j), x.shape, x.dtype)
        return x + lr * score + jnp.sqrt(2.0 * lr) * noise, loss

    return jax.lax.fori_loop(0, steps, body, (x0_hat, jnp.zeros((), x0_hat.dtype)))


def get_step_fn(denoiser, forward, config: DAPSConfig):
    """The per-image DAPS annealing step; step.inputs is a DAPSStep.

    Returns (x_{i+1}, the ODE's x0_hat, ||A(x0) - y||^2 at the last Langevin step's start)."""

    def ode(x, sigmas):
        def euler(x, pair):
            sigma, sigma_next = pair
            x0_hat = denoiser(x[None], sigma[None])[0]
            return x + (1.0 - sigma_next / sigma) * (x0_hat - x), None

        return jax.lax.scan(euler, x, (sigmas[:-1], sigmas[1:]))[0]

    def step(x, step, key, image):
        y, params = image
        langevin_key, noise_key = jax.random.split(key)
        x0_hat = ode(x, step.inputs.ode_sigmas)
        x0, loss = langevin(forward, x0_hat, step.sigma, step.inputs.lr, config.tau, config.langevin_steps, y, params,
                            langevin_key)
        x_next = x0 + step.sigma_next * jax.random.normal(noise_key, x.shape, x.dtype)
        return x_next, x0_hat, loss

    return step


def schedule(config: DAPSConfig) -> Schedule:
    """The annealing levels and, per step, the ODE's grid and eta_i = float32(lr) * float32(eta_i / lr);
    every step draws Langevin and forward-diffusion noise."""
    sigmas = annealing_sigmas(config)
    grids = np.stack([ode_sigmas(sigma, config) for sigma in sigmas[:-1]])
    lrs = jnp.asarray(config.lr, jnp.float32) * jnp.asarray(langevin_rates(config), jnp.float32)
    return Schedule(sigmas, DAPSStep(jnp.asarray(grids, jnp.float32), lrs), stochastic=True)


# DAPS release (configs/task/*.yaml, pixel entries; DAPS-1K).
DAPS = register_sampler(Sampler(
    "daps", DAPSConfig, schedule, get_step_fn, step_size="lr", nfe=lambda config: config.steps * config.ode_steps,
    paper={"inpaint": {"lr": 1e-4}, "inpaint_box": {"lr": 5e-5}, "gauss_deblur": {"lr": 1e-4},
           "motion_deblur": {"lr": 5e-5}, "sr4": {"lr": 1e-4}, "phase_retrieval": {"lr": 5e-5}, "hdr": {"lr": 2e-5}}))
