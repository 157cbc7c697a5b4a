"""guided-diffusion state-dict keys <-> paths in the Flax ADM params tree.

spgd_jax's ADM params tree mirrors guided-diffusion's state-dict keys. A torch key is split
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
Only names change here; guided_diffusion.py owns the layout changes (OIHW -> HWIO, Linear
(out, in) -> (in, out), Conv1d (out, in, 1) -> Dense (in, out)).
"""

from __future__ import annotations

import re

__all__ = ["flax_path", "torch_key"]

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
