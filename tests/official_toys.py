"""A toy eps-network and float64 transcriptions of guided-diffusion's update pieces, shared by the tests of the
baselines against their official code (tests/test_official_updates*.py, issue 25)."""

import jax
import jax.numpy as jnp
import numpy as np

from sampler_toys import SHAPE
from spgd_jax.denoisers import Denoiser
from spgd_jax.samplers import Step

ABAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))  # guided-diffusion's linear betas
LEVELS = np.sqrt(1.0 / ABAR - 1.0)


class ToyEps:
    """A toy eps-network eps(x_vp (B,H,W,C), t (B,)) = a(t) x + b(t) x W (W mixes channels), linear in x with a
    t-dependence strong enough that a timestep off by 0.5 changes eps by ~1e-3 (hashable: a Denoiser's
    network)."""

    @staticmethod
    def a(t):
        return 0.6 + 0.3 * np.sin(t / 97.0) if isinstance(t, np.ndarray) else 0.6 + 0.3 * jnp.sin(t / 97.0)

    @staticmethod
    def b(t):
        return 0.2 * np.cos(t / 131.0) if isinstance(t, np.ndarray) else 0.2 * jnp.cos(t / 131.0)

    def __call__(self, params, x, t, class_labels=None):
        mixed = jnp.einsum("bhwc,cd->bhwd", x, params["w"])
        return self.a(t)[:, None, None, None] * x + self.b(t)[:, None, None, None] * mixed

    def numpy(self, w, x_vp, k):
        """eps in float64 at the timestep k for one image x_vp (SHAPE or flattened; eps has its shape), and the
        matrix (n, n) of the linear map x_vp -> eps."""
        t = np.asarray(k, np.float64)
        eps = lambda v: (self.a(t) * v.reshape(SHAPE) + self.b(t) * v.reshape(SHAPE) @ w).reshape(v.shape)
        return eps(x_vp), np.stack([eps(e) for e in np.eye(x_vp.size)], axis=1)


CHANNEL_MIX = np.array([[0.3, -0.5], [0.4, 0.2]])


def toy_denoiser(network=None):
    """A Denoiser with the 'vp' preconditioning around ToyEps, and the network."""
    network = ToyEps() if network is None else network
    return Denoiser(network, {"w": jnp.asarray(CHANNEL_MIX, jnp.float32)}, "vp"), network


def official_x0(network, x_vp, k):
    """guided-diffusion's pred_xstart (float64) from the eps-network at the integer timestep k, and its Jacobian."""
    eps, eps_matrix = network.numpy(CHANNEL_MIX, x_vp, k)
    scale = 1.0 / np.sqrt(ABAR[k])
    x0 = scale * (x_vp - np.sqrt(1 - ABAR[k]) * eps)
    return x0, scale * (np.eye(x_vp.size) - np.sqrt(1 - ABAR[k]) * eps_matrix)


def official_p_sample(x0, x_vp, k, k_next, z):
    """guided-diffusion's p_sample on its respaced schedule (betas from abar of the kept timesteps), fixed
    small variance (beta_tilde), float64."""
    abar, abar_next = ABAR[k], ABAR[k_next]
    beta = 1 - abar / abar_next
    mean = beta * np.sqrt(abar_next) / (1 - abar) * x0 + (1 - abar_next) * np.sqrt(1 - beta) / (1 - abar) * x_vp
    return mean + np.sqrt(beta * (1 - abar_next) / (1 - abar)) * z


def one_step(step_fn, state, sigma, sigma_next, inputs, key, image, i=0):
    """Outer step i of a sampler's step function from the noise level sigma to sigma_next (float32)."""
    info = Step(jnp.int32(i), jnp.float32(sigma), jnp.float32(sigma_next), jnp.float32(1 - sigma_next / sigma), inputs)
    return jax.jit(step_fn)(state, info, key, image)


def our_step(step_fn, state, k, k_next, inputs, key, image):
    """One step of a sampler's step function at the DDPM levels of timesteps k -> k_next (float32)."""
    return one_step(step_fn, state, LEVELS[k], LEVELS[k_next], inputs, key, image)


def ve(x_vp, k):
    """Our coordinates of a VP state at timestep k."""
    return x_vp / np.sqrt(ABAR[k])


def denoise_numpy(network, x, sigma):
    """Our VP preconditioning (continuous timestep: PnP-ADMM is not a DDPM-schedule method) in float64."""
    log_term = np.log1p(sigma**2)
    t = 999 * 2 * log_term / (np.sqrt(0.1**2 + 2 * 19.9 * log_term) + 0.1)
    x_scaled = x.reshape(SHAPE) / np.sqrt(1 + sigma**2)
    eps, _ = network.numpy(CHANNEL_MIX, x_scaled, t)
    return x - sigma * eps.ravel()


def normal(key, shape=SHAPE):
    return np.asarray(jax.random.normal(key, shape, jnp.float32), np.float64)
