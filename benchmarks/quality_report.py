"""The quality benchmark's scoring: merge generate runs, compute the metrics, write the tables.

Part of benchmarks/quality.py (run it as `python -m benchmarks.quality`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.quality_bars import bars_markdown, gains_markdown, paired_gains, quality_bars
from benchmarks.quality_generate import degrade, read_images
from benchmarks.quality_jobs import METHOD_NAMES, TABLE1_TASKS, TABLE2_TASKS, TABLE3_TASKS, table1_methods
from spgd_jax import metrics, operators
from spgd_jax.classical import naive_inverse, restorer
from spgd_jax.samplers import SAMPLERS, forward_for, presets

MERGE_KEYS = ("unet_config", "seed", "test", "steps", "warmup")  # what makes two runs' rows comparable


def _read_manifest(run: Path) -> dict:
    path = run / "manifest.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist; pass folders written by `quality.py generate`")
    return json.loads(path.read_text())


def _job_info(manifest: dict, job: dict) -> dict:
    """The job with its device, jax version and tuning-image count (older manifests keep them per run)."""
    return {**job, **{k: job.get(k, manifest[k]) for k in ("device", "jax", "tune")}}


def merge(args) -> int:
    """One run from several generate runs that sampled other jobs on the same test images."""
    runs, out = [Path(r) for r in args.runs], Path(args.out)
    if out.exists():
        raise SystemExit(f"error: {out} exists; pass a new folder as --out (merge never overwrites)")
    manifests = [_read_manifest(r) for r in runs]
    base = manifests[0]
    jobs, source = {}, {}
    for run, manifest in zip(runs, manifests):
        for key in MERGE_KEYS:
            if manifest[key] != base[key]:
                raise SystemExit(f"error: {run} has {key} = {manifest[key]!r} but {runs[0]} has {base[key]!r}; "
                                 "only runs over the same test images and settings can be merged")
        if manifest["names"][:base["test"]] != base["names"][:base["test"]]:
            raise SystemExit(f"error: {run} restored other test images than {runs[0]}")
        for name, job in manifest["jobs"].items():
            if name in jobs:
                raise SystemExit(f"error: job {name} is in both {source[name]} and {run}; "
                                 "pass --jobs to generate so that each job runs once")
            jobs[name], source[name] = _job_info(manifest, job), run
    out.mkdir(parents=True)
    for name, run in source.items():
        shutil.copy(run / f"{name}.npz", out / f"{name}.npz")
    longest = max(manifests, key=lambda m: len(m["names"]))  # tuning images follow the test images
    merged = {**base, "names": longest["names"], "tune": max(j["tune"] for j in jobs.values()),
              "jobs": jobs, "merged_from": [str(r) for r in runs]}
    (out / "manifest.json").write_text(json.dumps(merged, indent=1) + "\n")
    print(f"merged {len(jobs)} jobs from {len(runs)} runs into {out}")
    return 0


def sampled_on(jobs: dict) -> str:
    """Where the jobs were sampled: one device, or the jobs of each device."""
    groups: dict[str, list[str]] = {}
    for name, job in jobs.items():
        groups.setdefault(f"{job['device']} (jax {job['jax']})", []).append(name)
    if len(groups) == 1:
        return next(iter(groups))
    return "; ".join(f"{where} for {', '.join(names)}" for where, names in groups.items())


def _summary(values: dict) -> dict:
    """Mean and std over the images of each metric, and the per-image values (for paired comparisons)."""
    return {**{k: {"mean": float(np.mean(v)), "std": float(np.std(v))} for k, v in values.items()},
            "per_image": {k: np.asarray(v, np.float64).round(5).tolist() for k, v in values.items()}}


def score(args) -> int:
    run = Path(args.run)
    manifest = _read_manifest(run)
    manifest["jobs"] = {name: _job_info(manifest, job) for name, job in manifest["jobs"].items()}
    n_test = manifest["test"]
    x, names = read_images(Path(args.images), n_test)
    if names != manifest["names"][:n_test]:
        raise SystemExit("error: --images holds other images than the run used")
    reference = jnp.asarray(x)
    rows = []
    for name, job in manifest["jobs"].items():
        if job.get("tune_only"):  # no test image: its sweep is in the tuning table
            continue
        with np.load(run / f"{name}.npz") as f:
            restored = f["restored"].astype(np.float32) / 127.5 - 1.0
            float_psnr, diverged = f["restored_float_psnr"], f["diverged"]
        picked = job["values"].index(job["picked"])
        rows.append({"job": name, **{k: job[k] for k in ("table", "row", "task", "dtype", "picked", "config",
                                                           "seconds", "nfe_per_image")},
                     "diverged": int(diverged[picked, :n_test].sum()),
                     "psnr_float": float(np.mean(float_psnr)),
                     "images": job.get("images"),
                     **_summary(metrics.all_metrics(jnp.asarray(restored), reference, vgg=True))})
    for task in sorted({r["task"] for r in rows if r["table"] == "1"}, key=TABLE1_TASKS.index):
        operator, params, y = degrade(task, x, manifest["seed"])
        restored = jax.jit(jax.vmap(restorer(operator, x.shape[1])))(y, params)
        rows.append({"job": f"t1_classical_{task}", "table": "1", "row": "classical", "task": task,
                     **_summary(metrics.all_metrics(jnp.clip(restored, -1, 1), reference, vgg=True))})
    meta = {**{k: manifest[k] for k in ("weights", "seed", "test", "steps", "warmup")}, "names": names}
    rows += compared_rows(args.compare or [], {r["job"] for r in rows}, meta)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta["sampled_on"] = sampled_on(manifest["jobs"])
    meta["tune"] = sorted({j["tune"] for j in manifest["jobs"].values() if len(j["values"]) > 1})
    meta["weights"] = args.weights_name or meta["weights"]
    meta["lpips"] = metrics.LPIPS_NAME
    meta["lpips_vgg"] = metrics.LPIPS_VGG_NAME
    stem = out / f"quality_{args.tag}"
    tuning = _tuning(run, manifest, _naive_on_tuning(Path(args.images), manifest))
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "tuning": tuning,
                                                    "bars": quality_bars(rows), "gains": paired_gains(rows)},
                                                    indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(rows, meta, tuning) + bars_markdown(rows)
                                       + gains_markdown(rows))
    print(stem.with_suffix(".md").read_text())
    return 0


def missing_rows(rows: list[dict]) -> list[str]:
    """Lines naming the registered methods with no Table 1 row for a task, and why where it is known."""
    have = {(r["job"][3:-len(r["task"]) - 1], r["task"]) for r in rows if r["table"] == "1"}  # t1_<method>_<task>
    lines = []
    for name in ("spgd",) + table1_methods():
        job = f"{name}1000" if name == "dps" else name
        tasks = [t for t in TABLE1_TASKS if (job, t) not in have]
        if not tasks:
            continue
        cannot = []
        for task in tasks:
            try:
                forward_for(presets.config(name, task), operators.get(task, 64))
            except ValueError:
                cannot.append(task)
        reasons = ([f"cannot run {', '.join(cannot)} (the paper's \"-\")"] if cannot else []) + \
                  ([f"not run on {', '.join(t for t in tasks if t not in cannot)}"] if len(cannot) < len(tasks) else [])
        label = "DPS as published (1000 NFE)" if name == "dps" else METHOD_NAMES.get(name, name)
        lines.append(f"- {label}: {'; '.join(reasons)}.")
    return ["Methods without a row:", ""] + lines + [""] if lines else []


def compared_rows(paths: list[str], jobs: set[str], meta: dict) -> list[dict]:
    """The rows of earlier score results (quality_*.json) that this run lacks, for the tables and the paired
    gains: only from results with the same seed over the same leading test images of the validation split, or
    over more of them (a 50-face run's rows join an 8-face run's over its first 8 faces); SystemExit
    otherwise. Each row names its source in 'from'."""
    out = []
    for path in paths:
        earlier = json.loads(Path(path).read_text())
        theirs, names = earlier["meta"], earlier["meta"].get("names")  # older results do not list their names
        if (theirs["seed"] != meta["seed"] or theirs["test"] < meta["test"]
                or (names is not None and names[: meta["test"]] != meta["names"])):
            raise SystemExit(f"error: --compare {path} has seed {theirs['seed']} over {theirs['test']} test images, "
                             f"this run seed {meta['seed']} over {meta['test']}; only results with the same seed over "
                             "the same leading test images (or more of them) compare")
        for row in earlier["rows"]:
            if row["job"] not in jobs:
                jobs.add(row["job"])
                out.append({**first_images(row, meta["test"]), "from": Path(path).name})
    return out


def first_images(row: dict, count: int) -> dict:
    """A score row over its first `count` test images: the metrics' mean and std over those; the counts over
    the whole earlier run (diverged, PSNR (float)) are dropped where the row had more images."""
    if len(row["per_image"]["psnr"]) == count:
        return row
    kept = {k: v for k, v in row.items() if k not in ("diverged", "psnr_float", "per_image", *row["per_image"])}
    return {**kept, **_summary({k: v[:count] for k, v in row["per_image"].items()})}


def _naive_on_tuning(images: Path, manifest: dict) -> dict:
    """{(task, tuning-image count): mean PSNR of the measurements' naive inverse on the tuning images} for every
    swept job's task, the floor its preset must beat (issue 25.5)."""
    n_test = manifest["test"]
    wanted = {(j["task"], j["tune"]) for j in manifest["jobs"].values() if j["tune"] and j["tuned_by"] is None}
    if not wanted:
        return {}
    x, names = read_images(images, n_test + max(tune for _, tune in wanted))
    if names != manifest["names"][: len(names)]:
        raise SystemExit("error: --images holds other images than the run used")
    out = {}
    for task, tune in sorted(wanted):
        _, _, y = degrade(task, x, manifest["seed"])
        rows = slice(n_test, n_test + tune)
        naive = naive_inverse(task, y[rows], x.shape[1])
        out[task, tune] = round(float(np.mean(metrics.psnr(naive, jnp.asarray(x[rows])))), 3)
    return out


def _tuning(run: Path, manifest: dict, naive: dict) -> list[dict]:
    """Per swept job: mean PSNR on the tuning images and the test images at every value; on the tuning images
    also the preset's (the config's own value, when the sweep has it) and the naive inverse's."""
    n_test, out = manifest["test"], []
    for name, job in manifest["jobs"].items():
        if job["tuned_by"] is None and _has_step_size(job["config"]):
            with np.load(run / f"{name}.npz") as f:
                scores, diverged = f["psnr"], f["diverged"]
            tested = 0 if job.get("tune_only") else n_test
            out.append({"job": name, "task": job["task"], "row": job["row"], "values": job["values"],
                        "picked": job["picked"],
                        "tune_psnr": np.mean(scores[:, tested:], 1).round(3).tolist() if job["tune"] else None,
                        "test_psnr": np.mean(scores[:, :tested], 1).round(3).tolist() if tested else None,
                        "diverged": diverged.sum(1).tolist(),
                        "preset_tune_psnr": _preset_psnr(job, np.mean(scores[:, tested:], 1)) if job["tune"] else None,
                        "naive_tune_psnr": naive.get((job["task"], job["tune"]))})
    return out


def _preset_psnr(job: dict, tune_psnr: np.ndarray) -> float | None:
    """The mean tuning PSNR at the job's config's own step size (the preset the sweep is built around), or None."""
    field = next(s.step_size for s in SAMPLERS.values() if s.config_type.__name__ == job["config"]["type"])
    preset = job["config"].get(field)
    matches = [k for k, v in enumerate(job["values"]) if np.isclose(v, preset, rtol=1e-6)]
    return round(float(tune_psnr[matches[0]]), 3) if matches else None


def _has_step_size(config: dict) -> bool:
    """Whether a manifest's config (with its 'type') belongs to a sampler with a step size."""
    return any(s.config_type.__name__ == config.get("type") and s.step_size for s in SAMPLERS.values())


def _step_size(r: dict) -> str:
    """The picked lr, zeta, ...; SPGD's lr schedule when it is not the paper's decay to 1 %."""
    if "picked" not in r or not _has_step_size(r["config"]):
        return "-"
    ratio = r["config"].get("lr_min_ratio", 0.01)
    return f"{r['picked']:g}" + ("" if ratio == 0.01 else " constant" if ratio == 1 else f" to x{ratio:g}")


def _cell(r: dict, metric: str, spec: str) -> str:
    return f"{r[metric]['mean']:{spec}} ± {r[metric]['std']:{spec}}"


def _step_size_source(meta: dict) -> str:
    """How the step sizes were chosen: meta['tune'] lists the tuning-image counts of the swept jobs."""
    if not meta["tune"]:
        return "step sizes: the presets (spgd_jax.samplers.presets), no sweep. "
    first, last = meta["test"], meta["test"] + max(meta["tune"]) - 1
    return (f"step sizes picked by mean PSNR on images {first}-{last} where the sweep table lists tuning images, "
            "else the presets (spgd_jax.samplers.presets). ")


def markdown(rows: list[dict], meta: dict, tuning: list[dict]) -> str:
    lines = [f"# Restoration quality of `{meta['weights']}` on {meta['test']} held-out faces", "",
             f"Test images: validation split 0-{meta['test'] - 1}; "
             + _step_size_source(meta)
             + f"PSNR (dB) / SSIM / {meta['lpips']}: mean ± std over "
             f"the test images (restorations saved as 8-bit). Seed {meta['seed']}; sampled on {meta['sampled_on']}; SPGD T = {meta['steps']}, N = {meta['warmup']}, its lr decaying linearly to "
             f"1 % over the run unless marked constant.", ""]
    titles = {"1": "Table 1: SPGD, the other methods, classical baselines",
              "2": f"Table 2: warm-up x ADM (T = {meta['steps']})",
              "3": f"Table 3: warm-up iterations N (T = {meta['steps']})",
              "bf16": "bfloat16 compute, or float32 with bfloat16 convolutions (float32 params), against float32, SPGD"}
    for table in ("1", "2", "3", "bf16"):
        chosen = [r for r in rows if r["table"] == table]
        if not chosen:  # the tables below borrow Table 1's rows; they need their own first
            continue
        if table == "2":
            chosen += [{**r, "row": "warm-up + ADM"} for r in rows if r["table"] == "1" and r["row"] == "SPGD"
                       and r["task"] in TABLE2_TASKS]
        if table == "3":
            chosen += [{**r, "row": "N = 1"} for r in rows if r["table"] == "2" and r["row"] == "ADM only"
                       and r["task"] in TABLE3_TASKS]
            chosen += [{**r, "row": f"N = {meta['warmup']}"} for r in rows if r["table"] == "1"
                       and r["row"] == "SPGD" and r["task"] in TABLE3_TASKS]
        if table == "bf16":
            chosen += [{**r, "row": "SPGD float32"} for r in rows if r["table"] == "1" and r["row"] == "SPGD"]
        lines += [f"## {titles[table]}", "",
                  "| task | method | step size | PSNR | SSIM | LPIPS | LPIPS-VGG | PSNR (float) | diverged | NFE | s/image |",
                  "|---|---|---:|---|---|---|---|---:|---:|---:|---:|"]
        for r in sorted(chosen, key=lambda r: (TABLE1_TASKS.index(r["task"]), r["row"])):
            step = _step_size(r)
            per_image = f"{r['seconds'] / r['images']:.2f}" if r.get("images") and r.get("seconds") else "-"
            extra = (f"{r['psnr_float']:.3f} | {r['diverged']}" if "psnr_float" in r else "- | -") + (
                f" | {r['nfe_per_image']} | {per_image}" if "picked" in r else " | - | -")
            lpips, vgg = (_cell(r, m, ".3f") if m in r else "-" for m in ("lpips", "lpips_vgg"))  # none below 32 px
            row = r["row"] + (f" (from {r['from']})" if "from" in r else "")
            lines.append(f"| {r['task']} | {row} | {step} | {_cell(r, 'psnr', '.2f')} | {_cell(r, 'ssim', '.3f')} | "
                         f"{lpips} | {vgg} | {extra} |")
        lines.append("")
    lines += missing_rows(rows)
    lines += ["## Step-size sweeps (mean PSNR, dB)", "",
              "Preset: the PSNR on the tuning images at the preset's own step size; naive: the measurements' naive "
              "inverse (spgd_jax.classical.naive_inverse) on the same images, the floor a preset must beat.", "",
              "| job | values | tuning images | test images | picked | preset | naive |", "|---|---|---|---|---:|---:|---:|"]
    cell = lambda v: "-" if v is None else f"{v:.2f}"
    for t in tuning:
        tune = ", ".join(f"{v:.2f}" for v in t["tune_psnr"]) if t["tune_psnr"] else "-"
        test = ", ".join(f"{v:.2f}" for v in t["test_psnr"]) if t["test_psnr"] else "-"
        lines.append(f"| {t['job']} | {', '.join(f'{v:g}' for v in t['values'])} | {tune} | {test} | {t['picked']:g} | "
                     f"{cell(t.get('preset_tune_psnr'))} | {cell(t.get('naive_tune_psnr'))} |")
    below = [t["job"] for t in tuning if None not in (t.get("preset_tune_psnr"), t.get("naive_tune_psnr"))
             and t["preset_tune_psnr"] <= t["naive_tune_psnr"]]
    lines += ["", f"Presets not above the naive inverse on the tuning images: {', '.join(below) or 'none'}."]
    return "\n".join(lines) + "\n"
