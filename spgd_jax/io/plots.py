"""Pictures of runs: gradient angles, learning-rate sweeps, x0_hat videos, training curves; every file
written atomically.

matplotlib and Pillow are imported on use, and only here (and in spgd_jax.io.images).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from spgd_jax.io.files import atomic_write
from spgd_jax.samplers.diagnostics import NAMES

__all__ = ["METRIC_LABELS", "plot_angles", "plot_curve", "plot_sweep", "save_figure", "save_gif", "sweep_figure"]

_LABELS = {
    "likelihood_vs_denoising": "likelihood g vs denoising D(x)-x",
    "likelihood_consecutive": "consecutive likelihood g (raw)",
    "smoothed_consecutive": "consecutive update m (ADM-smoothed)",
    "denoising_consecutive": "consecutive denoising D(x)-x",
}

METRIC_LABELS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS", "residual_rms": "residual RMS"}


def plot_angles(path: str | os.PathLike, diagnostics: dict, title: str = "") -> None:
    """Writes a PNG of the angles (mean and 10-90% band over the images) against the outer step.

    diagnostics: SampleResult.diagnostics, {name: (B, T)}; NaNs are skipped. Leave out images that diverged
    (their entries after divergence are meaningless). Atomic: the file appears complete or not at all.
    """
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    figure = Figure(figsize=(7, 4), dpi=100)
    axis = figure.subplots()
    for name in NAMES:
        values = np.asarray(diagnostics[name], dtype=np.float64)
        if values.size == 0 or np.all(np.isnan(values)):
            continue
        steps = np.arange(values.shape[-1])
        (line,) = axis.plot(steps, np.nanmean(values, axis=0), label=_LABELS[name])
        if values.shape[0] > 1:
            low, high = np.nanpercentile(values, [10, 90], axis=0)
            axis.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    axis.axhline(90, color="grey", linewidth=0.8, linestyle=":")
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.set_xlabel("outer step i")
    axis.set_ylabel("angle (degrees)")
    axis.set_ylim(0, 180)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=8, loc="best")
    else:
        axis.text(0.5, 0.5, "no finite values to show", ha="center", va="center", transform=axis.transAxes)
    if title:
        axis.set_title(title)
    save_figure(figure, path)


def save_figure(figure, path: str | os.PathLike) -> None:
    """Writes a matplotlib Figure as PNG atomically: the file appears complete or not at all."""
    figure.tight_layout()
    atomic_write(path, lambda stream: figure.savefig(stream, format="png"))


def save_gif(path: str | os.PathLike, frames: np.ndarray, duration_ms: int = 80, min_size: int = 128) -> None:
    """Writes an animated GIF (looping, last frame held 1 s) of frames (K, H, W, 3) in [-1, 1], atomically.

    Frames smaller than min_size are enlarged by an integer factor (nearest neighbour).
    """
    from PIL import Image

    from spgd_jax.io.images import to_uint8

    frames = to_uint8(np.asarray(frames))
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be (K, H, W, 3) with K >= 1, got shape {frames.shape}")
    factor = max(1, -(-min_size // frames.shape[1]))
    frames = frames.repeat(factor, axis=1).repeat(factor, axis=2)
    pictures = [Image.fromarray(frame) for frame in frames]
    durations = [duration_ms] * (len(pictures) - 1) + [1000]
    atomic_write(path, lambda stream: pictures[0].save(stream, format="GIF", save_all=True,
                                                       append_images=pictures[1:], duration=durations, loop=0))


def plot_sweep(path, lrs: Sequence[float], summaries: Sequence[dict], title: str, xlabel: str = "lr") -> None:
    """A PNG with one panel per metric (PSNR, SSIM, LPIPS, residual RMS, those present) against the swept step
    size `xlabel` (lr, zeta, ...; log axis), mean +- std over the images that did not diverge; written atomically."""
    save_figure(sweep_figure(lrs, summaries, title, xlabel), path)


def sweep_figure(lrs: Sequence[float], summaries: Sequence[dict], title: str, xlabel: str = "lr"):
    """The matplotlib Figure of plot_sweep. The x ticks are the swept values themselves, labelled as given
    (%g) without the log axis's minor labels, which overlap when the values span less than a decade."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone
    from matplotlib.ticker import NullFormatter, NullLocator

    names = [n for n in METRIC_LABELS if any(n in s for s in summaries)]
    figure = Figure(figsize=(3.2 * len(names), 3.2), dpi=100)
    axes = figure.subplots(1, len(names), squeeze=False)
    for axis, name in zip(axes[0], names):
        points = [(lr, s[name]["mean"], s[name]["std"]) for lr, s in zip(lrs, summaries)
                  if s.get(name, {}).get("mean") is not None]
        if points:
            x, mean, std = map(list, zip(*points))
            axis.errorbar(x, mean, yerr=std, marker="o", capsize=3)
        axis.set_xscale("log")
        axis.xaxis.set_minor_locator(NullLocator())
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xticks(list(lrs), [f"{lr:g}" for lr in lrs], rotation=45 if len(lrs) > 4 else 0, fontsize=8)
        axis.set_xlabel(xlabel)
        axis.set_title(METRIC_LABELS[name])
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return figure


def plot_curve(path: str | os.PathLike, curves: dict[str, tuple[Sequence[float], Sequence[float]]],
               xlabel: str, ylabel: str, title: str = "", log_y: bool = False) -> None:
    """A PNG of one or more curves {label: (x, y)} on one axis (points drawn where a curve has few), written
    atomically; non-finite (and, with log_y, non-positive) values are left out; no curve with a value
    left: the axis says so."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    figure = Figure(figsize=(7, 4), dpi=100)
    axis = figure.subplots()
    drawn = False
    for label, (x, y) in curves.items():
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        keep = np.isfinite(x) & np.isfinite(y) & ((y > 0) if log_y else True)
        if keep.any():
            axis.plot(x[keep], y[keep], marker="o" if keep.sum() <= 30 else None, markersize=3, label=label)
            drawn = True
    if drawn:
        if log_y:
            axis.set_yscale("log")
        axis.legend(fontsize=8, loc="best")
    else:
        axis.text(0.5, 0.5, "no finite values to show", ha="center", va="center", transform=axis.transAxes)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    if title:
        axis.set_title(title, fontsize=9)
    save_figure(figure, path)
