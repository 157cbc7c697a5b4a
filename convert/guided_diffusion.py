"""guided-diffusion (ADM) PyTorch checkpoints -> spgd_jax UNet params.

This module knows guided-diffusion's state-dict key names and tensor layouts:

- ``state_dict_shapes(config)``: every key ``create_model`` produces for a config,
  with its PyTorch shape (to report problems in the checkpoint's own terms);
- ``read_state_dict(path)``: a ``.pt`` file -> {key: float32 numpy array}, without
  ever executing pickled code;
- ``to_flax_params(state_dict, config)``: check every key and shape (one report
  listing every missing, unexpected and mis-shaped key), then map each tensor to
  its place in the Flax params tree (``adm_names.flax_path``) in Flax layout;
- ``convert(checkpoint, config, out)``: all of the above, then ``spgd_jax.io.checkpoint.save``.

Layouts: Conv2d weight (O, I, kh, kw) -> kernel (kh, kw, I, O); Linear weight
(O, I) -> kernel (I, O); attention qkv / proj_out Conv1d weight (O, I, 1) ->
Dense kernel (I, O); GroupNorm weight/bias -> scale/bias; Embedding weight
(num_classes, D) -> embedding, unchanged; biases unchanged.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np

from spgd_jax import models
from spgd_jax.io import checkpoint
from spgd_jax.models.adm import UNetConfig

from .adm_names import flax_path, torch_key

Shapes = dict[str, tuple[int, ...]]

_ATTENTION_1X1 = ("qkv", "proj_out")  # Conv1d(kernel_size=1) in torch, Dense in Flax


def _torch_shape(path: tuple[str, ...], flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the PyTorch tensor that becomes the Flax leaf at ``path``."""
    if path[-1] != "kernel":
        return flax_shape
    if len(flax_shape) == 4:  # (kh, kw, I, O) <- (O, I, kh, kw)
        kh, kw, cin, cout = flax_shape
        return (cout, cin, kh, kw)
    cin, cout = flax_shape
    return (cout, cin, 1) if path[-2] in _ATTENTION_1X1 else (cout, cin)


def state_dict_shapes(config: UNetConfig) -> Shapes:
    """Every state-dict key guided-diffusion's ``create_model`` gives this config, with its PyTorch shape.

    Derived from the Flax model's own params tree (the ADM family's ``param_shapes``)
    through ``adm_names.torch_key`` and the layouts below.
    """
    return {torch_key(path): _torch_shape(path, shape) for path, shape in models.family_of(config).param_shapes(config).items()}


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Load a guided-diffusion ``.pt`` file as {key: float32 numpy array}.

    Accepts a raw state dict ({key: tensor}, as ``th.save(model.state_dict())`` writes
    it) or a dict holding one under ``"state_dict"``, ``"model"`` or ``"ema"``; a
    ``"module."`` prefix on every key (DataParallel) is dropped. Tensors become float32.
    Loads with ``weights_only=True``: a file that needs pickled code is refused, never run.
    """
    import torch  # the converter's only torch use; the rest of the package never imports it

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        code = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if code is None:  # torch's safe unpickler also wraps plain garbage
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
            raise ValueError(f"{path} is not a readable PyTorch checkpoint "
                             f"({detail.group(1) if detail else str(e).splitlines()[0]})") from None
        raise ValueError(
            f"refusing to load {path}: it is not a plain tensor state dict; it refers to Python code "
            f"({code.group(1)}), which unpickling would run. If you trust the file, re-save its weights "
            f"as a state dict: torch.save(model.state_dict(), 'clean.pt')"
        ) from None
    except Exception as e:  # truncated or foreign files raise EOFError, IndexError, RuntimeError...
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model", "ema"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict ({{name: tensor}}); got {type(obj).__name__}")
    if obj and all(k.startswith("module.") for k in obj):  # saved from a DataParallel wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return {k: v.detach().to(torch.float32).numpy() for k, v in obj.items()}


def check_state_dict(state_dict: dict[str, np.ndarray], config: UNetConfig) -> None:
    """Raise one ValueError listing the missing, unexpected and mis-shaped keys (PyTorch shapes; at most
    checkpoint.SHOWN_PER_KIND of each kind, then how many more)."""
    expected = state_dict_shapes(config)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [f"{k}: checkpoint {tuple(state_dict[k].shape)}, config expects {expected[k]}"
                 for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    if missing or unexpected or misshaped:
        raise ValueError("\n".join([
            f"checkpoint does not match the config ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(misshaped)} mis-shaped keys); check --config (e.g. num_channels, num_res_blocks, "
            f"attention_resolutions, learn_sigma, class_cond, resblock_updown):",
            *checkpoint.mismatch_lines(missing, unexpected, misshaped)]))


def _to_flax_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    if leaf != "kernel":  # scale, bias, embedding: same layout
        return array
    if array.ndim == 4:  # Conv2d (O, I, kh, kw) -> (kh, kw, I, O)
        return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
    if array.ndim == 3:  # Conv1d with kernel size 1 (O, I, 1) -> Dense (I, O)
        return np.ascontiguousarray(array[:, :, 0].T)
    return np.ascontiguousarray(array.T)  # Linear (O, I) -> (I, O)


def to_flax_params(state_dict: dict[str, np.ndarray], config: UNetConfig) -> dict:
    """Checked state dict -> nested Flax params dict of float32 numpy arrays.

    Pops tensors from ``state_dict`` as it goes, so only one full copy of the weights is alive.
    """
    check_state_dict(state_dict, config)
    params: dict = {}
    for key in list(state_dict):
        *parents, leaf = flax_path(key)
        node = params
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = _to_flax_layout(state_dict.pop(key), leaf)
    return params


def convert(checkpoint_path: str | Path, config: UNetConfig, out: str | Path, overwrite: bool = False) -> Path:
    """Convert a guided-diffusion checkpoint to an spgd_jax checkpoint directory at ``out``.

    Refuses an existing ``out`` unless ``overwrite``; writes nothing unless every key checks out.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    params = to_flax_params(read_state_dict(checkpoint_path), config)
    checkpoint.save(out, params, config, overwrite=overwrite)
    return out
