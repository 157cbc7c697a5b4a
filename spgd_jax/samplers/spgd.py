"""SPGD: Stabilized Progressive Gradient Diffusion (SPEC section 3, paper Algorithm 1).

Per outer step i (sigma = t_i), per image, starting from x^0 = x_i:
  for j = 0..N-1:  g_j = grad_x ||A(D(x^j; t_i)) - y||^2;  m_j = ADM(g_j, m_{j-1});  x^{j+1} = x^j - eta_i m_j
  x_{i+1} = x^N + (1 - t_{i+1}/t_i) * (D(x^{N-1}; t_i) - x^{N-1})
The Euler step reuses the Tweedie estimate of the last warm-up iteration: T * N denoiser evaluations.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spgd_jax.samplers import diagnostics as diag
from spgd_jax.samplers._loop import SampleResult, check_trajectory_every, run_schedule
from spgd_jax.samplers.schedule import check_schedule, edm_sigmas

__all__ = [
    "ADM_MODES",
    "SPGDConfig",
    "WarmupState",
    "adm_update",
    "learning_rates",
    "get_warmup_fn",
    "get_step_fn",
    "spgd",
]

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
        if not isinstance(self.diagnostics, bool):
            raise TypeError(f"SPGDConfig.diagnostics must be True or False, got {self.diagnostics!r}")
        for name in ("lr", "beta", "lr_min_ratio"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise TypeError(f"SPGDConfig.{name} must be a finite number, got {value!r}")
        if self.lr <= 0:
            raise ValueError(f"SPGDConfig.lr must be > 0, got {self.lr}")
        if not 0 <= self.beta < 1:
            raise ValueError(f"SPGDConfig.beta must be in [0, 1), got {self.beta}")
        if not 0 <= self.lr_min_ratio <= 1:
            raise ValueError(f"SPGDConfig.lr_min_ratio must be in [0, 1], got {self.lr_min_ratio}")
        if not isinstance(self.warmup, int) or isinstance(self.warmup, bool) or self.warmup < 1:
            raise ValueError(f"SPGDConfig.warmup must be an int >= 1, got {self.warmup!r}")
        if self.adm not in ADM_MODES:
            raise ValueError(f"SPGDConfig.adm must be one of {ADM_MODES}, got {self.adm!r}")
        check_trajectory_every(self.trajectory_every)


def learning_rates(config: SPGDConfig) -> np.ndarray:
    """eta_i = lr * (1 + (i/T) * (lr_min_ratio - 1)), i = 0..T-1; host float64, shape (T,)."""
    ratio = np.arange(config.steps, dtype=np.float64) / config.steps
    return config.lr * (1.0 + ratio * (config.lr_min_ratio - 1.0))


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
    """warmup(x (H,W,C), sigma (), lr (), y, params) -> WarmupState after N iterations, for one image."""

    def likelihood(x, sigma, y, params):
        x0_hat = denoiser(x[None], sigma[None])[0]
        return jnp.sum((forward(x0_hat, params) - y) ** 2), x0_hat

    likelihood_and_grad = jax.value_and_grad(likelihood, has_aux=True)

    def warmup(x, sigma, lr, y, params) -> WarmupState:
        def warmup_step(j, state: WarmupState) -> WarmupState:
            (loss, x0_hat), grad = likelihood_and_grad(state.x, sigma, y, params)
            direction, momentum = adm_update(grad, state.momentum, j, config.beta, config.adm)
            tracker = state.tracker
            if tracker is not None:
                tracker = diag.track(tracker, j, grad, direction, x0_hat - state.x)
            return WarmupState(state.x - lr * direction, momentum, state.x, x0_hat, state.losses.at[j].set(loss),
                               tracker)

        zeros = jnp.zeros_like(x)
        tracker = diag.init_tracker(x) if config.diagnostics else None
        init = WarmupState(x, zeros, x, zeros, jnp.zeros((config.warmup,), x.dtype), tracker)
        return jax.lax.fori_loop(0, config.warmup, warmup_step, init)

    return warmup


def get_step_fn(denoiser, forward, config: SPGDConfig):
    """The per-image outer step for loop.run_schedule: warm-up, then the Euler step (SPEC 3.3)."""
    warmup = get_warmup_fn(denoiser, forward, config)

    def step(x, step, _key, image):
        y, params = image
        state = warmup(x, step.sigma, step.inputs, y, params)
        losses = state.losses
        if state.tracker is not None:
            losses = (losses, diag.step_means(state.tracker, config.warmup))
        return state.x + step.coefficient * (state.x0_hat - state.x_eval), state.x0_hat, losses

    return step


def spgd(
    denoiser: Callable[[jax.Array, jax.Array], jax.Array],
    forward: Callable[[jax.Array, Any], jax.Array],
    y: jax.Array,
    x_init: jax.Array,
    config: SPGDConfig,
    params: Any = None,
    progress: Callable[[int], None] | None = None,
    *,
    keys: jax.Array | None = None,
    lr: jax.Array | float | None = None,
) -> SampleResult:
    """SPGD from the initial noise x_init (B, H, W, C) ~ N(0, sigma_max^2 I); see spgd_jax.samplers._sample.sample.

    keys: the per-image loop keys of the registry's run contract; SPGD is deterministic and ignores them.
    lr: a scalar that replaces config.lr and may be traced (spgd_jax.samplers.sweep vmaps over it); either way
    eta_i = float32(lr) * float32(eta_i / lr), so a traced lr gives the bits of the same static one."""
    sigmas = edm_sigmas(config.steps, config.sigma_max, config.sigma_min, config.rho)
    decay = jnp.asarray(learning_rates(dataclasses.replace(config, lr=1.0)), jnp.float32)
    lrs = jnp.asarray(config.lr if lr is None else lr, jnp.float32) * decay
    step = get_step_fn(denoiser, forward, config)
    result = run_schedule(step, x_init, sigmas, lrs, (y, params), config.trajectory_every, progress)
    if config.diagnostics and isinstance(result, SampleResult):  # not for a segment's SegmentResult
        losses, angles = result.losses
        result = result._replace(losses=losses, diagnostics=angles)
    return result
