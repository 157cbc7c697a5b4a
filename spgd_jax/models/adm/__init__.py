"""The guided-diffusion "ADM" UNet (Dhariwal & Nichol 2021) as a Flax linen module.

A port of guided-diffusion's ``UNetModel`` exactly as its ``create_model``
(``script_util.py``) builds it for unconditional and class-conditional image
models: same layers, same order, same numerics (GroupNorm with 32 groups and
eps 1e-5 computed in float32, cos-then-sin timestep embedding, attention scale
1/sqrt(sqrt(head_channels)) on q and k, softmax in float32).

Shapes and units
----------------
``UNet(config)(x, timesteps, y=None, train=False)``:
  x          (B, H, W, C) float, H = W = config.image_size, C = config.in_channels
             (images in [-1, 1] scaled by the caller, e.g. by the VP preconditioning)
  timesteps  (B,) float, DDPM step index in [0, 999]; fractional values are fine
  y          (B,) int class labels in [0, 1000) iff config.class_cond, else None
  train      enables dropout (needs a 'dropout' rng) when config.dropout > 0
  returns    (B, H, W, out_channels) float32; out_channels = 2 * C with learn_sigma
             (eps, then the variance interpolation v), else C.

Compute dtype: ``config.dtype`` 'float32' (default) or 'bfloat16'. With
'bfloat16' the torso (input, middle and output blocks) runs its convolutions,
matmuls and element-wise ops in bfloat16 like guided-diffusion's use_fp16, while
GroupNorm and the attention softmax are computed in float32 and the time
embedding and the output head stay float32. Parameters are always float32.
On the CPU, XLA converts bfloat16 convolutions to float32, so there the torso's
3x3 stride-1 convolutions run through oneDNN instead (``_onednn``, with AMX or
AVX512-BF16 where the CPU has them; on a 2-core Intel Xeon with AMX SPGD 1.4x
faster than float32 at batch 1, 1.2x at batch 4), or, where oneDNN cannot be set
up (spgd_jax.xla_setup.onednn), as Winograd F(2x2, 3x3) with bfloat16 channel
products (``_winograd``; on a 2-core AMD EPYC 1.1-1.2x faster at batch 4).
'float32' leaves convolutions and matmuls at JAX's default precision, which on
recent NVIDIA GPUs is TF32; on x86-64 CPUs with AVX-512 its 3x3 stride-1 convolutions
run as spgd_jax's native float32 kernel (``_direct``: Winograd's F(4x4, 3x3) on images with sides in 4s
of 8 x 8 px or more and channels in 16s, F(2x2, 3x3) on other even ones of 16 x 12 px or more, direct sums
elsewhere; float32 round-off apart from XLA's, about 1e-5 of the output's scale, faster than
XLA's convolution; SPGD_JAX_DIRECT_CONV=0 keeps XLA's); wrap calls in ``jax.default_matmul_precision("highest")``
for true float32 arithmetic there. On the CPU, ``jax.default_matmul_precision("bfloat16")``
makes the float32 network's 3x3 stride-1 convolutions compute from bfloat16 operands
with float32 sums (like PyTorch's autocast; everything else stays float32): through oneDNN
where it uses AMX (on that Xeon SPGD 1.3-1.8x faster than float32, and faster than 'bfloat16'),
else as spgd_jax's Winograd kernel with AVX512-BF16 products where the CPU has them (``_direct``;
on a 2-core AMD EPYC, Zen 4, SPGD 1.25x faster than float32 at batch 4, where oneDNN's were not faster).

The 3x3 convolution routes are public for benchmarks and for users' own networks:
``onednn_conv3x3(x, kernel)`` (bfloat16, or float32 from bfloat16 operands; once
``spgd_jax.xla_setup.onednn.conv_target()`` is not None),
``direct_conv3x3(x, kernel)`` and ``winograd_float32_conv3x3(x, kernel)`` (float32; once
``spgd_jax.xla_setup.direct_conv.route()[0]``; ``winograd_tile(H, W, C)`` says which the latter computes: 4 for
Winograd's F(4x4, 3x3), 2 for F(2x2, 3x3), 0 for the direct sums; ``uses_winograd`` whether it is not 0),
``winograd_bfloat16_conv3x3(x, kernel)`` (float32, Winograd's operands rounded to bfloat16; once
``spgd_jax.xla_setup.direct_conv.bf16_products()[0]``) and ``winograd_conv3x3(x, kernel)`` (bfloat16 products
through XLA's dots); x (B, H, W, C), kernel (3, 3, C, D), 'same' padding, stride 1.

Parameter names mirror guided-diffusion's state-dict keys (spgd_jax.convert.guided_diffusion
maps one to the other).
"""

from spgd_jax.models.adm._config import CONFIGS, DEFAULT_CHANNEL_MULT, NUM_CLASSES, UNetConfig
from spgd_jax.models.adm._direct import (direct_conv3x3, uses_winograd, winograd_bfloat16_conv3x3,
                                         winograd_float32_conv3x3, winograd_tile)
from spgd_jax.models.adm._family import ADM  # the family, registered at its definition
from spgd_jax.models.adm._network import UNet, init_shapes, param_count, timestep_embedding
from spgd_jax.models.adm._onednn import onednn_conv3x3
from spgd_jax.models.adm._winograd import winograd_conv3x3

__all__ = ["ADM", "CONFIGS", "DEFAULT_CHANNEL_MULT", "NUM_CLASSES", "UNet", "UNetConfig", "direct_conv3x3", "init_shapes",
           "onednn_conv3x3",
           "param_count", "timestep_embedding", "uses_winograd", "winograd_bfloat16_conv3x3", "winograd_conv3x3",
           "winograd_float32_conv3x3", "winograd_tile"]
