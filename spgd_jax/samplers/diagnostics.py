"""Looking inside an SPGD run: gradient angles (the paper's Figure 2), recorded inside the compiled loop.

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

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["NAMES", "Tracker", "angle", "init_tracker", "step_means", "track"]

NAMES = ("likelihood_vs_denoising", "likelihood_consecutive", "smoothed_consecutive", "denoising_consecutive")
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
