"""Denoisers D(x, sigma) -> x0_hat: a preconditioning around a network (EDM's split).

    denoiser = spgd_jax.denoisers.make_denoiser(config, params)   # any registered family's config
    x0_hat = denoiser(x (B, H, W, C), sigma (B,))

Preconditionings (PRECONDITIONINGS): 'vp' (EDM's VP form for DDPM eps-networks such as guided-diffusion's:
`vp_preconditioning`), 'vp_ddpm' (the same with the trained integer timesteps, which the DDPM-schedule
samplers switch to with `trained_timesteps`: `vp_ddpm_preconditioning`) and 'edm' (EDM's own: `edm_preconditioning`); each takes any network apply function.
Any function D(x, sigma) works wherever a denoiser is asked for; a `Denoiser` is also a pytree whose
leaves are the parameters, so the samplers compile once per config, not once per checkpoint.
"""

from spgd_jax.denoisers._denoiser import PRECONDITIONINGS, Denoiser, make_denoiser
from spgd_jax.denoisers.ddpm import ddpm_timestep, trained_timesteps, vp_ddpm_preconditioning
from spgd_jax.denoisers.edm import edm_preconditioning
from spgd_jax.denoisers.vp import sigma_to_timestep, vp_preconditioning

__all__ = ["PRECONDITIONINGS", "Denoiser", "ddpm_timestep", "edm_preconditioning", "make_denoiser",
           "sigma_to_timestep", "trained_timesteps", "vp_ddpm_preconditioning", "vp_preconditioning"]
