"""Samplers: pure, jitted reverse processes (EDM or DDPM schedule), each a frozen config plus a run function.

    result = spgd_jax.samplers.sample(denoiser, forward, y, key, SPGDConfig(lr=2.5), params, x_shape=(H, W, C))

Registered (SAMPLERS): 'spgd' (SPGDConfig, spgd.py: the paper's Algorithm 1), 'dps' (DPSConfig, dps.py:
schedule "ddpm" as published or "edm"), 'mcg' (MCGConfig, mcg.py), 'score_sde' (ScoreSDEConfig, score_sde.py:
ancestral steps and projections), 'dpps' (DPPSConfig, dpps.py), 'euler' (EulerConfig, euler.py: unconditional).
A new method is one module plus one `register_sampler` line below. `presets` holds the per-task settings; `sweep` runs a sampler at several step sizes (SPGD's lr, DPS's zeta) in one call;
`diagnostics` the gradient angles SPGD can record.
"""

from spgd_jax.samplers import diagnostics, presets
from spgd_jax.samplers._loop import SampleResult
from spgd_jax.samplers._registry import SAMPLERS, Sampler, nfe, register_sampler, sampler_for
from spgd_jax.samplers._sample import initial_noise, sample
from spgd_jax.samplers.dpps import DPPSConfig, dpps
from spgd_jax.samplers.dps import DPSConfig, dps
from spgd_jax.samplers.euler import EulerConfig, euler
from spgd_jax.samplers.mcg import MCGConfig, mcg
from spgd_jax.samplers.posterior import posterior_mean
from spgd_jax.samplers.presets import dps_config, spgd_config
from spgd_jax.samplers.schedule import edm_sigmas
from spgd_jax.samplers.score_sde import ScoreSDEConfig, score_sde
from spgd_jax.samplers.spgd import SPGDConfig, spgd
from spgd_jax.samplers.sweep import sweep

register_sampler(Sampler("spgd", SPGDConfig, spgd, step_size="lr", nfe=lambda config: config.steps * config.warmup))
register_sampler(Sampler("dps", DPSConfig, dps, step_size="zeta"))
register_sampler(Sampler("mcg", MCGConfig, mcg, step_size="alpha", linear_only=True))
register_sampler(Sampler("score_sde", ScoreSDEConfig, score_sde, linear_only=True))
register_sampler(Sampler("dpps", DPPSConfig, dpps, step_size="zeta"))
register_sampler(Sampler("euler", EulerConfig, euler, conditional=False))

__all__ = ["SAMPLERS", "DPPSConfig", "DPSConfig", "EulerConfig", "MCGConfig", "SPGDConfig", "SampleResult", "Sampler",
           "ScoreSDEConfig", "diagnostics", "dpps", "dps", "dps_config", "edm_sigmas", "euler", "initial_noise", "mcg", "nfe",
           "posterior_mean", "presets", "register_sampler", "sample", "sampler_for", "score_sde", "spgd", "spgd_config",
           "sweep"]
