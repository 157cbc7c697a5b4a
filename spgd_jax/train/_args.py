"""The command line's arguments: the two parsers (train, export), the --model presets, the --set overrides.

--set KEY=VALUE sets a field of the model (UNetConfig) or of training (TrainConfig); the value is JSON
(a bare word is a string); the training parser's epilog lists every key with its default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import textwrap
from pathlib import Path

from spgd_jax.models.adm import CONFIGS, UNetConfig
from spgd_jax.train._state import TrainConfig

# The default prior: a small 64x64 ADM UNet sized for CPU training (see weights/MODEL_CARD.md).
DEFAULT64 = UNetConfig(
    image_size=64, num_channels=32, num_res_blocks=1, channel_mult=(1, 2, 2, 2),
    attention_resolutions=(16, 8), num_head_channels=32, use_scale_shift_norm=True,
    resblock_updown=True, learn_sigma=False, dropout=0.0)
MODELS = {"default64": DEFAULT64, **CONFIGS}

DESCRIPTION = "DDPM training of the ADM UNet prior, and export of its EMA weights."


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m spgd_jax.train", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_epilog())
    p.add_argument("--data", required=True, help="folder of training images (jpg/png, searched recursively)")
    p.add_argument("--run", default="runs/train", help="run folder: checkpoints, metrics, samples "
                                                       "(resumes if it holds checkpoints)")
    p.add_argument("--model", default="default64", choices=sorted(MODELS), help="architecture preset")
    p.add_argument("--image-size", type=int, default=None, help="override the preset's image size")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model (UNetConfig) or training (TrainConfig) field; JSON values, "
                        "e.g. --set num_channels=32 --set channel_mult=[1,2,2] --set batch_size=64")
    p.add_argument("--cache-dir", default="data_cache", help="where decoded images are cached (.npy)")
    p.add_argument("--no-cache", action="store_true",
                   help="do not use the persistent compilation cache (default: on; spgd_jax.xla_setup.compile_cache)")
    p.add_argument("--init", default=None, metavar="WEIGHTS",
                   help="start a new run from these weights (e.g. weights/default64): params and EMA, "
                        "fresh optimiser")
    return p


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m spgd_jax.train export",
                                description="Export a run's EMA weights + config and update the model card.")
    p.add_argument("--run", required=True, help="training run folder (holds checkpoints/)")
    p.add_argument("--out", required=True, help="output weights folder, e.g. weights/default64")
    p.add_argument("--card", default=None, help="model card whose export block is rewritten "
                                                "(default: MODEL_CARD.md beside --out, if present)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def card_path(args: argparse.Namespace) -> Path | None:
    """export's --card, by default MODEL_CARD.md beside --out when there is one."""
    if args.card is not None:
        return Path(args.card)
    default = Path(args.out).parent / "MODEL_CARD.md"
    return default if default.exists() else None


def configs(args: argparse.Namespace) -> tuple[UNetConfig, TrainConfig]:
    """The model (the --model preset with --image-size and the model --set keys) and training configs;
    ValueError for an unknown key or a bad value."""
    overrides = _parse_set(args.set)
    model_fields = set(UNetConfig.__dataclass_fields__)
    train_fields = set(TrainConfig.__dataclass_fields__)
    unknown = set(overrides) - model_fields - train_fields
    if unknown:
        raise ValueError(f"unknown --set key(s) {sorted(unknown)}; model keys: {sorted(model_fields)}; "
                         f"training keys: {sorted(train_fields)}")
    m = {k: v for k, v in overrides.items() if k in model_fields}
    m = {k: tuple(v) if isinstance(v, list) else v for k, v in m.items()}
    if args.image_size is not None:
        m["image_size"] = args.image_size
    model = dataclasses.replace(MODELS[args.model], **m)
    tr = {k: v for k, v in overrides.items() if k in train_fields}
    return model, TrainConfig(**tr)


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _epilog() -> str:
    """The --set keys with their defaults (model keys: the default64 preset's values), and the export command."""
    def listing(values: dict) -> str:
        return textwrap.fill(", ".join(f"{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}"
                                       for k, v in values.items()), 100, initial_indent="  ", subsequent_indent="  ")

    training = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    model = dataclasses.asdict(MODELS["default64"])
    return (f"--set keys, training (TrainConfig; default):\n{listing(training)}\n"
            f"--set keys, model (UNetConfig; the default64 preset's value, other presets differ):\n{listing(model)}\n\n"
            "Export: python -m spgd_jax.train export --run RUN --out weights/NAME")
