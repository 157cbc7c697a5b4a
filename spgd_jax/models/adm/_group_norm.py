"""GroupNorm32 with a hand-written gradient: fewer passes over the activations on a CPU.

guided-diffusion's GroupNorm32 normalises float32 activations over 32 groups of channels per image:
    y = (x - mean_g) / sqrt(var_g + eps) * scale + bias,   var_g = mean_g((x - mean_g)^2) (two-pass)
with mean_g over the positions and the channels of group g. The values are torch's (and flax's
nn.GroupNorm(use_fast_variance=False)'s). The gradient is written out,
    dx = rstd * (g' - mean_g(g') - xhat * mean_g(g' * xhat)),   g' = g * scale,  xhat = (x - mean_g) * rstd,
two reductions over the activations where jax.grad of the two-pass form takes more; on a 2-core Xeon the
64 px UNet's likelihood gradient took 4-10% less time with it (benchmarks/results/speed_cpu-2core-cpu64.md).
The parameters' gradients (for training) are sum(g * xhat) and sum(g) over every axis but the channels.

XLA:CPU splits each of these sums into a chain of reduce-windows over a stored operand (about 7 ops per
forward normalisation). Formulations with fewer ops measured no faster on a 2-core AMD EPYC (the likelihood
gradient at batch 4, issue 23): one variadic sum of (x - x_0, (x - x_0)^2) in two stages (901 -> 366 fusions
per NFE, 5-25% slower: XLA emits variadic sums as scalar loops); sums as a row of ones times the activations
(7-20% slower); trees of 16-position sums (2% slower; behind optimisation barriers, 901 -> 510 fusions, 8%
slower); silu and the scale-shift folded into this gradient (2% slower). So on the CPU, where
spgd_jax.xla_setup.group_norm_kernels has its handlers, the sums over the positions are native kernels instead:
the forward's mean and rstd, and the backward's per-channel sums s1 = sum(g) and s2 = sum(g * (x - mean_g)), from
which mean_g(g') = sum_c(scale * s1) / n, mean_g(g' * xhat) = rstd * sum_c(scale * s2) / n, and the parameters'
gradients sum(rstd * s2) and sum(s1) over the images. Both routes agree to float32 round-off. The kernels take
the activations in their own shape (B, ..., C): a reshape to (B, positions, C) before the call made XLA:CPU
compute a fused producer (the output blocks' skip concatenation, a residual sum) once more for the call, and
without it the default prior's SPGD sampler ran 1.09x faster with bfloat16 convolutions at batch 8 and 1.07x in
float32 at batch 4 on a 2-core AMD EPYC (in-process A/B, six rounds, load 1.2-1.6; session 29).

ADM's ResBlocks and output follow each GroupNorm with SiLU (the out_layers with a per-image scale-shift between):
group_norm_silu. On the CPU route it is silu((x - m) * a + b) with per-image, per-channel m (the group's mean),
a = rstd * scale (* (1 + s)) and b = bias (* (1 + s) + t), one native pass that writes only the result
(spgd_group_norm_silu); its gradient is one more (spgd_group_norm_silu_grad: dy = g * silu'(y) recomputing y
from x, dx = dy * a and the per-channel sums of dy and dy * (x - m) that give a's, b's and m's gradients), and
the moments' own gradient (d mean / dx = 1 / n, d rstd / dx = -rstd^3 (x - mean) / n) one XLA loop. XLA's ops
had stored y, sigmoid(y) and the product in three loops forward and read them back in four: the default
prior's SPGD sampler ran 1.06x faster in float32 at batch 4 and 1.03x at batch 1 (in-process A/B, ten rounds,
load 0.6-1.4; session 30, a 2-core AMD EPYC), and 1.06-1.10x at batches 1-8 with the sums' tasks of whole
rows (the kernels' docstring). Elsewhere group_norm_silu is the composition of group_norm, the scale-shift
and nn.silu, op for op.

The output blocks' ResBlocks normalise torch's concatenation of h and the skip activation along the channels.
group_norm_silu takes such activations as a tuple of parts (channel_parts): on the CPU route the kernels read
each part in place and write each part's gradient, so that neither the concatenation (written, then read by
every pass) nor its gradient's split is stored; the sums are the same, in the same order, as for the joined
activations (bit-identical results where the parts come in 16s of channels, as the UNet's do; else the vector
loops' remainders differ by float32 round-off). With the 1x1 skip convolution as a sum of one per part
(_network._SkipConnection), the default prior's SPGD sampler ran 1.05x faster in float32 at batch 4, 1.03x at
batch 8 and 1.01-1.03x at batch 1 (in-process A/B, 10-12 rounds, load 0.5-1.7; session 31, a 2-core AMD EPYC).
Elsewhere the parts are joined first.

Per-group values (mean, rstd and the backward's two means, (B, G)) reach the activations as per-channel arrays
(B, C) made once. XLA:CPU fuses a broadcast from (B, G) to the activations into the element-wise loop that uses
it, and emits that loop over a (..., G, C / G) view whose minor dimension (1-4 channels) defeats vectorisation:
normalisation and SiLU over f32[8, 64, 64, 96] took 6.1 ms instead of 1.6 ms on a 2-core Xeon. On the CPU the
per-channel arrays are therefore a dot with a 0/1 matrix (exact at HIGHEST precision for finite values; a
non-finite one turns its image's channels to NaN, where the result is lost anyway), which XLA does not fuse
into the loop: one dot for the forward's mean and rstd (kept for the backward) and one for the backward's two
means. The default prior's SPGD sampler ran 1.26x faster with bfloat16 convolutions at batch 8, 1.14x in
float32 at batch 4 and 1.13x at batch 1, with bit-identical outputs and no longer compile (in-process A/B,
five rounds, load 1.7-1.8). A dot per array instead (six per GroupNorm) gave 1.22x, 1.05x and 1.07x and compiled
for 3 s longer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

from spgd_jax.models.adm._config import NORM_EPS, NORM_GROUPS
from spgd_jax.xla_setup import group_norm_kernels

__all__ = ["GroupNorm32", "channel_parts", "group_norm", "group_norm_silu"]


def _grouped(x: jax.Array) -> jax.Array:
    """(B, ..., C) -> (B, positions, NORM_GROUPS, C / NORM_GROUPS)."""
    return x.reshape(x.shape[0], -1, NORM_GROUPS, x.shape[-1] // NORM_GROUPS)


def _native(x: jax.Array) -> bool:
    """Whether this trace computes x's sums with spgd_jax's CPU kernels (xla_setup.group_norm_kernels)."""
    return x.dtype == jnp.float32 and jax.default_backend() == "cpu" and group_norm_kernels.route()[0]


def _per_channel(shape: tuple[int, ...], *values: jax.Array) -> tuple[jax.Array, ...]:
    """Per-group values (B, G) as per-channel values (B, 1, ..., 1, C) of activations of `shape` (B, ..., C), each
    group's value on its channels: on the CPU one dot of them all with a 0/1 matrix, materialised apart from the
    loops that use them (module docstring)."""
    batch, channels = shape[0], shape[-1]
    stacked = jnp.stack(values, axis=1)  # (B, V, G)
    if jax.default_backend() == "cpu":
        ones = np.repeat(np.eye(NORM_GROUPS, dtype=stacked.dtype), channels // NORM_GROUPS, axis=1)  # (G, C)
        expanded = jnp.dot(stacked, ones, precision=lax.Precision.HIGHEST)
    else:
        expanded = jnp.repeat(stacked, channels // NORM_GROUPS, axis=2)
    per_channel = (batch,) + (1,) * (len(shape) - 2) + (channels,)
    return tuple(expanded[:, i].reshape(per_channel) for i in range(len(values)))


def _joined_shape(parts: tuple[jax.Array, ...]) -> tuple[int, ...]:
    """The shape of the parts side by side along the channels."""
    return parts[0].shape[:-1] + (sum(part.shape[-1] for part in parts),)


def _joined(parts: tuple[jax.Array, ...]) -> jax.Array:
    """The parts side by side along the channels, as one array."""
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def channel_parts(parts: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """Activations given in parts side by side along the channels (B, ..., C_q), as group_norm_silu takes them
    on this trace: unchanged where the CPU kernels read the parts in place (_native: float32 on the CPU), so that
    their concatenation is never stored, else joined into one array (a 1-tuple)."""
    if len({part.shape[:-1] for part in parts}) != 1 or len({part.dtype for part in parts}) != 1:
        raise ValueError(f"activations in parts must share their leading dims and dtype, got "
                         f"{[(part.shape, str(part.dtype)) for part in parts]}")
    return parts if _native(parts[0]) and len(parts) <= _MAX_PARTS else (_joined(parts),)


_MAX_PARTS = 4  # the kernels' kMaxParts


def _moments(*parts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """mean and rstd (B, G) of x (B, ..., C), given as one array or in parts side by side along the channels (the
    CPU kernels read them in place; elsewhere they are joined): two passes over the positions and the group's
    channels."""
    if _native(parts[0]):
        shape = (parts[0].shape[0], NORM_GROUPS)
        return jax.ffi.ffi_call(group_norm_kernels.MOMENTS_TARGET, (jax.ShapeDtypeStruct(shape, parts[0].dtype),) * 2,
                                vmap_method="broadcast_all")(*parts, eps=np.float32(NORM_EPS))
    x = _joined(parts)
    mean = jnp.mean(_grouped(x), axis=(1, 3))
    return mean, lax.rsqrt(jnp.mean(_grouped(jnp.square(x - _per_channel(x.shape, mean)[0])), axis=(1, 3)) + NORM_EPS)


@jax.custom_vjp
def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """GroupNorm32 of x (B, ..., C) float32, C a multiple of NORM_GROUPS; scale, bias (C,). Same shape as x."""
    return _group_norm_fwd(x, scale, bias)[0]


def _group_norm_fwd(x, scale, bias):
    mean, rstd = _moments(x)
    mean_c, rstd_c = _per_channel(x.shape, mean, rstd)
    return (x - mean_c) * rstd_c * scale + bias, (x, mean, rstd, mean_c, rstd_c, scale)


def _group_norm_bwd(residuals, g):
    x, mean, rstd, mean_c, rstd_c, scale = residuals
    xhat = (x - mean_c) * rstd_c
    g_scaled = g * scale
    b, c = x.shape[0], x.shape[-1]
    if _native(x):
        s1, s2 = jax.ffi.ffi_call(group_norm_kernels.SUMS_TARGET, (jax.ShapeDtypeStruct((b, c), x.dtype),) * 2,
                                  vmap_method="broadcast_all")(g, x, mean)
        count = x.size // b // NORM_GROUPS
        mean_g = _grouped(s1 * scale).sum(axis=(1, 3)) / count
        mean_gx = _grouped(s2 * scale).sum(axis=(1, 3)) * rstd / count
        grad_scale = jnp.sum(s2 * rstd_c.reshape(b, c), axis=0)
        grad_bias = jnp.sum(s1, axis=0)
    else:
        mean_g = jnp.mean(_grouped(g_scaled), axis=(1, 3))
        mean_gx = jnp.mean(_grouped(g_scaled * xhat), axis=(1, 3))
        axes = tuple(range(x.ndim - 1))
        grad_scale, grad_bias = jnp.sum(g * xhat, axis=axes), jnp.sum(g, axis=axes)
    mean_g_c, mean_gx_c = _per_channel(x.shape, mean_g, mean_gx)
    return rstd_c * (g_scaled - mean_g_c - xhat * mean_gx_c), grad_scale, grad_bias


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def group_norm_silu(x: jax.Array | tuple[jax.Array, ...], scale: jax.Array, bias: jax.Array,
                    scale_shift: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """ADM's normalise-then-activate: silu(y), y = group_norm(x, scale, bias) in float32 returned in x's dtype, or
    y * (1 + s) + t for scale_shift = (s, t) (B, 1, ..., 1, C) in x's dtype (the ResBlock's scale-shift norm).
    x (B, ..., C), C a multiple of NORM_GROUPS, or a tuple of parts (B, ..., C_q) side by side along the channels
    (as `channel_parts` leaves them: the output blocks' skip concatenation, never stored on the CPU route);
    scale, bias (C,) float32. The result is (B, ..., C) in x's dtype, the same as for the joined x.

    Where the CPU kernels compute float32 x's sums (_native), one kernel pass makes the result and one its
    gradient (module docstring); elsewhere it is exactly the composition of group_norm, the scale-shift and
    silu. s and t broadcast to (B, 1, ..., 1, C) (one value per image and channel); other shapes are a
    ValueError."""
    parts = channel_parts(tuple(x) if isinstance(x, (tuple, list)) else (x,))
    shape = _joined_shape(parts)
    per_image = (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],)
    for name, value in zip(("scale", "shift"), scale_shift or ()):
        if np.broadcast_shapes(np.shape(value), per_image) != per_image:
            raise ValueError(f"group_norm_silu: the scale-shift's {name} has shape {np.shape(value)}; it must "
                             f"broadcast to {per_image}, one value per image and channel of x {shape}")
    if not _native(parts[0]):
        x = parts[0]
        y = group_norm(x.astype(jnp.float32), scale, bias).astype(x.dtype)
        if scale_shift is not None:
            y = y * (1 + scale_shift[0]) + scale_shift[1]
        return nn.silu(y)
    batch, channels = shape[0], shape[-1]
    mean_c, rstd_c = _per_channel(shape, *_moments_with_gradient(parts))
    a = rstd_c.reshape(batch, channels) * scale
    b = jnp.broadcast_to(bias, (batch, channels))
    if scale_shift is not None:
        s, t = (jnp.broadcast_to(v, per_image).reshape(batch, channels) for v in scale_shift)
        a, b = a * (1 + s), b * (1 + s) + t
    return _affine_silu(parts, mean_c.reshape(batch, channels), a, b)


def _part_slices(parts: tuple[jax.Array, ...]) -> list[slice]:
    """Each part's channels in the joined activations."""
    ends = np.cumsum([part.shape[-1] for part in parts])
    return [slice(int(end) - part.shape[-1], int(end)) for part, end in zip(parts, ends)]


@jax.custom_vjp
def _moments_with_gradient(parts: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
    """_moments (native) of the parts with its gradient: d mean / dx = 1 / n, d rstd / dx = -rstd^3 (x - mean) / n,
    n the positions times the group's channels; one cotangent per part."""
    return _moments(*parts)


def _moments_fwd(parts):
    mean, rstd = _moments(*parts)
    return (mean, rstd), (parts, mean, rstd)


def _moments_bwd(residuals, cotangents):
    parts, mean, rstd = residuals
    d_mean, d_rstd = cotangents
    shape = _joined_shape(parts)
    count = np.prod(shape[1:]) // NORM_GROUPS
    d_mean_c, coefficient_c, mean_c = _per_channel(shape, d_mean / count, -d_rstd * rstd ** 3 / count, mean)
    return (tuple(d_mean_c[..., c] + coefficient_c[..., c] * (part - mean_c[..., c])
                  for part, c in zip(parts, _part_slices(parts))),)


_moments_with_gradient.defvjp(_moments_fwd, _moments_bwd)


@jax.custom_vjp
def _affine_silu(parts: tuple[jax.Array, ...], m: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """silu((x - m) * a + b) by the kernel spgd_group_norm_silu: x (B, ..., C) float32 in parts side by side along
    the channels, m, a, b (B, C); the result joined, (B, ..., C)."""
    return jax.ffi.ffi_call(group_norm_kernels.SILU_TARGET, jax.ShapeDtypeStruct(_joined_shape(parts), m.dtype),
                            vmap_method="broadcast_all")(m, a, b, *parts)


def _affine_silu_fwd(parts, m, a, b):
    return _affine_silu(parts, m, a, b), (parts, m, a, b)


def _affine_silu_bwd(residuals, g):
    """dx = dy * a (per part), dm = -a * sum(dy), da = sum(dy * (x - m)), db = sum(dy) over the positions,
    dy = g * silu'(y), by the kernel spgd_group_norm_silu_grad."""
    parts, m, a, b = residuals
    per_channel = jax.ShapeDtypeStruct(m.shape, m.dtype)
    s1, s2, *dx = jax.ffi.ffi_call(
        group_norm_kernels.SILU_GRAD_TARGET,
        (per_channel, per_channel, *(jax.ShapeDtypeStruct(part.shape, part.dtype) for part in parts)),
        vmap_method="broadcast_all")(g, m, a, b, *parts)
    return tuple(dx), -a * s1, s2, s1


_affine_silu.defvjp(_affine_silu_fwd, _affine_silu_bwd)


class GroupNorm32(nn.Module):
    """group_norm with parameters 'scale' (ones) and 'bias' (zeros), (C,) float32: flax nn.GroupNorm's names.
    Called with silu=True, group_norm_silu (with scale_shift) instead, whose x may come in parts side by side
    along the channels (a tuple)."""

    @nn.compact
    def __call__(self, x: jax.Array | tuple[jax.Array, ...], silu: bool = False,
                 scale_shift: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        parts = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        channels = sum(part.shape[-1] for part in parts)
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        if silu:
            return group_norm_silu(parts, scale, bias, scale_shift)
        if scale_shift is not None:
            raise ValueError("GroupNorm32: scale_shift is applied between the norm and SiLU; pass silu=True")
        return group_norm(_joined(parts).astype(jnp.float32), scale, bias)
