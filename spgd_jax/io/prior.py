"""Priors from files: a checkpoint directory -> a denoiser; where the default prior is.

The default prior is package data (`spgd_jax.weights`, the repository's weights/ folder), so it is found
from an editable install, a wheel and any working directory alike.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from spgd_jax.denoisers import Denoiser, make_denoiser
from spgd_jax.io import checkpoint

__all__ = ["default_weights_path", "load_denoiser"]


def default_weights_path() -> Path:
    """The project's default 64 px face prior (package data; see its MODEL_CARD.md beside it)."""
    return Path(str(importlib.resources.files("spgd_jax.weights") / "default64"))


def load_denoiser(path: str | Path | None = None, class_labels=None, dtype: str | None = None) -> Denoiser:
    """Checkpoint directory -> ``Denoiser`` D(x (B,H,W,C) in [-1,1], sigma (B,)) -> x0_hat (B,H,W,C).

    path: None loads the project's default 64 px face prior (``default_weights_path()``).
    class_labels ((B,) ints, class-conditional models only) and dtype ('float32' | 'bfloat16' compute
    dtype override) are passed to ``spgd_jax.denoisers.make_denoiser``; the preconditioning is the
    checkpoint's.
    """
    params, meta = checkpoint.load(default_weights_path() if path is None else path)
    return make_denoiser(meta.config, params, preconditioning=meta.preconditioning, class_labels=class_labels,
                         dtype=dtype)
