"""Linear algebra on a linear forward model given only as a function: its transpose, the proximal step of
the data term, and the projection onto the measurement-consistent set.

These are what the projection and splitting samplers (Score-SDE, MCG, DiffPIR, PnP-ADMM) need of an
operator. All act on ONE image and are jit/vmap friendly; the solves run at most a fixed number of conjugate-
gradient iterations (conjugate_gradients, which stops at convergence), so their cost is static. A non-linear forward model
(phase retrieval, HDR) raises a ValueError naming the problem.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = ["adjoint", "conjugate_gradients", "project", "proximal"]


def adjoint(forward: Callable[[jax.Array, Any], jax.Array], params: Any, x_shape: tuple[int, ...]):
    """A^T as a function y -> (H, W, C), for the linear x -> forward(x, params) on images of x_shape.

    Calling it raises ValueError if forward is not linear in x (jax.linear_transpose finds a primitive
    without a transpose rule). Where jax.linear_transpose cannot trace a linear forward (inside shard_map it
    fails on some batched primitives), A^T y is the vector-Jacobian product at x = 0 instead, equal for a
    linear A."""
    zeros = jnp.zeros(x_shape, jnp.float32)
    linear = lambda x: forward(x, params)

    def apply(y: jax.Array) -> jax.Array:
        try:
            return jax.linear_transpose(linear, zeros)(y)[0]
        except NotImplementedError as error:
            if "Transpose rule" in str(error):  # a non-linear primitive
                raise ValueError(
                    "this method needs a linear forward operator (inpainting, deblurring, SR); the given one is "
                    f"not linear in x ({str(error).splitlines()[0]})") from None
        except (IndexError, TypeError, ValueError):  # JAX could not transpose here; see the docstring
            pass
        return jax.vjp(linear, zeros)[1](y)[0]

    return apply


def proximal(forward, params, y: jax.Array, z: jax.Array, rho: jax.Array | float, iterations: int = 30) -> jax.Array:
    """argmin_x ||A x - y||^2 + rho ||x - z||^2 for ONE image: (A^T A + rho I) x = A^T y + rho z by CG from z.

    z: (H, W, C); y: one measurement; rho > 0 (a scalar, may be traced). Exact for a diagonal A^T A
    (inpainting) after one iteration; for blur and resize, iterations bound the error."""
    transpose = adjoint(forward, params, z.shape)
    normal = lambda x: transpose(forward(x, params)) + rho * x
    return conjugate_gradients(normal, transpose(y) + rho * z, z, iterations)


def project(forward, params, y: jax.Array, x: jax.Array, iterations: int = 30) -> jax.Array:
    """The point of {x' : A x' = y} closest to x, for ONE image: x + A^+ (y - A x), A^+ r the least-norm
    least-squares solution of A d = r, by CG on A^T A d = A^T r from d = 0 in image space. For inpainting this
    replaces the kept pixels by y; for an A without full row rank it is the closest least-squares point.

    (CG on A A^T v = y - A x in measurement space diverged where y has a component outside A's range, as our
    inpainting y has: noise on the removed pixels, where A A^T is 0; A^T r always lies in A^T A's range.)"""
    transpose = adjoint(forward, params, x.shape)
    normal = lambda d: transpose(forward(d, params))
    return x + conjugate_gradients(normal, transpose(y - forward(x, params)), jnp.zeros_like(x), iterations)


def conjugate_gradients(matrix: Callable[[jax.Array], jax.Array], b: jax.Array, x0: jax.Array,
                        iterations: int, tolerance: float = 1e-6) -> jax.Array:
    """x with matrix(x) ~= b, for a symmetric positive semi-definite linear `matrix`, by at most `iterations`
    steps of conjugate gradients from x0.

    The solve stops once the residual norm is at most `tolerance` ||b|| (1e-6: about float32's resolution of
    the residual) or a step has no curvature left: later iterations leave x unchanged, so x stays finite at
    any iteration count. (Run on, float32 CG drives its recursive residual below the smallest normal float,
    loses conjugacy and diverges: Gaussian deblurring at 64 px, rho 2.7e-2, gave NaN at 500 iterations.)
    A plain fori_loop with a frozen state, not a while_loop: it traces under vmap, grad and shard_map alike,
    and its cost is static."""
    threshold = tolerance**2 * jnp.vdot(b, b)

    def step(_, state):
        x, r, p, rr = state
        q = matrix(p)
        curvature = jnp.vdot(p, q)
        active = (rr > threshold) & (curvature > 0)
        alpha = jnp.where(active, rr / jnp.where(active, curvature, 1.0), 0.0)
        x_next, r_next = x + alpha * p, r - alpha * q
        rr_next = jnp.vdot(r_next, r_next)
        beta = rr_next / jnp.where(active, rr, 1.0)
        keep = lambda new, old: jnp.where(active, new, old)
        return keep(x_next, x), keep(r_next, r), keep(r_next + beta * p, p), keep(rr_next, rr)

    r = b - matrix(x0)
    return jax.lax.fori_loop(0, iterations, step, (x0, r, r, jnp.vdot(r, r)))[0]
