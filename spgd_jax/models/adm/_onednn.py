"""3x3 'same' convolutions with bfloat16 operands on the CPU through oneDNN (the FFI handler of
spgd_jax.xla_setup.onednn).

Two kinds of convolution take this route on the CPU backend, once spgd_jax.xla_setup.onednn has the handler
registered (a CPU with AVX512-BF16 or AMX):
- bfloat16 ones (UNetConfig(dtype="bfloat16")): bfloat16 in, bfloat16 out;
- float32 ones asked to run at bfloat16 precision: by `jax.default_matmul_precision("bfloat16")` (or
  "BF16_BF16_F32") around the call or trace, or by precision="bfloat16" (or lax.DotAlgorithmPreset.BF16_BF16_F32)
  on the call. The operands are rounded to bfloat16 and the float32 sums come back unrounded: what PyTorch's
  CPU autocast does to convolutions, and what that precision means for convolutions on TPUs. Everything else
  (GroupNorm, SiLU, attention, the 1x1 and strided convolutions) stays float32.
Products accumulate in float32 either way (AMX where the CPU has it). Float32 convolutions at bfloat16 precision
take spgd_jax's own Winograd kernel instead (`_direct.winograd_bfloat16_conv3x3`: Winograd's F(2x2, 3x3) with its
transformed operands rounded to bfloat16, AVX512-BF16 dot products, float32 sums) where the CPU has AVX512-BF16
and oneDNN would not use AMX (`float32_target()`): on a 2-core AMD EPYC (Zen 4: AVX512-BF16, no AMX) oneDNN's
bfloat16 convolutions ran no faster than spgd_jax's float32 Winograd kernel, and this one 1.5-2.1x faster than
either on the default prior's shapes (benchmarks/results/conv_shapes_cpu-2core-epyc-s28.md). Everything else goes to
`_winograd.conv_general_dilated` (Winograd for bfloat16, then `_direct` for float32 3x3 convolutions on AVX-512
CPUs, lax's convolution for the rest): float32 at JAX's default precision never takes this route, so its results
stay float32 to round-off.

The input gradient is the same convolution of the output gradient with the kernel flipped in space and its
in/out axes swapped (same operand rounding); the kernel gradient is lax's, in x's dtype (training only).
jax.vmap batches the call itself (the handler takes leading batch dims of the input and of the kernel).
Shapes: x (B, H, W, C), kernel (3, 3, C, D) -> (B, H, W, D), in x's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spgd_jax.models.adm import _conv, _direct, _winograd
from spgd_jax.xla_setup import direct_conv, onednn

__all__ = ["BFLOAT16_PRECISIONS", "conv_general_dilated", "float32_target", "onednn_conv3x3"]

# The precisions (jax.default_matmul_precision's names, or lax.DotAlgorithmPreset's) that let a float32
# convolution compute from bfloat16 roundings of its operands with float32 sums
BFLOAT16_PRECISIONS = ("bfloat16", "BF16_BF16_F32")


@_conv.with_same_3x3_gradient
def onednn_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x (B, H, W, C), kernel (3, 3, C, D), both bfloat16 -> (B, H, W, D) bfloat16; or both float32 -> float32,
    computed from their bfloat16 roundings with float32 sums. The CPU only, once
    spgd_jax.xla_setup.onednn.conv_target() is not None."""
    if onednn.conv_target() is None:
        raise RuntimeError(f"oneDNN's convolution is not available here ({onednn.route()[1]}); use "
                           "winograd_conv3x3 or lax.conv_general_dilated")
    if x.dtype != kernel.dtype or x.dtype not in (jnp.bfloat16, jnp.float32):
        raise TypeError(f"onednn_conv3x3 takes x and kernel both bfloat16 or both float32, got {x.dtype} and "
                        f"{kernel.dtype}")
    if x.ndim != 4 or kernel.shape[:3] != (3, 3, x.shape[-1]) or kernel.ndim != 4:
        raise ValueError(f"onednn_conv3x3 takes x (B, H, W, C) and kernel (3, 3, C, D), got {x.shape} and "
                         f"{kernel.shape}")
    out = jax.ShapeDtypeStruct(x.shape[:-1] + kernel.shape[-1:], x.dtype)
    return jax.ffi.ffi_call(onednn.TARGET, out, vmap_method="expand_dims")(x.astype(jnp.bfloat16),
                                                                           kernel.astype(jnp.bfloat16))


def _bfloat16_operands(dtype, precision) -> bool:
    """Whether a convolution of `dtype` at `precision` (the call's, else jax.default_matmul_precision's) computes
    from bfloat16 operands."""
    if dtype == jnp.bfloat16:
        return True
    if precision is None:
        precision = jax.config.jax_default_matmul_precision
    return dtype == jnp.float32 and getattr(precision, "name", precision) in BFLOAT16_PRECISIONS


def float32_target() -> str | None:
    """The FFI target that float32 3x3 'same' convolutions at bfloat16 precision call on this CPU: spgd_jax's
    Winograd kernel with AVX512-BF16 products (direct_conv.TARGET, as `_direct.winograd_bfloat16_conv3x3`) where
    the CPU has those instructions and oneDNN would not use AMX, else oneDNN's (onednn.TARGET) where available,
    else None (the precision then changes nothing on the CPU). See the module docstring."""
    if direct_conv.bf16_products()[0] and not onednn.uses_amx():
        return direct_conv.TARGET
    return onednn.conv_target()


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """lax.conv_general_dilated; 3x3 'same' convolutions with bfloat16 operands (see the module docstring) run
    on the CPU as `_direct.winograd_bfloat16_conv3x3` (float32 ones, where `float32_target()` is its target) or
    as `onednn_conv3x3` (where oneDNN's handler is available)."""
    if (_bfloat16_operands(lhs.dtype, precision)
            and jax.default_backend() == "cpu"
            and _conv.is_same_3x3(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                  feature_group_count, kwargs)):
        target = float32_target() if lhs.dtype == rhs.dtype == jnp.float32 else onednn.conv_target()
        if target == direct_conv.TARGET:
            return _direct.winograd_bfloat16_conv3x3(lhs, rhs)
        if target is not None:
            return onednn_conv3x3(lhs, rhs.astype(lhs.dtype))
    return _winograd.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                          dimension_numbers, feature_group_count, precision, **kwargs)


def conv3x3_plus(x: jax.Array, kernel: jax.Array, bias: jax.Array, residual: jax.Array | None = None,
                 precision=None) -> jax.Array:
    """(conv_general_dilated(x, kernel) + bias) + residual for a 3x3 'same' stride-1 convolution, x (B, H, W, C),
    kernel (3, 3, C, D), bias (D,), residual (B, H, W, D) or None, all of one dtype: in one call where the
    convolution runs on spgd_jax's native kernel in float32 (`_direct.conv3x3_plus`, the same bits, without the
    additions' pass over the output), else as those additions after `conv_general_dilated`."""
    out_shape = x.shape[:-1] + kernel.shape[-1:]
    native = (x.dtype == kernel.dtype == bias.dtype == jnp.float32 and jax.default_backend() == "cpu"
              and x.ndim == 4 and kernel.shape[:3] == (3, 3, x.shape[-1]) and x.shape[-1] > 0
              and (residual is None or (residual.shape == out_shape and residual.dtype == jnp.float32)))
    if native and _bfloat16_operands(x.dtype, precision) and float32_target() is not None:
        native, bf16_products = float32_target() == direct_conv.TARGET, True
    else:
        native, bf16_products = native and direct_conv.route()[0], False
    if native:
        return _direct.conv3x3_plus(x, kernel, bias, residual, bf16_products)
    y = conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_conv.NHWC,
                             precision=precision) + bias
    return y if residual is None else y + residual
