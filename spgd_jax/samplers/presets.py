"""Per-task sampler settings: the paper's values, and the one place where they are tuned.

`config(sampler, task)` returns the config the CLI uses for any registered sampler by
default with the default prior (`tuned=False`: with other weights; `spgd_config(task)` and
`dps_config(task)` are its two most used cases); every field can be overridden by keyword. The learning rates are the
paper's FFHQ values (Table 5; SPEC section 3), the DPS step sizes the DPS
release's (SPEC section 5). `TUNED_*` hold the values changed for the default
64 px prior, with the measurement that justified each change in
benchmarks/results/.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from spgd_jax.samplers.dps import DPSConfig
from spgd_jax.operators import TASKS, get as get_operator
from spgd_jax.samplers.spgd import SPGDConfig

__all__ = ["DPS_ZETA", "PAPER", "PAPER_LR", "TASK_SIGMA_Y", "TUNED", "config", "TUNED_SPGD", "TUNED_ZETA", "UNSUPPORTED_BY_DEFAULT_PRIOR",
           "UNSUPPORTED_PAIRS_BY_DEFAULT_PRIOR", "default_prior_warning", "dps_config",
           "spgd_config"]

# Paper Table 5 (FFHQ); phase retrieval and HDR from the reference configs. The reference's
# box-inpainting config carries another method's settings, so it uses random inpainting's.
PAPER_LR = {
    "inpaint": 2.5,
    "inpaint_box": 2.5,
    "gauss_deblur": 1.5,
    "motion_deblur": 1.0,
    "sr4": 8.0,
    "phase_retrieval": 2.0,
    "hdr": 1.0,
}
# DPS release (1000 ancestral steps): 0.5 inpainting, 0.3 deblurring and SR, 1.0 phase retrieval. The release
# has no HDR task: hdr's 0.3 is ours (the deblurring value), not the release's.
DPS_ZETA = {
    "inpaint": 0.5,
    "inpaint_box": 0.5,
    "gauss_deblur": 0.3,
    "motion_deblur": 0.3,
    "sr4": 0.3,
    "phase_retrieval": 1.0,
    "hdr": 0.3,
}
# SPGD settings tuned for the default 64 px prior on its validation split: per task, the SPGDConfig
# fields that differ from the paper's (lr from PAPER_LR, lr_min_ratio 0.01); a task not listed keeps them.
# Measurements: benchmarks/results/spgd_schedule_probe.md (and spgd_lr_probe.md before it).
# - The paper's linear decay to 1 % of eta leaves the deblurring tasks' last steps too weak to fit the
#   measurement (final residual RMS 0.02, twice sigma_y): a constant rate (lr_min_ratio 1) fits it
#   (0.0105) and gains +3.6 dB on Gaussian deblurring (validation faces 50-52, 28.71 -> 32.29 dB).
# - Gaussian deblurring diverges at the paper's lr 1.5 on 10 of 10 faces: the blur passes the mean
#   colour unchanged, so gradient steps on ||A x - y||^2 oscillate and grow once 2 eta > 2.
# - Box inpainting diverges at lr 2.5 on 6 of 6 faces, at outer step 6 (benchmarks/results/task_probe.md):
#   the largest eigenvalue lambda of J^T J, J the Jacobian of x -> A(D(x; t)), is about 0.74 from the
#   first steps on, so a warm-up step grows the residual once eta > 1 / lambda = 1.35. lr 1.2 (validation
#   faces 50-55: 23.95 dB, none diverged; 0.6: 23.78, 0.9: 23.89; harmonic inpainting 20.23).
# - HDR: from sigma_max 100 the default prior's Tweedie estimates are noise of std 1.4 (0.36 at t = 20, 0.15
#   at t = 5), so the clip saturates 72 % of their pixels, where the likelihood has no gradient; the
#   image drifts to a wrong colour and stays saturated (faces 50-55 at the paper's lr 1: 12.09 dB, residual
#   RMS 0.54, y / 2: 17.05 dB; lr 0.2 or 0.4 no better). Starting at sigma_max 10 (x_T is still noise,
#   std 10 over images of std 0.5) fixes it: constant lr 0.1 gives 23.16 dB on faces 50-53 (decaying lr
#   0.1: 22.88, 0.2: 22.57; sigma_max 20, lr 0.2: 22.44; y / 2: 17.03). lambda grows from 1.3 (t = 100) to
#   10 (t = 0.27), so the rate must stay near 0.1.
# - Phase retrieval (unsupported, below): the same start at sigma_max 10 lifts it from 10.11 dB (paper's lr
#   2, faces 50-53) to 17.15 dB at lr 1 (decaying; 0.25: 14.88, 0.5: 16.45, 2: 17.10, 4: 15.12), but two of
#   the four faces stay unrecovered at every setting (9-13 dB) while their residual fits sigma_y.
TUNED_SPGD: dict[str, dict[str, float]] = {
    "gauss_deblur": {"lr": 0.8, "lr_min_ratio": 1.0},
    "motion_deblur": {"lr": 0.8, "lr_min_ratio": 1.0},
    "inpaint_box": {"lr": 1.2},
    "hdr": {"lr": 0.1, "lr_min_ratio": 1.0, "sigma_max": 10.0},
    "phase_retrieval": {"lr": 1.0, "sigma_max": 10.0},
}
# Tasks the default 64 px prior does not restore (the command line warns; README): phase retrieval gives
# texture (7.6 dB on the demo face with the paper's settings); with the tuned start above it recovers about
# half of the validation faces (17.15 dB mean on faces 50-53: 19.8 / 9.1 / 12.6 / 27.1); the paper itself
# needs restarts and a 256 px prior.
UNSUPPORTED_BY_DEFAULT_PRIOR: dict[str, str] = {
    "phase_retrieval": "phase retrieval is not supported by the 64 px default prior (it returns texture, not "
                       "a face); use a full-size prior with --weights",
}
# (sampler, task) pairs that the default prior runs but does not restore at the preset (the command line warns;
# tests/test_presets_restore.py checks every other pair on the demo face), with the measurement:
# - PnP-ADMM on inpainting: a denoiser at one fixed noise level fills 80 % missing pixels with grey smudges; the
#   x-update is exact for a mask, so rho changes nothing (tuning faces 50-53: 16.06 dB at rho 1e-4, 1e-3 and 1e-2
#   with sigma_d 0.3; 13.4 dB at sigma_d 1; the demo face 14.55 dB against harmonic filling's 18.57).
UNSUPPORTED_PAIRS_BY_DEFAULT_PRIOR: dict[tuple[str, str], str] = {
    ("pnp_admm", "inpaint"): "PnP-ADMM does not restore random inpainting with the 64 px default prior (its one "
                             "fixed-level denoiser leaves the missing 80 % grey; 16 dB on held-out faces, below "
                             "harmonic filling); use --sampler spgd, ddrm or diffpir",
}


def default_prior_warning(sampler: str, task: str) -> str | None:
    """Why the default prior does not restore `task` with `sampler` at its preset, or None."""
    return UNSUPPORTED_BY_DEFAULT_PRIOR.get(task) or UNSUPPORTED_PAIRS_BY_DEFAULT_PRIOR.get((sampler, task))
# DPS: the release's zetas (tuned for 1000 ancestral steps at 256 px) leave the 64 px default prior's
# samples unguided (random inpainting, 500 EDM steps: 6.0 / 6.4 / 15.3 dB at zeta 0.05 / 0.25 / 1; 22.3 /
# 23.3 / 22.5 dB at 2 / 5 / 12.5, mean of validation faces 1-2); 10x the release value is used for every
# task (benchmarks/results/dps_zeta_probe.md). benchmarks/quality.py re-picks them on faces 50-81.
TUNED_ZETA: dict[str, float] = {
    "inpaint": 5.0,
    "gauss_deblur": 3.0,
    "motion_deblur": 3.0,
    "sr4": 3.0,
}


# The measurement noise std of each task's operator ([-1, 1] units; the same at every size): the default of a
# config's sigma_y (DDRM, DiffPIR), so that presets.config's noise model is the task's, as on the command line.
TASK_SIGMA_Y: dict[str, float] = {task: get_operator(task, 64).sigma_y for task in TASKS}

# Per sampler, per task: the config fields of the method's own paper or release (PAPER) and those changed
# for the default 64 px prior (TUNED, each with its measurement above or in benchmarks/results/). A
# task missing from a sampler's table uses the config's own defaults.
# DPS's PAPER row is the published sampler (1000 ancestral DDPM steps, the release's zeta); for the default
# prior it runs on the EDM schedule with 500 steps (SPGD's NFEs at T = 100, N = 5) and TUNED_ZETA.
# DPPS: the release's configs (github.com/74587887/DPPS_code): zeta 1.0 inpainting and SR x4, 0.4 deblurring.
PAPER: dict[str, dict[str, dict[str, Any]]] = {
    "spgd": {task: {"lr": lr} for task, lr in PAPER_LR.items()},
    "dps": {task: {"zeta": zeta, "schedule": "ddpm", "steps": 1000} for task, zeta in DPS_ZETA.items()},
    "dpps": {"inpaint": {"zeta": 1.0}, "inpaint_box": {"zeta": 1.0}, "gauss_deblur": {"zeta": 0.4},
             "motion_deblur": {"zeta": 0.4}, "sr4": {"zeta": 1.0}},
    # DiffPIR release's lambda and zeta (main_ddpir_inpainting.py, main_ddpir_deblur.py; sr4: the middle of
    # main_ddpir_sisr.py's lambda sweep 2-12 at zeta 0.25). Its deblurring and SR scripts run 100 steps at noise
    # 12.75/255 in [0, 1] units (sigma_y 0.1 here); we run them at the SPGD paper's 20 NFE and the task's sigma_y.
    "diffpir": {"inpaint": {"lam": 1.0, "zeta": 1.0}, "inpaint_box": {"lam": 1.0, "zeta": 1.0},
                "gauss_deblur": {"lam": 7.0, "zeta": 0.3}, "motion_deblur": {"lam": 7.0, "zeta": 0.3},
                "sr4": {"lam": 6.0, "zeta": 0.25}},
    # RED-Diff release (NVlabs/RED-diff sample_test.sh; motion blur has no line there: the yaml default 0.1).
    "red_diff": {"inpaint": {"lr": 0.25}, "inpaint_box": {"lr": 0.25}, "gauss_deblur": {"lr": 0.5},
                 "motion_deblur": {"lr": 0.1}, "sr4": {"lr": 0.1}},
    # DAPS release (configs/task/*.yaml, pixel entries; DAPS-1K).
    "daps": {"inpaint": {"lr": 1e-4}, "inpaint_box": {"lr": 5e-5}, "gauss_deblur": {"lr": 1e-4},
             "motion_deblur": {"lr": 5e-5}, "sr4": {"lr": 1e-4}, "phase_retrieval": {"lr": 5e-5}, "hdr": {"lr": 2e-5}},
}
# DDRM (20 NFE) with the default prior, validation faces 50-53 (tuning split): eta 1 instead of the paper's
# 0.85 gains on inpainting (22.1 vs 17.8 dB; 100 steps at 0.85: 24.4, so the 20-step budget is the limit)
# and SR x4 (26.2 vs 25.5 dB), and loses on Gaussian deblurring (31.2 vs 32.3 dB), which keeps 0.85.
# DiffPIR and PnP-ADMM: the step size picked per task by benchmarks/quality.py on tuning faces 50-57 from 0.25x,
# 1x and 4x the release's (benchmarks/results/quality_cpu-2core-methods-50img.md, its sweep table). Only
# DiffPIR's motion deblurring (lam 28: 31.95 dB against 31.31 at 7) and PnP-ADMM's SR x4 (rho 0.0025: 24.90
# against 23.59 at 0.01) gain clearly; the others are within 0.1 dB of their neighbours (inpainting identical
# at every value). Both motion and SR picks are at the grid's edge: a wider sweep may gain more.
# Score-SDE and MCG on deblurring: the projection onto A x = y + sigma' A n solved to convergence passes the
# measurement noise through the inverse blur, whose weak frequencies amplify it into colour noise (Score-SDE,
# Gaussian deblurring, 200 steps, tuning faces 50-51: 14.07 dB with 30 CG iterations, Laplacian RMS 7-8x the
# truth's; 24.35 dB with 10; 29.41 dB with 5; Wiener 31.42). Five iterations stop before the weak directions
# move (early stopping as a regulariser); MCG shares the projection and the setting.
TUNED: dict[str, dict[str, dict[str, Any]]] = {
    "spgd": TUNED_SPGD,
    "ddrm": {"inpaint": {"eta": 1.0}, "sr4": {"eta": 1.0}},
    "diffpir": {"inpaint": {"lam": 0.25, "zeta": 1.0}, "gauss_deblur": {"lam": 28.0, "zeta": 0.3},
                "motion_deblur": {"lam": 28.0, "zeta": 0.3}, "sr4": {"lam": 1.5, "zeta": 0.25}},
    "pnp_admm": {"inpaint": {"rho": 0.0025}, "sr4": {"rho": 0.0025}},
    "score_sde": {"gauss_deblur": {"cg_iterations": 5}, "motion_deblur": {"cg_iterations": 5}},
    "mcg": {"gauss_deblur": {"cg_iterations": 5}, "motion_deblur": {"cg_iterations": 5}},
    "dps": {task: {"zeta": TUNED_ZETA.get(task, zeta), "schedule": "edm", "steps": 500}
            for task, zeta in DPS_ZETA.items()},
}


def config(sampler: str, task: str, tuned: bool = True, **overrides):
    """The config of the registered `sampler` (a name of spgd_jax.samplers.SAMPLERS) for `task`: its
    PAPER settings, then (tuned=True) its TUNED ones for the default 64 px prior, then every override
    that is not None. ValueError naming the choices for an unknown sampler, task or field."""
    from spgd_jax.samplers._registry import SAMPLERS  # the registry is filled by spgd_jax.samplers

    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    config_type = SAMPLERS[sampler].config_type
    defaults = {**PAPER.get(sampler, {}).get(task, {}), **(TUNED.get(sampler, {}).get(task, {}) if tuned else {})}
    if "sigma_y" in {f.name for f in dataclasses.fields(config_type)} and task in TASKS:
        defaults = {"sigma_y": TASK_SIGMA_Y[task], **defaults}  # the method's noise model is the task's (0.05 for the box)
    return _config(config_type, task, defaults, overrides)


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
