"""Save and load UNet params + config (orbax); no torch.

A checkpoint is a directory::

    <path>/config.json   UNetConfig.to_dict() (also accepted by ``python -m convert --config``)
    <path>/params/       orbax PyTree checkpoint of the Flax params tree (float32)

``save`` is atomic: it writes everything into a temporary directory beside
``path`` and renames it into place at the end, so an error or Ctrl-C leaves
either the previous state or a complete checkpoint, never a partial one.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from spgd_jax.unet import UNet, UNetConfig, init_shapes

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def default_weights_path() -> Path:
    """The project's default 64 px face prior (weights/default64; see weights/MODEL_CARD.md)."""
    return Path(__file__).resolve().parent.parent / "weights" / "default64"


def param_shapes(config: UNetConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{path in the params tree: shape} that ``UNet(config).init`` produces (no FLOPs, no memory)."""
    params = init_shapes(config)["params"]
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(params).items()}


def check_params(params: dict, config: UNetConfig) -> None:
    """Raise one ValueError listing every missing, unexpected and mis-shaped entry of ``params``."""
    if isinstance(params, dict) and set(params) == {"params"}:
        raise TypeError("pass the params collection itself (variables['params']), not the variables dict")
    expected = param_shapes(config)
    got = {path: tuple(np.shape(leaf)) for path, leaf in traverse_util.flatten_dict(params).items()}
    missing = ["/".join(p) for p in expected if p not in got]
    unexpected = ["/".join(p) for p in got if p not in expected]
    misshaped = [f"{'/'.join(p)}: params {got[p]}, config expects {expected[p]}"
                 for p in expected if p in got and got[p] != expected[p]]
    if missing or unexpected or misshaped:
        lines = [f"params do not match the config ({len(missing)} missing, {len(unexpected)} unexpected, "
                 f"{len(misshaped)} mis-shaped entries); use the config the params were made with:"]
        lines += [f"  missing: {p}" for p in missing]
        lines += [f"  unexpected: {p}" for p in unexpected]
        lines += [f"  mis-shaped: {m}" for m in misshaped]
        raise ValueError("\n".join(lines))


def _orbax():
    import orbax.checkpoint as ocp  # imported on use: slow to import, only needed here

    return ocp.PyTreeCheckpointer()


def save(path: str | Path, params: dict, config: UNetConfig, overwrite: bool = False) -> Path:
    """Write ``params`` (the Flax params tree, i.e. ``variables['params']``) and ``config`` to ``path``.

    Checks the params against the config first. Refuses an existing ``path`` unless ``overwrite``.
    Returns ``path``.
    """
    if not isinstance(config, UNetConfig):
        raise TypeError(f"config must be a UNetConfig, got {type(config).__name__}")
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
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
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


def load_config(path: str | Path) -> UNetConfig:
    """The UNetConfig stored in checkpoint directory ``path``."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist (make one with python -m convert)")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise ValueError(f"{path} is not a complete spgd_jax checkpoint: {CONFIG_FILE} is missing")
    try:
        return UNetConfig.from_dict(json.loads(config_file.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{config_file} is not a valid UNet config: {e}") from None


def load(path: str | Path) -> tuple[dict, UNetConfig]:
    """Read a checkpoint directory written by ``save`` -> (params as jax arrays, UNetConfig)."""
    path = Path(path)
    config = load_config(path)
    params_dir = path / PARAMS_DIR
    if not params_dir.is_dir():
        raise ValueError(f"{path} is not a complete spgd_jax checkpoint: {PARAMS_DIR}/ is missing")
    try:
        with _orbax() as reader:
            params = reader.restore(params_dir.absolute())
    except Exception as e:  # orbax/tensorstore raise many kinds; all mean the same to the user
        raise ValueError(f"could not read the params in {params_dir} (corrupt or partial checkpoint?): "
                         f"{type(e).__name__}: {e}") from None
    check_params(params, config)
    return jax.tree_util.tree_map(jnp.asarray, params), config


def load_denoiser(path: str | Path | None = None, class_labels=None, dtype: str | None = None):
    """Checkpoint directory -> ``Denoiser`` D(x (B,H,W,C) in [-1,1], sigma (B,)) -> x0_hat (B,H,W,C).

    path: None loads the project's default 64 px face prior (``default_weights_path()``).

    class_labels ((B,) ints, class-conditional models only) and dtype ('float32' | 'bfloat16'
    compute dtype override) are passed to ``spgd_jax.denoiser.make_denoiser``.
    """
    from spgd_jax.denoiser import make_denoiser

    params, config = load(default_weights_path() if path is None else path)
    return make_denoiser(UNet(config), params, class_labels=class_labels, dtype=dtype)
