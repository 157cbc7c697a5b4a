"""``python -m spgd_jax.convert CHECKPOINT.pt --config ffhq256 --out weights/ffhq256 [--overwrite]``

Converts a guided-diffusion (ADM) PyTorch state dict into an spgd_jax checkpoint
directory (orbax params + config.json). ``--config`` is a name from
``spgd_jax.models.adm.CONFIGS`` or a JSON file holding ``UNetConfig.to_dict()``.

Reading a .pt file needs PyTorch, the package's torch extra: ``pip install 'spgd-jax[torch]'``.
Without it ``--help`` works and a conversion stops at once with that advice (exit status 2).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

from spgd_jax.models.adm import CONFIGS, UNetConfig

from .guided_diffusion import convert

TORCH_MISSING = ("error: reading a PyTorch checkpoint needs PyTorch, which is not installed; install the torch "
                 "extra: pip install 'spgd-jax[torch]'")


def resolve_config(name_or_path: str) -> UNetConfig:
    """A CONFIGS name, or a path to a JSON file of UNetConfig.to_dict()."""
    if name_or_path in CONFIGS:
        return CONFIGS[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"--config {name_or_path!r} is neither a known config ({', '.join(sorted(CONFIGS))}) "
                         f"nor an existing JSON file")
    try:
        return UNetConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError, KeyError) as e:
        raise ValueError(f"--config {path}: not a valid UNetConfig JSON: {e}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spgd_jax.convert", description=__doc__.split("\n\n")[1],
                                     epilog="Needs PyTorch: pip install 'spgd-jax[torch]'.")
    parser.add_argument("checkpoint", type=Path, help="guided-diffusion .pt state dict (e.g. ffhq_10m.pt)")
    parser.add_argument("--config", required=True,
                        help=f"model config: one of {', '.join(sorted(CONFIGS))}, or a JSON file")
    parser.add_argument("--out", required=True, type=Path, help="output checkpoint directory (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("torch") is None:
        print(TORCH_MISSING, file=sys.stderr)
        return 2

    start = time.perf_counter()
    try:
        out = convert(args.checkpoint, resolve_config(args.config), args.out, overwrite=args.overwrite)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: nothing was written to {args.out}", file=sys.stderr)
        return 130
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
