"""bfloat16 3x3 'same' convolutions on the CPU through oneDNN (the FFI handler of spgd_jax.xla_setup.onednn).

The ADM UNet's 3x3 convolutions in bfloat16, on the CPU backend, run as one oneDNN direct convolution each
(products accumulated in float32; AMX where the CPU has it) when spgd_jax.xla_setup.onednn has the handler
registered; otherwise, and for everything else, `_winograd.conv_general_dilated` decides (Winograd for
bfloat16, lax's convolution for the rest). Float32 never takes this route: on a Xeon with AMX, oneDNN's
float32 convolutions made the default prior's SPGD step no faster than XLA's, so float32 results stay
XLA's, bit for bit.

The input gradient is the same convolution of the output gradient with the kernel flipped in space and its
in/out axes swapped; the kernel gradient is lax's (training only). jax.vmap batches the call itself (the
handler takes leading batch dims of the input and of the kernel).
Shapes: x (B, H, W, C), kernel (3, 3, C, D) -> (B, H, W, D), in x's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from spgd_jax.models.adm import _conv, _winograd
from spgd_jax.xla_setup import onednn

__all__ = ["conv_general_dilated", "onednn_conv3x3"]


def _same_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    out = jax.ShapeDtypeStruct(x.shape[:-1] + kernel.shape[-1:], x.dtype)
    return jax.ffi.ffi_call(onednn.TARGET, out, vmap_method="expand_dims")(x, kernel)


@jax.custom_vjp
def onednn_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x (B, H, W, C), kernel (3, 3, C, D), both bfloat16 -> (B, H, W, D) bfloat16; the CPU only, once
    spgd_jax.xla_setup.onednn.conv_target() is not None."""
    return _same_conv(x, kernel)


def _forward(x, kernel):
    # x is kept for the kernel's gradient only, and only when the kernel is differentiated (training): the
    # samplers' input gradient then traces no kernel gradient.
    return onednn_conv3x3(x.value, kernel.value), (x.value if kernel.perturbed else None, kernel.value)


def _backward(residuals, g):
    x, kernel = residuals
    dx = _same_conv(g, jnp.swapaxes(kernel[::-1, ::-1], 2, 3))
    if x is None:
        return dx, None
    _, kernel_vjp = jax.vjp(
        lambda k: lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_conv.NHWC), kernel)
    return dx, kernel_vjp(g)[0]


onednn_conv3x3.defvjp(_forward, _backward, symbolic_zeros=True)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """lax.conv_general_dilated; bfloat16 3x3 'same' convolutions on the CPU run as `onednn_conv3x3` when
    oneDNN's handler is available."""
    if (lhs.dtype == jnp.bfloat16
            and jax.default_backend() == "cpu"
            and _conv.is_same_3x3(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                  feature_group_count, kwargs)
            and onednn.conv_target() is not None):
        return onednn_conv3x3(lhs, rhs.astype(lhs.dtype))
    return _winograd.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                          dimension_numbers, feature_group_count, precision, **kwargs)
