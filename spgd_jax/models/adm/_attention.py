"""Softmax attention with a hand-written gradient, as XLA's ops or as spgd_jax's native CPU kernels.

Float32 attention traced for the CPU, where spgd_jax.xla_setup.attention_kernels has its handlers, runs as those
(forward and backward): blocks of queries against all keys in the cache, the weights recomputed in the backward
from the log of each softmax denominator. On a 2-core Xeon the `cpu-64` preset's SPGD sampler (six heads of 16
channels at 16 px) ran 1.10x faster at batch 1, 1.22x in float32 at batch 4 and 1.31x with bfloat16 convolutions at
batch 8, the default prior's 1.05x, 1.10x and 1.13x (both routes in one process, in turn; benchmarks/results/
attention_kernels_cpu-2core-xeon-s26-cpu64.md, -s26.md).
Elsewhere (bfloat16, other backends, no kernels) the plain formulation's ops: jax.grad of softmax(q k^T) v
contracts the attention weights and their cotangent over their first (query) axis; XLA:CPU runs a dot only on
row-major operands, so it transposes those (B, H, T, S) matrices in memory first. Here the backward pass computes
dk^T = q^T dlogits and dv^T = g^T w instead, transposing only the (T, C) operands and results. Values and
gradients of both routes are those of the plain formulation up to float32 round-off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spgd_jax.xla_setup import attention_kernels

__all__ = ["attention"]


def _heads_first(a: jax.Array) -> jax.Array:
    """(B, T, H, C) -> (B, H, T, C)."""
    return jnp.swapaxes(a, 1, 2)


def _forward(q, k, v):
    """The output and the float32 weights (B, H, T, S)."""
    logits = _heads_first(q) @ jnp.moveaxis(k, 1, 3)
    weight = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return _heads_first(weight.astype(q.dtype) @ _heads_first(v)), weight


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax_s(sum_c q[b,t,h,c] k[b,s,h,c]) v[b,s,h,c] -> (B, T, H, C); q (B, T, H, C), k and v (B, S, H, C) of
    one dtype, already scaled (the logits are q . k); the softmax and its gradient in float32."""
    if q.dtype == jnp.float32 and k.shape[1] > 0 and jax.default_backend() == "cpu" and attention_kernels.route()[0]:
        return _native_attention(q, k, v)
    return _xla_attention(q, k, v)


@jax.custom_vjp
def _xla_attention(q, k, v):
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


_xla_attention.defvjp(_attention_fwd, _attention_bwd)


def _native_forward(q, k, v):
    """The handler's output (B, T, H, C) and lse (B, H, T), log sum_s exp(q . k)."""
    shapes = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(q.shape[:-3] + (q.shape[-2], q.shape[-3]),
                                                                             q.dtype))
    return jax.ffi.ffi_call(attention_kernels.FORWARD_TARGET, shapes, vmap_method="broadcast_all")(q, k, v)


@jax.custom_vjp
def _native_attention(q, k, v):
    return _native_forward(q, k, v)[0]


def _native_fwd(q, k, v):
    out, lse = _native_forward(q, k, v)
    return out, (q, k, v, out, lse)


def _native_bwd(residuals, g):
    q, k, v, out, lse = residuals
    shapes = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (q, k, v))
    return tuple(jax.ffi.ffi_call(attention_kernels.BACKWARD_TARGET, shapes, vmap_method="broadcast_all")(
        q, k, v, out, lse, g.astype(q.dtype)))


_native_attention.defvjp(_native_fwd, _native_bwd)
