"""DDRM (Kawar et al. 2022, "Denoising Diffusion Restoration Models") in the spectral space of A = U S V^T.

Needs a forward operator that carries its SVD (`spgd_jax.operators.svd(task_operator)`, an SVDForward);
any other forward raises a ValueError (motion deblurring has no SVD: the SPGD paper's Table 1 shows '-').
All quantities are in the denoiser's variance-exploding coordinates x = x0 + sigma * n (the paper's x_t
with sigma_t = sqrt(1 - abar_t) / sqrt(abar_t), its Section 3.1); spectral coefficients are V^T x, one per
pixel and channel; s_i the singular values (0 where A measures nothing); ybar_i = (U^T y)_i / s_i. Per image:

  init (Eq. 8, the release's efficient_generalized_steps): with n ~ N(0, I) (x_init / sigma_0),
      s_i sigma_0 > sigma_y:  xbar_i = ybar_i + sqrt(sigma_0^2 - sigma_y^2 / s_i^2) n_i,   else xbar_i = sigma_0 n_i
      x_0 = V xbar
  step i = 0..T-1 (Eq. 7), from sigma = t_i to sigma' = t_{i+1}, noise n ~ N(0, I) from the loop's key:
      x0_hat = D(x_i; t_i);  c = V^T x0_hat;  e = V^T (x_i - x0_hat) / t_i
      s_i = 0:                  xbar'_i = c_i + sqrt(1 - eta^2) sigma' e_i + eta sigma' n_i
      s_i sigma' <  sigma_y:    xbar'_i = c_i + sqrt(1 - eta^2) sigma' (ybar_i - c_i) / (sigma_y / s_i) + eta sigma' n_i
      s_i sigma' >= sigma_y:    xbar'_i = (1 - eta_b) c_i + eta_b ybar_i + sqrt(sigma'^2 - sigma_y^2 eta_b^2 / s_i^2) n_i
      x_{i+1} = V xbar'
  T denoiser evaluations (the SPGD paper: 20 NFEs, eta = 0.85, eta_b = 1, the DDRM paper's recommendation).

Schedule: the release's DDIM respacing of the 1000-step linear-beta DDPM, timesteps k = 0, s, 2s, ..., with
s = 1000 // T (k = 950, 900, ..., 0 for T = 20), then sigma = 0. At sigma_y = 0 the last step (sigma' = 0)
takes the third case, so A x_T = y exactly (with eta_b = 1).

Departures from the release, and why:
- The case rule follows the paper's Eq. 7 (s_i sigma' >= sigma_y: third case; s_i = 0: first case); the
  release uses strict inequalities, which leave the boundary (and, at sigma_y = 0, the last step) to the
  first case, and sends zero singular values with sigma_y > 0 to the second.
- Singular values below `singular_floor` count as 0 (no measurement). The release zeroes the 1-D singular
  values below 3e-2 of its blur and bicubic operators (ZERO in svd_replacement.py); we floor the 2-D
  products of our exact factors, so the operator itself (forward, the measurements) is unchanged.
- The release scales its initial state into VP coordinates by 1/sigma_0 instead of sqrt(abar_0), a
  relative difference of 1 - sqrt(1 - abar_0) ~ 5e-5 at k = 950; we use the exact VE state.
- `losses` holds ||A(x0_hat) - y||^2 per step (the release records none).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from spgd_jax import operators
from spgd_jax.operators import SVDForward
from spgd_jax.samplers._checks import check_number, check_trajectory_every
from spgd_jax.samplers._registry import Sampler, Schedule, register_sampler
from spgd_jax.samplers.schedule import DDPM_STEPS

__all__ = ["DDRM", "DDRMConfig", "ddrm_sigmas", "get_step_fn", "initial_state", "schedule", "spectral_start"]


def ddrm_sigmas(steps: int) -> np.ndarray:
    """DDRM's noise levels: sigma_k = sqrt(1/abar_k - 1) at k = j * (1000 // steps), j = steps-1..0, then 0
    (the release's range(0, 1000, 1000 // T), which has more than T entries when T does not divide 1000).

    float64, shape (steps + 1,); betas = linspace(1e-4, 0.02, 1000) (guided-diffusion's linear schedule)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= DDPM_STEPS:
        raise ValueError(f"steps must be an int in [1, {DDPM_STEPS}], got {steps!r}")
    alpha_bar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, DDPM_STEPS, dtype=np.float64))
    timesteps = (np.arange(steps) * (DDPM_STEPS // steps))[::-1]  # the release's range(0, 1000, 1000 // T)
    return np.append(np.sqrt(1.0 / alpha_bar[timesteps] - 1.0), 0.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DDRMConfig:
    """DDRM settings (the same for every task in the SPGD paper).

    steps: T denoiser evaluations (20). eta: eta of Eq. 7 (0.85). eta_b: eta_b of Eq. 7 (1.0). sigma_y: the
    measurement noise std in [-1, 1] units (0.01 for the four core tasks: operators.get(task, size).sigma_y).
    singular_floor: singular values below it count as 0 (3e-2, the release's ZERO). trajectory_every: k > 0
    also returns x0_hat every k steps. sigma_max (property): the first noise level, sigma at k = 950 for T = 20.
    """

    steps: int = 20
    eta: float = 0.85
    eta_b: float = 1.0
    sigma_y: float = 0.01
    singular_floor: float = 3e-2
    trajectory_every: int = 0

    def __post_init__(self):
        ddrm_sigmas(self.steps)  # validates steps
        check_number("DDRMConfig", "eta", self.eta, 0.0, 1.0)
        check_number("DDRMConfig", "eta_b", self.eta_b, 0.0, 1.0)
        check_number("DDRMConfig", "sigma_y", self.sigma_y, 0.0)
        check_number("DDRMConfig", "singular_floor", self.singular_floor, 0.0)
        check_trajectory_every(self.trajectory_every)

    @property
    def sigma_max(self) -> float:
        return float(ddrm_sigmas(self.steps)[0])


def _check_svd(forward) -> SVDForward:
    if not isinstance(forward, SVDForward):
        raise ValueError("DDRM needs the SVD of the forward operator: pass spgd_jax.operators.svd(operator) (for "
                         "inpaint, inpaint_box, gauss_deblur, sr4) or another SVDForward; motion deblurring and "
                         f"non-linear operators have none (got {forward!r})")
    return forward


def _spectrum(forward: SVDForward, y, params, x_shape, floor):
    """(s, ybar): singular values (0 below floor) and Sigma^+ U^T y on the (H, W, C) spectral grid."""
    s = jnp.broadcast_to(forward.singulars(params, x_shape), x_shape)
    s = jnp.where(s >= floor, s, 0.0) if floor > 0 else s
    measured = s > 0
    ybar = jnp.where(measured, forward.ut(y, params, x_shape) / jnp.where(measured, s, 1.0), 0.0)
    return s, ybar


def initial_state(forward: SVDForward, y, params, noise, sigma, sigma_y, floor):
    """Eq. 8 for ONE image: V xbar with xbar_i = ybar_i + sqrt(sigma^2 - sigma_y^2/s_i^2) n_i where
    s_i sigma > sigma_y, else sigma n_i. noise: n ~ N(0, I) of the image's shape (spectral coordinates)."""
    s, ybar = _spectrum(forward, y, params, noise.shape, floor)
    informative = s * sigma > sigma_y
    std = jnp.sqrt(jnp.maximum(sigma**2 - sigma_y**2 / jnp.where(informative, s, 1.0) ** 2, 0.0))
    return forward.v(jnp.where(informative, ybar + std * noise, sigma * noise), params)


def get_step_fn(denoiser, forward, config: DDRMConfig):
    """The per-image DDRM step (Eq. 7); needs a key per step (the noise)."""
    forward = _check_svd(forward)
    eta, eta_b, sigma_y, floor = config.eta, config.eta_b, config.sigma_y, config.singular_floor

    def step(x, step, key, image):
        y, params = image
        sigma, sigma_next = step.sigma, step.sigma_next
        x0_hat = denoiser(x[None], sigma[None])[0]
        s, ybar = _spectrum(forward, y, params, x.shape, floor)
        c = forward.vt(x0_hat, params)
        e = forward.vt((x - x0_hat) / sigma, params)
        noise = jax.random.normal(key, x.shape, x.dtype)
        deterministic = math.sqrt(1.0 - eta**2) * sigma_next
        unmeasured = c + deterministic * e + eta * sigma_next * noise
        std = jnp.sqrt(jnp.maximum(sigma_next**2 - (sigma_y * eta_b / jnp.where(s > 0, s, 1.0)) ** 2, 0.0))
        spectral = (1.0 - eta_b) * c + eta_b * ybar + std * noise  # s_i sigma' >= sigma_y (always when sigma_y = 0)
        if sigma_y > 0:
            noisier_y = c + deterministic * (ybar - c) * s / sigma_y + eta * sigma_next * noise
            spectral = jnp.where(s * sigma_next >= sigma_y, spectral, noisier_y)
        spectral = jnp.where(s == 0, unmeasured, spectral)
        return forward.v(spectral, params), x0_hat, jnp.sum((forward(x0_hat, params) - y) ** 2)

    return step


def schedule(config: DDRMConfig) -> Schedule:
    """ddrm_sigmas(T); every step draws noise."""
    return Schedule(ddrm_sigmas(config.steps), stochastic=True)


def spectral_start(denoiser, forward, y, x_init, config: DDRMConfig, params):
    """The batched Eq. 8 start from x_init = sigma_0 n (B, H, W, C); forward: an SVDForward, else ValueError."""
    forward = _check_svd(forward)
    sigma_0 = float(ddrm_sigmas(config.steps)[0])
    return jax.vmap(lambda y_b, p_b, x_b: initial_state(forward, y_b, p_b, x_b / sigma_0, sigma_0, config.sigma_y,
                                                        config.singular_floor))(y, params, x_init)


DDRM = register_sampler(Sampler(
    "ddrm", DDRMConfig, schedule, get_step_fn, init=spectral_start, linear_only=True, forward=operators.svd,
    # eta 1 instead of the paper's 0.85 with the default prior, validation faces 50-53 (tuning split): it gains
    # on inpainting (22.1 vs 17.8 dB; 100 steps at 0.85: 24.4, so the 20-step budget is the limit) and SR x4
    # (26.2 vs 25.5 dB) and loses on Gaussian deblurring (31.2 vs 32.3 dB), which keeps 0.85.
    tuned={"inpaint": {"eta": 1.0}, "sr4": {"eta": 1.0}}))
