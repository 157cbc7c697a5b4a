"""Writing a run's outputs: pictures, metrics, samples, diagnostics, videos, the sweep report, the config."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spgd_jax import metrics
from spgd_jax.io import images, plots
from spgd_jax.io.files import write_json, write_npz, write_text
from spgd_jax.io.plots import METRIC_LABELS
from spgd_jax.restore._args import hint
from spgd_jax.samplers import describe, sampler_of

__all__ = ["measurement_picture", "run_folders", "sweep_markdown", "video_frames", "write_outputs"]

STD_WHITE = 0.25  # std/NAME.png: a per-pixel std (mean over channels, [-1, 1] units) of this or more is white


def run_folders(root: Path, field: str | None, step_sizes: tuple[float, ...] | None) -> list[Path]:
    """One folder per run: root itself, or root/FIELD-VALUE for each step size of a sweep (e.g. lr-2.5)."""
    return [root] if step_sizes is None else [root / f"{field}-{value:g}" for value in step_sizes]


def measurement_picture(y: np.ndarray, size: int) -> np.ndarray:
    """A (size, size, 3) picture in [-1, 1] of one measurement: images as they are (upsampled by
    nearest neighbour when smaller), anything else (e.g. Fourier magnitudes) on a log scale."""
    y = np.asarray(y, dtype=np.float32)
    if y.ndim < 2:
        y = np.zeros((size, size, 3), np.float32)
    elif y.ndim != 3 or y.shape[-1] != 3:
        y = np.broadcast_to(y.reshape(y.shape[0], -1, 1)[..., :1], (y.shape[0], y.shape[0], 3))
    y = np.nan_to_num(y, nan=0.0, posinf=0.0, neginf=0.0)
    if y.min() < -1.5 or y.max() > 1.5:  # not an image in [-1, 1]: show log magnitude
        y = np.log1p(np.abs(y))
        y = 2 * (y - y.min()) / max(float(y.max() - y.min()), 1e-12) - 1
    if y.shape[0] != size:
        idx = np.arange(size) * y.shape[0] // size
        y = y[idx][:, idx]
    return np.clip(y, -1, 1)


def video_frames(trajectory: np.ndarray, x: np.ndarray, diverged_step: int, every: int) -> np.ndarray:
    """x0_hat at outer steps 0, every, 2 every, ... (those before a divergence), then the result x."""
    if diverged_step >= 0:
        trajectory = trajectory[: -(-diverged_step // every)]  # the steps s * every < diverged_step
    return np.concatenate([trajectory, x[None]])


def residual_rms(operator, x: np.ndarray, y: np.ndarray, op_params) -> np.ndarray:
    """(B,) sqrt(mean((A(x_b) - y_b)^2)): how well each restoration explains its measurement."""
    forward = jax.vmap(operator.forward) if op_params else jax.vmap(lambda image: operator.forward(image, None))
    predicted = forward(jnp.asarray(x), *([op_params] if op_params else []))
    residual = np.asarray(predicted, np.float64) - np.asarray(y, np.float64)
    return np.sqrt(np.mean(residual**2, axis=tuple(range(1, np.ndim(y)))))


def _summary(values: dict[str, np.ndarray], finite: np.ndarray) -> dict:
    return {k: {"mean": float(v[finite].mean()) if finite.any() else None,
                "std": float(v[finite].std()) if finite.any() else None} for k, v in values.items()}


def _flag_divergences(per_image, run, args, config, value) -> None:
    """Records in per_image (and warns about) every image with a diverged sample; the warning gives the
    method's hint (Sampler.hint, with the flags of the fields it names) and the run's step size."""
    sampler = sampler_of(config)
    field = sampler.step_size
    rate = getattr(config, field) if value is None and field else value
    advice = hint(describe()[sampler.name]) + ("" if rate is None else f" (this run: {field} {rate:g})")
    where = "" if value is None else f" at {field} {value:g}"
    lost = run.get("diverged_samples", run["diverged"].astype(int))  # how many of the image's samples diverged
    for record, count, step in zip(per_image, lost, run["diverged_step"]):
        if not count:
            continue
        record["diverged_at_step"] = int(step)
        if args.samples == 1:
            print(f"warning: {record['name']}{where} diverged (became NaN or inf) at outer step {int(step)}; "
                  f"its image is the last finite state. Try {advice}.", file=sys.stderr)
            continue
        record["diverged_samples"] = int(count)
        rest = (f"the restoration is the mean of the other {args.samples - count}" if count < args.samples
                else "the restoration is the mean of their last finite states")
        print(f"warning: {count} of {args.samples} samples of {record['name']}{where} diverged (became NaN or inf), "
              f"the first at outer step {int(step)}; {rest}. Try {advice}.", file=sys.stderr)


def write_run(folder: Path, names, run: dict, truth, y, op_params, operator, config, args, value) -> dict:
    """One run's restored/, metrics.json, diagnostics and videos in folder; returns its metric summary.
    value: the run's step size in a sweep (None: the config's own)."""
    x, diverged, diverged_step = run["x"], run["diverged"], run["diverged_step"]
    per_image = [{"name": name, "diverged": bool(flag)} for name, flag in zip(names, diverged)]
    _flag_divergences(per_image, run, args, config, value)
    values = {"residual_rms": residual_rms(operator, x, y, op_params)}
    if truth is not None:
        found = metrics.all_metrics(jnp.asarray(x), jnp.asarray(truth))
        values.update({k: np.asarray(v) for k, v in found.items()})
    for i, record in enumerate(per_image):
        record.update({k: float(v[i]) for k, v in values.items()})
    summary = _summary(values, ~diverged)

    (folder / "restored").mkdir(parents=True, exist_ok=True)
    for name, image in zip(names, x):
        images.save_png(folder / "restored" / f"{name}.png", image)
    if args.samples > 1:
        _write_samples(folder, names, run["samples"], truth, per_image)
    if args.video:
        (folder / "video").mkdir(exist_ok=True)
        for b, name in enumerate(names):
            frames = video_frames(run["trajectory"][b], x[b], int(diverged_step[b]), config.trajectory_every)
            plots.save_gif(folder / "video" / f"{name}.gif", frames)
    if run.get("diagnostics") is not None:
        sampler = sampler_of(config)
        rate = getattr(config, sampler.step_size) if value is None else value
        angles = {k: np.asarray(v) for k, v in run["diagnostics"].items()}
        write_npz(folder / "diagnostics.npz", names=np.asarray(names), diverged_step=diverged_step, **angles)
        plots.plot_angles(folder / "diagnostics.png", {k: v[~diverged] for k, v in angles.items()},
                          title=f"{args.task}, {sampler.name}, {sampler.step_size} {rate:g}")
    write_json(folder / "metrics.json", {
        **({} if value is None else {sampler_of(config).step_size: value}),
        **({} if args.samples == 1 else {"samples": args.samples, "restored": "the mean of the samples"}),
        "lpips": metrics.LPIPS_NAME,
        "residual_rms": "sqrt(mean((A(x) - y)^2)) per image in [-1, 1] units; compare with sigma_y",
        "mean_std_over_finite_images": summary,
        "images": per_image,
    })
    return summary


def _write_samples(folder: Path, names, samples: np.ndarray, truth, per_image: list[dict]) -> None:
    """samples.npz (every sample, (B, K, H, W, C) in [-1, 1]), std/NAME.png (per-pixel std of the samples,
    mean over channels: black 0, white STD_WHITE or more) and, against the truth, each sample's PSNR."""
    std = samples.std(axis=1).mean(axis=-1)  # (B, H, W)
    write_npz(folder / "samples.npz", samples=samples.astype(np.float32), std=std.astype(np.float32),
              names=np.asarray(names))
    (folder / "std").mkdir(exist_ok=True)
    for name, image in zip(names, std):
        gray = np.clip(image / STD_WHITE, 0.0, 1.0) * 2.0 - 1.0
        images.save_png(folder / "std" / f"{name}.png", np.repeat(gray[..., None], 3, axis=-1))
    for record, image_std in zip(per_image, std):
        record["std_mean"] = float(image_std.mean())
    if truth is not None:
        for record, image_samples, reference in zip(per_image, samples, truth):
            scores = metrics.psnr(jnp.asarray(image_samples), jnp.broadcast_to(reference, image_samples.shape))
            record["sample_psnr"] = [float(v) for v in scores]


def sweep_markdown(field: str, step_sizes: Sequence[float], summaries: Sequence[dict], diverged: Sequence[int],
                   images: int, title: str) -> str:
    """A markdown report: one row per step size (the config field `field`), mean +- std over the images that
    did not diverge.

    summaries[k]: {metric: {"mean": float | None, "std": float | None}} (restore's metrics.json summary).
    diverged[k]: how many of the `images` images diverged at step_sizes[k].
    """
    names = [n for n in METRIC_LABELS if any(n in s for s in summaries)]
    lines = [f"# {title}", "", f"| {field} | " + " | ".join(METRIC_LABELS[n] for n in names) + " | diverged |",
             "|---:|" + "---:|" * len(names) + "---:|"]
    for value, summary, count in zip(step_sizes, summaries, diverged):
        cells = []
        for name in names:
            found = summary.get(name, {})
            cells.append("-" if found.get("mean") is None else f"{found['mean']:.4g} ± {found['std']:.2g}")
        lines.append(f"| {value:g} | " + " | ".join(cells) + f" | {count} / {images} |")
    lines += ["", "Mean ± std over the images that did not diverge; residual RMS = sqrt(mean((A(x) - y)^2)), "
              f"in [-1, 1] units (compare with sigma_y). Per-image values: {field}-VALUE/metrics.json."]
    return "\n".join(lines) + "\n"


def write_outputs(root: Path, runs: dict, inputs, operator, config, step_sizes, args, settings: dict) -> list[dict]:
    """Every output of the run into root (the staging folder); returns one metric summary per run folder.

    inputs: the run's Measurements; settings: what config.json records besides the sampler config."""
    size = settings["unet_config"]["image_size"]
    names, y, truth, op_params = inputs.names, inputs.y, inputs.truth, inputs.params
    pictures = [measurement_picture(yi, size) for yi in y]
    (root / "measurement").mkdir()
    for name, picture in zip(names, pictures):
        images.save_png(root / "measurement" / f"{name}.png", picture)
    write_npz(root / "measurement.npz", y=np.asarray(y), names=np.asarray(names), task=np.asarray(args.task),
              **{f"param_{k}": v for k, v in op_params.items()})
    sampler = sampler_of(config)
    summaries = []
    for k, folder in enumerate(run_folders(root, sampler.step_size, step_sizes)):
        run = jax.tree_util.tree_map(lambda a: a[k], runs)
        summaries.append(write_run(folder, names, run, truth, y, op_params, operator, config, args,
                                   None if step_sizes is None else step_sizes[k]))
    rows = [np.concatenate(([truth[i]] if truth is not None else []) + [pictures[i]] + list(runs["x"][:, i]), axis=1)
            for i in range(len(names))]
    images.save_png(root / "grid.png", np.concatenate(rows, axis=0))
    if step_sizes is not None:
        diverged = [int(d.sum()) for d in runs["diverged"]]
        title = (f"{args.task}: {sampler.name} {sampler.step_size} sweep ({len(names)} image(s), "
                 f"{config.steps} steps)")
        write_text(root / "sweep.md", sweep_markdown(sampler.step_size, step_sizes, summaries, diverged, len(names),
                                                     title))
        plots.plot_sweep(root / "sweep.png", step_sizes, summaries, title, sampler.step_size)
    swept = {} if step_sizes is None else {sampler.step_size: list(step_sizes)}
    write_json(root / "config.json", {
        "task": args.task,
        "operator": {"sigma_y": operator.sigma_y, **dict(operator.settings)},
        "sampler": sampler.name,
        "sampler_config": {**dataclasses.asdict(config), **swept},
        "step_sizes": swept or None,
        **settings,
    })
    return summaries
