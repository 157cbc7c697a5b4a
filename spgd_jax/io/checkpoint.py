"""Checkpoints: store and load a network's params with what they are (orbax; no torch, no denoisers).

A checkpoint is a directory::

    <path>/config.json   {"family": "adm", "preconditioning": "vp", "config": {...the family config...},
                          "params_sha256": "..."}
    <path>/params/       orbax PyTree checkpoint of the Flax params tree (float32)

`params_sha256` (params_digest) is checked by ``load``: orbax stores incompressible arrays (random or trained
weights) as raw blocks without a checksum, so bytes damaged on disk would otherwise load without an error and
the sampler diverge. A config.json without it (written before spgd-jax recorded it) loads unchecked.

The family is a name in `spgd_jax.models.FAMILIES`, the preconditioning one in
`spgd_jax.denoisers.PRECONDITIONINGS` (stored as given: a denoiser built from the checkpoint checks it).
A config.json that is a bare ADM UNet config (spgd-jax 0.1) reads as family 'adm' with 'vp' preconditioning. ``save`` is atomic: it writes everything into a temporary
directory beside ``path`` and renames it into place at the end, so an error or Ctrl-C leaves either the
previous state or a complete checkpoint, never a partial one. Building a denoiser from a checkpoint is
`spgd_jax.io.prior.load_denoiser`'s job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from spgd_jax import models

__all__ = ["CONFIG_FILE", "PARAMS_DIR", "SHOWN_PER_KIND", "Checkpoint", "check_params", "load", "load_config",
           "mismatch_lines", "params_digest", "save"]

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint's params are: the family's config, the family name and the preconditioning."""

    config: Any
    family: str
    preconditioning: str

    def to_dict(self) -> dict:
        return {"family": self.family, "preconditioning": self.preconditioning, "config": self.config.to_dict()}

    @classmethod
    def of(cls, config: Any, preconditioning: str | None = None) -> "Checkpoint":
        """The description of params for `config` (a registered family's); default: the family's
        preconditioning (a name; spgd_jax.denoisers.make_denoiser refuses an unknown one)."""
        family = models.family_of(config)
        preconditioning = family.preconditioning if preconditioning is None else preconditioning
        if not isinstance(preconditioning, str) or not preconditioning:
            raise TypeError(f"preconditioning must be a name such as 'vp' or 'edm', got {preconditioning!r}")
        return cls(config, family.name, preconditioning)


def check_params(params: dict, config: Any) -> None:
    """Raise one ValueError listing the missing, unexpected and mis-shaped entries of ``params`` (at most
    SHOWN_PER_KIND of each kind, then how many more)."""
    if isinstance(params, dict) and set(params) == {"params"}:
        raise TypeError("pass the params collection itself (variables['params']), not the variables dict")
    expected = models.family_of(config).param_shapes(config)
    got = {path: tuple(np.shape(leaf)) for path, leaf in traverse_util.flatten_dict(params).items()}
    missing = ["/".join(p) for p in expected if p not in got]
    unexpected = ["/".join(p) for p in got if p not in expected]
    misshaped = [f"{'/'.join(p)}: params {got[p]}, config expects {expected[p]}"
                 for p in expected if p in got and got[p] != expected[p]]
    if missing or unexpected or misshaped:
        raise ValueError("\n".join([
            f"params do not match the config ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(misshaped)} mis-shaped entries); use the config the params were made with:",
            *mismatch_lines(missing, unexpected, misshaped)]))


SHOWN_PER_KIND = 10  # mismatch_lines: entries listed of each kind; a file of another network misses hundreds


def mismatch_lines(missing: list[str], unexpected: list[str], misshaped: list[str]) -> list[str]:
    """'  missing: NAME' (then 'unexpected:', 'mis-shaped:') lines, at most SHOWN_PER_KIND of each kind, then
    '  ... and N more missing' where there are more."""
    lines = []
    for kind, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        lines += [f"  {kind}: {name}" for name in names[:SHOWN_PER_KIND]]
        if len(names) > SHOWN_PER_KIND:
            lines.append(f"  ... and {len(names) - SHOWN_PER_KIND} more {kind}")
    return lines


def params_digest(params: dict) -> str:
    """sha256 (hex) of a params tree: every leaf's path, shape and float32 bytes, in path order."""
    digest = hashlib.sha256()
    for path, leaf in sorted(traverse_util.flatten_dict(params).items()):
        array = np.ascontiguousarray(np.asarray(leaf, dtype=np.float32))
        digest.update(repr(("/".join(path), array.shape)).encode() + array.tobytes())
    return digest.hexdigest()


def _orbax():
    import orbax.checkpoint as ocp  # imported on use: slow to import, only needed here

    return ocp.PyTreeCheckpointer()


def _drop_late_read_callbacks(unraisable) -> None:
    """sys.unraisablehook around reads: drops "RuntimeError: Event loop is closed", passes on the rest."""
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
        return
    _LATE_READS["previous"](unraisable)


# When a read fails, orbax closes its event loop while tensorstore's other reads are still in flight; each of
# them then calls back into the closed loop, and its "RuntimeError: Event loop is closed" would print a
# traceback around our error message (a dozen for one corrupt file), some before the error reaches us. So the
# filter is on during every read, and stays on once one has failed (its stragglers come later).
_LATE_READS: dict[str, Any] = {"previous": None, "failed": False}


def _filter_late_read_callbacks(on: bool) -> None:
    if on and sys.unraisablehook is not _drop_late_read_callbacks:
        _LATE_READS["previous"], sys.unraisablehook = sys.unraisablehook, _drop_late_read_callbacks
    elif not on and not _LATE_READS["failed"] and sys.unraisablehook is _drop_late_read_callbacks:
        sys.unraisablehook = _LATE_READS["previous"]


def save(path: str | Path, params: dict, config: Any, overwrite: bool = False,
         preconditioning: str | None = None) -> Path:
    """Write ``params`` (the Flax params tree, i.e. ``variables['params']``) of a registered family's
    ``config`` to ``path``, with the preconditioning they are for (default: the family's).

    Checks the params against the config first. Refuses an existing ``path`` unless ``overwrite``.
    Returns ``path``.
    """
    try:
        meta = Checkpoint.of(config, preconditioning)
    except TypeError as error:
        raise TypeError(f"config: {error}") from None
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    check_params(params, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    old = tmp.with_name(tmp.name + "-old")
    try:
        tmp.mkdir()
        params = jax.tree_util.tree_map(lambda a: np.asarray(a, dtype=np.float32), params)
        with _orbax() as writer:
            writer.save(tmp / PARAMS_DIR, params)
        record = {**meta.to_dict(), "params_sha256": params_digest(params)}
        (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if path.exists():  # overwrite: move the old one aside, put the new one in place, then delete
            path.rename(old)
        tmp.rename(path)
    except BaseException:
        if old.exists() and not path.exists():
            old.rename(path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return path


def load_config(path: str | Path) -> Checkpoint:
    """What the checkpoint directory ``path`` holds (family, preconditioning, config), without its params."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist (make one with python -m "
                                "spgd_jax.convert)")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise ValueError(f"{path} is not a complete spgd_jax checkpoint: {CONFIG_FILE} is missing")
    try:
        data = json.loads(config_file.read_text())
        if "family" not in data:  # spgd-jax 0.1: a bare ADM UNet config
            data = {"family": "adm", "preconditioning": "vp", "config": data}
        family = models.get_family(data["family"])
        return Checkpoint.of(family.config_type.from_dict(data["config"]), data["preconditioning"])
    except (json.JSONDecodeError, TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{config_file} is not a valid checkpoint config: {e}") from None


def load(path: str | Path) -> tuple[dict, Checkpoint]:
    """Read a checkpoint directory written by ``save`` -> (params as jax arrays, Checkpoint)."""
    path = Path(path)
    meta = load_config(path)
    params_dir = path / PARAMS_DIR
    if not params_dir.is_dir():
        raise ValueError(f"{path} is not a complete spgd_jax checkpoint: {PARAMS_DIR}/ is missing")
    _filter_late_read_callbacks(True)
    try:
        with _orbax() as reader:
            params = reader.restore(params_dir.absolute())
    except Exception as e:  # orbax/tensorstore raise many kinds; all mean the same to the user
        _LATE_READS["failed"] = True
        raise ValueError(f"could not read the params in {params_dir} (corrupt or partial checkpoint?): "
                         f"{type(e).__name__}: {e}") from None
    _filter_late_read_callbacks(False)
    check_params(params, meta.config)
    recorded = json.loads((path / CONFIG_FILE).read_text()).get("params_sha256")
    if recorded is not None and params_digest(params) != recorded:
        raise ValueError(f"the params in {params_dir} are damaged: their sha256 is not the one {CONFIG_FILE} "
                         "recorded when they were written. Use a good copy of the checkpoint, or write it again "
                         "(python -m spgd_jax.convert, or the training run's checkpoint)")
    return jax.device_put(params), meta  # one transfer: jnp.asarray per leaf compiled a program each (~0.3 s)
