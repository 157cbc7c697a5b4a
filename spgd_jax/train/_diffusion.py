"""The DDPM maths of training: the noise schedule, the forward process, the loss, monitoring samples.

Host constants are float64 numpy; on the device they are used in float32. Images are (B, H, W, C) in
[-1, 1]; t is an int timestep in [0, T).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from spgd_jax.denoisers import make_denoiser
from spgd_jax.models.adm import UNet
from spgd_jax.samplers import EulerConfig, run


@dataclass(frozen=True)
class Diffusion:
    """DDPM constants for `num_timesteps` steps; arrays are float64 numpy (T,)."""

    betas: np.ndarray
    alphas_cumprod: np.ndarray

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)


def linear_schedule(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Diffusion:
    """guided-diffusion's "linear" schedule: betas linearly from beta_start to beta_end
    (both scaled by 1000 / num_timesteps), alphas_cumprod = cumprod(1 - betas)."""
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    scale = 1000.0 / num_timesteps
    betas = np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)
    return Diffusion(betas=betas, alphas_cumprod=np.cumprod(1.0 - betas))


def q_sample(abar_t: jax.Array, x0: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; abar_t (B,), x0/noise (B, H, W, C)."""
    a = abar_t[:, None, None, None]
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise


def _normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x) of 8-bit data x in [-1, 1] (bins of width 2/255) under N(mean, exp(log_scale)^2)."""
    inv_std = jnp.exp(-log_scale)
    upper = inv_std * (x - mean + 1.0 / 255.0)
    lower = inv_std * (x - mean - 1.0 / 255.0)
    log_cdf_upper = jax.scipy.special.log_ndtr(upper)
    log_sf_lower = jax.scipy.special.log_ndtr(-lower)
    log_delta = jnp.log(jnp.maximum(jax.scipy.special.ndtr(upper) - jax.scipy.special.ndtr(lower), 1e-12))
    return jnp.where(x < -0.999, log_cdf_upper, jnp.where(x > 0.999, log_sf_lower, log_delta))


def vb_terms_bpd(diffusion: Diffusion, eps: jax.Array, var_values: jax.Array, x0: jax.Array,
                 x_t: jax.Array, t: jax.Array) -> jax.Array:
    """Per-image variational-bound term L_t in bits/dim for the learned-variance output (B,).

    eps, var_values, x0, x_t: (B, H, W, C); t int (B,).  var_values in [-1, 1] interpolates the log
    variance between the clipped posterior variance and beta_t (guided-diffusion's "learned_range").
    L_0 is the discretised decoder NLL, L_t (t > 0) the KL to the true posterior q(x_{t-1}|x_t, x0).
    """
    betas, abar = diffusion.betas, diffusion.alphas_cumprod
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    post_logvar = np.log(np.append(post_var[1], post_var[1:]))
    coef_x0 = betas * np.sqrt(abar_prev) / (1.0 - abar)
    coef_xt = (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar)

    def at(table):
        return jnp.asarray(table, jnp.float32)[t][:, None, None, None]

    true_mean = at(coef_x0) * x0 + at(coef_xt) * x_t
    true_logvar = at(post_logvar)
    x0_hat = at(np.sqrt(1.0 / abar)) * x_t - at(np.sqrt(1.0 / abar - 1.0)) * eps
    model_mean = at(coef_x0) * x0_hat + at(coef_xt) * x_t
    frac = (var_values + 1.0) / 2.0
    model_logvar = frac * at(np.log(betas)) + (1.0 - frac) * true_logvar
    kl = jnp.mean(_normal_kl(true_mean, true_logvar, model_mean, model_logvar), axis=(1, 2, 3))
    nll = -jnp.mean(_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar), axis=(1, 2, 3))
    return jnp.where(t == 0, nll, kl) / np.log(2.0)


def parse_loss_weighting(spec: str) -> float | None:
    """The gamma of a loss weighting "min-snr-G" (G > 0), None for "eps" (no weighting); ValueError otherwise."""
    if spec == "eps":
        return None
    gamma = None
    if isinstance(spec, str) and spec.startswith("min-snr-"):
        try:
            gamma = float(spec[len("min-snr-"):])
        except ValueError:
            pass
    if gamma is None or not gamma > 0 or not np.isfinite(gamma):
        raise ValueError(f"loss_weighting must be 'eps' or 'min-snr-G' with G > 0 (e.g. 'min-snr-5'), got {spec!r}")
    return gamma


def loss_weights(diffusion: Diffusion, t: jax.Array, gamma: float | None) -> jax.Array | None:
    """Min-SNR-gamma weights of the eps MSE at timesteps t (B,): min(SNR_t, gamma) / SNR_t with
    SNR_t = abar_t / (1 - abar_t) (1 where SNR_t <= gamma: the noisier timesteps), None for gamma None."""
    if gamma is None:
        return None
    abar = np.asarray(diffusion.alphas_cumprod, np.float64)
    snr = abar / (1.0 - abar)
    return jnp.asarray(np.minimum(snr, gamma) / snr, jnp.float32)[t]


def per_image_loss(model: UNet, diffusion: Diffusion, params, x0: jax.Array, t: jax.Array,
                   noise: jax.Array, dropout_key: jax.Array | None, mse_weights: jax.Array | None = None) -> jax.Array:
    """DDPM training loss per image (B,): eps MSE (times mse_weights (B,), if given) (+ VB term with learn_sigma).

    x0, noise (B, H, W, C) in [-1, 1] / N(0, 1); t int (B,) in [0, T); dropout on iff dropout_key.
    """
    abar = jnp.asarray(diffusion.alphas_cumprod, jnp.float32)[t]
    x_t = q_sample(abar, x0, noise)
    train = dropout_key is not None
    out = model.apply({"params": params}, x_t, t.astype(jnp.float32), train=train,
                      rngs={"dropout": dropout_key} if train else None)
    c = x0.shape[-1]
    eps = out[..., :c]
    loss = jnp.mean((noise - eps) ** 2, axis=(1, 2, 3))
    if mse_weights is not None:
        loss = mse_weights * loss
    if model.config.learn_sigma:
        loss = loss + vb_terms_bpd(diffusion, jax.lax.stop_gradient(eps), out[..., c:], x0, x_t, t)
    return loss


def sample_images(model: UNet, params, key: jax.Array, num_images: int, num_steps: int) -> jax.Array:
    """Unconditional samples (num_images, S, S, C) for monitoring: the project's EDM Euler sampler
    on the VP-preconditioned denoiser (the path SPGD uses), `num_steps` network evaluations."""
    cfg = model.config
    euler_config = EulerConfig(steps=num_steps)
    x_init = euler_config.sigma_max * jax.random.normal(
        key, (num_images, cfg.image_size, cfg.image_size, cfg.in_channels))
    return run(make_denoiser(cfg, params), None, None, x_init, euler_config).x
