"""The quality benchmark's jobs: which sampler runs with which config, sweep and images (Tables 1-3, bfloat16).

Part of benchmarks/quality.py (run it as `python -m benchmarks.quality`).
"""

from __future__ import annotations

import dataclasses

from spgd_jax import operators
from spgd_jax.samplers import SAMPLERS, forward_for, nfe, presets, sampler_of

TABLE1_TASKS = ("inpaint", "gauss_deblur", "motion_deblur", "sr4")
TABLE2_TASKS = ("inpaint", "sr4")
TABLE3_TASKS = ("inpaint",)
# Sweep grids, as multiples of the task's preset (spgd_jax.samplers.presets: lr, zeta).
LR_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
ZETA_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
MEAN_SAMPLES = 4  # Table 1's posterior-mean row: SPGD samples averaged per image
METHOD_FACTORS = (0.5, 1.0, 2.0)  # the other methods' step-size sweeps, x the task's preset
# How the tables name the registered samplers (the paper's names); others by their registry name.
METHOD_NAMES = {"spgd": "SPGD", "dps": "DPS", "ddrm": "DDRM", "diffpir": "DiffPIR", "pnp_admm": "PnP-ADMM",
                "red_diff": "RED-Diff", "mcg": "MCG", "score_sde": "Score-SDE", "dpps": "DPPS", "daps": "DAPS"}


def table1_methods() -> tuple[str, ...]:
    """The registered restoring samplers other than SPGD (DPS: its published form, beside the equal-NFE row)."""
    return tuple(n for n, s in SAMPLERS.items() if s.conditional and n != "spgd")


@dataclasses.dataclass(frozen=True)
class Job:
    """One sampler run over the images. values: absolute sweep values of the sampler's step size (lr,
    zeta, ...), or None to use the value picked by job `tuned_by`, or None with tuned_by None for a sampler
    without a step size (its config as it is); runs on all images when it sweeps, else on the test set.
    samples > 1: the restoration is the mean of that many samples per image (that many times the NFE)."""

    name: str
    table: str
    row: str
    task: str
    config: object  # a registered sampler's config
    values: tuple[float, ...] | None = None
    tuned_by: str | None = None
    dtype: str = "float32"  # a key of benchmarks.compute.COMPUTE
    samples: int = 1
    tune_only: bool = False  # a sweep over the tuning images alone (its pick feeds later jobs; no table row)

    def rows(self, n_test: int, n_all: int) -> slice:
        """The images the job restores: the tuning images, all (a sweep), or the test images."""
        return slice(n_test, n_all) if self.tune_only else slice(0, n_all if self.values else n_test)


def plan(steps: int, warmup: int, tasks: tuple[str, ...] = TABLE1_TASKS, lr_factors=LR_FACTORS,
         zeta_factors=ZETA_FACTORS, methods: tuple[str, ...] = (), method_factors=METHOD_FACTORS) -> list[Job]:
    """Every job of Tables 1-3 and the bfloat16 check, most important first; `methods`: registered samplers
    whose Table 1 rows (their presets, with the NFE of their papers) come after SPGD's and DPS's."""
    jobs = []
    for task in tasks:
        config = presets.spgd_config(task, steps=steps, warmup=warmup)
        jobs.append(Job(f"t1_spgd_{task}", "1", "SPGD", task, config,
                        values=tuple(config.lr * f for f in lr_factors)))
    for task in tasks:
        config = presets.dps_config(task, steps=steps * warmup)
        jobs.append(Job(f"t1_dps_{task}", "1", f"DPS ({steps * warmup} steps, equal NFE)", task, config,
                        values=tuple(config.zeta * f for f in zeta_factors)))
    for name in methods:
        for task in tasks:
            # DPS's tuned preset is the equal-NFE row above; its Table 1 row is DPS as published
            config = presets.config(name, task, tuned=name != "dps")
            try:
                forward_for(config, operators.get(task, 64))
            except ValueError:  # e.g. DDRM has no SVD of motion blur: the paper's "-"
                continue
            step = sampler_of(config).step_size
            values = None if step is None else tuple(getattr(config, step) * f for f in method_factors)
            label = f"{METHOD_NAMES.get(name, name)} ({nfe(config)} NFE" + (", as published)" if name == "dps" else ")")
            job = f"{name}{'1000' if name == 'dps' else ''}_{task}"
            if values is not None:  # tuned on the tuning images alone, then run once on the test images
                jobs.append(Job(f"tune_{job}", "tune", label, task, config, values=values, tune_only=True))
            jobs.append(Job(f"t1_{job}", "1", label, task, config, tuned_by=None if values is None else f"tune_{job}"))
    for task in tasks:
        jobs.append(Job(f"t1_spgd_mean{MEAN_SAMPLES}_{task}", "1", f"SPGD, mean of {MEAN_SAMPLES} samples "
                        f"({MEAN_SAMPLES}x NFE)", task, presets.spgd_config(task, steps=steps, warmup=warmup),
                        tuned_by=f"t1_spgd_{task}", samples=MEAN_SAMPLES))
    for task in tasks:
        jobs.append(Job(f"bf16_spgd_{task}", "bf16", "SPGD bfloat16", task,
                        presets.spgd_config(task, steps=steps, warmup=warmup), tuned_by=f"t1_spgd_{task}",
                        dtype="bfloat16"))
    for task in tasks:
        jobs.append(Job(f"bf16conv_spgd_{task}", "bf16", "SPGD float32, bfloat16 convolutions", task,
                        presets.spgd_config(task, steps=steps, warmup=warmup), tuned_by=f"t1_spgd_{task}",
                        dtype="float32-bf16conv"))
    for task in (t for t in TABLE2_TASKS if t in tasks):
        for label, n, adm in (("no warm-up, no ADM", 1, "off"), ("ADM only", 1, "paper"),
                              ("warm-up only", warmup, "off")):
            jobs.append(Job(f"t2_{task}_n{n}_{adm}", "2", label, task,
                            presets.spgd_config(task, steps=steps, warmup=n, adm=adm), tuned_by=f"t1_spgd_{task}"))
    for task in (t for t in TABLE3_TASKS if t in tasks):
        for n in (2, 10):
            jobs.append(Job(f"t3_{task}_n{n}", "3", f"N = {n}", task,
                            presets.spgd_config(task, steps=steps, warmup=n), tuned_by=f"t1_spgd_{task}"))
    return jobs
