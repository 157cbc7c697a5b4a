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
  spgd_jax.sharding    a batch of independent images over devices and hosts, and over a CPU's cores
The applications, around it: spgd_jax.io (checkpoints, images, plots, atomic files), spgd_jax.restore and
spgd_jax.train (the command lines), spgd_jax.convert (PyTorch checkpoints; needs torch).
Importing spgd_jax loads nothing else until a name of it is used (then none of PIL, matplotlib or orbax). It
sets XLA:CPU flags under which its programs run faster, before JAX starts its backends
(spgd_jax.xla_setup.cpu_flags; SPGD_JAX_CPU_FLAGS=0 keeps XLA's defaults).
"""

import importlib

from spgd_jax.xla_setup.cpu_flags import use_fast_cpu_flags_on_import

use_fast_cpu_flags_on_import()  # first: before anything below can start JAX's backends (imports no JAX itself)

# name -> the module that defines it; loaded on first use (PEP 562), so that `import spgd_jax` and the command
# lines' argument checks do not import JAX.
_PUBLIC = {
    "CONFIGS": "spgd_jax.models.adm",
    "DPSConfig": "spgd_jax.samplers",
    "Denoiser": "spgd_jax.denoisers",
    "EulerConfig": "spgd_jax.samplers",
    "SPGDConfig": "spgd_jax.samplers",
    "SampleResult": "spgd_jax.samplers",
    "UNet": "spgd_jax.models.adm",
    "UNetConfig": "spgd_jax.models.adm",
    "default_weights_path": "spgd_jax.io.prior",
    "dps_config": "spgd_jax.samplers",
    "edm_sigmas": "spgd_jax.samplers",
    "load_denoiser": "spgd_jax.io.prior",
    "make_denoiser": "spgd_jax.denoisers",
    "sample": "spgd_jax.samplers",
    "spgd_config": "spgd_jax.samplers",
    "sweep": "spgd_jax.samplers",
}
_SUBPACKAGES = ("classical", "denoisers", "metrics", "models", "operators", "samplers", "sharding")

__all__ = sorted([*_PUBLIC, *_SUBPACKAGES])


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"spgd_jax.{name}")
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'spgd_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
