"""The ADM UNet's layers and the Flax module (see spgd_jax.models.adm for shapes and dtypes)."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from spgd_jax.models.adm._attention import attention
from spgd_jax.models.adm._config import NUM_CLASSES, UNetConfig
from spgd_jax.models.adm import _onednn
from spgd_jax.models.adm._conv import conv_general_dilated
from spgd_jax.models.adm._group_norm import GroupNorm32, channel_parts

__all__ = ["UNet", "init_shapes", "param_count", "timestep_embedding"]


# Layers ------------------------------------------------------------------------


def timestep_embedding(timesteps: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding (B,) -> (B, dim) float32: [cos(t f), sin(t f)], f_i = max_period^(-i/half)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None]
    embedding = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
    return embedding


# torch's default init for conv/linear weights (kaiming_uniform, a=sqrt(5)).
_torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
_zeros = nn.initializers.zeros


def _norm(h: jax.Array, name: str) -> jax.Array:
    """GroupNorm32: computed in float32, returned in h's dtype."""
    return GroupNorm32(name=name)(h).astype(h.dtype)


def _norm_silu(h: jax.Array | tuple[jax.Array, ...], name: str,
               scale_shift: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """silu(_norm(h)), or silu(_norm(h) * (1 + scale) + shift) for scale_shift = (scale, shift) (B, 1, 1, C), in
    h's dtype (GroupNorm32 with silu=True); h may be a tuple of parts side by side along the channels."""
    return GroupNorm32(name=name)(h, silu=True, scale_shift=scale_shift)


def _conv3(features: int, dtype: Any, name: str, strides: int = 1, zero: bool = False) -> nn.Conv:
    """3x3 convolution with torch's padding=1 (explicit, so stride 2 matches torch)."""
    return nn.Conv(
        features,
        (3, 3),
        strides=(strides, strides),
        padding=((1, 1), (1, 1)),
        dtype=dtype,
        kernel_init=_zeros if zero else _torch_kernel_init,
        conv_general_dilated=_onednn.conv_general_dilated,
        name=name,
    )


def _upsample_nearest(h: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)


@jax.custom_vjp
def _avgpool2(h: jax.Array) -> jax.Array:
    """2x2 average pool, (B, H, W, C) -> (B, H/2, W/2, C); its gradient is the plain one (g / 4, upsampled)."""
    b, hh, ww, c = h.shape
    return h.reshape(b, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))


def _avgpool2_fwd(h: jax.Array) -> tuple[jax.Array, None]:
    return _avgpool2(h), None


def _avgpool2_bwd(_: None, g: jax.Array) -> tuple[jax.Array]:
    # Upsampled by a broadcast, g's element-wise chain (the GroupNorm and residual cotangents of this level and,
    # through the same broadcast there, of every coarser one) is fused by XLA:CPU into each consumer and
    # recomputed 4x per level down, though g is in memory already for the convolutions' gradients. A product
    # with the identity (exact for finite g; a non-finite entry turns its pixel's channels to NaN, where the
    # gradient is lost anyway) is a dot, which XLA does not fuse, so the consumers read g instead:
    # the default prior's SPGD step 45 against 48 ms per image-NFE at batch 1, 41 against 45 at batch 4.
    eye = jnp.eye(g.shape[-1], dtype=g.dtype)
    g = jnp.einsum("bhwc,cd->bhwd", g, eye, precision=jax.lax.Precision.HIGHEST) * 0.25
    return (jnp.repeat(jnp.repeat(g, 2, axis=1), 2, axis=2),)


_avgpool2.defvjp(_avgpool2_fwd, _avgpool2_bwd)


class _SkipConnection(nn.Module):
    """The ResBlock's 1x1 convolution: nn.Conv's parameters ('kernel' (1, 1, C, D), 'bias' (D,), float32) and
    values, of an input given in parts side by side along the channels (channel_parts): the sum of each part's
    convolution with its rows of the kernel, so that the parts are never joined (one part: nn.Conv's ops)."""

    features: int
    dtype: Any

    @nn.compact
    def __call__(self, parts: tuple[jax.Array, ...]) -> jax.Array:
        channels = sum(part.shape[-1] for part in parts)
        kernel = self.param("kernel", _torch_kernel_init, (1, 1, channels, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)
        y, start = None, 0
        for part in parts:
            width = part.shape[-1]
            term = conv_general_dilated(part.astype(self.dtype), kernel[:, :, start:start + width], (1, 1),
                                        ((0, 0), (0, 0)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
            y, start = term if y is None else y + term, start + width
        return y + bias.reshape((1, 1, 1, -1))


class _Conv3x3Plus(nn.Module):
    """The ResBlock's 3x3 convolutions: nn.Conv's parameters ('kernel' (3, 3, C, D), 'bias' (D,), float32), init and
    values, of x (B, H, W, C), plus a residual (B, H, W, D) added after the bias where given:
    `_onednn.conv3x3_plus`, one pass of the native float32 kernel on the CPU (the same bits as the additions)."""

    features: int
    dtype: Any
    zero: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array | None = None) -> jax.Array:
        kernel_init = _zeros if self.zero else _torch_kernel_init
        kernel = self.param("kernel", kernel_init, (3, 3, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
        return _onednn.conv3x3_plus(x, kernel, bias, residual)


class ResBlock(nn.Module):
    """guided-diffusion ResBlock; updown is '', 'up' (nearest x2) or 'down' (2x2 average pool). Its input x may be
    a tuple of parts side by side along the channels (an output block's h and skip, joined by torch's
    concatenation), taken as channel_parts says."""

    out_channels: int
    config: UNetConfig
    updown: str = ""

    @nn.compact
    def __call__(self, x: jax.Array | tuple[jax.Array, ...], emb: jax.Array, train: bool) -> jax.Array:
        cfg, dtype = self.config, self.config.compute_dtype
        parts = channel_parts(x if isinstance(x, tuple) else (x,))
        if self.updown and len(parts) > 1:
            parts = (jnp.concatenate(parts, axis=-1),)
        h = _norm_silu(parts, "in_layers_0")
        if self.updown:
            resample = _upsample_nearest if self.updown == "up" else _avgpool2
            h, parts = resample(h), (resample(parts[0]),)
        h = _Conv3x3Plus(self.out_channels, dtype, name="in_layers_2")(h)

        emb_width = 2 * self.out_channels if cfg.use_scale_shift_norm else self.out_channels
        emb_out = nn.Dense(emb_width, dtype=dtype, kernel_init=_torch_kernel_init, name="emb_layers_1")(nn.silu(emb))
        emb_out = emb_out.astype(h.dtype)[:, None, None, :]
        if cfg.use_scale_shift_norm:
            h = _norm_silu(h, "out_layers_0", tuple(jnp.split(emb_out, 2, axis=-1)))
        else:
            h = _norm_silu(h + emb_out, "out_layers_0")
        if cfg.dropout > 0:
            h = nn.Dropout(cfg.dropout, deterministic=not train)(h)
        if sum(part.shape[-1] for part in parts) != self.out_channels:
            skip = _SkipConnection(self.out_channels, dtype, name="skip_connection")(parts)
        else:
            skip = jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
        return _Conv3x3Plus(self.out_channels, dtype, zero=True, name="out_layers_3")(h, skip)


class AttentionBlock(nn.Module):
    """Self-attention over all positions; legacy or new q/k/v head order per config."""

    num_heads: int
    config: UNetConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.config.compute_dtype
        b, hh, ww, c = x.shape
        heads, ch = self.num_heads, c // self.num_heads
        flat = x.reshape(b, hh * ww, c)
        qkv = nn.Dense(3 * c, dtype=dtype, kernel_init=_torch_kernel_init, name="qkv")(_norm(flat, "norm"))
        if self.config.use_new_attention_order:
            # QKVAttention: channels ordered (q|k|v, head, ch).
            q, k, v = jnp.moveaxis(qkv.reshape(b, hh * ww, 3, heads, ch), 2, 0)
        else:
            # QKVAttentionLegacy: channels ordered (head, q|k|v, ch).
            q, k, v = jnp.moveaxis(qkv.reshape(b, hh * ww, heads, 3, ch), 3, 0)
        scale = 1 / math.sqrt(math.sqrt(ch))
        a = attention(q * scale, k * scale, v).reshape(b, hh * ww, c)
        h = nn.Dense(c, dtype=dtype, kernel_init=_zeros, name="proj_out")(a)
        return (flat + h).reshape(b, hh, ww, c)


class _Block(nn.Module):
    """One TimestepEmbedSequential: layers named '0', '1', ... as in torch.

    layers: tuples ('conv', channels) | ('res', out_channels, updown) |
            ('attn', num_heads) | ('down',) | ('up',).
    """

    layers: tuple[tuple, ...]
    config: UNetConfig

    @nn.compact
    def __call__(self, h: jax.Array | tuple[jax.Array, ...], emb: jax.Array, train: bool) -> jax.Array:
        """h (B, H, W, C), or for an output block its input's parts (h, skip), which its first layer, a ResBlock,
        takes as they are."""
        dtype = self.config.compute_dtype
        for j, (kind, *args) in enumerate(self.layers):
            name = str(j)
            if isinstance(h, tuple) and kind != "res":
                h = jnp.concatenate(h, axis=-1)
            if kind == "conv":
                h = _conv3(args[0], dtype, name)(h)
            elif kind == "res":
                h = ResBlock(args[0], self.config, args[1], name=name)(h, emb, train)
            elif kind == "attn":
                h = AttentionBlock(args[0], self.config, name=name)(h)
            else:  # "down" or "up"
                h = _Resample(self.config, kind, name=name)(h)
        return h


class _Resample(nn.Module):
    """Downsample (3x3 stride-2 conv 'op') or Upsample (nearest x2 then 3x3 'conv')."""

    config: UNetConfig
    direction: str

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        dtype, c = self.config.compute_dtype, h.shape[-1]
        if self.direction == "down":
            return _conv3(c, dtype, "op", strides=2)(h)
        return _conv3(c, dtype, "conv")(_upsample_nearest(h))


def _plan(cfg: UNetConfig) -> tuple[tuple[tuple, ...], tuple[tuple, ...]]:
    """Layer lists of input_blocks and output_blocks, following UNetModel.__init__."""
    chans = cfg.level_channels
    last = len(chans) - 1
    attn_ds = cfg.attention_downsample
    inputs: list[tuple] = [(("conv", chans[0]),)]
    ds = 1
    for level, ch in enumerate(chans):
        for _ in range(cfg.num_res_blocks):
            layers = [("res", ch, "")]
            if ds in attn_ds:
                layers.append(("attn", cfg.heads(ch)))
            inputs.append(tuple(layers))
        if level != last:
            inputs.append((("res", ch, "down"),) if cfg.resblock_updown else (("down",),))
            ds *= 2
    outputs: list[tuple] = []
    for level in reversed(range(len(chans))):
        ch = chans[level]
        for i in range(cfg.num_res_blocks + 1):
            layers = [("res", ch, "")]
            if ds in attn_ds:
                layers.append(("attn", cfg.heads(ch, upsample=True)))
            if level and i == cfg.num_res_blocks:
                layers.append(("res", ch, "up") if cfg.resblock_updown else ("up",))
                ds //= 2
            outputs.append(tuple(layers))
    return tuple(inputs), tuple(outputs)


class UNet(nn.Module):
    """guided-diffusion UNetModel; see the module docstring for shapes, dtypes and names."""

    config: UNetConfig

    def _check_inputs(self, x: jax.Array, timesteps: jax.Array, y: jax.Array | None, train: bool) -> None:
        cfg = self.config
        size = cfg.image_size
        if x.ndim != 4 or x.shape[1:] != (size, size, cfg.in_channels):
            raise ValueError(
                f"x must have shape (B, {size}, {size}, {cfg.in_channels}) (NHWC), got {x.shape}"
            )
        if timesteps.shape != (x.shape[0],):
            raise ValueError(f"timesteps must have shape (B,) = ({x.shape[0]},), got {timesteps.shape}")
        if cfg.class_cond:
            if y is None:
                raise ValueError("this model is class-conditional: pass y, int labels of shape (B,)")
            if y.shape != (x.shape[0],) or not jnp.issubdtype(y.dtype, jnp.integer):
                raise ValueError(f"y must be int labels of shape ({x.shape[0]},), got {y.dtype} {y.shape}")
        elif y is not None:
            raise ValueError("y given but the model is unconditional (class_cond=False); pass y=None")
        if train and cfg.dropout > 0 and not self.has_rng("dropout"):
            raise ValueError("train=True with dropout > 0 needs a 'dropout' rng: apply(..., rngs={'dropout': key})")

    @nn.compact
    def __call__(
        self, x: jax.Array, timesteps: jax.Array, y: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        cfg = self.config
        x, timesteps = jnp.asarray(x), jnp.asarray(timesteps)
        y = None if y is None else jnp.asarray(y)
        self._check_inputs(x, timesteps, y, train)
        dtype = cfg.compute_dtype
        emb_dim = 4 * cfg.num_channels

        emb = timestep_embedding(timesteps, cfg.num_channels)
        emb = nn.Dense(emb_dim, kernel_init=_torch_kernel_init, name="time_embed_0")(emb)
        emb = nn.Dense(emb_dim, kernel_init=_torch_kernel_init, name="time_embed_2")(nn.silu(emb))
        if cfg.class_cond:
            emb = emb + nn.Embed(NUM_CLASSES, emb_dim, name="label_emb")(y)

        input_plan, output_plan = _plan(cfg)
        h = x.astype(dtype)
        skips = []
        for i, layers in enumerate(input_plan):
            h = _Block(layers, cfg, name=f"input_blocks_{i}")(h, emb, train)
            skips.append(h)
        mid = cfg.level_channels[-1]
        h = ResBlock(mid, cfg, name="middle_block_0")(h, emb, train)
        h = AttentionBlock(cfg.heads(mid), cfg, name="middle_block_1")(h)
        h = ResBlock(mid, cfg, name="middle_block_2")(h, emb, train)
        for i, layers in enumerate(output_plan):
            # torch.cat([h, skip], dim=1), left to the block's first ResBlock (channel_parts)
            h = _Block(layers, cfg, name=f"output_blocks_{i}")((h, skips.pop()), emb, train)

        h = _norm_silu(h.astype(jnp.float32), "out_0")
        return _conv3(cfg.out_channels, jnp.float32, "out_2", zero=True)(h)


def init_shapes(config: UNetConfig, batch: int = 1) -> Any:
    """Shapes/dtypes of UNet(config)'s variables, via jax.eval_shape (no allocation)."""
    size = config.image_size
    x = jax.ShapeDtypeStruct((batch, size, size, config.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.float32)
    y = jax.ShapeDtypeStruct((batch,), jnp.int32) if config.class_cond else None
    return jax.eval_shape(UNet(config).init, jax.random.key(0), x, t, y)


def param_count(config: UNetConfig) -> int:
    """Number of scalar parameters of UNet(config)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(init_shapes(config)["params"]))
