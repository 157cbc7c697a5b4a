"""An independent PyTorch implementation of guided-diffusion's ``UNetModel``.

It is the reference the Flax port (``spgd_jax.models.adm``) and the converter are
tested against. It is written from guided-diffusion's ``unet.py`` and
``script_util.create_model`` (openai/guided-diffusion, final version: channel
multipliers may be fractional, e.g. 0.5 for 512px, channels int(mult * width))
and reproduces their
``state_dict`` key names, tensor shapes and float32 numerics exactly:

- GroupNorm with 32 groups, eps 1e-5, computed in float32;
- ResBlock (optional scale-shift norm, optional up/down-sampling inside the
  block, 1x1 skip convolution when the channel count changes);
- AttentionBlock with the legacy ("split heads, then q/k/v") or the new
  ("split q/k/v, then heads") order, ``num_heads`` or ``num_head_channels``;
  the decoder uses ``num_heads_upsample`` where set, the middle block never does;
- class-conditional label embedding, learned-sigma (6 output channels).

Layout is PyTorch's: images NCHW, float32, timesteps (B,) float (fractional
timesteps allowed), labels (B,) int64. Where guided-diffusion computes in float32
(GroupNorm, softmax, timestep embedding) a float64 model stays in float64, so
``model.double()`` gives the tests a high-precision ground truth.
Only the test-suite imports this module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 1000

# guided-diffusion's create_model default channel multipliers, by image size.
DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """guided-diffusion's ``.float()``, except that float64 stays float64."""
    return t if t.dtype == torch.float64 else t.float()


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32 groups) evaluated in float32 whatever the input dtype."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_upcast(x)).type(x.dtype)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim): [cos(t f_0..f_{h-1}), sin(t f_0..f_{h-1})], f_i = P^(-i/h).

    The frequencies are float32 (as in guided-diffusion) even for float64 timesteps.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    timesteps = _upcast(timesteps)
    angles = timesteps[:, None] * freqs.to(timesteps.dtype)[None, :]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


def _upsample_nearest(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


def _downsample_avg(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    """Nearest x2 upsampling followed by a 3x3 conv (state-dict key ``conv``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_upsample_nearest(x))


class Downsample(nn.Module):
    """Stride-2 3x3 conv (state-dict key ``op``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = _conv3x3(channels, channels, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the embedding; ``resample`` in {None, 'up', 'down'}.

    Keys: in_layers.{0 norm, 2 conv}, emb_layers.1 (linear), out_layers.{0 norm, 3 conv},
    skip_connection (1x1 conv, only when the channel count changes).
    """

    def __init__(self, channels: int, emb_dim: int, out_channels: int, dropout: float,
                 scale_shift: bool, resample: str | None = None):
        super().__init__()
        self.scale_shift = scale_shift
        self.resample = {None: None, "up": _upsample_nearest, "down": _downsample_avg}[resample]
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), _conv3x3(channels, out_channels))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels if scale_shift else out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(dropout), _conv3x3(out_channels, out_channels))
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        norm, act, conv = self.in_layers
        h = act(norm(x))
        if self.resample is not None:  # resample between the activation and the conv
            h, x = self.resample(h), self.resample(x)
        h = conv(h)
        e = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        out_norm, rest = self.out_layers[0], self.out_layers[1:]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = rest(out_norm(h + e))
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions. Keys: norm, qkv (Conv1d C->3C), proj_out (Conv1d C->C)."""

    def __init__(self, channels: int, num_heads: int, num_head_channels: int, new_order: bool):
        super().__init__()
        if num_head_channels == -1:
            self.heads = num_heads
        else:
            assert channels % num_head_channels == 0
            self.heads = channels // num_head_channels
        self.new_order = new_order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """(B, 3C, T) -> (B, C, T). Both q and k are scaled by ch**-0.25 before the product."""
        b, width, t = qkv.shape
        ch = width // (3 * self.heads)
        if self.new_order:  # channel axis = [q | k | v], each [head0 | head1 | ...]
            q, k, v = (z.reshape(b * self.heads, ch, t) for z in qkv.chunk(3, dim=1))
        else:  # channel axis = [head0 (q|k|v) | head1 (q|k|v) | ...]
            q, k, v = qkv.reshape(b * self.heads, 3 * ch, t).split(ch, dim=1)
        s = 1 / math.sqrt(math.sqrt(ch))
        logits = torch.einsum("bct,bcs->bts", q * s, k * s)
        weights = torch.softmax(_upcast(logits), dim=-1).type(logits.dtype)
        return torch.einsum("bts,bcs->bct", weights, v).reshape(b, -1, t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        flat = x.reshape(b, c, hh * ww)
        h = self.proj_out(self.attend(self.qkv(self.norm(flat))))
        return (flat + h).reshape(b, c, hh, ww)


class EmbedSequential(nn.Sequential):
    """Sequential whose ResBlocks also receive the embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNetModel(nn.Module):
    """guided-diffusion's UNetModel (2-D, conv_resample=True, float32).

    ``attention_ds``: downsampling factors (1, 2, 4, ...) at which attention is used,
    as guided-diffusion's UNetModel takes them (create_model converts from pixels).
    forward(x (B,C,H,W), timesteps (B,), y (B,) or None) -> (B, out_channels, H, W).
    """

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, num_res_blocks: int,
                 attention_ds: tuple[int, ...], dropout: float, channel_mult: tuple[int, ...],
                 num_classes: int | None, num_heads: int, num_head_channels: int, num_heads_upsample: int,
                 use_scale_shift_norm: bool, resblock_updown: bool, use_new_attention_order: bool):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.model_channels = model_channels
        self.num_classes = num_classes
        emb_dim = 4 * model_channels

        def res(cin, cout, resample=None):
            return ResBlock(cin, emb_dim, cout, dropout, use_scale_shift_norm, resample)

        def attn(c, heads):
            return AttentionBlock(c, heads, num_head_channels, use_new_attention_order)

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        ch = input_ch = int(channel_mult[0] * model_channels)
        ds, skip_channels = 1, [ch]
        self.input_blocks = nn.ModuleList([EmbedSequential(_conv3x3(in_channels, ch))])
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_ds:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, "down") if resblock_updown else Downsample(ch)
                self.input_blocks.append(EmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = EmbedSequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_ds:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, "up") if resblock_updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), _conv3x3(input_ch, out_channels))
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        assert (y is not None) == (self.num_classes is not None), "y iff class-conditional"
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if y is not None:
            emb = emb + self.label_emb(y)
        skips = []
        h = _upcast(x)
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))


def create_model(image_size: int, num_channels: int, num_res_blocks: int, channel_mult=None,
                 learn_sigma: bool = False, class_cond: bool = False, attention_resolutions=(16,),
                 num_heads: int = 1, num_head_channels: int = -1, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = False, dropout: float = 0.0, resblock_updown: bool = False,
                 use_new_attention_order: bool = False, in_channels: int = 3) -> UNetModel:
    """guided-diffusion's ``create_model`` with attention_resolutions in pixels (a tuple) and
    channel_mult a tuple or None (None: the default for the image size). Returns the model in eval mode."""
    if channel_mult is None:
        if image_size not in DEFAULT_CHANNEL_MULT:
            raise ValueError(f"unsupported image size: {image_size}")
        channel_mult = DEFAULT_CHANNEL_MULT[image_size]
    model = UNetModel(
        in_channels=in_channels,
        model_channels=num_channels,
        out_channels=2 * in_channels if learn_sigma else in_channels,
        num_res_blocks=num_res_blocks,
        attention_ds=tuple(image_size // int(r) for r in attention_resolutions),
        dropout=dropout,
        channel_mult=tuple(channel_mult),
        num_classes=NUM_CLASSES if class_cond else None,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
    )
    return model.eval()


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Give every parameter (zero-initialised ones included) non-trivial random values, in place.

    Conv/linear weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), GroupNorm scale ~ 1 + N(0, 0.2^2),
    GroupNorm shift ~ N(0, 0.2^2), label embedding ~ N(0, 1). Activations stay O(1) through the net.
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(t, std, mean=0.0):
        t.copy_(mean + std * torch.randn(t.shape, generator=gen))

    for module in model.modules():
        if isinstance(module, nn.GroupNorm):
            normal(module.weight, 0.2, 1.0)
            normal(module.bias, 0.2)
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            normal(module.weight, module.weight[0].numel() ** -0.5)
            normal(module.bias, 0.1)
        elif isinstance(module, nn.Embedding):
            normal(module.weight, 1.0)
    return model


def from_config(config, seed: int) -> UNetModel:
    """Randomized reference model for a ``spgd_jax.models.adm.UNetConfig`` (its create_model fields)."""
    fields = {k: v for k, v in config.to_dict().items() if k != "dtype"}
    return randomize_(create_model(**fields), seed)
