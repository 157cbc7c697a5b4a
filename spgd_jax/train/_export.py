"""Export of a run's EMA weights (the prior the restore command loads) and the model card's numbers.

`export` writes `OUT/` with `spgd_jax.io.checkpoint.save`, `validation_split.txt` beside it, and
rewrites the block between CARD_BEGIN and CARD_END of a model card (the prose around it stays): the
data, the recipe, updates and epochs, hardware, time and images/s, the final losses, and a plot of the
loss curves from the run's metrics.jsonl, `<OUT name>_loss.png` beside the card.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from spgd_jax import sharding
from spgd_jax.io import checkpoint
from spgd_jax.io.files import write_text
from spgd_jax.io.plots import plot_curve
from spgd_jax.models.adm import UNetConfig
from spgd_jax.train import _checkpoints as checkpoints
from spgd_jax.train._diffusion import parse_loss_weighting
from spgd_jax.train._report import VALIDATION_SPLIT
from spgd_jax.train._state import TrainConfig, recipe

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
        _update_card(Path(card), meta, out, loss_curves(run, step))
    return meta


def loss_curves(run: Path, up_to: int) -> dict[str, tuple[list[int], list[float]]]:
    """{"training loss": (steps, losses), "validation loss": (steps, losses)} from RUN/metrics.jsonl, up to
    step `up_to`.  A session that resumed from an earlier checkpoint than the last record replaces the
    records it repeats (the log is appended to, never rewritten)."""
    curves: dict[str, list[tuple[int, float]]] = {"training loss": [], "validation loss": []}
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed session
            continue
        for name, key in (("training loss", "loss"), ("validation loss", "val_loss")):
            if record.get(key) is not None and record["step"] <= up_to:
                points = curves[name]
                while points and points[-1][0] >= record["step"]:
                    points.pop()
                points.append((record["step"], float(record[key])))
    return {name: ([s for s, _ in points], [v for _, v in points]) for name, points in curves.items()}


def _update_card(card: Path, meta: dict, out: Path, curves: dict) -> None:
    if not card.exists():
        raise ValueError(f"model card {str(card)!r} does not exist; create it with the lines "
                         f"{CARD_BEGIN} and {CARD_END} where the numbers go")
    text = card.read_text()
    if CARD_BEGIN not in text or CARD_END not in text:
        raise ValueError(f"model card {str(card)!r} lacks the marker lines {CARD_BEGIN} / {CARD_END}")
    t = meta["train"]
    r = recipe(t)
    hours = meta["train_seconds"] / 3600
    epochs = meta["step"] * t["batch_size"] / meta["num_train"]
    sources = meta.get("sources") or {}
    if set(sources) <= {"."}:  # no folders: nothing to add to the count
        sources = {}
    split = meta.get("split", {})
    schedule = (f"linear warm-up {t['warmup_steps']} steps, then constant" if r["lr_schedule"] == "constant" else
                f"linear warm-up {t['warmup_steps']} steps, then cosine decay to {r['min_lr_ratio']:g} x lr "
                f"at update {r['decay_horizon']:,}")
    gamma = parse_loss_weighting(r["loss_weighting"])
    plot = card.parent / f"{out.name}_loss.png"
    has_val, has_plot = bool(curves["validation loss"][0]), any(steps for steps, _ in curves.values())
    if has_plot:
        plot_curve(plot, curves, "training updates", "loss", log_y=True,
                   title=f"{out.name}: training loss (mean over each log interval) and validation loss "
                         f"(EMA weights, {meta['num_val']} held-out images)")
    block = "\n".join([
        CARD_BEGIN,
        "| quantity | value |",
        "|---|---|",
        f"| weights | `{out.name}` (EMA, decay {t['ema_decay']}), {meta['num_params']:,} parameters, "
        f"{meta['weights_mb']:.1f} MB |",
        *([f"| initialised from | `{meta['init']}` (its weights as weights and EMA, fresh optimiser) |"]
          if meta.get("init") else []),
        f"| data | {meta['num_train']:,} training and {meta['num_val']:,} validation images (every "
        f"{split.get('every', '?')}th file from index {split.get('offset', '?')} held out) from "
        f"`{Path(meta['data']).name}`" + (": " + ", ".join(f"{k} {v:,}" for k, v in sources.items()) if sources else "")
        + " |",
        f"| training updates | {meta['step']:,} at batch {t['batch_size']} "
        f"({epochs:.1f} epochs of {meta['num_train']:,} images) |",
        f"| objective | eps MSE" + (f", weighted by min(SNR, {gamma:g}) / SNR (min-SNR-{gamma:g})" if gamma else "")
        + ("; random horizontal flips" if r["flip"] else "; no augmentation") + " |",
        f"| optimiser | Adam, lr {t['lr']:g} ({schedule}), grad clip {t['grad_clip']}, seed {t['seed']} |",
        f"| hardware | {'; '.join(meta['hardware'])} |",
        f"| wall time | {hours:.1f} h of training |" if hours >= 1 else
        f"| wall time | {60 * hours:.1f} min of training |",
        f"| throughput | {meta['images_per_s']:,.0f} training images/s (latest session, compilation excluded) |"
        if meta.get("images_per_s") else "| throughput | not measured |",
        f"| final training loss | {meta['train_loss']:.4f} (mean of the last "
        f"{meta.get('train_loss_updates') or t['log_every']} updates) |"
        if meta["train_loss"] is not None else "| final training loss | not measured |",
        f"| final validation loss | {meta['val_loss']:.4f} (EMA weights, {meta['num_val']} held-out images, "
        f"fixed t and noise) |" if meta["val_loss"] is not None else "| final validation loss | not measured |",
        *(["", f"![loss curves]({plot.name})", "",
           f"Loss curves (`{plot.name}`, from the run's metrics.jsonl)"
           + (f": the validation loss at {len(curves['validation loss'][0])} point(s), the last "
              f"{curves['validation loss'][1][-1]:.4f} at update {curves['validation loss'][0][-1]:,}." if has_val
              else "; no validation loss was recorded.")] if has_plot else []),
        CARD_END])
    write_text(card, re.sub(re.escape(CARD_BEGIN) + ".*?" + re.escape(CARD_END), lambda m: block, text, flags=re.S))
