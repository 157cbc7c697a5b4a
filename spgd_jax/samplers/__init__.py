"""Samplers: pure, jitted restoration methods on a shared noise schedule, each a frozen config plus a run function.

    result = spgd_jax.samplers.sample(denoiser, forward, y, key, SPGDConfig(lr=2.5), params, x_shape=(H, W, C))

Registered (SAMPLERS), the paper's Table 1 and more:
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
A new method is one module plus one `register_sampler` line below. `presets` holds the per-task settings;
`sweep` runs a sampler at several values of its step size (SPGD's lr, DPS's zeta, ...) in one call; `nfe`
counts a config's denoiser evaluations per image; `forward_for(config, operator)` is the forward model a
sampler runs a task with (DDRM's carries the SVD); `diagnostics` the gradient angles SPGD can record.
"""

from spgd_jax import operators
from spgd_jax.samplers import diagnostics, presets
from spgd_jax.samplers._loop import SampleResult
from spgd_jax.samplers._registry import SAMPLERS, Sampler, forward_for, nfe, register_sampler, sampler_for
from spgd_jax.samplers._sample import initial_noise, sample
from spgd_jax.samplers.daps import DAPSConfig, daps
from spgd_jax.samplers.ddrm import DDRMConfig, ddrm
from spgd_jax.samplers.diffpir import DiffPIRConfig, diffpir
from spgd_jax.samplers.dpps import DPPSConfig, dpps
from spgd_jax.samplers.dps import DPSConfig, dps
from spgd_jax.samplers.euler import EulerConfig, euler
from spgd_jax.samplers.mcg import MCGConfig, mcg
from spgd_jax.samplers.pnp_admm import PnPADMMConfig, pnp_admm
from spgd_jax.samplers.posterior import posterior_mean
from spgd_jax.samplers.presets import dps_config, spgd_config
from spgd_jax.samplers.red_diff import RedDiffConfig, red_diff
from spgd_jax.samplers.schedule import edm_sigmas
from spgd_jax.samplers.score_sde import ScoreSDEConfig, score_sde
from spgd_jax.samplers.spgd import SPGDConfig, spgd
from spgd_jax.samplers.sweep import sweep

register_sampler(Sampler("spgd", SPGDConfig, spgd, step_size="lr", nfe=lambda config: config.steps * config.warmup))
register_sampler(Sampler("dps", DPSConfig, dps, step_size="zeta"))
register_sampler(Sampler("mcg", MCGConfig, mcg, step_size="alpha", linear_only=True))
register_sampler(Sampler("score_sde", ScoreSDEConfig, score_sde, linear_only=True))
register_sampler(Sampler("dpps", DPPSConfig, dpps, step_size="zeta"))
register_sampler(Sampler("ddrm", DDRMConfig, ddrm, linear_only=True, forward=operators.svd))
register_sampler(Sampler("diffpir", DiffPIRConfig, diffpir, step_size="lam", linear_only=True))
register_sampler(Sampler("pnp_admm", PnPADMMConfig, pnp_admm, step_size="rho", linear_only=True))
register_sampler(Sampler("red_diff", RedDiffConfig, red_diff, step_size="lr", linear_only=True))
register_sampler(Sampler("daps", DAPSConfig, daps, step_size="lr", nfe=lambda config: config.steps * config.ode_steps))
register_sampler(Sampler("euler", EulerConfig, euler, conditional=False))

__all__ = ["SAMPLERS", "DAPSConfig", "DDRMConfig", "DPPSConfig", "DPSConfig", "DiffPIRConfig", "EulerConfig", "MCGConfig",
           "PnPADMMConfig", "RedDiffConfig", "SPGDConfig", "SampleResult", "Sampler", "ScoreSDEConfig", "daps", "ddrm",
           "diagnostics", "diffpir", "dpps", "dps", "dps_config", "edm_sigmas", "euler", "forward_for", "initial_noise", "mcg", "nfe",
           "pnp_admm", "posterior_mean", "presets", "red_diff", "register_sampler", "sample", "sampler_for", "score_sde",
           "spgd", "spgd_config", "sweep"]
