"""The ADM UNet's configuration: guided-diffusion's create_model arguments, and the named configs."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

__all__ = ["CONFIGS", "DEFAULT_CHANNEL_MULT", "NORM_EPS", "NORM_GROUPS", "NUM_CLASSES", "UNetConfig"]

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
