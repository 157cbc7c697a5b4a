"""Softmax attention whose gradient multiplies the (T, S) matrices only in their stored layout.

jax.grad of softmax(q k^T) v contracts the attention weights and their cotangent over their first (query)
axis; XLA:CPU runs a dot only on row-major operands, so it transposes those (B, H, T, S) matrices in memory
first. Here the backward pass computes dk^T = q^T dlogits and dv^T = g^T w instead, transposing only the
(T, C) operands and results. Values and gradients are those of the plain formulation up to float32
round-off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["attention"]


def _heads_first(a: jax.Array) -> jax.Array:
    """(B, T, H, C) -> (B, H, T, C)."""
    return jnp.swapaxes(a, 1, 2)


def _forward(q, k, v):
    """The output and the float32 weights (B, H, T, S)."""
    logits = _heads_first(q) @ jnp.moveaxis(k, 1, 3)
    weight = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return _heads_first(weight.astype(q.dtype) @ _heads_first(v)), weight


@jax.custom_vjp
def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax_s(sum_c q[b,t,h,c] k[b,s,h,c]) v[b,s,h,c] -> (B, T, H, C); q, k, v (B, T, H, C) of one dtype,
    already scaled (the logits are q . k); the softmax and its gradient in float32."""
    return _forward(q, k, v)[0]


def _attention_fwd(q, k, v):
    out, weight = _forward(q, k, v)
    return out, (q, k, v, weight)


def _attention_bwd(residuals, g):
    q, k, v, weight = residuals
    d_weight = (_heads_first(g) @ jnp.moveaxis(v, 1, 3)).astype(jnp.float32)  # (B, H, T, S)
    d_logits = (weight * (d_weight - jnp.sum(d_weight * weight, axis=-1, keepdims=True))).astype(q.dtype)
    dq = _heads_first(d_logits @ _heads_first(k))
    dk = jnp.moveaxis(jnp.moveaxis(q, 1, 3) @ d_logits, 3, 1)  # (q^T dlogits)^T: (B, H, C, S) -> (B, S, H, C)
    dv = jnp.moveaxis(jnp.moveaxis(g, 1, 3) @ weight.astype(q.dtype), 3, 1)  # (g^T w)^T
    return dq, dk, dv


attention.defvjp(_attention_fwd, _attention_bwd)
