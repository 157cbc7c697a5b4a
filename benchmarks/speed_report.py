"""The speed benchmark's report: the phases' rows merged, per-image figures, speed-ups and targets, the markdown
table, the roofline and the plot (benchmarks/speed.py)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from benchmarks import roofline, trace_summary
from benchmarks.speed_setup import GIB, LR, Preset, write_json

_HOST_STUB = {"cpu": "n/a", "cpu_count": "n/a", "python": "n/a", "loadavg_1_5_15min": None}
_INFO_STUBS = {
    "torch": {"device": "n/a", "torch": "n/a", "cuda": None, "default_flags": {}, "host": _HOST_STUB},
    "jax": {"device": "n/a", "backend": "n/a", "jax": "n/a", "jaxlib": "n/a", "flax": "n/a",
            "jax_default_matmul_precision": "n/a", "XLA_FLAGS": "", "host": _HOST_STUB},
}


def load_phase(path: Path, phase: str) -> dict:
    """A phase's results, or an empty stand-in naming the problem when the phase wrote none."""
    if path.is_file():
        return json.loads(path.read_text())
    return {"info": _INFO_STUBS[phase], "rows": [], "xcheck": {}, "skipped": [f"{phase} phase: no results ({path})"]}


def device_label(jax_info: dict) -> str:
    if jax_info.get("backend") not in ("cpu", "gpu", "cuda", "rocm"):
        return "unknown"
    if jax_info.get("backend") == "cpu":
        return f"cpu-{jax_info['host']['cpu_count']}core"
    kind = jax_info.get("device", "gpu").lower()
    match = re.search(r"(h100|h200|a100|l40s?|rtx ?\d{4}|v100|a10g?|t4|b200)", kind)
    return "gpu-" + (match.group(1).replace(" ", "") if match else re.sub(r"[^a-z0-9]+", "-", kind).strip("-"))


def derive(row: dict, preset: Preset, flops_per_nfe: float | None = None, peaks: dict | None = None) -> dict:
    """Per-image numbers for the full T-step run from a timed row; with flops_per_nfe (FLOPs of one
    image-NFE) also the TFLOP/s achieved and, with the device's peaks, its fraction of the peak."""
    row = dict(row)
    if row.get("status") != "ok":
        return row
    scale = preset.steps / preset.timed_steps
    total = row["run_s"] * scale
    row["extrapolated"] = preset.timed_steps != preset.steps
    row["s_per_image"] = total / row["batch"]
    row["images_per_s"] = row["batch"] / total
    row["nfe_per_s"] = row["batch"] * preset.steps * preset.warmup / total
    peak = row.get("peak_bytes") or row.get("xla_bytes")
    row["peak_gib"] = None if peak is None else peak / GIB
    if row["framework"] == "jax":
        rate = roofline.achieved(row["nfe_per_s"], flops_per_nfe, (peaks or {}).get(row["dtype"]))
        row["tflops"], row["fraction_of_peak"] = rate["tflops"], rate["fraction_of_peak"]
    return row


def roofline_summary(preset: Preset, jax_info: dict, rows: list[dict]) -> dict:
    """FLOPs per image, the device's peaks and the floors they set, and what the bf16 target needs."""
    flops = jax_info.get("flops_per_image_nfe")
    if not flops:
        return {}
    nfe = preset.steps * preset.warmup
    summary = {"flops_per_image_nfe": flops, "flops_per_image": flops * nfe, "peaks": jax_info.get("peaks")}
    moved = {}  # bytes one image's run moves, from the largest loop-free ('nfe only') row of each dtype
    for r in sorted((r for r in rows if r.get("variant") == "nfe only" and r.get("xla_bytes_accessed")),
                    key=lambda r: r["batch"]):
        moved[r["dtype"]] = r["xla_bytes_accessed"] / r["batch"] * nfe
    summary["bytes_per_image"] = moved
    if summary["peaks"]:
        summary["floors_s_per_image"] = roofline.floors(flops * nfe, summary["peaks"], moved)
        summary["bf16_target_tflops"] = flops * nfe / 1.0 / 1e12
        summary["bf16_target_fraction_of_peak"] = summary["bf16_target_tflops"] / summary["peaks"]["bfloat16"]
    return summary


def cpu_peaks(jax_info: dict) -> dict | None:
    """TFLOP/s peaks per dtype from the measured matmuls (the faster framework's), or None when not measured."""
    measured = jax_info.get("cpu_matmul_gflops")
    if not measured:
        return None
    return {dtype: max(v for k, v in measured.items() if k.endswith(dtype) and v) / 1e3
            for dtype in ("float32", "bfloat16")}


def scaling_targets(preset: Preset, sampler: list[dict], torch_rows: list[dict], reference: dict) -> list[dict]:
    """Issue 23's CPU targets beyond the per-batch ratios: images/s rising with the batch as much as the
    reference's, and 1.5x the fastest PyTorch configuration (any variant, dtype and batch)."""
    if preset.goals_device != "cpu" or not sampler or not torch_rows:
        return []
    targets = []
    for dtype in preset.dtypes:
        rate = {r["batch"]: r["images_per_s"] for r in sampler if r["dtype"] == dtype}
        batches = sorted(rate)
        if len(batches) < 2:
            continue
        rising = all(rate[a] < rate[b] for a, b in zip(batches, batches[1:]))
        targets.append({"what": f"JAX {dtype} images/s rises with the batch {', '.join(map(str, batches))}",
                        "value": rate[batches[-1]] / rate[batches[0]], "goal": "rising at every step",
                        "met": rising})
        first, last = batches[0], batches[-1]
        if first in reference and last in reference:
            theirs = reference[last]["images_per_s"] / reference[first]["images_per_s"]
            targets.append({"what": f"JAX {dtype} images/s gain batch {first} -> {last} over the reference's "
                                    f"({theirs:.2f}x)",
                            "value": rate[last] / rate[first] / theirs, "goal": ">= 1x",
                            "met": rate[last] / rate[first] >= theirs})
    best_torch = max(torch_rows, key=lambda r: r["images_per_s"])
    best = max(sampler, key=lambda r: r["images_per_s"])
    targets.append({"what": f"JAX best images/s (batch {best['batch']}) / fastest PyTorch ({best_torch['variant']}, "
                            f"batch {best_torch['batch']})",
                    "value": best["images_per_s"] / best_torch["images_per_s"], "goal": ">= 1.5x",
                    "met": best["images_per_s"] >= 1.5 * best_torch["images_per_s"]})
    return targets


def speed_targets(preset: Preset, sampler: list[dict], torch_rows: list[dict], reference: dict) -> list[dict]:
    """Issue 15's targets ({what, value, goal, met}): JAX images/s over the PyTorch reference's at each goal
    batch, scaling_targets', and the best bfloat16 s/image. sampler: the JAX sampler's ok rows (derived);
    torch_rows: PyTorch's ok rows; reference: {batch: the PyTorch reference's row}."""
    targets = []
    for batch, goal in preset.speedup_goals:
        for dtype in preset.dtypes:
            r = next((r for r in sampler if r["dtype"] == dtype and r["batch"] == batch), None)
            if r and "speedup_vs_torch_reference" in r:
                targets.append({"what": f"JAX {dtype} / PyTorch reference images/s at batch {batch}",
                                "value": r["speedup_vs_torch_reference"], "goal": f">= {goal:g}x",
                                "met": r["speedup_vs_torch_reference"] >= goal})
    targets += scaling_targets(preset, sampler, torch_rows, reference)
    bf16 = [r for r in sampler if r["dtype"] == "bfloat16"]
    if bf16:
        best = min(bf16, key=lambda r: r["s_per_image"])
        targets.append({"what": f"JAX bfloat16 s/image at the best batch ({best['batch']})",
                        "value": best["s_per_image"], "goal": "<= 1.0 s", "met": best["s_per_image"] <= 1.0})
    return targets


def report(preset_name: str, preset: Preset, work: Path, out: Path, label: str | None) -> Path:
    torch_result = load_phase(work / "torch.json", "torch")
    jax_result = load_phase(work / "jax.json", "jax")
    label = label or device_label(jax_result["info"])
    ji = jax_result["info"]
    rows = [derive(r, preset, ji.get("flops_per_image_nfe"), ji.get("peaks") or cpu_peaks(ji))
            for r in torch_result["rows"] + jax_result["rows"]]
    ok = [r for r in rows if r.get("status") == "ok"]
    reference = {r["batch"]: r for r in ok if r["framework"] == "torch" and r["variant"] == "reference"}
    tuned = {r["batch"]: r for r in ok if r["framework"] == "torch" and r["variant"] == "tuned"}
    torch_rows = [r for r in ok if r["framework"] == "torch"]
    fastest = {b: max((r for r in torch_rows if r["batch"] == b), key=lambda r: r["images_per_s"])
               for b in {r["batch"] for r in torch_rows}}
    sampler = [r for r in ok if r["framework"] == "jax" and r["variant"] == "sample"]
    for r in sampler:
        for name, base in (("speedup_vs_torch_reference", reference), ("speedup_vs_torch_tuned", tuned),
                           ("speedup_vs_torch_fastest", fastest)):
            if r["batch"] in base:
                r[name] = r["images_per_s"] / base[r["batch"]]["images_per_s"]

    targets = speed_targets(preset, sampler, torch_rows, reference)

    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"speed_{label}"
    profile = jax_result.get("profile")
    if profile and profile.get("trace") and (work / profile["trace"]).is_file():  # beside the report
        shutil.copy(work / profile["trace"], stem.with_suffix(".trace.json.gz"))
        profile = dict(profile, trace=stem.with_suffix(".trace.json.gz").name)

    summary = {
        "preset": preset_name,
        "label": label,
        "description": preset.description,
        "work": {"unet": preset.unet.to_dict(), "T": preset.steps, "N": preset.warmup,
                 "timed_outer_steps": preset.timed_steps, "task": "random inpainting (20% kept)", "lr": LR,
                 "nfe_per_image": preset.steps * preset.warmup, "repeats": preset.repeats,
                 "jax_adm": "paper (default)", "torch_adm": "computed and discarded (reference)"},
        "method": ("Each row runs timed_outer_steps outer steps (N warm-up iterations each) once untimed, then "
                   "`repeats` times timed; the fastest is scaled by T/timed_outer_steps (extrapolated=true when "
                   "timed_outer_steps < T). JAX: one AOT-compiled call of spgd_jax.sample per (dtype, batch), "
                   "compile time separate. Peak memory: PyTorch torch.cuda.max_memory_allocated; JAX the XLA "
                   "buffer assignment of the compiled call (arguments + outputs + temporaries)."),
        "torch_info": torch_result["info"],
        "jax_info": jax_result["info"],
        "xcheck": {p: dict(jax_result["xcheck"].get(p, {}), **torch_result["xcheck"].get(p, {}))
                   for p in preset.xcheck_precisions},
        "rows": rows,
        "roofline": roofline_summary(preset, ji, rows),
        "profile": profile,
        "batch_profiles": jax_result.get("batch_profiles", []),
        "targets": targets,
        "goals_device": preset.goals_device,
        "skipped": torch_result["skipped"] + jax_result["skipped"],
        "notes": list(preset.notes),
    }
    write_json(stem.with_suffix(".json"), summary)
    stem.with_suffix(".md").write_text(markdown(summary))
    plot(summary, stem.with_suffix(".png"))
    print(stem.with_suffix(".md").read_text())
    return stem


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(s: dict) -> str:
    """The report as markdown: the set-up, the cross-check, the timings, the targets, the roofline, the
    profile, what was skipped and the notes; s is the summary report() writes as JSON."""
    lines = setup_markdown(s) + xcheck_markdown(s["xcheck"]) + timings_markdown(s["rows"])
    lines += targets_markdown(s)
    lines += roofline_markdown(s["roofline"], s["work"])
    if s.get("profile"):
        lines += profile_markdown(s["profile"])
    if s.get("batch_profiles"):
        lines += batch_profiles_markdown(s["batch_profiles"])
    if s["skipped"]:
        lines += ["", "Skipped: " + "; ".join(s["skipped"]) + "."]
    if s["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in s["notes"]]
    return "\n".join(lines) + "\n"


def setup_markdown(s: dict) -> list[str]:
    """The title and what was measured where: the work per image, the devices and versions, the PyTorch
    variants, the host and its load, the method, and on a CPU its measured matmul peak."""
    ti, ji = s["torch_info"], s["jax_info"]
    w = s["work"]
    lines = [
        f"# Speed: JAX SPGD vs the PyTorch baseline ({s['label']})",
        "",
        f"{s['description']}. Written by `benchmarks/speed.py --preset {s['preset']}`.",
        "",
        f"- Work per image: T={w['T']} outer steps x N={w['N']} warm-up iterations = {w['nfe_per_image']} NFEs "
        f"(UNet forward + backward), {w['task']}, image {w['unet']['image_size']}px, random weights shared by both "
        f"frameworks. Timed {w['timed_outer_steps']} outer steps per row"
        + (f", scaled by {w['T'] / w['timed_outer_steps']:g} (extrapolated)." if w['timed_outer_steps'] != w['T']
           else " (the whole run, no extrapolation)."),
        f"- JAX device: {ji['device']} ({ji['backend']}); jax {ji['jax']}, jaxlib {ji['jaxlib']}, flax {ji['flax']}; "
        f"jax_default_matmul_precision={ji['jax_default_matmul_precision']}; XLA_FLAGS=`{ji['XLA_FLAGS'] or ''}`.",
        f"- PyTorch device: {ti['device']}; torch {ti['torch']}"
        + (f", CUDA {ti['cuda']}, cuDNN {ti['cudnn']}" if ti.get("cuda") else "")
        + f"; default flags: {', '.join(f'{k}={v}' for k, v in ti['default_flags'].items())}.",
        "- PyTorch variants: `reference` = as the reference code runs (weights keep requires_grad, so each backward "
        "also computes weight gradients; cudnn.deterministic=True); `tuned` = weights frozen, cudnn.benchmark=True; "
        "`tuned-bf16` = tuned under torch.autocast(dtype=bfloat16).",
        "- JAX dtypes: `float32`, `bfloat16` = the UNet's compute dtype (--dtype); `float32-bf16conv` = the float32 UNet "
        "with its 3x3 convolutions computed from bfloat16 operands, float32 sums (traced under "
        "jax.default_matmul_precision('bfloat16'); --conv-precision bfloat16).",
        f"- Host: {ji['host']['cpu']} ({ji['host']['cpu_count']} cores), Python {ji['host']['python']}; load average "
        f"(1/5/15 min) at start {ti['host']['loadavg_1_5_15min']} (PyTorch), {ji['host']['loadavg_1_5_15min']} (JAX), "
        f"at end {ji['host'].get('loadavg_end')}.",
        f"- {s['method']}",
    ]
    if ji.get("cpu_matmul_gflops"):
        lines.append("- This CPU's measured peak (benchmarks/peak_matmul.py, a 2048^2 matmul), GFLOP/s: "
                     + ", ".join(f"{k} {v:.0f}" for k, v in ji["cpu_matmul_gflops"].items() if k != "peak" and v)
                     + "; `% of peak` is against the faster framework's figure for the row's dtype.")
    return lines


def xcheck_markdown(xcheck: dict) -> list[str]:
    """The cross-check's table, a row per precision ({precision: the merged JAX and PyTorch record})."""
    lines = [
        "",
        "## Cross-check (ADM off, float32)",
        "",
        "| precision | UNet | T x N | batch | max abs diff | max abs x | relative | tolerance | result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for precision, x in xcheck.items():
        if "max_abs_diff" not in x:
            lines.append(f"| {precision} | - | - | - | - | - | - | - | not run |")
            continue
        lines.append(
            f"| {precision} | {x['unet']['image_size']}px, {x['unet']['num_channels']} ch | {x['steps']} x {x['warmup']} | "
            f"{x['batch']} | {x['max_abs_diff']:.3g} | {x['max_abs_torch']:.3g} | {x['rel_diff']:.2e} | "
            f"{x['tolerance_rel']:g} x max abs x | {({True: 'pass', False: 'FAIL'}).get(x['pass'], 'informational')} |")
    return lines + [
        "",
        "`highest`: JAX under jax.default_matmul_precision('highest'), PyTorch with TF32 off; `default`: both "
        "frameworks' default flags (TF32 convolutions on NVIDIA GPUs; informational).",
    ]


def timings_markdown(rows: list[dict]) -> list[str]:
    """The timings' table, a row per derived row (PyTorch first), '-' for the figures a row lacks."""
    lines = [
        "",
        "## Timings",
        "",
        "Variants: JAX `sample` = spgd_jax.sample, the whole run in one compiled call (as inside your own jit; on a "
        "CPU, spgd_jax.sample called on concrete arrays runs a batch as two such calls side by side, which "
        "benchmarks.versus_torch times); JAX `nfe only` = the same "
        "number of likelihood gradients (UNet forward + backward) as separate compiled calls outside any loop, "
        "a reference point (its s/image: the run at that NFE rate; see the notes).",
        "",
        "| framework | variant | dtype | batch | s/image | images/s | NFE/s | TFLOP/s | % of peak | compile s | peak GiB "
        "| x torch ref | x torch tuned | x torch fastest | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["framework"] != "torch", r["variant"], r["dtype"], r["batch"])):
        lines.append(
            f"| {r['framework']} | {r['variant']} | {r['dtype']} | {r['batch']} | {_fmt(r.get('s_per_image'), '.3f')} | "
            f"{_fmt(r.get('images_per_s'), '.3f')} | {_fmt(r.get('nfe_per_s'), '.1f')} | "
            f"{_fmt(r.get('tflops'), '.3g')} | {_fmt(r.get('fraction_of_peak') and 100 * r['fraction_of_peak'], '.1f')} | "
            f"{_fmt(r.get('compile_s'), '.1f')} | {_fmt(r.get('peak_gib'), '.2f')} | "
            f"{_fmt(r.get('speedup_vs_torch_reference'), '.2f')} | {_fmt(r.get('speedup_vs_torch_tuned'), '.2f')} | "
            f"{_fmt(r.get('speedup_vs_torch_fastest'), '.2f')} | "
            f"{r.get('status')} |")
    return lines


def targets_markdown(s: dict) -> list[str]:
    """The targets' table (none when there are no targets), headed by whether the goals are this device's."""
    if not s["targets"]:
        return []
    goals = s.get("goals_device", "gpu")
    same = s["jax_info"]["backend"] == goals
    where = "same device" if same else f"{goals.upper()} goals, informational on this device"
    lines = ["", f"## Targets ({where})", "", "| what | value | goal | met |", "|---|---|---|---|"]
    for t in s["targets"]:
        lines.append(f"| {t['what']} | {t['value']:.2f} | {t['goal']} | {'yes' if t['met'] else 'no'} |")
    return lines


def profile_markdown(p: dict) -> list[str]:
    """The profiled row's summary by kind of op (trace_summary), or why there is none."""
    lines = ["", f"## Profile: JAX sampler, {p['dtype']}, batch {p['batch']}, {p['outer_steps']} outer steps", ""]
    if "summary" not in p:
        return lines + [f"No profile: {p.get('error')}."]
    lines += [f"One more run of the timed program under `jax.profiler` ({p['run_s']:.2f} s with the profiler on; "
              f"trace `{p['trace']}`), summarised by `benchmarks/trace_summary.py` from the "
              f"{p['summary']['source']}'s op executions.", ""]
    return lines + trace_summary.markdown_lines(p["summary"])


def batch_profiles_markdown(profiles: list[dict]) -> list[str]:
    """Op time per image-NFE by kind of op (rows) and batch (columns), from one profiled run per batch: what a
    larger batch saves per image, and what it costs."""
    done = sorted((p for p in profiles if "ms_per_image_nfe" in p), key=lambda p: p["batch"])
    lines = ["", f"## Op time per image-NFE by batch ({profiles[0]['dtype']})", ""]
    failed = [f"batch {p['batch']}: {p['error']}" for p in profiles if "error" in p]
    if not done:
        return lines + ["No profile: " + "; ".join(failed) + "."]
    kinds = sorted({k for p in done for k in p["ms_per_image_nfe"]}, key=lambda k: -done[-1]["ms_per_image_nfe"].get(k, 0))
    lines += ["One more run of each sampler row under `jax.profiler`; ms of op time (each op's time includes the idle "
              "time after it) per image and network evaluation (forward + input gradient).", "",
              "| kind | " + " | ".join(f"batch {p['batch']}" for p in done) + " |", "|---|" + "---:|" * len(done)]
    for kind in kinds:
        lines.append(f"| {kind} | " + " | ".join(f"{p['ms_per_image_nfe'].get(kind, 0.0):.2f}" for p in done) + " |")
    lines.append("| all | " + " | ".join(f"{sum(p['ms_per_image_nfe'].values()):.2f}" for p in done) + " |")
    return lines + ([""] + ["No profile at " + "; ".join(failed) + "."] if failed else [])


def _flop(count: float) -> str:
    return f"{count / 1e12:.1f} TFLOP" if count >= 1e12 else f"{count / 1e9:.2f} GFLOP"


def roofline_markdown(roof: dict, work: dict) -> list[str]:
    if not roof:
        return []
    lines = [
        "", "## Roofline", "",
        f"- One image-NFE (UNet forward + input-gradient backward, batch 1) is {_flop(roof['flops_per_image_nfe'])} "
        f"by XLA's cost analysis of the loop-free program; a T x N = {work['nfe_per_image']} run is "
        f"{_flop(roof['flops_per_image'])} per image. TFLOP/s in the table = NFE/s x that.",
    ]
    for dtype, moved in sorted(roof.get("bytes_per_image", {}).items()):
        lines.append(f"- Bytes moved per image ({dtype}, XLA's count for the compiled `nfe only` program): "
                     f"{moved / 1e9:.0f} GB.")
    peaks = roof.get("peaks")
    if peaks:
        lines.append(f"- Device peaks ({peaks['source']}, dense): bfloat16 {peaks['bfloat16']:g} TFLOP/s, float32 as TF32 "
                     f"{peaks['float32']:g} TFLOP/s, HBM {peaks['hbm_tb_s']:g} TB/s.")
        for dtype, floor in roof["floors_s_per_image"].items():
            memory = "" if floor["memory_s"] is None else f", all bytes at the HBM bandwidth {floor['memory_s']:.3f} s"
            lines.append(f"- Floor for {dtype}: all FLOPs at the peak {floor['compute_s']:.3f} s/image{memory}.")
        lines.append(f"- The bfloat16 target (1.0 s/image) needs {roof['bf16_target_tflops']:.0f} TFLOP/s, "
                     f"{100 * roof['bf16_target_fraction_of_peak']:.0f}% of the dense bfloat16 peak.")
    else:
        lines.append("- No peak figures for this device (benchmarks/roofline.py lists NVIDIA H200, H100, A100).")
    return lines


def plot(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in s["rows"]:
        if r.get("status") == "ok":
            name = f"{r['framework']} {r['variant']} {r['dtype']}"
            series.setdefault(name, []).append((r["batch"], r["images_per_s"]))
    for name, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"images / s (T={s['work']['T']}, N={s['work']['N']})")
    ax.set_title(f"SPGD speed, {s['work']['unet']['image_size']}px, {s['label']}")
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
