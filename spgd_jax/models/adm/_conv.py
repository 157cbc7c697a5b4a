"""A 2-D convolution whose input gradient is an explicit HWIO convolution.

JAX's transpose rule emits the input gradient of a convolution with the kernel's in/out
axes swapped in its dimension numbers. XLA:CPU runs only HWIO kernels through its fast
(Eigen) path and rewrites the others in a pass that visits the entry computation alone,
so inside the samplers' `lax.scan` / `fori_loop` those backward convolutions ran as slow
elemental loops (about 20x slower; benchmarks/results/speed_cpu-2core.md). Here the
backward pass flips and transposes the kernel itself, behind an optimization barrier so
that XLA cannot fold the transpose back into the convolution. Values and gradients are
the same as `lax.conv_general_dilated`'s; GPUs are unaffected either way.

`conv_general_dilated` has lax's signature, so Flax's `nn.Conv(conv_general_dilated=...)`
takes it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["NHWC", "conv_general_dilated", "flipped", "is_same_3x3", "with_same_3x3_gradient"]

NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(x, kernel, strides, padding, dimension_numbers, precision):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=dimension_numbers, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _hwio_conv(x, kernel, strides, padding, dimension_numbers, precision):
    return _conv(x, kernel, strides, padding, dimension_numbers, precision)


def _hwio_conv_fwd(x, kernel, strides, padding, dimension_numbers, precision):
    # x is kept for the kernel's gradient only, and only when the kernel is differentiated (training): the
    # samplers' input gradient then traces no kernel gradient.
    out = _conv(x.value, kernel.value, strides, padding, dimension_numbers, precision)
    return out, (x.value if kernel.perturbed else None, kernel.value, x.value.shape)


def _hwio_conv_bwd(strides, padding, dimension_numbers, precision, residuals, g):
    x, kernel, x_shape = residuals
    # The input gradient is the convolution of g, dilated by the strides, with the kernel flipped
    # in space and its in/out axes swapped (an HWIO kernel again), padded to give x's size back.
    transposed = lax.optimization_barrier(flipped(kernel))
    pads = []
    for axis, (low, _), stride, size in zip((1, 2), padding, strides, kernel.shape[:2]):
        dilated = (g.shape[axis] - 1) * stride + 1
        pad_low = size - 1 - low
        pads.append((pad_low, x_shape[axis] + size - 1 - dilated - pad_low))
    dx = lax.conv_general_dilated(g, transposed, (1, 1), pads, lhs_dilation=strides,
                                  dimension_numbers=dimension_numbers, precision=precision).astype(g.dtype)
    if x is None:
        return dx, None
    _, kernel_vjp = jax.vjp(lambda k: _conv(x, k, strides, padding, dimension_numbers, precision), kernel)
    return dx, kernel_vjp(g)[0]


_hwio_conv.defvjp(_hwio_conv_fwd, _hwio_conv_bwd, symbolic_zeros=True)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """lax.conv_general_dilated for NHWC inputs and HWIO kernels with explicit padding pairs,
    with the HWIO input gradient above; other cases go to lax unchanged."""
    plain = (
        lhs.ndim == 4
        and not isinstance(padding, str)
        and all(d in (None, 1) for d in (lhs_dilation or (1,)) + (rhs_dilation or (1,)))
        and feature_group_count == 1
        and not kwargs
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
    )
    if not plain:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision, **kwargs)
    dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    return _hwio_conv(lhs, rhs, tuple(window_strides), padding, dims, precision)


def is_same_3x3(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                feature_group_count=1, kwargs=None) -> bool:
    """Whether lax.conv_general_dilated's arguments make a 3x3 'same' convolution: NHWC input, HWIO kernel,
    stride 1, padding 1 on every side, no dilation or groups (the ADM UNet's 3x3 convolutions)."""
    return (
        lhs.ndim == 4 and rhs.ndim == 4 and rhs.shape[:2] == (3, 3)
        and tuple(window_strides) == (1, 1)
        and not isinstance(padding, str) and tuple(tuple(int(p) for p in pair) for pair in padding) == ((1, 1), (1, 1))
        and all(d in (None, 1) for d in (lhs_dilation or (1,)) + (rhs_dilation or (1,)))
        and feature_group_count == 1 and not kwargs
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
    )


def flipped(kernel: jax.Array) -> jax.Array:
    """The kernel (3, 3, C, D) of a 3x3 'same' convolution's input gradient: (3, 3, D, C), flipped in space with its
    in/out axes swapped."""
    return jnp.swapaxes(kernel[::-1, ::-1], 2, 3)


def with_same_3x3_gradient(conv, input_gradient=None):
    """`conv(x, kernel)`, a 3x3 'same' stride-1 convolution (x (B, H, W, C), kernel (3, 3, C, D)), as a custom_vjp:
    the input gradient is `input_gradient(g, kernel)` of the output gradient g (B, H, W, D), by default `conv` of g
    with `flipped(kernel)`; the kernel gradient is lax's, traced only when the kernel is differentiated
    (training), so that the samplers' input gradient keeps no x for it."""
    rule = jax.custom_vjp(conv)
    if input_gradient is None:
        input_gradient = lambda g, kernel: conv(g, flipped(kernel))  # noqa: E731

    def forward(x, kernel):
        return rule(x.value, kernel.value), (x.value if kernel.perturbed else None, kernel.value)

    def backward(residuals, g):
        x, kernel = residuals
        dx = input_gradient(g, kernel).astype(g.dtype)
        if x is None:
            return dx, None
        _, kernel_vjp = jax.vjp(lambda k: lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                                                   dimension_numbers=NHWC), kernel)
        return dx, kernel_vjp(g)[0]

    rule.defvjp(forward, backward, symbolic_zeros=True)
    return rule
