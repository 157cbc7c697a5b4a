"""The quality benchmark's bars: SPGD against the classical baselines and DPS, paired per test image.

Part of benchmarks/quality.py (run it as `python -m benchmarks.quality`).
"""

from __future__ import annotations

import numpy as np

from benchmarks.quality_jobs import MEAN_SAMPLES, TABLE1_TASKS

CLASSICAL_MARGIN_DB = 1.5  # SPGD must beat the classical baseline by this much PSNR, with lower LPIPS
DPS_TASKS_NEEDED = 3  # SPGD must match or beat DPS at equal NFE on this many Table-1 tasks


def quality_bars(rows: list[dict]) -> list[dict]:
    """Each Table-1 SPGD row (one sample; mean of samples) against the classical baseline, and the
    one-sample row against DPS at equal NFE, on the same test images.

    gain: mean over the images of the paired PSNR difference SPGD - other (dB); stderr: its standard
    error; ahead: images where SPGD's PSNR is higher; met: gain >= CLASSICAL_MARGIN_DB with lower
    mean LPIPS (classical), gain >= 0 (DPS)."""
    by_job = {r["job"]: r for r in rows}
    comparisons = []
    for task in TABLE1_TASKS:
        one_sample = f"t1_spgd_{task}"
        pairs = [(job, f"t1_classical_{task}") for job in (one_sample, f"t1_spgd_mean{MEAN_SAMPLES}_{task}")]
        for spgd_job, other_job in pairs + [(one_sample, f"t1_dps_{task}")]:
            if spgd_job not in by_job or other_job not in by_job:
                continue
            ours, other = by_job[spgd_job], by_job[other_job]
            diff = np.asarray(ours["per_image"]["psnr"]) - np.asarray(other["per_image"]["psnr"])
            gain = float(diff.mean())
            stderr = float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else float("nan")
            against = "classical" if other["row"] == "classical" else "DPS"
            lpips = (ours["lpips"]["mean"], other["lpips"]["mean"]) if "lpips" in ours else None
            met = gain >= 0 if against == "DPS" else \
                gain >= CLASSICAL_MARGIN_DB and (lpips is None or lpips[0] < lpips[1])
            comparisons.append({"task": task, "spgd": ours["row"], "against": against, "gain": gain,
                                "stderr": stderr, "ahead": int((diff > 0).sum()), "images": int(diff.size),
                                "lpips": lpips, "met": bool(met)})
    return comparisons


def bars_markdown(rows: list[dict]) -> str:
    """The quality-bar section of the report: one line per comparison and a verdict per bar."""
    comparisons = quality_bars(rows)
    if not comparisons:
        return ""
    lines = ["", "## Quality bars", "",
             f"SPGD minus the other method on the same test images: PSNR gain in dB (mean of the paired "
             f"per-image differences ± its standard error); ahead: images where SPGD's PSNR is higher. "
             f"Bars: at least +{CLASSICAL_MARGIN_DB:g} dB over the classical baseline with lower LPIPS; "
             f"at least +0 dB against DPS at equal NFE on {DPS_TASKS_NEEDED} of {len(TABLE1_TASKS)} tasks.", "",
             "| task | SPGD row | against | PSNR gain | ahead | LPIPS SPGD / other | met |", "|---|---|---|---:|---:|---|---|"]
    for c in comparisons:
        lpips = f"{c['lpips'][0]:.3f} / {c['lpips'][1]:.3f}" if c["lpips"] else "-"
        lines.append(f"| {c['task']} | {c['spgd']} | {c['against']} | {c['gain']:+.2f} ± {c['stderr']:.2f} | "
                     f"{c['ahead']}/{c['images']} | {lpips} | {'yes' if c['met'] else 'no'} |")
    lines.append("")
    against_dps = [c for c in comparisons if c["against"] == "DPS"]
    if against_dps:
        wins = sum(c["met"] for c in against_dps)
        verdict = ("met" if wins >= DPS_TASKS_NEEDED else "not met" if len(against_dps) == len(TABLE1_TASKS)
                   else f"open ({len(against_dps)} of {len(TABLE1_TASKS)} tasks have a DPS row)")
        lines.append(f"- DPS at equal NFE: SPGD matches or beats it on {wins} of {len(against_dps)} tasks "
                     f"({', '.join(c['task'] for c in against_dps if c['met']) or 'none'}); "
                     f"bar {DPS_TASKS_NEEDED} of {len(TABLE1_TASKS)}: {verdict}.")
    for spgd_row in dict.fromkeys(c["spgd"] for c in comparisons if c["against"] == "classical"):
        chosen = [c for c in comparisons if c["against"] == "classical" and c["spgd"] == spgd_row]
        met = [c["task"] for c in chosen if c["met"]]
        lines.append(f"- Classical baselines, {spgd_row}: bar met on {len(met)} of {len(chosen)} tasks "
                     f"({', '.join(met) or 'none'}).")
    return "\n".join(lines) + "\n"


def paired_gains(rows: list[dict]) -> list[dict]:
    """SPGD (one sample) minus every other Table 1 row of its task, on the same test images: for each metric,
    the mean of the paired per-image differences and its standard error."""
    out = []
    for task in TABLE1_TASKS:
        table1 = [r for r in rows if r["table"] == "1" and r["task"] == task]
        ours = next((r for r in table1 if r["job"] == f"t1_spgd_{task}"), None)
        if ours is None:
            continue
        for other in table1:
            if other is ours:
                continue
            gains = {}
            for metric in ours["per_image"]:
                if metric in other["per_image"]:
                    diff = np.asarray(ours["per_image"][metric]) - np.asarray(other["per_image"][metric])
                    stderr = float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else float("nan")
                    gains[metric] = {"gain": float(diff.mean()), "stderr": stderr}
            out.append({"task": task, "against": other["row"], "images": len(ours["per_image"]["psnr"]), **gains})
    return out


def gains_markdown(rows: list[dict]) -> str:
    """The paired SPGD-minus-method section of the report (empty without an SPGD Table 1 row)."""
    gains = paired_gains(rows)
    if not gains:
        return ""
    metrics_shown = [m for m in ("psnr", "ssim", "lpips", "lpips_vgg") if any(m in g for g in gains)]
    labels = {"psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS", "lpips_vgg": "LPIPS-VGG"}
    lines = ["", "## SPGD minus each method (paired, same test images)", "",
             "Mean of the per-image differences SPGD - method ± its standard error (positive PSNR/SSIM and negative "
             "LPIPS favour SPGD).", "", "| task | method | " + " | ".join(labels[m] for m in metrics_shown) + " |",
             "|---|---|" + "---:|" * len(metrics_shown)]
    spec = {"psnr": "+.2f", "ssim": "+.3f", "lpips": "+.3f", "lpips_vgg": "+.3f"}
    for g in gains:
        cells = [f"{g[m]['gain']:{spec[m]}} ± {g[m]['stderr']:.{spec[m][-2]}f}" if m in g else "-" for m in metrics_shown]
        lines.append(f"| {g['task']} | {g['against']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
