"""spgd-jax: diffusion-based image restoration with SPGD in JAX/Flax.

The public API, end to end (images float32 in [-1, 1], NHWC):

    import jax, spgd_jax
    denoiser = spgd_jax.load_denoiser("weights/default64")      # D(x (B,H,W,C), sigma (B,))
    op = spgd_jax.operators.get("sr4", image_size=64)           # forward model of one image
    params = op.init_params(k1, batch, 64)                      # per-image operator parameters
    y = op.measure(k2, x, params)                               # (B, 16, 16, 3) noisy measurement
    result = spgd_jax.sample(denoiser, op.forward, y, k3, spgd_jax.spgd_config("sr4"), params,
                             x_shape=(64, 64, 3))
    result.x                                                    # (B, 64, 64, 3) restored

Everything here is a pure function of its inputs and works inside jit, vmap and grad.
"""

from spgd_jax import diagnostics, metrics, operators, sharding
from spgd_jax.checkpoint import load, load_denoiser, save
from spgd_jax.denoiser import make_denoiser, vp_preconditioning
from spgd_jax.dps import DPSConfig
from spgd_jax.loop import SampleResult
from spgd_jax.presets import dps_config, spgd_config
from spgd_jax.sampling import sample
from spgd_jax.schedule import edm_sigmas
from spgd_jax.spgd import SPGDConfig
from spgd_jax.sweep import sweep_lr
from spgd_jax.unconditional import EulerConfig
from spgd_jax.unet import CONFIGS, UNet, UNetConfig

__all__ = [
    "CONFIGS",
    "DPSConfig",
    "EulerConfig",
    "SPGDConfig",
    "SampleResult",
    "UNet",
    "UNetConfig",
    "diagnostics",
    "dps_config",
    "edm_sigmas",
    "load",
    "load_denoiser",
    "make_denoiser",
    "metrics",
    "operators",
    "sample",
    "save",
    "sharding",
    "spgd_config",
    "sweep_lr",
    "vp_preconditioning",
]
