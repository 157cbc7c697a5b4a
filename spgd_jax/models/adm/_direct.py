"""Float32 3x3 'same' convolutions on the CPU through spgd_jax's direct AVX-512 kernel (xla_setup.direct_conv).

Float32 3x3 stride-1 convolutions with padding 1 (the ADM UNet's) take this route on the CPU backend once the
handler is registered (x86-64 Linux with AVX-512F): each output pixel's sums are float32 fused multiply-adds
over the taps and input channels, so results differ from XLA's convolution by float32 round-off only. On a
2-core Xeon the default prior's convolutions ran 1.4-3.0x faster than XLA's alone at batch 1 and 1.0-5.5x at
batch 4 (benchmarks/results/conv_shapes_cpu-2core-xeon-s24-b1.md, -b4.md), and its SPGD sampler 1.22x faster at
batch 1 and 1.09x at batch 4 (benchmarks/results/direct_conv_kernels_cpu-2core-xeon.md).
Convolutions whose output channels are not a multiple of 16 (the UNet's 32->3 output head) stay XLA's. The
input gradient is the same convolution of the output gradient with the kernel flipped in space and its in/out
axes swapped, a copy the handler makes and keeps across calls with the same kernel values (XLA:CPU would copy it
at every step of a sampler's loop); the kernel gradient is lax's (training only). Everything else goes to
`_conv.conv_general_dilated`.
jax.vmap batches the call itself (the handler takes leading batch dims of the input and of the kernel).
Shapes: x (B, H, W, C), kernel (3, 3, C, D) -> (B, H, W, D), float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from spgd_jax.models.adm import _conv
from spgd_jax.xla_setup import direct_conv

__all__ = ["conv_general_dilated", "direct_conv3x3"]

CHANNEL_MULTIPLE = 16  # the handler's output channels come in AVX-512 vectors of 16 float32


def _call(x: jax.Array, kernel: jax.Array, flipped: bool) -> jax.Array:
    """The handler's convolution of x by kernel, or (flipped) by _conv.flipped(kernel); lax's where the output
    channels are not a multiple of 16."""
    out_channels = kernel.shape[2] if flipped else kernel.shape[3]
    if out_channels % CHANNEL_MULTIPLE:
        return lax.conv_general_dilated(x, _conv.flipped(kernel) if flipped else kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=_conv.NHWC)
    out = jax.ShapeDtypeStruct(x.shape[:-1] + (out_channels,), jnp.float32)
    return jax.ffi.ffi_call(direct_conv.TARGET, out, vmap_method="expand_dims")(x, kernel, flipped=flipped)


def _input_gradient(g: jax.Array, kernel: jax.Array) -> jax.Array:
    """The handler flips the kernel itself and keeps the copy for the next call with the same values."""
    return _call(g, kernel, True)


@functools.partial(_conv.with_same_3x3_gradient, input_gradient=_input_gradient)
def direct_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x (B, H, W, C), kernel (3, 3, C, D), both float32 -> (B, H, W, D) float32. The CPU only, once
    spgd_jax.xla_setup.direct_conv.route()[0]; D not a multiple of 16 runs as lax's convolution."""
    ok, why = direct_conv.route()
    if not ok:
        raise RuntimeError(f"the direct convolution kernel is not available here ({why}); use "
                           "lax.conv_general_dilated")
    if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
        raise TypeError(f"direct_conv3x3 takes float32 x and kernel, got {x.dtype} and {kernel.dtype}")
    if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[:3] != (3, 3, x.shape[-1]):
        raise ValueError(f"direct_conv3x3 takes x (B, H, W, C) and kernel (3, 3, C, D), got {x.shape} and "
                         f"{kernel.shape}")
    return _call(x, kernel, False)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """lax.conv_general_dilated; float32 3x3 'same' convolutions run as `direct_conv3x3` on the CPU where the
    kernel is available and its output or input channels are a multiple of 16 (the forward or the input gradient
    then runs in the kernel)."""
    if (lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32
            and jax.default_backend() == "cpu"
            and _conv.is_same_3x3(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                  feature_group_count, kwargs)
            and 0 in (rhs.shape[3] % CHANNEL_MULTIPLE, rhs.shape[2] % CHANNEL_MULTIPLE)  # forward or input gradient
            and direct_conv.route()[0]):
        return direct_conv3x3(lhs, rhs)
    return _conv.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                      dimension_numbers, feature_group_count, precision, **kwargs)
