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

from spgd_jax.models.adm import _conv, _winograd
from spgd_jax.xla_setup import onednn

__all__ = ["conv_general_dilated", "onednn_conv3x3"]


@_conv.with_same_3x3_gradient
def onednn_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x (B, H, W, C), kernel (3, 3, C, D), both bfloat16 -> (B, H, W, D) bfloat16; the CPU only, once
    spgd_jax.xla_setup.onednn.conv_target() is not None."""
    if onednn.conv_target() is None:
        raise RuntimeError(f"oneDNN's convolution is not available here ({onednn.route()[1]}); use "
                           "winograd_conv3x3 or lax.conv_general_dilated")
    if x.dtype != jnp.bfloat16 or kernel.dtype != jnp.bfloat16:
        raise TypeError(f"onednn_conv3x3 takes bfloat16 x and kernel, got {x.dtype} and {kernel.dtype}")
    if x.ndim != 4 or kernel.shape[:3] != (3, 3, x.shape[-1]) or kernel.ndim != 4:
        raise ValueError(f"onednn_conv3x3 takes x (B, H, W, C) and kernel (3, 3, C, D), got {x.shape} and "
                         f"{kernel.shape}")
    out = jax.ShapeDtypeStruct(x.shape[:-1] + kernel.shape[-1:], x.dtype)
    return jax.ffi.ffi_call(onednn.TARGET, out, vmap_method="expand_dims")(x, kernel)


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
