"""Float32 3x3 'same' convolutions on the CPU through spgd_jax's native AVX-512 kernel (xla_setup.direct_conv):
Winograd's F(4x4, 3x3) or F(2x2, 3x3) where it pays, direct sums elsewhere.

Float32 3x3 stride-1 convolutions with padding 1 (the ADM UNet's) take this route on the CPU backend once the
handler is registered (x86-64 Linux with AVX-512F), as `winograd_float32_conv3x3` (`winograd_tile` decides):
images with sides in 4s of at least 8 x 8 px and input channels in 16s as Winograd's F(4x4, 3x3) in float32 (4x
fewer multiplies than the direct sums; transforms with coefficients up to 8 and down to 1/24, the kernel's made in
float64), other images with even sides of at least 48 tiles of 2x2 pixels (16 x 12 px) as F(2x2, 3x3) (2.25x
fewer; coefficients 0, +-1, +-1/2), the others as direct float32 sums (`direct_conv3x3`). Results differ from
XLA's convolution by float32 round-off: F(2x2, 3x3)'s by as little as the direct sums', F(4x4, 3x3)'s by about
ten times that (1e-5 of the output's scale in tests), the price of its larger coefficients. F(4x4, 3x3) took over
from F(2x2, 3x3) in session 29: on a 2-core AMD EPYC (Zen 4) the default prior's convolutions ran 1.2-1.6x
faster (64 -> 64 channels at 64 px and batch 8: 5.8 against 8.4 ms) and 8 px images 1.3-2x faster than the
direct sums; the default prior's float32 SPGD sampler 1.29x faster at batch 4 (in-process A/B, six rounds, load
1.2-1.3). On a 2-core Xeon the direct
kernel ran the default prior's convolutions 1.4-3.0x faster than XLA's alone at batch 1 and 1.0-5.5x at batch 4
(benchmarks/results/conv_shapes_cpu-2core-xeon-s24-b1.md, -b4.md), and Winograd 1.2-1.6x faster than the direct
kernel on the 16-64 px ones (benchmarks/results/conv_shapes_cpu-2core-xeon-s25-b1.md, -b4.md).
Output channels that are not a multiple of 16 (the UNet's RGB output head, and the input gradient of its first
convolution) are computed in 16s, the extra ones zero and not stored: 5x the multiplies for 3 channels, still
faster than XLA's convolution at about 25 GFLOP/s on those shapes. The input gradient is the same kind of
convolution of the output gradient with the kernel flipped in space and its in/out axes swapped. The flipped and
transformed kernels are made by a call of their own on the weights alone (xla_setup.direct_conv), which XLA hoists
out of a sampler's loops: until session 26 every convolution compared its weights with the kept copy, and the
`cpu-64` preset's sampler ran 1.10x faster at batch 1 without that (in-process A/B, bit-identical outputs). The
kernel gradient is lax's (training only). Everything else goes to `_conv.conv_general_dilated`.
`conv3x3_plus` adds a bias and a residual to the output in the same call, tile by tile as it is written (the
ResBlocks' convolutions: the same bits as the additions after it, without their pass over the output).
jax.vmap batches the call itself (the handler takes leading batch dims of the input and of the kernel).
Shapes: x (B, H, W, C), kernel (3, 3, C, D) -> (B, H, W, D), float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from spgd_jax.models.adm import _conv
from spgd_jax.xla_setup import direct_conv

__all__ = ["conv3x3_plus", "conv_general_dilated", "direct_conv3x3", "uses_winograd", "winograd_bfloat16_conv3x3",
           "winograd_float32_conv3x3", "winograd_tile"]

CHANNEL_MULTIPLE = 16  # Winograd's input transform takes the input channels in AVX-512 vectors of 16 float32
# F(2x2, 3x3) takes images of at least this many 2x2 tiles (16 x 12 px): fewer are too little work to split over
# two threads at batch 1, and there the direct sums ran as fast (8 px images: 0.10 ms either way, on a Xeon).
# Decided per image, not per batch, so that an image's result does not depend on the images beside it.
WINOGRAD_MIN_TILES = 48
# With bfloat16 products F(2x2, 3x3) takes 8 x 8 px images too: on a 2-core AMD EPYC (Zen 4) a 64 -> 64 channel
# 8 px convolution took 0.029 ms against the direct sums' 0.038 at batch 1 and 0.053 against 0.131 at batch 4.
BFLOAT16_WINOGRAD_MIN_TILES = 16
# F(4x4, 3x3) (float32 only) takes images of at least this many 4x4 tiles (8 x 8 px): there, on the AMD EPYC, a
# 128 -> 128 channel convolution took 0.10 ms against F(2x2, 3x3)'s 0.12 and the direct sums' 0.17 at batch 1.
WINOGRAD4_MIN_TILES = 4


def winograd_tile(height: int, width: int, in_channels: int, bf16_products: bool = False) -> int:
    """The output tile of the Winograd algorithm `winograd_float32_conv3x3` (with bf16_products,
    `winograd_bfloat16_conv3x3`) computes a convolution of (height, width, in_channels) images with: 4 (F(4x4,
    3x3); float32, sides in 4s, at least WINOGRAD4_MIN_TILES tiles), 2 (F(2x2, 3x3); even sides, at least
    WINOGRAD_MIN_TILES, or with bfloat16 products BFLOAT16_WINOGRAD_MIN_TILES, tiles), or 0 (the direct sums).
    in_channels must be a multiple of CHANNEL_MULTIPLE for either."""
    if in_channels % CHANNEL_MULTIPLE != 0:
        return 0
    if not bf16_products and height % 4 == 0 and width % 4 == 0 and (height // 4) * (width // 4) >= WINOGRAD4_MIN_TILES:
        return 4
    min_tiles = BFLOAT16_WINOGRAD_MIN_TILES if bf16_products else WINOGRAD_MIN_TILES
    return 2 if height % 2 == 0 and width % 2 == 0 and (height // 2) * (width // 2) >= min_tiles else 0


def uses_winograd(height: int, width: int, in_channels: int, bf16_products: bool = False) -> bool:
    """Whether `winograd_tile(...)` is a Winograd algorithm's rather than the direct sums'."""
    return winograd_tile(height, width, in_channels, bf16_products) > 0


def _call(x: jax.Array, kernel: jax.Array, flipped: bool, winograd: bool, bf16_products: bool = False,
          bias: jax.Array | None = None, residual: jax.Array | None = None) -> jax.Array:
    """The handler's convolution of x by kernel, or (flipped) by _conv.flipped(kernel); when `winograd`, as the
    Winograd algorithm of winograd_tile(x's height, width, channels), with bfloat16 products if `bf16_products`;
    plus bias (D,) and then residual (shaped as the output) where given, added as the output is written."""
    out_channels = kernel.shape[2] if flipped else kernel.shape[3]
    tile = winograd_tile(*x.shape[-3:], bf16_products=bf16_products) if winograd else 0
    attributes = dict(flipped=flipped, winograd=np.int32(tile), bf16_products=tile > 0 and bf16_products)
    out = jax.ShapeDtypeStruct(x.shape[:-1] + (out_channels,), jnp.float32)
    tokens = jax.ffi.ffi_call(direct_conv.PREPARE_TARGET, jax.ShapeDtypeStruct(kernel.shape[:-4], jnp.int32),
                              vmap_method="expand_dims")(kernel, **attributes)
    addends = [a for a in (bias, residual) if a is not None]
    return jax.ffi.ffi_call(direct_conv.TARGET, out, vmap_method="expand_dims")(
        x, kernel, tokens, *addends, bias=bias is not None, residual=residual is not None, **attributes)


def _checked_call(name: str, x: jax.Array, kernel: jax.Array, winograd: bool, bf16_products: bool = False,
                  bias: jax.Array | None = None, residual: jax.Array | None = None) -> jax.Array:
    ok, why = direct_conv.bf16_products() if bf16_products else direct_conv.route()
    if not ok:
        raise RuntimeError(f"the native {'bfloat16-product' if bf16_products else 'float32'} convolution kernel is "
                           f"not available here ({why}); use lax.conv_general_dilated")
    if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
        raise TypeError(f"{name} takes float32 x and kernel, got {x.dtype} and {kernel.dtype}")
    if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[:3] != (3, 3, x.shape[-1]):
        raise ValueError(f"{name} takes x (B, H, W, C) and kernel (3, 3, C, D), got {x.shape} and {kernel.shape}")
    out_shape = x.shape[:-1] + kernel.shape[-1:]
    if bias is not None and (bias.dtype != jnp.float32 or bias.shape != kernel.shape[-1:]):
        raise ValueError(f"{name} takes a float32 bias {kernel.shape[-1:]}, got {bias.dtype} {bias.shape}")
    if residual is not None and (residual.dtype != jnp.float32 or residual.shape != out_shape):
        raise ValueError(f"{name} takes a float32 residual shaped as the output {out_shape}, got {residual.dtype} "
                         f"{residual.shape}")
    return _call(x, kernel, False, winograd, bf16_products, bias, residual)


@functools.partial(_conv.with_same_3x3_gradient, input_gradient=lambda g, kernel: _call(g, kernel, True, False))
def direct_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x (B, H, W, C), kernel (3, 3, C, D), both float32 -> (B, H, W, D) float32, as the direct convolution (the
    input gradient too). The CPU only, once spgd_jax.xla_setup.direct_conv.route()[0]."""
    return _checked_call("direct_conv3x3", x, kernel, winograd=False)


@functools.partial(_conv.with_same_3x3_gradient, input_gradient=lambda g, kernel: _call(g, kernel, True, True))
def winograd_float32_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x (B, H, W, C), kernel (3, 3, C, D), both float32 -> (B, H, W, D) float32, as Winograd's F(4x4, 3x3) or
    F(2x2, 3x3) in float32 where `winograd_tile(H, W, in channels)` says (each direction decides for itself: the
    input gradient's input channels are D), else as `direct_conv3x3`. The CPU only, once spgd_jax.xla_setup.direct_conv.route()[0]."""
    return _checked_call("winograd_float32_conv3x3", x, kernel, winograd=True)


@functools.partial(_conv.with_same_3x3_gradient,
                   input_gradient=lambda g, kernel: _call(g, kernel, True, True, bf16_products=True))
def winograd_bfloat16_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x (B, H, W, C), kernel (3, 3, C, D), both float32 -> (B, H, W, D) float32, as Winograd's F(2x2, 3x3) with
    its transformed operands rounded to bfloat16 and float32 sums where `uses_winograd(H, W, in channels,
    bf16_products=True)` (the error of a convolution at jax.default_matmul_precision("bfloat16"), in about half
    the products' time of `winograd_float32_conv3x3`), else as `direct_conv3x3` (float32). The CPU only, once
    spgd_jax.xla_setup.direct_conv.bf16_products()[0] (AVX512-BF16)."""
    return _checked_call("winograd_bfloat16_conv3x3", x, kernel, winograd=True, bf16_products=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def conv3x3_plus(x: jax.Array, kernel: jax.Array, bias: jax.Array, residual: jax.Array | None,
                 bf16_products: bool = False) -> jax.Array:
    """(winograd_float32_conv3x3(x, kernel) + bias) + residual (with bf16_products, winograd_bfloat16_conv3x3's),
    in one call: the handler adds bias (D,) and residual (B, H, W, D, or None) to each tile of the output as it is
    written, in the order of the additions after the call, so the same bits without a pass of their own. All
    float32; the gradient: the input's as the convolution's, the residual's g, the bias's g summed over the images
    and pixels, the kernel's lax's (each only where differentiated)."""
    return _checked_call("conv3x3_plus", x, kernel, winograd=True, bf16_products=bf16_products, bias=bias,
                         residual=residual)


def _conv3x3_plus_forward(x, kernel, bias, residual, bf16_products):
    residual_value = None if residual is None else residual.value
    out = _checked_call("conv3x3_plus", x.value, kernel.value, winograd=True, bf16_products=bf16_products,
                        bias=bias.value, residual=residual_value)
    return out, (x.value if kernel.perturbed else None, kernel.value, bias.perturbed,
                 residual is not None and residual.perturbed)


def _conv3x3_plus_backward(bf16_products, residuals, g):
    x, kernel, bias_perturbed, residual_perturbed = residuals
    dx = _call(g, kernel, True, True, bf16_products)
    dkernel = None
    if x is not None:
        _, kernel_vjp = jax.vjp(lambda k: jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                                                       dimension_numbers=_conv.NHWC), kernel)
        dkernel = kernel_vjp(g)[0]
    dbias = g.sum(axis=tuple(range(g.ndim - 1))) if bias_perturbed else None
    return dx, dkernel, dbias, g if residual_perturbed else None


conv3x3_plus.defvjp(_conv3x3_plus_forward, _conv3x3_plus_backward, symbolic_zeros=True)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """lax.conv_general_dilated; float32 3x3 'same' convolutions run as `winograd_float32_conv3x3` on the CPU where
    the kernel is available."""
    if (lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32
            and jax.default_backend() == "cpu"
            and _conv.is_same_3x3(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                  feature_group_count, kwargs)
            and direct_conv.route()[0]):
        return winograd_float32_conv3x3(lhs, rhs)
    return _conv.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                      dimension_numbers, feature_group_count, precision, **kwargs)
