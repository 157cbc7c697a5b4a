"""Learning-rate sweeps: SPGD at several learning rates in one compiled call.

    result = spgd_jax.sweep_lr(denoiser, op.forward, y, key, config, [0.5, 1, 2, 4], params, x_shape=(64, 64, 3))
    result.x[k]              # (B, H, W, C), the restoration at lrs[k]
    result.diverged[k]       # (B,) which images diverged at lrs[k]

Every learning rate starts from the same initial noise (the same key) and measurements, so the runs
differ only in eta: result.x[k] equals `sample(..., dataclasses.replace(config, lr=lrs[k]))` (to
float32 rounding of the batched network). The learning rate is a traced value (`jax.vmap` over it),
so one compilation serves every list of the same length.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from spgd_jax.diagnostics import save_figure
from spgd_jax.loop import SampleResult
from spgd_jax.sampling import _check_measurements, check_x_shape, initial_noise
from spgd_jax.spgd import SPGDConfig, spgd

__all__ = ["sweep_lr", "check_lrs", "markdown_table", "plot_sweep"]


def check_lrs(lrs: Sequence[float]) -> tuple[float, ...]:
    """The learning rates as a tuple of floats; ValueError unless a non-empty list of finite numbers > 0."""
    try:
        values = tuple(float(v) for v in lrs)
    except (TypeError, ValueError):
        raise ValueError(f"learning rates must be a list of numbers, e.g. [0.5, 1, 2, 4]; got {lrs!r}") from None
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if not values or bad:
        raise ValueError(f"learning rates must be finite and > 0 (at least one); got {list(values)}")
    return values


def sweep_lr(
    denoiser: Callable[[jax.Array, jax.Array], jax.Array],
    forward: Callable[[jax.Array, Any], jax.Array],
    y: jax.Array,
    key: jax.Array,
    config: SPGDConfig,
    lrs: Sequence[float] | jax.Array,
    params: Any = None,
    *,
    x_shape: tuple[int, int, int],
    progress: Callable[[int], None] | None = None,
) -> SampleResult:
    """SPGD for each learning rate in lrs (L values; config.lr is ignored), batched over images and rates.

    Arguments as spgd_jax.sample. Returns a SampleResult whose every array has a leading axis L:
    x (L, B, H, W, C), diverged (L, B), diverged_step (L, B), trajectory (L, B, K, H, W, C) or None,
    losses (L, B, T, N), diagnostics {name: (L, B, T)} or None. progress(i) may be called once per
    learning rate for each outer step i.
    """
    if not isinstance(config, SPGDConfig):
        raise TypeError(f"sweep_lr sweeps SPGD's learning rate: config must be an SPGDConfig, "
                        f"got {type(config).__name__}")
    lrs = jnp.asarray(check_lrs(lrs), jnp.float32)
    return _sweep(denoiser, forward, y, key, config, lrs, params, check_x_shape(x_shape), progress)


@functools.partial(jax.jit, static_argnums=(0, 1, 4, 7, 8))
def _sweep(denoiser, forward, y, key, config, lrs, params, x_shape, progress) -> SampleResult:
    _check_measurements(forward, y, params, y.shape[0], x_shape)
    x_init = initial_noise(key, y.shape[0], x_shape, config.sigma_max)
    return jax.vmap(lambda lr: spgd(denoiser, forward, y, x_init, config, params, progress, lr=lr))(lrs)


_COLUMNS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS", "residual_rms": "residual RMS"}


def markdown_table(lrs: Sequence[float], summaries: Sequence[dict], diverged: Sequence[int], images: int,
                   title: str) -> str:
    """A markdown report: one row per learning rate, mean +- std over the images that did not diverge.

    summaries[k]: {metric: {"mean": float | None, "std": float | None}} (restore's metrics.json summary).
    diverged[k]: how many of the `images` images diverged at lrs[k].
    """
    names = [n for n in _COLUMNS if any(n in s for s in summaries)]
    lines = [f"# {title}", "", "| lr | " + " | ".join(_COLUMNS[n] for n in names) + " | diverged |",
             "|---:|" + "---:|" * len(names) + "---:|"]
    for lr, summary, count in zip(lrs, summaries, diverged):
        cells = []
        for name in names:
            value = summary.get(name, {})
            cells.append("-" if value.get("mean") is None else f"{value['mean']:.4g} ± {value['std']:.2g}")
        lines.append(f"| {lr:g} | " + " | ".join(cells) + f" | {count} / {images} |")
    lines += ["", "Mean ± std over the images that did not diverge; residual RMS = sqrt(mean((A(x) - y)^2)), "
              "in [-1, 1] units (compare with sigma_y). Per-image values: lr-VALUE/metrics.json."]
    return "\n".join(lines) + "\n"


def plot_sweep(path, lrs: Sequence[float], summaries: Sequence[dict], title: str) -> None:
    """A PNG with one panel per metric (PSNR, SSIM, LPIPS, residual RMS, those present) against lr (log
    axis), mean +- std over the images that did not diverge; written atomically."""
    save_figure(sweep_figure(lrs, summaries, title), path)


def sweep_figure(lrs: Sequence[float], summaries: Sequence[dict], title: str):
    """The matplotlib Figure of plot_sweep. The x ticks are the swept rates themselves, labelled as given
    (%g) without the log axis's minor labels, which overlap when the rates span less than a decade."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone
    from matplotlib.ticker import NullFormatter, NullLocator

    names = [n for n in _COLUMNS if any(n in s for s in summaries)]
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
        axis.set_xlabel("learning rate")
        axis.set_title(_COLUMNS[name])
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return figure
