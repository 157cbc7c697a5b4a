"""Samplers: pure, jitted reverse processes on the EDM schedule, each a frozen config plus a run function.

    result = spgd_jax.samplers.sample(denoiser, forward, y, key, SPGDConfig(lr=2.5), params, x_shape=(H, W, C))

Registered (SAMPLERS): 'spgd' (SPGDConfig, spgd.py: the paper's Algorithm 1), 'dps' (DPSConfig, dps.py),
'euler' (EulerConfig, euler.py: unconditional), 'red_diff' (RedDiffConfig, red_diff.py: Adam on a variational
mean), 'daps' (DAPSConfig, daps.py: decoupled annealing, Langevin in x0 space). A new method is one module plus one
`register_sampler` line below. `presets` holds the per-task settings; `sweep` runs a sampler at several step sizes
(SPGD's lr, DPS's zeta) in one call; `diagnostics` the gradient angles SPGD can record.
"""

from spgd_jax.samplers import diagnostics, presets
from spgd_jax.samplers._loop import SampleResult
from spgd_jax.samplers._registry import SAMPLERS, Sampler, register_sampler, sampler_for
from spgd_jax.samplers._sample import initial_noise, sample
from spgd_jax.samplers.daps import DAPSConfig, daps
from spgd_jax.samplers.dps import DPSConfig, dps
from spgd_jax.samplers.euler import EulerConfig, euler
from spgd_jax.samplers.posterior import posterior_mean
from spgd_jax.samplers.presets import dps_config, spgd_config
from spgd_jax.samplers.red_diff import RedDiffConfig, red_diff
from spgd_jax.samplers.schedule import edm_sigmas
from spgd_jax.samplers.spgd import SPGDConfig, spgd
from spgd_jax.samplers.sweep import sweep

register_sampler(Sampler("spgd", SPGDConfig, spgd, step_size="lr"))
register_sampler(Sampler("dps", DPSConfig, dps, step_size="zeta"))
register_sampler(Sampler("euler", EulerConfig, euler, conditional=False))
register_sampler(Sampler("red_diff", RedDiffConfig, red_diff, step_size="lr", linear_only=True))
register_sampler(Sampler("daps", DAPSConfig, daps, step_size="lr"))

__all__ = ["SAMPLERS", "DAPSConfig", "DPSConfig", "EulerConfig", "RedDiffConfig", "SPGDConfig", "SampleResult",
           "Sampler", "daps", "diagnostics", "dps", "dps_config", "edm_sigmas", "euler", "initial_noise",
           "posterior_mean", "presets", "red_diff", "register_sampler", "sample", "sampler_for", "spgd", "spgd_config",
           "sweep"]
