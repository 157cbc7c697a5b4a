"""3x3 'same' convolutions in bfloat16 on the CPU, as Winograd F(2x2, 3x3) with bfloat16 channel products.

XLA:CPU converts a bfloat16 convolution to float32 (160-200 GFLOP/s here either way), while its YNNPACK
dot multiplies bfloat16 with float32 accumulation at up to 376 GFLOP/s. Winograd's minimal filtering
(Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks") computes each 2x2 tile of a
3x3 stride-1 convolution from a 4x4 tile of its input: both tiles and the kernel are transformed by
small constant matrices, and the channel mixing becomes 16 independent (pixels, C) x (C, D) products,
2.25x fewer multiplies than the direct convolution. Here the transforms and the accumulation run in
float32 and only the products' operands are rounded to bfloat16, so the result has bfloat16's relative
error (about 2^-8 per operand), like a bfloat16 convolution.

`conv_general_dilated` has lax's signature (Flax's `nn.Conv(conv_general_dilated=...)` takes it). It
takes this route for bfloat16 NHWC inputs, HWIO 3x3 kernels, stride 1, padding 1, no dilation or
groups, even height and width, on the CPU backend; everything else (float32 included) goes
to `_direct.conv_general_dilated`. The input gradient is the same Winograd convolution with the kernel
flipped in space and its in/out axes swapped; the kernel gradient is lax's (training only).
Shapes: x (B, H, W, C), kernel (3, 3, C, D) -> (B, H, W, D), in x's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spgd_jax.models.adm import _conv, _direct

__all__ = ["conv_general_dilated", "winograd_conv3x3"]

# F(2x2, 3x3)'s kernel transform G (4x3); the input transform B^T and output transform A^T are written
# out below as sums and differences of rows (B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]],
# A^T = [[1,1,1,0],[0,1,-1,-1]]).
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)


def _input_transform(x: jax.Array) -> jax.Array:
    """(B, H, W, C) float32 -> (4, 4, B, H/2, W/2, C): B^T d B for every overlapping 4x4 tile d of x padded by 1."""
    height, width = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = [padded[:, k:k + height:2] for k in range(4)]
    rows = jnp.stack([rows[0] - rows[2], rows[1] + rows[2], rows[2] - rows[1], rows[1] - rows[3]])
    cols = [rows[:, :, :, k:k + width:2] for k in range(4)]
    return jnp.stack([cols[0] - cols[2], cols[1] + cols[2], cols[2] - cols[1], cols[1] - cols[3]], axis=1)


def _output_transform(m: jax.Array) -> jax.Array:
    """(4, 4, B, H/2, W/2, D) float32 -> (B, H, W, D): A^T m A for every tile, the 2x2 tiles put back in place."""
    rows = jnp.stack([m[0] + m[1] + m[2], m[1] - m[2] - m[3]])  # (2, 4, B, h, w, D)
    tiles = jnp.stack([rows[:, 0] + rows[:, 1] + rows[:, 2], rows[:, 1] - rows[:, 2] - rows[:, 3]], axis=1)
    _, _, batch, h, w, features = tiles.shape  # (2, 2, B, h, w, D) -> (B, h, 2, w, 2, D)
    return jnp.transpose(tiles, (2, 3, 0, 4, 1, 5)).reshape(batch, 2 * h, 2 * w, features)


def _winograd(x: jax.Array, kernel: jax.Array, product_dtype) -> jax.Array:
    """3x3 stride-1 padding-1 convolution of x (B, H even, W even, C) with kernel (3, 3, C, D), in x's dtype."""
    u = jnp.einsum("ai,ijcd,bj->abcd", _G, kernel.astype(jnp.float32), _G)  # G g G^T: (4, 4, C, D)
    v = _input_transform(x.astype(jnp.float32))
    m = jnp.einsum("abnhwc,abcd->abnhwd", v.astype(product_dtype), u.astype(product_dtype),
                   preferred_element_type=jnp.float32)
    return _output_transform(m).astype(x.dtype)


@_conv.with_same_3x3_gradient
def winograd_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x (B, H, W, C) with H, W even, kernel (3, 3, C, D) -> (B, H, W, D) in x's dtype; bfloat16 products."""
    return _winograd(x, kernel, jnp.bfloat16)


def _takes_winograd(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                    feature_group_count, kwargs) -> bool:
    return (
        lhs.dtype == jnp.bfloat16
        and jax.default_backend() == "cpu"
        and _conv.is_same_3x3(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                              feature_group_count, kwargs)
        and lhs.shape[1] % 2 == 0 and lhs.shape[2] % 2 == 0
    )


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """lax.conv_general_dilated; bfloat16 3x3 'same' convolutions on the CPU run as `winograd_conv3x3`."""
    if _takes_winograd(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                       feature_group_count, kwargs):
        return winograd_conv3x3(lhs, rhs.astype(lhs.dtype))
    return _direct.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                      dimension_numbers, feature_group_count, precision, **kwargs)
