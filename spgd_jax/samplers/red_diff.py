"""RED-Diff (Mardani et al., ICLR 2024, "A variational perspective on solving inverse problems with diffusion
models"): the variational mean mu is optimised by Adam while the timestep runs from t = T down to 1.

Official code NVlabs/RED-diff, algos/reddiff.py (the update below) with _configs/algo/reddiff.yaml
(awd=True, cond_awd=False, obs_weight=1, denoise_term_weight='linear', sigma_x0=0, eta=0). Per image:
  mu_0 = A^+ y                                        (REDDIFF.initialize: H.H_pinv(y_0))
  for i = 0..T-1 over the DDPM timesteps t_i of range(0, 1000, 1000 // T), reversed (ddrm_sigmas: 999..0 at T = 1000,
  950..0 at T = 20; sigma_i = sqrt(1/abar_{t_i} - 1)), the network seeing the integer t_i:
    eps ~ N(0, I);  x_i = mu + sigma_i eps              (code: xt = sqrt(abar) mu + sqrt(1 - abar) eps, over sqrt(abar))
    eps_hat = (x_i - D(x_i; sigma_i)) / sigma_i         (the eps-network's output et, no gradient)
    loss(mu) = mean_m((y - A(mu))^2) / 2 + lambda * sigma_i * mean(sg(eps_hat - eps) * mu)  (loss_obs + w_t loss_noise)
  mean_m: the mean over the m measured entries of y (those with A(1) != 0; for inpainting the kept pixels, as
  the code's H.H returns only those; every entry for blur and resize)
    mu = Adam(lr, betas (0.9, 0.99), eps 1e-8)(mu, grad loss(mu))
  return mu
The weight lambda_t = lambda / SNR_t^(1/2) of the code's 'linear' weighting is lambda * sqrt(1 - abar)/sqrt(abar)
= lambda * sigma in our coordinates (the paper's SNR-based weighting). One denoiser evaluation per step (T = 1000:
1000 NFE, the paper's; the release's yaml defaults to 50 steps and its sample_test.sh to 10), no backpropagation
through the denoiser.

Departures from the official code, and why:
- The means run over ONE image's pixels and measurements (the code's torch .mean() also averages over the batch,
  which only scales the gradient by 1/B; Adam is invariant to that scale up to its eps), so an image's result
  does not depend on the batch it is in.
- We return mu after the last Adam step, as the paper's algorithm does; the code returns x0_pred = mu + sigma_x0 *
  noise computed before the last step (the same mu, one update earlier).
- A^+ y is computed for any linear forward by conjugate gradients (operators.project from x = 0: the least-norm
  solution of A x = y, `init_iterations` CG steps); the code uses each operator's SVD pseudo-inverse, which for
  deblurring zeroes singular values below 3e-2, and hand-written inverses for HDR and phase retrieval. A
  non-linear forward therefore raises ValueError (linear_only).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from spgd_jax.denoisers import trained_timesteps
from spgd_jax.operators import project
from spgd_jax.samplers._checks import check_int, check_number, check_step_size, check_trajectory_every
from spgd_jax.samplers._registry import Sampler, Schedule, register_sampler
from spgd_jax.samplers.ddrm import ddrm_sigmas  # RED-Diff's release steps on DDRM's timesteps
from spgd_jax.samplers.schedule import DDPM_STEPS

__all__ = ["RED_DIFF", "RedDiffConfig", "adam", "get_step_fn", "initial_mean", "mean_start", "schedule"]

ADAM_BETAS = (0.9, 0.99)  # reddiff.py: torch.optim.Adam([mu], lr, betas=(0.9, 0.99)), eps 1e-8 (torch's default)
ADAM_EPS = 1e-8


@dataclasses.dataclass(frozen=True, kw_only=True)
class RedDiffConfig:
    """RED-Diff settings. `lr` (Adam's learning rate, the traced step size) is per task; the official
    NVlabs/RED-diff defaults (_configs/algo/reddiff.yaml: lr 0.1, grad_term_weight 0.25, overridden per task in
    sample_test.sh) are: inpaint lr 0.25 (the in2_20ff line), gauss_deblur lr 0.5 (deblur_gauss line), sr4
    lr 0.1 (sr4 line, no override), motion_deblur lr 0.1 (no line for it: the yaml default); lam 0.25 for all four.

    lam: lambda, the weight of the denoising term (official grad_term_weight); lambda_t = lam * sigma_t.
    steps: T DDPM timesteps, the release's range(0, 1000, 1000 // T) (ddrm_sigmas), one denoiser evaluation each
    (1000: the paper's; the release's yaml says 50, its sample_test.sh 10). init_iterations: CG iterations of
    mu_0 = A^+ y.
    trajectory_every: k > 0 also returns the Tweedie estimate D(x_i; sigma_i) every k steps.
    sigma_max (property): sigma of the first timestep (157.4 at T = 1000); RED-Diff starts from A^+ y and uses
    only the shape of the initial noise that `sample` draws at this level.
    """

    lr: float
    lam: float = 0.25
    steps: int = DDPM_STEPS
    init_iterations: int = 30
    trajectory_every: int = 0

    def __post_init__(self):
        check_step_size("RedDiffConfig", "lr", self.lr)
        check_number("RedDiffConfig", "lam", self.lam, 0.0)
        check_int("RedDiffConfig", "steps", self.steps, 2, DDPM_STEPS, meaning="DDPM timesteps")
        check_int("RedDiffConfig", "init_iterations", self.init_iterations, meaning="CG iterations of A^+ y")
        check_trajectory_every(self.trajectory_every)

    @property
    def sigma_max(self) -> float:
        return float(ddrm_sigmas(self.steps)[0])


def adam(lr: jax.Array | float) -> optax.GradientTransformation:
    """The official optimiser: Adam with betas (0.9, 0.99), eps 1e-8, no weight decay; lr (float32) may be
    traced."""
    return optax.adam(jnp.asarray(lr, jnp.float32), b1=ADAM_BETAS[0], b2=ADAM_BETAS[1], eps=ADAM_EPS)


def initial_mean(forward, y: jax.Array, params: Any, x_shape: tuple[int, ...], iterations: int) -> jax.Array:
    """mu_0 = A^+ y (H, W, C) for ONE image: the least-norm solution of A x = y by `iterations` CG steps.

    ValueError if forward is not linear."""
    return project(forward, params, y, jnp.zeros(x_shape, jnp.float32), iterations)


def get_step_fn(denoiser, forward, config: RedDiffConfig):
    """The per-image RED-Diff step: state (mu (H,W,C), Adam state); step.inputs is the step's
    lambda_t = lam * sigma_t; key draws eps. Returns ((mu, adam state), D(x; sigma), data term)."""
    denoiser = trained_timesteps(denoiser)  # the network sees the trained integer DDPM timesteps, as released
    optimizer = adam(config.lr)

    def loss_fn(mu, residual_noise, weight, y, params):
        # The mean over the MEASURED entries of y, as the official H.H returns only the kept pixels: our
        # inpainting y is full-size with zeros where A(1) = 0, and a mean over all of it made the data term
        # 5x too weak for `inpaint` (20 % kept) and 1.33x for `inpaint_box` (issue 25.1).
        measured = jnp.sum(forward(jnp.ones_like(mu), params) != 0)
        data = jnp.sum((y - forward(mu, params)) ** 2) / (2 * measured)
        return data + weight * jnp.mean(residual_noise * mu), data

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def step(state, step, key, image):
        mu, opt_state = state
        y, params = image
        eps = jax.random.normal(key, mu.shape, mu.dtype)
        x = mu + step.sigma * eps
        x0_hat = denoiser(x[None], step.sigma[None])[0]
        residual_noise = jax.lax.stop_gradient((x - x0_hat) / step.sigma - eps)
        grad, data = grad_fn(mu, residual_noise, step.inputs, y, params)
        updates, opt_state = optimizer.update(grad, opt_state, mu)
        return (optax.apply_updates(mu, updates), opt_state), x0_hat, data

    return step


def schedule(config: RedDiffConfig) -> Schedule:
    """The release's timesteps range(0, 1000, 1000 // T) (ddrm_sigmas(T)) and lambda_t = lam * sigma_t per
    step; every step draws eps."""
    sigmas = ddrm_sigmas(config.steps)
    return Schedule(sigmas, jnp.asarray(config.lam * sigmas[:-1], jnp.float32), stochastic=True)


def mean_start(denoiser, forward, y, x_init, config: RedDiffConfig, params):
    """The batched state (mu_0 = A^+ y, Adam's initial state); x_init gives only the image shape."""
    mu = jax.vmap(lambda y_b, p: initial_mean(forward, y_b, p, x_init.shape[1:], config.init_iterations))(y, params)
    return mu, jax.vmap(adam(config.lr).init)(mu)


# PAPER: NVlabs/RED-diff sample_test.sh; motion blur has no line there: the yaml default 0.1. TUNED: the lr picked
# by the Table 1 job (benchmarks/table1_cpu.sh; benchmarks/results/quality_cpu-2core-table1-8img.md, its sweep
# table) on 4 tuning faces, the grid widened past its edge: the release's values leave the default prior's
# samples far from the measurement. Inpainting 27.35 dB at 0.03125 against 21.49 at 0.25 (25.82 on the 8 test
# faces); Gaussian deblurring 32.67 at 0.03125 against 25.65 at 0.5, below the blurred image's 27.44 (31.35 on
# the test faces); motion deblurring 31.07 at 0.05 against 30.78 at 0.1 (29.89 on the test faces); SR x4 27.11 at
# 0.0125 against 26.28 at 0.1 (a flat top: 27.09 / 27.07 at half / twice that). Box inpainting takes random
# inpainting's lr, as in the release (the demo face: 16.12 dB at 0.03125 against 13.59 at 0.25 and the
# grey-filled measurement's 16.09).
RED_DIFF = register_sampler(Sampler(
    "red_diff", RedDiffConfig, schedule, get_step_fn, init=mean_start, output=lambda state: state[0],
    step_size="lr", linear_only=True,
    paper={"inpaint": {"lr": 0.25}, "inpaint_box": {"lr": 0.25}, "gauss_deblur": {"lr": 0.5},
           "motion_deblur": {"lr": 0.1}, "sr4": {"lr": 0.1}},
    tuned={"inpaint": {"lr": 0.03125}, "inpaint_box": {"lr": 0.03125}, "gauss_deblur": {"lr": 0.03125},
           "motion_deblur": {"lr": 0.05}, "sr4": {"lr": 0.0125}}))
