"""The resumable checkpoints of a run folder: `RUN/checkpoints/STEP/` (orbax) holds the TrainState and
the run's metadata (model and training config, data split, wall time, hardware, last losses).

Any number of devices may restore what any number saved: the state is restored onto the sharding asked for.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding

from spgd_jax.models.adm import UNet, UNetConfig
from spgd_jax.train._data import Split
from spgd_jax.train._state import TrainConfig, TrainState, init_state, make_optimizer, recipe

# Metadata carried over from the checkpoint a run resumes from (the rest describes this session's settings).
CARRIED_OVER = ("train_seconds", "hardware", "train_loss", "train_loss_updates", "val_loss", "init", "images_per_s")


def manager(run: Path, read_only: bool = False) -> ocp.CheckpointManager:
    """The checkpoints of `run` (the latest two are kept); close it after use."""
    return ocp.CheckpointManager(
        (run / "checkpoints").resolve(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=not read_only, read_only=read_only,
                                             enable_async_checkpointing=False))


def new_meta(model_config: UNetConfig, tcfg: TrainConfig, data_dir: str | os.PathLike, split: Split,
             num_train: int, num_val: int, sources: dict[str, int] | None = None) -> dict:
    """The metadata of a run that has not trained yet.  sources: images per top-level data folder.
    images_per_s: the training throughput of the latest session that trained (compilation excluded)."""
    return {"model": model_config.to_dict(), "train": dataclasses.asdict(tcfg),
            "data": str(Path(data_dir).resolve()), "sources": sources or {}, "split": dataclasses.asdict(split),
            "num_train": num_train, "num_val": num_val,
            "train_seconds": 0.0, "hardware": [], "train_loss": None, "train_loss_updates": None, "val_loss": None,
            "init": None, "images_per_s": None}


def save(mngr: ocp.CheckpointManager, step: int, state: TrainState, meta: dict) -> None:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
              force=True)
    mngr.wait_until_finished()


def restore_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_state(mngr: ocp.CheckpointManager, step: int, model_config: UNetConfig, tcfg: TrainConfig,
                  sharding: NamedSharding) -> TrainState:
    """The TrainState of checkpoint `step`, placed with `sharding` (any device count may have saved it)."""
    abstract = jax.eval_shape(lambda: init_state(UNet(model_config), make_optimizer(tcfg), jax.random.PRNGKey(0)))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    return TrainState(*restored)


def check_resumable(old: dict, new: dict) -> None:
    """Raises ValueError naming every setting of `new` that differs from the checkpoint's `old`
    where a resumed run could not continue the same training."""
    problems = []
    if old["model"] != new["model"]:
        diff = {k: (old["model"].get(k), v) for k, v in new["model"].items() if old["model"].get(k) != v}
        problems.append(f"model config differs (checkpoint, now): {diff}")
    old_recipe, new_recipe = recipe(old["train"]), recipe(new["train"])
    for k in sorted(set(old_recipe) | set(new_recipe)):
        if old_recipe.get(k) != new_recipe.get(k):
            problems.append(f"train.{k} differs: checkpoint {old_recipe.get(k)!r}, now {new_recipe.get(k)!r}")
    for k in ("split", "num_train", "num_val"):
        if old[k] != new[k]:
            problems.append(f"{k} differs: checkpoint {old[k]!r}, now {new[k]!r}")
    if problems:
        raise ValueError("cannot resume this run with these settings: " + "; ".join(problems)
                         + ". Use the original command, or a new --run folder.")


def hardware_description() -> str:
    """This session's devices and host CPU, as the metadata's "hardware" list records them."""
    devices = jax.local_devices()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()}); host {cpu}, "
            f"{os.cpu_count()} logical CPUs")
