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
'float32' leaves convolutions and matmuls at JAX's default precision, which on
recent NVIDIA GPUs is TF32; wrap calls in ``jax.default_matmul_precision("highest")``
for true float32 arithmetic there.

Parameter naming (the checkpoint converter depends on it)
---------------------------------------------------------
The params tree mirrors guided-diffusion's state-dict keys. A torch key is split
at '.', and a numeric segment that follows a name segment is joined to it with
'_' ("input_blocks.1" -> "input_blocks_1", "in_layers.2" -> "in_layers_2");
a numeric segment that follows a numeric segment stays its own segment (the
layer index inside a block: "input_blocks.1.0" -> ("input_blocks_1", "0")). The
leaf "bias" stays "bias"; "weight" becomes "scale" for GroupNorm, "embedding"
for label_emb and "kernel" for convolutions and linear layers. Examples:

  time_embed.0.weight                     ('time_embed_0', 'kernel')
  label_emb.weight                        ('label_emb', 'embedding')
  input_blocks.0.0.bias                   ('input_blocks_0', '0', 'bias')
  input_blocks.1.0.in_layers.0.weight     ('input_blocks_1', '0', 'in_layers_0', 'scale')
  input_blocks.2.1.qkv.weight             ('input_blocks_2', '1', 'qkv', 'kernel')
  input_blocks.3.0.op.weight              ('input_blocks_3', '0', 'op', 'kernel')
  middle_block.1.proj_out.bias            ('middle_block_1', 'proj_out', 'bias')
  output_blocks.2.2.conv.weight           ('output_blocks_2', '2', 'conv', 'kernel')
  out.2.weight                            ('out_2', 'kernel')

``flax_path(torch_key)`` and its inverse ``torch_key(path)`` implement this rule.
Only names change here; the converter owns layout changes (OIHW -> HWIO, Linear
(out, in) -> (in, out), Conv1d (out, in, 1) -> Dense (in, out)).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from spgd_jax._conv import conv_general_dilated

__all__ = [
    "UNetConfig",
    "UNet",
    "CONFIGS",
    "NUM_CLASSES",
    "DEFAULT_CHANNEL_MULT",
    "timestep_embedding",
    "flax_path",
    "torch_key",
    "init_shapes",
    "param_count",
]

NUM_CLASSES = 1000
NORM_GROUPS = 32
NORM_EPS = 1e-5
# create_model's channel_mult for each image size when none is given.
DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Arguments of guided-diffusion's create_model; defaults are create_model's.

    attention_resolutions are feature-map sizes in pixels (create_model's "16,8"
    is (16, 8)); a comma-separated string of that form is accepted too.
    channel_mult None means create_model's default for image_size (64, 128, 256
    or 512); after construction the field holds the resolved tuple.
    num_head_channels -1 means "use num_heads heads"; otherwise the head count
    is channels // num_head_channels. num_heads_upsample -1 means num_heads.
    dtype is the compute dtype, 'float32' or 'bfloat16'; params are float32.
    """

    image_size: int
    num_channels: int
    num_res_blocks: int
    channel_mult: tuple[float, ...] | None = None
    attention_resolutions: tuple[int, ...] = (16,)
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    learn_sigma: bool = False
    class_cond: bool = False
    dropout: float = 0.0
    in_channels: int = 3
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("image_size", "num_channels", "num_res_blocks", "num_heads", "in_channels"):
            _positive_int(name, getattr(self, name))
        for name in ("num_head_channels", "num_heads_upsample"):
            value = getattr(self, name)
            if value != -1:
                _positive_int(f"{name} (or -1)", value)
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {self.dropout!r}")

        mult = self.channel_mult
        if mult is None:
            if self.image_size not in DEFAULT_CHANNEL_MULT:
                raise ValueError(
                    f"no default channel_mult for image_size {self.image_size} (guided-diffusion has "
                    f"defaults for {sorted(DEFAULT_CHANNEL_MULT)}); pass channel_mult explicitly, "
                    "e.g. channel_mult=(1, 2, 2)"
                )
            mult = DEFAULT_CHANNEL_MULT[self.image_size]
        mult = tuple(mult)
        if not mult or any(isinstance(m, bool) or not isinstance(m, (int, float)) or m <= 0 for m in mult):
            raise ValueError(f"channel_mult must be a non-empty tuple of positive numbers, got {mult!r}")
        object.__setattr__(self, "channel_mult", mult)
        if self.image_size % 2 ** (len(mult) - 1):
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2**{len(mult) - 1} "
                f"(one halving per channel_mult level after the first)"
            )

        res = self.attention_resolutions
        if isinstance(res, str):
            res = tuple(int(r) for r in res.split(",") if r.strip())
        res = tuple(res)
        sizes = self.feature_sizes
        if any(isinstance(r, bool) or not isinstance(r, int) or r not in sizes for r in res):
            raise ValueError(
                f"attention_resolutions {res!r} must be feature-map sizes in pixels of this model, "
                f"i.e. taken from {sizes} (image_size {self.image_size} halved per channel_mult level)"
            )
        object.__setattr__(self, "attention_resolutions", res)

        for ch in self.level_channels:
            if ch % NORM_GROUPS:
                raise ValueError(
                    f"every level's channels (int(mult * num_channels) = {self.level_channels}) must be "
                    f"divisible by {NORM_GROUPS} for GroupNorm32; change num_channels or channel_mult"
                )
        for ch, heads_name in self._attention_channels():
            heads = getattr(self, heads_name)
            if self.num_head_channels != -1:
                if ch % self.num_head_channels:
                    raise ValueError(
                        f"attention over {ch} channels: not divisible by num_head_channels "
                        f"{self.num_head_channels}; pick num_head_channels dividing {ch}"
                    )
            elif ch % heads:
                raise ValueError(
                    f"attention over {ch} channels: not divisible by {heads_name}={heads}; "
                    f"pick a head count dividing {ch}"
                )

    # Derived quantities -------------------------------------------------------

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def compute_dtype(self) -> Any:
        return _DTYPES[self.dtype]

    @property
    def feature_sizes(self) -> tuple[int, ...]:
        """Feature-map size in pixels at each channel_mult level."""
        return tuple(self.image_size // 2**level for level in range(len(self.channel_mult)))

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(int(m * self.num_channels) for m in self.channel_mult)

    @property
    def attention_downsample(self) -> tuple[int, ...]:
        """create_model's conversion: downsample rate image_size // res per resolution."""
        return tuple(self.image_size // r for r in self.attention_resolutions)

    def heads(self, channels: int, upsample: bool = False) -> int:
        """Number of attention heads for an AttentionBlock over `channels` channels."""
        if self.num_head_channels != -1:
            return channels // self.num_head_channels
        if upsample and self.num_heads_upsample != -1:
            return self.num_heads_upsample
        return self.num_heads

    def _attention_channels(self) -> list[tuple[int, str]]:
        """(channels, head-count field) of every AttentionBlock, middle block included."""
        heads_up = "num_heads" if self.num_heads_upsample == -1 else "num_heads_upsample"
        found = [(self.level_channels[-1], "num_heads")]
        for level, ch in enumerate(self.level_channels):
            if 2**level in self.attention_downsample:
                found += [(ch, "num_heads"), (ch, heads_up)]
        return found

    # Serialisation -----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples become lists); from_dict inverts it."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UNetConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown UNetConfig fields {unknown}; known fields: {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


_FFHQ256 = UNetConfig(
    image_size=256,
    num_channels=128,
    num_res_blocks=1,
    channel_mult=(1, 1, 2, 2, 4, 4),
    attention_resolutions=(16,),
    num_heads=4,
    num_head_channels=64,
    use_scale_shift_norm=True,
    resblock_updown=True,
    learn_sigma=True,
)

CONFIGS: dict[str, UNetConfig] = {
    # DPS release ffhq_10m.pt: 93,563,910 parameters.
    "ffhq256": _FFHQ256,
    # guided-diffusion 256x256_diffusion_uncond.pt: 552,814,086 parameters.
    "imagenet256": dataclasses.replace(_FFHQ256, num_channels=256, num_res_blocks=2, attention_resolutions=(32, 16, 8)),
    # Small configurations for tests; together they exercise every option.
    "tiny16": UNetConfig(
        image_size=16,
        num_channels=32,
        num_res_blocks=1,
        channel_mult=(1, 2),
        attention_resolutions=(8,),
        num_head_channels=16,
        use_scale_shift_norm=True,
        resblock_updown=True,
        learn_sigma=True,
    ),
    "tiny16_plain": UNetConfig(
        image_size=16,
        num_channels=32,
        num_res_blocks=2,
        channel_mult=(1, 1, 2),
        attention_resolutions=(16, 4),
        num_heads=2,
        num_heads_upsample=4,
    ),
    "tiny16_cond": UNetConfig(
        image_size=16,
        num_channels=32,
        num_res_blocks=1,
        channel_mult=(1, 2),
        attention_resolutions=(16, 8),
        num_head_channels=8,
        use_scale_shift_norm=True,
        use_new_attention_order=True,
        learn_sigma=True,
        class_cond=True,
        dropout=0.1,
    ),
}


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
    out = nn.GroupNorm(
        num_groups=NORM_GROUPS,
        epsilon=NORM_EPS,
        dtype=jnp.float32,
        use_fast_variance=False,
        name=name,
    )(h.astype(jnp.float32))
    return out.astype(h.dtype)


def _conv3(features: int, dtype: Any, name: str, strides: int = 1, zero: bool = False) -> nn.Conv:
    """3x3 convolution with torch's padding=1 (explicit, so stride 2 matches torch)."""
    return nn.Conv(
        features,
        (3, 3),
        strides=(strides, strides),
        padding=((1, 1), (1, 1)),
        dtype=dtype,
        kernel_init=_zeros if zero else _torch_kernel_init,
        conv_general_dilated=conv_general_dilated,
        name=name,
    )


def _upsample_nearest(h: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)


def _avgpool2(h: jax.Array) -> jax.Array:
    b, hh, ww, c = h.shape
    return h.reshape(b, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))


class ResBlock(nn.Module):
    """guided-diffusion ResBlock; updown is '', 'up' (nearest x2) or 'down' (2x2 average pool)."""

    out_channels: int
    config: UNetConfig
    updown: str = ""

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
        cfg, dtype = self.config, self.config.compute_dtype
        h = nn.silu(_norm(x, "in_layers_0"))
        if self.updown:
            resample = _upsample_nearest if self.updown == "up" else _avgpool2
            h, x = resample(h), resample(x)
        h = _conv3(self.out_channels, dtype, "in_layers_2")(h)

        emb_width = 2 * self.out_channels if cfg.use_scale_shift_norm else self.out_channels
        emb_out = nn.Dense(emb_width, dtype=dtype, kernel_init=_torch_kernel_init, name="emb_layers_1")(nn.silu(emb))
        emb_out = emb_out.astype(h.dtype)[:, None, None, :]
        if cfg.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = _norm(h, "out_layers_0") * (1 + scale) + shift
        else:
            h = _norm(h + emb_out, "out_layers_0")
        h = nn.silu(h)
        if cfg.dropout > 0:
            h = nn.Dropout(cfg.dropout, deterministic=not train)(h)
        h = _conv3(self.out_channels, dtype, "out_layers_3", zero=True)(h)

        if x.shape[-1] != self.out_channels:
            skip = nn.Conv(self.out_channels, (1, 1), padding=((0, 0), (0, 0)), dtype=dtype, kernel_init=_torch_kernel_init,
                           conv_general_dilated=conv_general_dilated, name="skip_connection")
            x = skip(x)
        return x + h


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
        logits = jnp.einsum("bthc,bshc->bhts", q * scale, k * scale)
        weight = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(logits.dtype)
        a = jnp.einsum("bhts,bshc->bthc", weight, v).reshape(b, hh * ww, c)
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
    def __call__(self, h: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
        dtype = self.config.compute_dtype
        for j, (kind, *args) in enumerate(self.layers):
            name = str(j)
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
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = _Block(layers, cfg, name=f"output_blocks_{i}")(h, emb, train)

        h = nn.silu(_norm(h.astype(jnp.float32), "out_0"))
        return _conv3(cfg.out_channels, jnp.float32, "out_2", zero=True)(h)


# Parameter names -----------------------------------------------------------------

_NORM_MODULES = {"in_layers_0", "out_layers_0", "norm", "out_0"}
_NAME_INDEX = re.compile(r"^(.*\D)_(\d+)$")


def flax_path(torch_key: str) -> tuple[str, ...]:
    """guided-diffusion state-dict key -> path in the Flax params tree (leaf name included)."""
    parts = torch_key.split(".")
    if len(parts) < 2 or parts[-1] not in ("weight", "bias") or not all(parts):
        raise ValueError(f"not a guided-diffusion parameter key: {torch_key!r} (expected '<module path>.weight|bias')")
    path: list[str] = []
    for previous, part in zip([""] + parts[:-2], parts[:-1]):
        if part.isdigit() and previous and not previous.isdigit():
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    if parts[-1] == "bias":
        leaf = "bias"
    elif path[-1] in _NORM_MODULES:
        leaf = "scale"
    elif path[-1] == "label_emb":
        leaf = "embedding"
    else:
        leaf = "kernel"
    return (*path, leaf)


def torch_key(path: tuple[str, ...]) -> str:
    """Inverse of flax_path: Flax params path -> guided-diffusion state-dict key."""
    if len(path) < 2 or path[-1] not in ("kernel", "scale", "embedding", "bias"):
        raise ValueError(f"not a UNet params path: {path!r} (expected (..., 'kernel'|'scale'|'embedding'|'bias'))")
    parts = []
    for segment in path[:-1]:
        match = _NAME_INDEX.match(segment)
        parts.extend(match.groups() if match else (segment,))
    return ".".join(parts + ["bias" if path[-1] == "bias" else "weight"])


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
