"""SPGD: Stabilized Progressive Gradient Diffusion (SPEC section 3, paper Algorithm 1).

Per outer step i (sigma = t_i), per image, starting from x^0 = x_i:
  for j = 0..N-1:  g_j = grad_x ||A(D(x^j; t_i)) - y||^2;  m_j = ADM(g_j, m_{j-1});  x^{j+1} = x^j - eta_i m_j
  x_{i+1} = x^N + (1 - t_{i+1}/t_i) * (D(x^{N-1}; t_i) - x^{N-1})
The Euler step reuses the Tweedie estimate of the last warm-up iteration: T * N denoiser evaluations.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spgd_jax.samplers import diagnostics as diag
from spgd_jax.samplers._checks import check_bool, check_int, check_number, check_step_size, check_trajectory_every
from spgd_jax.samplers._loop import Recorded
from spgd_jax.samplers._registry import Sampler, Schedule, register_sampler
from spgd_jax.samplers.schedule import check_schedule, edm_sigmas

__all__ = ["ADM_MODES", "PAPER_LR", "SPGD", "SPGDConfig", "TUNED_SPGD", "WarmupState", "adm_update", "get_step_fn",
           "get_warmup_fn", "learning_rates", "lr_decay", "schedule"]

ADM_MODES = ("paper", "off", "reference_cosine")
COSINE_EPS = 1e-8  # as torch.nn.functional.cosine_similarity: a.b / (max(|a|, eps) * max(|b|, eps))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SPGDConfig:
    """SPGD settings (paper defaults). `lr` (eta) is per task: paper Table 5, e.g. 2.5 random inpainting.

    steps: T outer steps. warmup: N warm-up iterations per outer step (N = 1 with adm='off' is the
    paper's "baseline"). beta: ADM base momentum. lr_min_ratio: eta_i = lr * (1 + (i/T)(lr_min_ratio - 1)).
    sigma_max, sigma_min, rho: the EDM schedule. trajectory_every: k > 0 also returns x0_hat every k outer
    steps (0 = off). diagnostics: also return gradient angles per outer step (SampleResult.diagnostics,
    see spgd_jax.samplers.diagnostics; the result is unchanged).
    adm, with cos(a, b) = a.b / (max(|a|, 1e-8) max(|b|, 1e-8)) as torch's cosine_similarity:
      'paper'            m_0 = g_0, m_j = a_j beta m_{j-1} + (1 - a_j beta) g_j, a_j = (1 + cos(g_j, m_{j-1})) / 2
                         with the cosine over the whole image (Eq. 13); the update x^{j+1} = x^j - eta_i m_j.
      'off'              the update uses the raw gradient: x^{j+1} = x^j - eta_i g_j. The reference code computes
                         m_j and discards it, so 'off' reproduces the reference code's updates.
      'reference_cosine' m_j as in 'paper' but a_j = (1 + mean over pixels (h, w) of cos(g_j[h, w, :],
                         m_{j-1}[h, w, :])) / 2, the reference code's cosine (torch dim=1 of NCHW: over channels),
                         one a_j per image; the update uses m_j.
    """

    lr: float
    steps: int = 100
    warmup: int = 5
    beta: float = 0.9
    lr_min_ratio: float = 0.01
    sigma_max: float = 100.0
    sigma_min: float = 0.1
    rho: float = 7.0
    adm: str = "paper"
    trajectory_every: int = 0
    diagnostics: bool = False

    def __post_init__(self):
        check_schedule(self.steps, self.sigma_max, self.sigma_min, self.rho)
        check_bool("SPGDConfig", "diagnostics", self.diagnostics)
        check_step_size("SPGDConfig", "lr", self.lr)
        check_number("SPGDConfig", "beta", self.beta)
        if not 0 <= self.beta < 1:
            raise ValueError(f"SPGDConfig.beta must be in [0, 1), got {self.beta}")
        check_number("SPGDConfig", "lr_min_ratio", self.lr_min_ratio, 0.0, 1.0)
        check_int("SPGDConfig", "warmup", self.warmup)
        if self.adm not in ADM_MODES:
            raise ValueError(f"SPGDConfig.adm must be one of {ADM_MODES}, got {self.adm!r}")
        check_trajectory_every(self.trajectory_every)


def lr_decay(config: SPGDConfig) -> np.ndarray:
    """eta_i / lr = 1 + (i/T) * (lr_min_ratio - 1), i = 0..T-1; host float64, shape (T,)."""
    ratio = np.arange(config.steps, dtype=np.float64) / config.steps
    return 1.0 + ratio * (config.lr_min_ratio - 1.0)


def learning_rates(config: SPGDConfig) -> np.ndarray:
    """eta_i = lr * (1 + (i/T) * (lr_min_ratio - 1)), i = 0..T-1; host float64, shape (T,)."""
    return config.lr * lr_decay(config)


def schedule(config: SPGDConfig) -> Schedule:
    """The EDM noise levels and the per-step rates eta_i = float32(lr) * float32(eta_i / lr) (lr may be traced:
    the same bits either way)."""
    sigmas = edm_sigmas(config.steps, config.sigma_max, config.sigma_min, config.rho)
    return Schedule(sigmas, jnp.asarray(config.lr, jnp.float32) * jnp.asarray(lr_decay(config), jnp.float32))


def _cosine(a: jax.Array, b: jax.Array, axis) -> jax.Array:
    norm_a = jnp.maximum(jnp.linalg.norm(a, axis=axis), COSINE_EPS)
    norm_b = jnp.maximum(jnp.linalg.norm(b, axis=axis), COSINE_EPS)
    return jnp.sum(a * b, axis=axis) / (norm_a * norm_b)


def adm_update(
    grad: jax.Array, momentum: jax.Array, j: jax.Array, beta: float, mode: str
) -> tuple[jax.Array, jax.Array]:
    """Adaptive directional momentum for ONE image (H, W, C): returns (update direction, new momentum m_j).

    j is the warm-up iteration (m_0 = g_0 at j = 0); see SPGDConfig for the modes.
    """
    if mode == "off":
        return grad, momentum
    if mode == "paper":
        cosine = _cosine(grad, momentum, axis=None)
    else:  # reference_cosine: channels at each pixel, then the mean over pixels
        cosine = jnp.mean(_cosine(grad, momentum, axis=-1))
    alpha = (1.0 + cosine) / 2.0
    smoothed = alpha * beta * momentum + (1.0 - alpha * beta) * grad
    momentum = jnp.where(j == 0, grad, smoothed)
    return momentum, momentum


class WarmupState(NamedTuple):
    """Carry of the warm-up loop for one image; after N iterations x = x^N, x_eval = x^{N-1}."""

    x: jax.Array  # x^j (H, W, C)
    momentum: jax.Array  # m_{j-1} (H, W, C), the ADM state
    x_eval: jax.Array  # the last point where the likelihood was evaluated
    x0_hat: jax.Array  # D(x_eval; t_i)
    losses: jax.Array  # (N,) L(x^j) for the iterations done so far
    tracker: diag.Tracker | None  # gradient angles (config.diagnostics) or None


def get_warmup_fn(denoiser, forward, config: SPGDConfig):
    """warmup(x (H,W,C), sigma (), eta (), y, params) -> WarmupState after N iterations, for one image."""

    def likelihood(x, sigma, y, params):
        x0_hat = denoiser(x[None], sigma[None])[0]
        return jnp.sum((forward(x0_hat, params) - y) ** 2), x0_hat

    likelihood_and_grad = jax.value_and_grad(likelihood, has_aux=True)

    def warmup(x, sigma, eta, y, params) -> WarmupState:
        def warmup_step(j, state: WarmupState) -> WarmupState:
            (loss, x0_hat), grad = likelihood_and_grad(state.x, sigma, y, params)
            direction, momentum = adm_update(grad, state.momentum, j, config.beta, config.adm)
            tracker = state.tracker
            if tracker is not None:
                tracker = diag.track(tracker, j, grad, direction, x0_hat - state.x)
            return WarmupState(state.x - eta * direction, momentum, state.x, x0_hat, state.losses.at[j].set(loss),
                               tracker)

        zeros = jnp.zeros_like(x)
        tracker = diag.init_tracker(x) if config.diagnostics else None
        init = WarmupState(x, zeros, x, zeros, jnp.zeros((config.warmup,), x.dtype), tracker)
        return jax.lax.fori_loop(0, config.warmup, warmup_step, init)

    return warmup


def get_step_fn(denoiser, forward, config: SPGDConfig):
    """The per-image outer step: warm-up, then the Euler step (SPEC 3.3); step.inputs is eta_i."""
    warmup = get_warmup_fn(denoiser, forward, config)

    def step(x, step, _key, image):
        y, params = image
        state = warmup(x, step.sigma, step.inputs, y, params)
        losses = state.losses
        if state.tracker is not None:
            losses = Recorded(losses, diag.step_means(state.tracker, config.warmup))
        return state.x + step.coefficient * (state.x0_hat - state.x_eval), state.x0_hat, losses

    return step



# Paper Table 5 (FFHQ); phase retrieval and HDR from the reference configs. The reference's
# box-inpainting config carries another method's settings, so it uses random inpainting's.
PAPER_LR = {
    "inpaint": 2.5,
    "inpaint_box": 2.5,
    "gauss_deblur": 1.5,
    "motion_deblur": 1.0,
    "sr4": 8.0,
    "phase_retrieval": 2.0,
    "hdr": 1.0,
}
# SPGD settings tuned for the default 64 px prior on its validation split: per task, the SPGDConfig
# fields that differ from the paper's (lr from PAPER_LR, lr_min_ratio 0.01); a task not listed keeps them.
# Measurements: benchmarks/results/spgd_schedule_probe.md (and spgd_lr_probe.md before it).
# - The paper's linear decay to 1 % of eta leaves the deblurring tasks' last steps too weak to fit the
#   measurement (final residual RMS 0.02, twice sigma_y): a constant rate (lr_min_ratio 1) fits it
#   (0.0105) and gains +3.6 dB on Gaussian deblurring (validation faces 50-52, 28.71 -> 32.29 dB).
# - Gaussian deblurring diverges at the paper's lr 1.5 on 10 of 10 faces: the blur passes the mean
#   colour unchanged, so gradient steps on ||A x - y||^2 oscillate and grow once 2 eta > 2.
# - Box inpainting diverges at lr 2.5 on 6 of 6 faces, at outer step 6 (benchmarks/results/task_probe.md):
#   the largest eigenvalue lambda of J^T J, J the Jacobian of x -> A(D(x; t)), is about 0.74 from the
#   first steps on, so a warm-up step grows the residual once eta > 1 / lambda = 1.35. lr 1.2 (validation
#   faces 50-55: 23.95 dB, none diverged; 0.6: 23.78, 0.9: 23.89; harmonic inpainting 20.23).
# - HDR: from sigma_max 100 the default prior's Tweedie estimates are noise of std 1.4 (0.36 at t = 20, 0.15
#   at t = 5), so the clip saturates 72 % of their pixels, where the likelihood has no gradient; the
#   image drifts to a wrong colour and stays saturated (faces 50-55 at the paper's lr 1: 12.09 dB, residual
#   RMS 0.54, y / 2: 17.05 dB; lr 0.2 or 0.4 no better). Starting at sigma_max 10 (x_T is still noise,
#   std 10 over images of std 0.5) fixes it: constant lr 0.1 gives 23.16 dB on faces 50-53 (decaying lr
#   0.1: 22.88, 0.2: 22.57; sigma_max 20, lr 0.2: 22.44; y / 2: 17.03). lambda grows from 1.3 (t = 100) to
#   10 (t = 0.27), so the rate must stay near 0.1.
# - Phase retrieval (unsupported by the default prior, presets.UNSUPPORTED_BY_DEFAULT_PRIOR): the same start at sigma_max 10 lifts it from 10.11 dB (paper's lr
#   2, faces 50-53) to 17.15 dB at lr 1 (decaying; 0.25: 14.88, 0.5: 16.45, 2: 17.10, 4: 15.12), but two of
#   the four faces stay unrecovered at every setting (9-13 dB) while their residual fits sigma_y.
TUNED_SPGD: dict[str, dict[str, float]] = {
    "gauss_deblur": {"lr": 0.8, "lr_min_ratio": 1.0},
    "motion_deblur": {"lr": 0.8, "lr_min_ratio": 1.0},
    "inpaint_box": {"lr": 1.2},
    "hdr": {"lr": 0.1, "lr_min_ratio": 1.0, "sigma_max": 10.0},
    "phase_retrieval": {"lr": 1.0, "sigma_max": 10.0},
}

SPGD = register_sampler(Sampler(
    "spgd", SPGDConfig, schedule, get_step_fn, step_size="lr", nfe=lambda config: config.steps * config.warmup,
    paper={task: {"lr": lr} for task, lr in PAPER_LR.items()}, tuned=TUNED_SPGD))
