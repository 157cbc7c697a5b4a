"""Singular value decompositions of the linear task operators, for DDRM (Kawar et al. 2022).

``svd(operator)`` returns an ``SVDForward``: a frozen, hashable callable ``forward(x, params)`` (the task's
own forward, unchanged) that also applies the factors of A = U S V^T to ONE image:

- ``vt(x, params)``: V^T x, spectral coefficients of x's shape (H, W, C);
- ``v(c, params)``: V c, the image of spectral coefficients c (H, W, C);
- ``ut(y, params, x_shape)``: U^T y laid out on the (H, W, C) spectral grid of x_shape, 0 where A has no
  singular value;
- ``u(c, params)``: U applied to the measured part of c (H, W, C), a measurement of y's shape;
- ``singulars(params, x_shape)``: the singular values on that grid (broadcastable to x_shape, 0 where
  A has none), so forward(x) == u(singulars * vt(x)).

The factors act identically on every channel. Available for:
- ``inpaint`` / ``inpaint_box``: A = diag(mask): U = V = I, singular values = the mask (1 kept, 0 removed);
  ``ut`` also zeroes the removed pixels of y (their measurement is pure noise).
- ``gauss_deblur``: the blur is separable: with reflect padding (``d c b | a b c d | c b a``) and the
  kernel outer(g, g), blur(x) = B x B^T per channel with B the (H, H) 1-D reflect-padded correlation
  matrix of g (g = the kernel's row sums); B = U_b S_b V_b^T by NumPy in float64.
- ``sr4``: antialiased bicubic downsampling, x -> R x C^T with R, C = resize_matrix(H or W, 1/factor).
Motion deblurring (per-image, non-separable kernels) and the non-linear tasks have none: ValueError.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._blur import gaussian_kernel
from ._operator import Operator
from ._resize import resize_matrix

__all__ = ["SVDForward", "svd"]

_HI = jax.lax.Precision.HIGHEST


class SVDForward:
    """Base of forward operators that carry their SVD A = U S V^T (see the module docstring).

    Subclasses implement __call__(x, params), vt, v, ut, u and singulars for ONE image x (H, W, C); they
    must be hashable (static under jit). DDRM accepts exactly the forwards that are SVDForward instances."""

    def __call__(self, x: jax.Array, params: Any) -> jax.Array:
        raise NotImplementedError

    def vt(self, x: jax.Array, params: Any) -> jax.Array:
        raise NotImplementedError

    def v(self, c: jax.Array, params: Any) -> jax.Array:
        raise NotImplementedError

    def ut(self, y: jax.Array, params: Any, x_shape: tuple[int, int, int]) -> jax.Array:
        raise NotImplementedError

    def u(self, c: jax.Array, params: Any) -> jax.Array:
        raise NotImplementedError

    def singulars(self, params: Any, x_shape: tuple[int, int, int]) -> jax.Array:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class _MaskSVD(SVDForward):
    """A = diag(mask) (inpainting): U = V = I, singular values = mask (H, W, 1)."""

    operator: Operator

    def __call__(self, x, params):
        return self.operator.forward(x, params)

    def vt(self, x, params):
        return x

    def v(self, c, params):
        return c

    def ut(self, y, params, x_shape):
        return y * params["mask"].astype(y.dtype)

    def u(self, c, params):
        return c * params["mask"].astype(c.dtype)

    def singulars(self, params, x_shape):
        return params["mask"].astype(jnp.float32)


@functools.lru_cache(maxsize=32)
def _factors(matrix_key: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U (m, m), s (m,), V^T (n, n)) float64 of the 1-D matrix named by matrix_key (m <= n)."""
    kind, n, value = matrix_key
    if kind == "blur":
        matrix = _reflect_correlation_matrix(np.asarray(value, np.float64), n)
    else:
        matrix = resize_matrix(n, value, True)
    u, s, vt = np.linalg.svd(matrix, full_matrices=True)
    return u, s, vt


def _reflect_correlation_matrix(taps: np.ndarray, n: int) -> np.ndarray:
    """(n, n) matrix of out[i] = sum_t taps[t] * x[reflect(i + t - k // 2)], k = len(taps), with
    whole-sample reflection (jnp.pad mode 'reflect': index -1 -> 1, n -> n - 2), as _blur.blur pads."""
    pad = len(taps) // 2
    index = np.arange(n)[:, None] + np.arange(len(taps))[None, :] - pad
    index = np.where(index < 0, -index, index)
    index = np.where(index >= n, 2 * (n - 1) - index, index)
    matrix = np.zeros((n, n))
    np.add.at(matrix, (np.repeat(np.arange(n), len(taps)), index.ravel()), np.tile(taps, n))
    return matrix


@dataclasses.dataclass(frozen=True)
class _SeparableSVD(SVDForward):
    """A x = R x C^T per channel with R = U_r S_r V_r^T (h, H) and C = U_c S_c V_c^T (w, W), h <= H, w <= W.

    kind "blur" (value: the 1-D taps, a tuple) or "resize" (value: the scale); the 1-D matrices depend on
    the image's H and W and are built (and factored) on the host once per shape."""

    operator: Operator
    kind: str
    value: Any

    def __call__(self, x, params):
        return self.operator.forward(x, params)

    def _factors(self, x_shape):
        return _factors((self.kind, x_shape[0], self.value)), _factors((self.kind, x_shape[1], self.value))

    def vt(self, x, params):
        (_, _, vt_r), (_, _, vt_c) = self._factors(x.shape)
        return jnp.einsum("ah,hwc,bw->abc", jnp.asarray(vt_r, x.dtype), x, jnp.asarray(vt_c, x.dtype), precision=_HI)

    def v(self, c, params):
        (_, _, vt_r), (_, _, vt_c) = self._factors(c.shape)
        return jnp.einsum("ah,abc,bw->hwc", jnp.asarray(vt_r, c.dtype), c, jnp.asarray(vt_c, c.dtype), precision=_HI)

    def ut(self, y, params, x_shape):
        (u_r, _, _), (u_c, _, _) = self._factors(x_shape)
        coefficients = jnp.einsum("ia,ijc,jb->abc", jnp.asarray(u_r, y.dtype), y, jnp.asarray(u_c, y.dtype), precision=_HI)
        return jnp.zeros(tuple(x_shape[:2]) + y.shape[2:], y.dtype).at[: y.shape[0], : y.shape[1]].set(coefficients)

    def u(self, c, params):
        (u_r, _, _), (u_c, _, _) = self._factors(c.shape)
        measured = c[: u_r.shape[0], : u_c.shape[0]]
        return jnp.einsum("ia,abc,jb->ijc", jnp.asarray(u_r, c.dtype), measured, jnp.asarray(u_c, c.dtype), precision=_HI)

    def singulars(self, params, x_shape):
        (_, s_r, _), (_, s_c, _) = self._factors(x_shape)
        grid = np.zeros(tuple(x_shape[:2]) + (1,))
        grid[: len(s_r), : len(s_c), 0] = np.outer(s_r, s_c)
        return jnp.asarray(grid, jnp.float32)


def svd(operator: Operator) -> SVDForward:
    """The task operator as an SVDForward (its forward unchanged, plus its SVD factors); see the module docstring.

    ValueError for an operator without an SVD here (motion_deblur, non-linear or unknown tasks)."""
    if operator.name in ("inpaint", "inpaint_box"):
        return _MaskSVD(operator)
    settings = dict(operator.settings)
    if operator.name == "gauss_deblur":
        kernel = gaussian_kernel(settings["kernel_size"], settings["std"], settings["truncate"]).astype(np.float64)
        return _SeparableSVD(operator, "blur", tuple(kernel.sum(axis=1).tolist()))  # kernel = outer(g, g), sum(g) = 1
    if operator.name == "sr4":
        return _SeparableSVD(operator, "resize", 1.0 / settings["factor"])
    if operator.name == "motion_deblur":
        raise ValueError("motion_deblur has no SVD here: its per-image motion kernels are not separable, so "
                         "SVD-based methods (DDRM) do not apply to it (the SPGD paper's Table 1 has '-' for DDRM)")
    raise ValueError(f"no SVD for the operator {operator.name!r}: SVDs exist for inpaint, inpaint_box, gauss_deblur "
                     "and sr4 (linear operators with a diagonal or separable matrix)")
