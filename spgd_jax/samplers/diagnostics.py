"""Looking inside an SPGD run: gradient angles (the paper's Figure 2), their plot, and a video of x0_hat.

With ``SPGDConfig(diagnostics=True)`` the compiled run also records, per image and outer step i
(sigma = t_i), over the warm-up iterations j = 0..N-1 at the points x^j (SPEC section 3.2):

    g_j = grad_x ||A(D(x^j; t_i)) - y||^2   the likelihood gradient (raw)
    m_j                                     the direction the update x^{j+1} = x^j - eta_i m_j uses:
                                            the ADM-smoothed gradient (m_j = g_j with adm='off')
    d_j = D(x^j; t_i) - x^j                 the denoising direction (the Euler step moves along it)

and returns in ``SampleResult.diagnostics`` four (B, T) float32 arrays of angles in degrees,
angle(a, b) = arccos(a.b / (|a| |b|)) over the whole image (see `angle`):

    likelihood_vs_denoising  mean over j = 0..N-1 of angle(g_j, d_j)
    likelihood_consecutive   mean over j = 1..N-1 of angle(g_j, g_{j-1})
    smoothed_consecutive     mean over j = 1..N-1 of angle(m_j, m_{j-1})
    denoising_consecutive    mean over j = 1..N-1 of angle(d_j, d_{j-1})

The consecutive angles are NaN with N = 1 (one iteration has no predecessor). The update moves x
along -g_j and the Euler step along +d_j: likelihood_vs_denoising = 90 deg means the two do not
interact, above 90 deg that they pull the same way, below 90 deg that they conflict. Recording
costs no network evaluations and leaves the result unchanged.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spgd_jax.io.files import atomic_write

__all__ = ["NAMES", "Tracker", "angle", "track", "init_tracker", "step_means", "plot_angles", "save_figure",
           "save_gif"]

NAMES = ("likelihood_vs_denoising", "likelihood_consecutive", "smoothed_consecutive", "denoising_consecutive")
_LABELS = {
    "likelihood_vs_denoising": "likelihood g vs denoising D(x)-x",
    "likelihood_consecutive": "consecutive likelihood g (raw)",
    "smoothed_consecutive": "consecutive update m (ADM-smoothed)",
    "denoising_consecutive": "consecutive denoising D(x)-x",
}
_EPS = 1e-30  # norms below this count as zero vectors


def angle(a: jax.Array, b: jax.Array) -> jax.Array:
    """The angle in degrees, in [0, 180], between two arrays of the same shape taken as vectors.

    Computed as 2 atan2(|u - v|, |u + v|) of the unit vectors u, v (accurate near 0 and 180 deg, where
    arccos of the cosine is not); 90 deg when exactly one of them is zero.
    """
    u = a / jnp.maximum(jnp.linalg.norm(a), _EPS)
    v = b / jnp.maximum(jnp.linalg.norm(b), _EPS)
    return jnp.degrees(2.0 * jnp.arctan2(jnp.linalg.norm(u - v), jnp.linalg.norm(u + v)))


class Tracker(NamedTuple):
    """The warm-up loop's diagnostics carry for one image."""

    grad: jax.Array  # g_{j-1} (H, W, C)
    direction: jax.Array  # m_{j-1}
    denoise: jax.Array  # d_{j-1}
    sums: jax.Array  # (4,) running sums of the angles, in the order of NAMES


def init_tracker(x: jax.Array) -> Tracker:
    zeros = jnp.zeros_like(x)
    return Tracker(zeros, zeros, zeros, jnp.zeros((len(NAMES),), jnp.float32))


def track(tracker: Tracker, j: jax.Array, grad: jax.Array, direction: jax.Array, denoise: jax.Array) -> Tracker:
    """Adds warm-up iteration j's angles (the consecutive ones from j = 1 on)."""
    consecutive = jnp.stack(
        [angle(grad, tracker.grad), angle(direction, tracker.direction), angle(denoise, tracker.denoise)]
    )
    new = jnp.concatenate([angle(grad, denoise)[None], jnp.where(j > 0, consecutive, 0.0)])
    return Tracker(grad, direction, denoise, tracker.sums + new.astype(jnp.float32))


def step_means(tracker: Tracker, warmup: int) -> dict[str, jax.Array]:
    """{name: scalar} the means over one outer step's N = warmup iterations (see the module docstring)."""
    pairs = warmup - 1
    means = [tracker.sums[0] / warmup] + [
        tracker.sums[k] / pairs if pairs else jnp.float32(jnp.nan) for k in range(1, len(NAMES))
    ]
    return dict(zip(NAMES, means))


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

    from spgd_jax.images import to_uint8

    frames = to_uint8(np.asarray(frames))
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be (K, H, W, 3) with K >= 1, got shape {frames.shape}")
    factor = max(1, -(-min_size // frames.shape[1]))
    frames = frames.repeat(factor, axis=1).repeat(factor, axis=2)
    pictures = [Image.fromarray(frame) for frame in frames]
    durations = [duration_ms] * (len(pictures) - 1) + [1000]
    atomic_write(path, lambda stream: pictures[0].save(stream, format="GIF", save_all=True,
                                                       append_images=pictures[1:], duration=durations, loop=0))
