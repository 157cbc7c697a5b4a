"""The files of a dataset run: each image's as soon as its batch is done, the aggregate once all are.

Per image (each file atomic; the manifest row last, so a row means its pictures are complete):
restored/NAME.png, measurement/NAME.png, std/NAME.png (with --samples K > 1), and finished/NAME.npz
(spgd_jax.restore.manifest: the metrics row, y, the operator's parameters and the samples).
The aggregate, written by one process from the rows alone (memory for one image at a time):
metrics.json (per-image rows in the listing's order, mean and std over the finite images), grid.png
(input | measurement | restored for the first GRID_IMAGES images), measurement.npz (every y and
parameter, and the identities: fed back with --measurement and the same --seed it restores the same
bits), samples.npz (K > 1) and config.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from spgd_jax import metrics
from spgd_jax.io import images
from spgd_jax.io.files import write_json
from spgd_jax.io.stacked_npz import write_stacked_npz
from spgd_jax.restore._writers import STD_WHITE, measurement_picture, residual_rms
from spgd_jax.restore.image_stream import ImageEntry
from spgd_jax.restore.manifest import Manifest

__all__ = ["GRID_IMAGES", "write_aggregate", "write_images"]

GRID_IMAGES = 64  # grid.png shows the first this many images (all of a small run)
_PARAM = "param_"


def _save(path: Path, picture: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    images.save_png(path, picture)


def write_images(manifest: Manifest, entries: list[ImageEntry], truth: np.ndarray, result: dict, operator,
                 hint: str) -> list[dict]:
    """Every file of a batch's images, then their rows; returns the rows.

    result: x (B, H, W, C), y (B, ...), params {name: (B, ...)}, diverged (B,), diverged_step (B,), and with
    K > 1 samples (B, K, H, W, C) and diverged_samples (B,). hint: what to try after a divergence."""
    x, y, params = result["x"], result["y"], result["params"]
    values = {"residual_rms": residual_rms(operator, x, y, params or None)}
    values.update({k: np.asarray(v) for k, v in metrics.all_metrics(jnp.asarray(x), jnp.asarray(truth)).items()})
    samples = result.get("samples")
    size = x.shape[1]
    rows = []
    for b, entry in enumerate(entries):
        row = {"name": entry.name, "identity": entry.identity, "diverged": bool(result["diverged"][b]),
               **{k: float(v[b]) for k, v in values.items()}}
        arrays = {"y": np.asarray(y[b]), **{f"{_PARAM}{k}": np.asarray(v[b]) for k, v in params.items()}}
        step = int(result["diverged_step"][b])
        if step >= 0:
            row["diverged_at_step"] = step
            lost = "" if samples is None else f"{int(result['diverged_samples'][b])} of {samples.shape[1]} samples of "
            print(f"warning: {lost}{entry.name} diverged (became NaN or inf) at outer step {step}; try {hint}",
                  file=sys.stderr)
        if samples is not None:
            std = samples[b].std(axis=0).mean(axis=-1)  # (H, W)
            gray = np.clip(std / STD_WHITE, 0.0, 1.0) * 2.0 - 1.0
            _save(manifest.out / "std" / f"{entry.name}.png", np.repeat(gray[..., None], 3, axis=-1))
            scores = metrics.psnr(jnp.asarray(samples[b]), jnp.broadcast_to(truth[b], samples[b].shape))
            row.update(diverged_samples=int(result["diverged_samples"][b]), std_mean=float(std.mean()),
                       sample_psnr=[float(s) for s in scores])
            arrays.update(samples=samples[b].astype(np.float32), std=std.astype(np.float32))
        _save(manifest.out / "restored" / f"{entry.name}.png", x[b])
        _save(manifest.out / "measurement" / f"{entry.name}.png", measurement_picture(y[b], size))
        manifest.write_row(entry.name, row, arrays)
        rows.append(row)
    return rows


def _summary(rows: list[dict]) -> dict:
    finite = [r for r in rows if not r["diverged"]]
    names = [k for k in ("residual_rms", "psnr", "ssim", "lpips") if rows and k in rows[0]]
    return {k: {"mean": float(np.mean([r[k] for r in finite])) if finite else None,
                "std": float(np.std([r[k] for r in finite])) if finite else None} for k in names}


def _grid(manifest: Manifest, entries: list[ImageEntry], size: int) -> np.ndarray:
    read = lambda folder, name: images.load_image(manifest.out / folder / f"{name}.png", size)
    rows = [np.concatenate([images.load_image(e.path, size), read("measurement", e.name), read("restored", e.name)],
                           axis=1) for e in entries[:GRID_IMAGES]]
    return np.concatenate(rows, axis=0)


def write_aggregate(manifest: Manifest, entries: list[ImageEntry], size: int, task: str, config: dict) -> dict:
    """metrics.json, grid.png, measurement.npz, samples.npz (K > 1), config.json and the completed manifest,
    from the rows of the finished entries; returns the metric summary."""
    done = manifest.finished()
    finished = [e for e in entries if e.name in done]
    skipped = manifest.skipped()
    rows = [row for _, row, _ in manifest.rows([e.name for e in finished])]
    summary = _summary(rows)
    samples = config.get("samples", 1)
    write_json(manifest.out / "metrics.json", {
        **({} if samples == 1 else {"samples": samples, "restored": "the mean of the samples"}),
        "lpips": metrics.LPIPS_NAME,
        "residual_rms": "sqrt(mean((A(x) - y)^2)) per image in [-1, 1] units; compare with sigma_y",
        "mean_std_over_finite_images": summary,
        "images": rows,
        "skipped": [{"name": name, **record} for name, record in skipped.items()],
    })
    if finished:
        images.save_png(manifest.out / "grid.png", _grid(manifest, finished, size))
        _, first = manifest.read_row(finished[0].name)
        names = [e.name for e in finished]
        column = lambda key: (first[key].shape, first[key].dtype, (a[key] for _, _, a in manifest.rows(names)))
        params = {key: column(key) for key in first if key.startswith(_PARAM)}
        write_stacked_npz(manifest.out / "measurement.npz", {"y": column("y"), **params}, len(finished),
                          names=np.asarray(names), identities=np.asarray([e.identity for e in finished]),
                          task=np.asarray(task))
        if samples > 1:
            write_stacked_npz(manifest.out / "samples.npz", {"samples": column("samples"), "std": column("std")},
                              len(finished), names=np.asarray(names))
    write_json(manifest.out / "config.json", {**config, "images": len(finished), "skipped": len(skipped)})
    manifest.complete({"images": len(entries), "finished": len(finished),
                       "skipped": [{"name": name, **record} for name, record in skipped.items()]})
    return summary
