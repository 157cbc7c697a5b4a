"""Samplers: restoration methods on a shared noise schedule, each a config (a pytree) and a per-image step.

    result = spgd_jax.samplers.sample(denoiser, forward, y, key, SPGDConfig(lr=2.5), params, x_shape=(H, W, C))

Registered (SAMPLERS), the paper's Table 1 and more, one module each:
- 'spgd'      SPGDConfig, spgd.py: the paper's Algorithm 1 (EDM schedule, warm-up and ADM);
- 'dps'       DPSConfig, dps.py: schedule "ddpm" as published (1000 ancestral steps) or "edm";
- 'mcg'       MCGConfig, mcg.py: DPS-like gradient plus projection (linear operators);
- 'score_sde' ScoreSDEConfig, score_sde.py: ancestral steps and projections (linear operators);
- 'dpps'      DPPSConfig, dpps.py: DPS with the best of M candidate noises per step;
- 'ddrm'      DDRMConfig, ddrm.py: 20 DDIM steps in the operator's SVD (forward = spgd_jax.operators.svd(op));
- 'diffpir'   DiffPIRConfig, diffpir.py: proximal data steps between denoising steps (linear operators);
- 'pnp_admm'  PnPADMMConfig, pnp_admm.py: ADMM with the prior's denoiser at a fixed noise level (linear operators);
- 'red_diff'  RedDiffConfig, red_diff.py: Adam on a variational mean (linear operators);
- 'daps'      DAPSConfig, daps.py: decoupled annealing, Langevin in x0 space;
- 'euler'     EulerConfig, euler.py: unconditional samples of the prior.
A method is one module: its config, `schedule(config)`, `get_step_fn(denoiser, forward, config)` (the
per-image step), init and output where its state is not the image, its presets, and one `register_sampler`
call (Sampler, Schedule, Step: see _registry.py). The driver (driver.py) runs them all: `run` from a given
x_T, `sample`, `sweep` (a vmap over the config's step size: SPGD's lr, DPS's zeta, ...) and
`sample_sharded` (over the devices). `presets.config(name, task)` picks a method's settings for a task;
`nfe` counts a config's denoiser evaluations per image; `forward_for(config, operator)` is the forward model
a method runs a task with (DDRM's carries the SVD); `posterior_keys` and `posterior_mean` draw and average
K samples per image; `diagnostics` the gradient angles SPGD can record.
"""

# The methods first, in the order SAMPLERS lists them: each module registers itself when imported.
from spgd_jax.samplers.spgd import SPGDConfig
from spgd_jax.samplers.dps import DPSConfig
from spgd_jax.samplers.mcg import MCGConfig
from spgd_jax.samplers.score_sde import ScoreSDEConfig
from spgd_jax.samplers.dpps import DPPSConfig
from spgd_jax.samplers.ddrm import DDRMConfig
from spgd_jax.samplers.diffpir import DiffPIRConfig
from spgd_jax.samplers.pnp_admm import PnPADMMConfig
from spgd_jax.samplers.red_diff import RedDiffConfig
from spgd_jax.samplers.daps import DAPSConfig
from spgd_jax.samplers.euler import EulerConfig
from spgd_jax.samplers import diagnostics, presets  # noqa: E402 (after the methods, on purpose)
from spgd_jax.samplers._loop import Recorded, SampleResult, Segment, SegmentResult, Step, step_keys
from spgd_jax.samplers._registry import (SAMPLERS, Sampler, Schedule, forward_for, get_sampler, nfe,
                                         register_sampler, sampler_of)
from spgd_jax.samplers.driver import (image_keys, initial_noise, run, run_in_segments, sample, sample_sharded,
                                      sweep)
from spgd_jax.samplers.posterior import posterior_keys, posterior_mean
from spgd_jax.samplers.presets import dps_config, spgd_config
from spgd_jax.samplers.schedule import edm_sigmas

__all__ = ["SAMPLERS", "DAPSConfig", "DDRMConfig", "DPPSConfig", "DPSConfig", "DiffPIRConfig", "EulerConfig",
           "MCGConfig", "PnPADMMConfig", "Recorded", "RedDiffConfig", "SPGDConfig", "SampleResult", "Sampler",
           "Schedule", "ScoreSDEConfig", "Segment", "SegmentResult", "Step", "diagnostics", "dps_config",
           "edm_sigmas", "forward_for", "get_sampler", "image_keys", "initial_noise", "nfe", "posterior_keys",
           "posterior_mean", "presets", "register_sampler", "run", "run_in_segments", "sample", "sample_sharded",
           "sampler_of", "spgd_config", "step_keys", "sweep"]
