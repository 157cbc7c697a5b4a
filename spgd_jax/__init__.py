"""spgd-jax: diffusion-based image restoration with SPGD in JAX/Flax.

The public API, end to end (images float32 in [-1, 1], NHWC):

    import jax, spgd_jax
    denoiser = spgd_jax.load_denoiser()                         # the default 64 px face prior; or a path
    op = spgd_jax.operators.get("sr4", image_size=64)           # forward model of one image
    params = op.init_params(k1, batch, 64)                      # per-image operator parameters
    y = op.measure(k2, x, params)                               # (B, 16, 16, 3) noisy measurement
    result = spgd_jax.sample(denoiser, op.forward, y, k3, spgd_jax.spgd_config("sr4"), params,
                             x_shape=(64, 64, 3))
    result.x                                                    # (B, 64, 64, 3) restored

The core, pure JAX (every function works inside jit, vmap and grad; no files):
  spgd_jax.models      network families (the ADM UNet) and their registry
  spgd_jax.denoisers   preconditionings (VP, EDM) around a network: D(x, sigma)
  spgd_jax.operators   forward models, their seeded per-image parameters, the task registry
  spgd_jax.samplers    SPGD and ten more methods (DPS, MCG, Score-SDE, DPPS, DDRM, DiffPIR, PnP-ADMM,
                       RED-Diff, DAPS; Euler for unconditional samples), their registry, presets, the
                       one driver (sample, sweep, sample_sharded)
  spgd_jax.metrics     PSNR, SSIM, LPIPS;  spgd_jax.classical  prior-free restorations (the yardstick)
  spgd_jax.sharding    a batch of independent images over devices and hosts
The applications, around it: spgd_jax.io (checkpoints, images, plots, atomic files), spgd_jax.restore and
spgd_jax.train (the command lines), spgd_jax.convert (PyTorch checkpoints; needs torch).
Importing spgd_jax loads none of PIL, matplotlib or orbax.
"""

from spgd_jax import classical, denoisers, metrics, models, operators, samplers, sharding
from spgd_jax.denoisers import Denoiser, make_denoiser
from spgd_jax.io.prior import default_weights_path, load_denoiser
from spgd_jax.models.adm import CONFIGS, UNet, UNetConfig
from spgd_jax.samplers import (DPSConfig, EulerConfig, SampleResult, SPGDConfig, dps_config, edm_sigmas, sample,
                               spgd_config, sweep)

__all__ = [
    "CONFIGS",
    "DPSConfig",
    "Denoiser",
    "EulerConfig",
    "SPGDConfig",
    "SampleResult",
    "UNet",
    "UNetConfig",
    "classical",
    "default_weights_path",
    "denoisers",
    "dps_config",
    "edm_sigmas",
    "load_denoiser",
    "make_denoiser",
    "metrics",
    "models",
    "operators",
    "sample",
    "samplers",
    "sharding",
    "spgd_config",
    "sweep",
]
