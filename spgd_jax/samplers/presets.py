"""Per-task sampler settings: the one place that picks a registered sampler's config for a task.

`config(sampler, task)` returns the config the command line uses for any registered sampler by default
with the default prior (`tuned=False`: with other weights); every field can be overridden by keyword.
The values live beside each method's config, in its registration (Sampler.paper, the settings of its
paper or release, and Sampler.tuned, those changed for the default 64 px prior with the measurement that
justified each change): SPGD's in spgd_jax/samplers/spgd.py (PAPER_LR, the paper's Table 5; TUNED_SPGD),
DPS's in dps.py (DPS_ZETA, TUNED_ZETA), and so on. `spgd_config(task)` and `dps_config(task)` are its two
most used cases.
"""

from __future__ import annotations

import dataclasses

from spgd_jax.operators import TASKS, get as get_operator
from spgd_jax.samplers._registry import get_sampler
from spgd_jax.samplers.dps import DPS_ZETA, TUNED_ZETA, DPSConfig
from spgd_jax.samplers.spgd import PAPER_LR, TUNED_SPGD, SPGDConfig

__all__ = ["DPS_ZETA", "PAPER_LR", "TUNED_SPGD", "TUNED_ZETA", "UNSUPPORTED_BY_DEFAULT_PRIOR",
           "UNSUPPORTED_PAIRS_BY_DEFAULT_PRIOR", "config", "default_prior_warning", "dps_config", "spgd_config"]

# Tasks the default 64 px prior does not restore (the command line warns; README): phase retrieval gives
# texture (7.6 dB on the demo face with the paper's settings); with SPGD's tuned start (spgd.TUNED_SPGD) it
# recovers about half of the validation faces (17.15 dB mean on faces 50-53: 19.8 / 9.1 / 12.6 / 27.1); the
# paper itself needs restarts and a 256 px prior.
UNSUPPORTED_BY_DEFAULT_PRIOR: dict[str, str] = {
    "phase_retrieval": "phase retrieval is not supported by the 64 px default prior (it returns texture, not "
                       "a face); use a full-size prior with --weights",
}
# (sampler, task) pairs that the default prior runs but does not restore at the preset (the command line warns;
# tests/test_presets_restore.py checks every other pair on the demo face), with the measurement:
# - PnP-ADMM on inpainting: a denoiser at one fixed noise level fills 80 % missing pixels with grey smudges; the
#   x-update is exact for a mask, so rho changes nothing (tuning faces 50-53: 16.06 dB at rho 1e-4, 1e-3 and 1e-2
#   with sigma_d 0.3; 13.4 dB at sigma_d 1; the demo face 14.55 dB against harmonic filling's 18.57).
# - DPS (500 EDM steps, TUNED_ZETA) on all but random inpainting: a sample may leave the measurement unfitted.
#   Held-out faces do well on average (50 test faces: deblurring 30.1 / 28.7 dB, SR x4 19.9 +- 4.9 dB at zeta 3),
#   but the demo face with the preset test's keys (tests/test_presets_restore.py) gives 15.8 / 16.8 / 14.8 /
#   9.9 dB on inpaint_box / gauss_deblur / motion_deblur / sr4 with residuals of 2.5-13.6 sigma_y, below the
#   measurement itself (16.1 / 20.5 / 15.1 / 16.9 dB); SR x4 at zeta 3 / 5 / 10 / 20 with two sampler keys:
#   8.2 / 8.6 / 9.9 / 12.4 and 16.4 / 17.1 / 17.6 / 17.4 dB. HDR (zeta 0.3, no tuned value: the release has no
#   HDR task) 7.1 dB, residual 20.5 sigma_y, against 19.9 dB for y / 2.
# - Score-SDE (1000 steps, projections onto y) on random inpainting: speckle over the missing pixels (the demo
#   face 11.84 dB against the grey-filled measurement's 11.85, Laplacian 1.42x the face's; 13.13 dB at 50 steps).
# - DPPS (the release's 1000 steps, zeta 1.0) on box inpainting: the box is filled with a face part that does not
#   match (the demo face 11.56 and 12.85 dB with sampler keys 3 and 4, residual 0.51-0.55 sigma_y, against the
#   grey-filled measurement's 16.09; its other four tasks pass: 17.83 / 18.59 / 22.78 / 20.51 dB on SR x4 /
#   inpainting / Gaussian / motion deblurring against 16.88 / 11.85 / 20.51 / 15.06).
_DPS_UNRELIABLE = ("DPS at its preset is unreliable on {} with the 64 px default prior: a sample can leave the "
                   "measurement unfitted (the demo face: below the degraded image itself), though held-out faces "
                   "do well on average; use --sampler spgd, or compare several --seed values")
UNSUPPORTED_PAIRS_BY_DEFAULT_PRIOR: dict[tuple[str, str], str] = {
    ("pnp_admm", "inpaint"): "PnP-ADMM does not restore random inpainting with the 64 px default prior (its one "
                             "fixed-level denoiser leaves the missing 80 % grey; 16 dB on held-out faces, below "
                             "harmonic filling); use --sampler spgd, ddrm or diffpir",
    ("score_sde", "inpaint"): "Score-SDE does not restore random inpainting with the 64 px default prior (its "
                              "projections leave speckle over the missing 80 %: the demo face at the level of the "
                              "grey-filled measurement); use --sampler spgd, red_diff or dps",
    ("dpps", "inpaint_box"): "DPPS does not restore box inpainting with the 64 px default prior (it fills the box "
                             "with a face part that does not match: the demo face below the grey-filled "
                             "measurement); use --sampler spgd",
    **{("dps", task): _DPS_UNRELIABLE.format(task) for task in ("inpaint_box", "gauss_deblur", "motion_deblur", "sr4", "hdr")},
}


def default_prior_warning(sampler: str, task: str) -> str | None:
    """Why the default prior does not restore `task` with `sampler` at its preset, or None."""
    return UNSUPPORTED_BY_DEFAULT_PRIOR.get(task) or UNSUPPORTED_PAIRS_BY_DEFAULT_PRIOR.get((sampler, task))


def config(sampler: str, task: str, tuned: bool = True, **overrides):
    """The config of the registered `sampler` (a name of spgd_jax.samplers.SAMPLERS) for `task`: its
    PAPER settings, then (tuned=True) its TUNED ones for the default 64 px prior, then every override
    that is not None. ValueError naming the choices for an unknown sampler, task or field."""
    method = get_sampler(sampler)
    defaults = {**method.paper.get(task, {}), **(method.tuned.get(task, {}) if tuned else {})}
    if "sigma_y" in {f.name for f in dataclasses.fields(method.config_type)} and task in TASKS:
        # the method's noise model is the task's operator's (0.05 for inpaint_box), as on the command line
        defaults = {"sigma_y": get_operator(task, 64).sigma_y, **defaults}
    return _config(method.config_type, task, defaults, overrides)


def _config(config_type, task: str, defaults: dict, overrides: dict):
    """config_type(**defaults) with the overrides that are not None; clear errors for unknown names."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    fields = {f.name for f in dataclasses.fields(config_type)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}; {config_type.__name__} takes {', '.join(sorted(fields))}")
    values = {**defaults, **{k: v for k, v in overrides.items() if v is not None}}
    missing = [f.name for f in dataclasses.fields(config_type) if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.name not in values]
    if missing:
        raise ValueError(f"{config_type.__name__} has no preset {', '.join(missing)} for task {task!r}; give it "
                         f"(keyword {missing[0]}=..., on the command line --set {missing[0]}=...)")
    return config_type(**values)


def spgd_config(task: str, tuned: bool = True, **overrides) -> SPGDConfig:
    """SPGDConfig for `task` (T=100, N=5, beta=0.9, the task's lr), with any field overridden.

    tuned: the settings tuned for the default 64 px prior where there are some (TUNED_SPGD); False: the
    paper's (for the full-size priors the paper used)."""
    return config("spgd", task, tuned, **overrides)


def dps_config(task: str, tuned: bool = True, **overrides) -> DPSConfig:
    """DPSConfig for `task`, with any field overridden.

    tuned: for the default 64 px prior, the EDM schedule with 500 steps (the NFEs of SPGD at T=100, N=5) and
    TUNED_ZETA; False: DPS as published (1000 ancestral DDPM steps, the release's zeta)."""
    return config("dps", task, tuned, **overrides)
