"""Samplers: pure, jitted reverse processes on the EDM schedule, each a frozen config plus a run function.

    result = spgd_jax.samplers.sample(denoiser, forward, y, key, SPGDConfig(lr=2.5), params, x_shape=(H, W, C))

Registered (SAMPLERS): 'spgd' (SPGDConfig, spgd.py: the paper's Algorithm 1), 'dps' (DPSConfig, dps.py),
'euler' (EulerConfig, euler.py: unconditional), 'ddrm' (DDRMConfig, ddrm.py: needs forward =
spgd_jax.operators.svd(operator)), 'diffpir' (DiffPIRConfig, diffpir.py), 'pnp_admm' (PnPADMMConfig,
pnp_admm.py). A new method is one module plus one `register_sampler` line below. `presets` holds the per-task settings; `sweep` runs a sampler at several step sizes (SPGD's lr, DPS's zeta) in one call;
`diagnostics` the gradient angles SPGD can record.
"""

from spgd_jax.samplers import diagnostics, presets
from spgd_jax.samplers._loop import SampleResult
from spgd_jax.samplers._registry import SAMPLERS, Sampler, register_sampler, sampler_for
from spgd_jax.samplers._sample import initial_noise, sample
from spgd_jax.samplers.ddrm import DDRMConfig, ddrm
from spgd_jax.samplers.diffpir import DiffPIRConfig, diffpir
from spgd_jax.samplers.dps import DPSConfig, dps
from spgd_jax.samplers.euler import EulerConfig, euler
from spgd_jax.samplers.pnp_admm import PnPADMMConfig, pnp_admm
from spgd_jax.samplers.posterior import posterior_mean
from spgd_jax.samplers.presets import dps_config, spgd_config
from spgd_jax.samplers.schedule import edm_sigmas
from spgd_jax.samplers.spgd import SPGDConfig, spgd
from spgd_jax.samplers.sweep import sweep

register_sampler(Sampler("spgd", SPGDConfig, spgd, step_size="lr"))
register_sampler(Sampler("dps", DPSConfig, dps, step_size="zeta"))
register_sampler(Sampler("euler", EulerConfig, euler, conditional=False))
register_sampler(Sampler("ddrm", DDRMConfig, ddrm, linear_only=True))
register_sampler(Sampler("diffpir", DiffPIRConfig, diffpir, step_size="lam", linear_only=True))
register_sampler(Sampler("pnp_admm", PnPADMMConfig, pnp_admm, step_size="rho", linear_only=True))

__all__ = ["SAMPLERS", "DDRMConfig", "DPSConfig", "DiffPIRConfig", "EulerConfig", "PnPADMMConfig", "SPGDConfig",
           "SampleResult", "Sampler", "ddrm", "diagnostics", "diffpir", "dps", "dps_config", "edm_sigmas", "euler",
           "initial_noise", "pnp_admm", "posterior_mean", "presets", "register_sampler", "sample", "sampler_for", "spgd",
           "spgd_config", "sweep"]
