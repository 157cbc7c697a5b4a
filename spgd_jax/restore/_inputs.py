"""What a restore run works on: the prior, the operator, and the measurements (made from images or read)."""

from __future__ import annotations

import dataclasses
import functools
import zipfile
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spgd_jax import operators
from spgd_jax.denoisers import make_denoiser
from spgd_jax.io import checkpoint, images
from spgd_jax.restore._args import UsageError

__all__ = ["Measurements", "load_prior", "make_operator", "measurements"]


class Measurements(NamedTuple):
    """y (B, ...) in [-1, 1] units, the per-image operator parameters {name: (B, ...)}, one name per image,
    and the ground truth (B, H, W, 3) when the measurements were made from images here (else None)."""

    y: np.ndarray
    params: dict
    names: list[str]
    truth: np.ndarray | None
    notices: list[str]


def _checkpoint_stamp(path: Path) -> tuple:
    """Modification times that change when a checkpoint directory is rewritten."""
    stamp = []
    for part in (path, path / checkpoint.CONFIG_FILE, path / checkpoint.PARAMS_DIR):
        try:
            stamp.append(part.stat().st_mtime_ns)
        except OSError:
            stamp.append(None)
    return tuple(stamp)


@functools.lru_cache(maxsize=2)
def _prior(path: str, stamp: tuple, dtype: str | None):
    """(denoiser, the network config it runs), cached while the checkpoint is unchanged: repeated runs in one
    process (a notebook, the tests) reuse the loaded weights."""
    del stamp  # part of the cache key only
    params, meta = checkpoint.load(path)
    config = meta.config if dtype is None else dataclasses.replace(meta.config, dtype=dtype)
    return make_denoiser(config, params, preconditioning=meta.preconditioning), config


def load_prior(weights: Path, dtype: str | None = None):
    """(denoiser, UNetConfig) of a checkpoint directory, computing in `dtype` ('float32' | 'bfloat16'; None:
    the checkpoint's); UsageError naming the problem and the fix."""
    if weights.is_file():
        raise UsageError(f"--weights {weights} is a file; it needs a checkpoint directory. Convert a PyTorch .pt "
                         f"file with: python -m spgd_jax.convert {weights} --config NAME --out DIR, then pass --weights DIR")
    try:
        return _prior(str(weights.resolve()), _checkpoint_stamp(weights), dtype)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(f"cannot load weights from {weights}: {error}") from None


@functools.lru_cache(maxsize=8)
def make_operator(task: str, size: int, sigma_y: float | None) -> operators.Operator:
    """The task's operator at `size` px (cached: the same object reuses the compiled sampler)."""
    try:
        return operators.get(task, size, **({} if sigma_y is None else {"sigma_y": sigma_y}))
    except ValueError as error:
        raise UsageError(str(error)) from None


def unique_names(paths: list[Path]) -> list[str]:
    """File stems, with -2, -3, ... appended to repeats."""
    names, seen = [], {}
    for path in paths:
        stem = path.stem
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


def measurements(args, operator: operators.Operator, size: int, key_operator, key_noise) -> Measurements:
    """The run's measurements: read from --measurement, or made from --input (default: the demo face)."""
    notices: list[str] = []
    if args.measurement:
        y, params, names = _load_measurement(args.measurement, args.task)
        _check_measurement(args.measurement, y, params, operator, size)
        truth = None
    else:
        try:
            if args.input is None:
                names, truth = ["grace_hopper"], images.load_demo(size, notices)[None]
            else:
                paths = images.find_images(args.input)
                names, truth = unique_names(paths), np.stack([images.load_image(p, size, notices) for p in paths])
        except (FileNotFoundError, ValueError) as error:
            raise UsageError(str(error)) from None
        params = operator.init_params(key_operator, len(truth), size)
        y = np.asarray(operator.measure(key_noise, jnp.asarray(truth), params))
    params = {k: np.asarray(v) for k, v in dict(params or {}).items()}
    return Measurements(y, params, names, truth, notices)


def _load_measurement(path: str, task: str):
    """(y (B, ...), params dict, names) from a measurement.npz written by this tool."""
    try:
        with open(path, "rb") as stream:
            data = np.load(stream, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("it holds one unnamed array")
            y = np.asarray(data["y"], dtype=np.float32)
            params = {key[len("param_"):]: data[key] for key in data.files if key.startswith("param_")}
            default_names = [f"image{i:03d}" for i in range(len(y))]
            names = [str(n) for n in data["names"]] if "names" in data.files else default_names
            made_for = str(data["task"]) if "task" in data.files else None
    except FileNotFoundError:
        raise UsageError(f"measurement file {path} does not exist") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise UsageError(f"{path} is not a measurement .npz written by spgd_jax.restore (needs an array 'y'): "
                         f"{error}") from None
    if made_for is not None and made_for != task:
        raise UsageError(f"{path} is a measurement of task {made_for!r}, not {task!r}; pass --task {made_for}")
    if y.ndim < 1 or len(y) == 0 or len(names) != len(y):
        raise UsageError(f"{path} holds {len(names)} name(s) for measurements y of shape {y.shape}; write it again "
                         "with this tool")
    return y, params, names


def _check_measurement(path: str, y: np.ndarray, params: dict, operator, size: int) -> None:
    """The measurement must fit the operator at the model's size: same parameter names and shapes and y shape."""
    expected_params = jax.tree_util.tree_map(np.asarray, operator.init_params(jax.random.key(0), 1, size))
    if set(params) != set(expected_params or {}):
        raise UsageError(f"{path} holds operator parameters {sorted(params)}, but task {operator.name!r} at {size} px "
                         f"needs {sorted(expected_params or {})}; make the measurement with the same --task and "
                         "--weights")
    for name, value in params.items():
        if value.shape[0] != len(y) or value.shape[1:] != expected_params[name].shape[1:]:
            raise UsageError(
                f"{path}: parameter {name!r} has shape {value.shape}, task {operator.name!r} at {size} px needs "
                f"({len(y)}, {', '.join(map(str, expected_params[name].shape[1:]))}); make the measurement with "
                "the same --task and --weights")
    one = jax.tree_util.tree_map(lambda a: a[0], expected_params) if expected_params else None
    expected_y = jax.eval_shape(operator.forward, jax.ShapeDtypeStruct((size, size, 3), jnp.float32), one).shape
    if y.shape[1:] != expected_y:
        raise UsageError(f"{path}: each measurement has shape {y.shape[1:]}, but task {operator.name!r} with a {size} "
                         f"px model makes {expected_y}; restore it with the weights (image size) and task it was "
                         "made for")
