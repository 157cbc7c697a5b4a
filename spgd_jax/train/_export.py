"""Export of a run's EMA weights (the prior the restore command loads) and the model card's numbers.

`export` writes `OUT/` with `spgd_jax.io.checkpoint.save`, `validation_split.txt` beside it, and
rewrites the block between CARD_BEGIN and CARD_END of a model card (the prose around it stays).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from spgd_jax import sharding
from spgd_jax.io import checkpoint
from spgd_jax.io.files import write_text
from spgd_jax.models.adm import UNetConfig
from spgd_jax.train import _checkpoints as checkpoints
from spgd_jax.train._report import VALIDATION_SPLIT
from spgd_jax.train._state import TrainConfig

CARD_BEGIN, CARD_END = "<!-- export:begin -->", "<!-- export:end -->"
MAX_WEIGHTS_MB = 30.0


def export(run: str | os.PathLike, out: str | os.PathLike, card: str | os.PathLike | None = None,
           step: int | None = None, overwrite: bool = False) -> dict:
    """Write the EMA params + config of checkpoint `step` (default: latest) of `run` to `out` with
    spgd_jax.io.checkpoint.save; copy validation_split.txt beside `out`; rewrite the block between
    CARD_BEGIN and CARD_END in `card`.  Returns the checkpoint's metadata."""
    run, out = Path(run), Path(out)
    if not (run / "checkpoints").is_dir():
        raise ValueError(f"{str(run)!r} has no checkpoints/ folder; pass the --run folder of a training run")
    mngr = checkpoints.manager(run, read_only=True)
    try:
        step = mngr.latest_step() if step is None else step
        if step is None or step not in mngr.all_steps():
            raise ValueError(f"no checkpoint {'at step ' + str(step) if step is not None else ''} in "
                             f"{str(run / 'checkpoints')!r}; available steps: {list(mngr.all_steps())}")
        meta = checkpoints.restore_meta(mngr, step)
        model_config = UNetConfig.from_dict(meta["model"])
        replicated = NamedSharding(sharding.batch_mesh(jax.local_devices()), PartitionSpec())
        state = checkpoints.restore_state(mngr, step, model_config, TrainConfig(**meta["train"]), replicated)
    finally:
        mngr.close()
    checkpoint.save(out, state.ema_params, model_config, overwrite=overwrite)
    size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    if size_mb > MAX_WEIGHTS_MB:
        raise ValueError(f"exported weights {str(out)!r} take {size_mb:.1f} MB > {MAX_WEIGHTS_MB} MB; "
                         f"train a smaller model")
    write_text(out.parent / VALIDATION_SPLIT, (run / VALIDATION_SPLIT).read_text())
    meta = {**meta, "step": step, "weights_mb": size_mb,
            "num_params": sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.ema_params))}
    if card is not None:
        _update_card(Path(card), meta, out)
    return meta


def _update_card(card: Path, meta: dict, out: Path) -> None:
    if not card.exists():
        raise ValueError(f"model card {str(card)!r} does not exist; create it with the lines "
                         f"{CARD_BEGIN} and {CARD_END} where the numbers go")
    text = card.read_text()
    if CARD_BEGIN not in text or CARD_END not in text:
        raise ValueError(f"model card {str(card)!r} lacks the marker lines {CARD_BEGIN} / {CARD_END}")
    t = meta["train"]
    hours = meta["train_seconds"] / 3600
    block = "\n".join([
        CARD_BEGIN,
        "| quantity | value |",
        "|---|---|",
        f"| weights | `{out.name}` (EMA, decay {t['ema_decay']}), {meta['num_params']:,} parameters, "
        f"{meta['weights_mb']:.1f} MB |",
        *([f"| initialised from | `{meta['init']}` (its weights as weights and EMA, fresh optimiser) |"]
          if meta.get("init") else []),
        f"| training updates | {meta['step']:,} at batch {t['batch_size']} "
        f"({meta['step'] * t['batch_size'] / meta['num_train']:.1f} epochs of {meta['num_train']:,} images) |",
        f"| optimiser | Adam, lr {t['lr']:g} (linear warm-up {t['warmup_steps']} steps), "
        f"grad clip {t['grad_clip']}, seed {t['seed']} |",
        f"| hardware | {'; '.join(meta['hardware'])} |",
        f"| wall time | {hours:.1f} h of training |" if hours >= 1 else
        f"| wall time | {60 * hours:.1f} min of training |",
        f"| final training loss | {meta['train_loss']:.4f} (mean of the last {t['log_every']} updates) |"
        if meta["train_loss"] is not None else "| final training loss | not measured |",
        f"| final validation loss | {meta['val_loss']:.4f} (EMA weights, {meta['num_val']} held-out images, "
        f"fixed t and noise) |" if meta["val_loss"] is not None else "| final validation loss | not measured |",
        CARD_END])
    write_text(card, re.sub(re.escape(CARD_BEGIN) + ".*?" + re.escape(CARD_END), lambda m: block, text, flags=re.S))
