"""Linear algebra on a linear forward model given only as a function: its transpose, the proximal step of
the data term, and the projection onto the measurement-consistent set.

These are what the projection and splitting samplers (Score-SDE, MCG, DiffPIR, PnP-ADMM) need of an
operator. All act on ONE image and are jit/vmap friendly; the solves run a fixed number of conjugate-
gradient iterations (jax.scipy.sparse.linalg.cg), so their cost is static. A non-linear forward model
(phase retrieval, HDR) raises a ValueError naming the problem.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = ["adjoint", "project", "proximal"]


def adjoint(forward: Callable[[jax.Array, Any], jax.Array], params: Any, x_shape: tuple[int, ...]):
    """A^T as a function y -> (H, W, C), for the linear x -> forward(x, params) on images of x_shape.

    Calling it raises ValueError if forward is not linear in x."""
    transpose = jax.linear_transpose(lambda x: forward(x, params), jax.ShapeDtypeStruct(x_shape, jnp.float32))

    def apply(y: jax.Array) -> jax.Array:
        try:
            return transpose(y)[0]
        except (NotImplementedError, TypeError, ValueError) as error:  # a primitive without a transpose rule
            raise ValueError(
                "this method needs a linear forward operator (inpainting, deblurring, SR); the given one is "
                f"not linear in x ({type(error).__name__}: {str(error).splitlines()[0]})") from None

    return apply


def proximal(forward, params, y: jax.Array, z: jax.Array, rho: jax.Array | float, iterations: int = 30) -> jax.Array:
    """argmin_x ||A x - y||^2 + rho ||x - z||^2 for ONE image: (A^T A + rho I) x = A^T y + rho z by CG from z.

    z: (H, W, C); y: one measurement; rho > 0 (a scalar, may be traced). Exact for a diagonal A^T A
    (inpainting) after one iteration; for blur and resize, iterations bound the error."""
    transpose = adjoint(forward, params, z.shape)
    normal = lambda x: transpose(forward(x, params)) + rho * x
    solution, _ = jax.scipy.sparse.linalg.cg(normal, transpose(y) + rho * z, x0=z, maxiter=iterations)
    return solution


def project(forward, params, y: jax.Array, x: jax.Array, iterations: int = 30) -> jax.Array:
    """The point of {x' : A x' = y} closest to x, for ONE image: x + A^T (A A^T)^{-1} (y - A x), by CG in the
    measurement space. For inpainting this replaces the kept pixels by y; for an A without full row rank
    CG returns a least-squares point."""
    transpose = adjoint(forward, params, x.shape)
    gram = lambda v: forward(transpose(v), params)
    residual = y - forward(x, params)
    correction, _ = jax.scipy.sparse.linalg.cg(gram, residual, x0=jnp.zeros_like(residual), maxiter=iterations)
    return x + transpose(correction)
