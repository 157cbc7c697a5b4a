"""Sampling a run: every image in chunks of one compiled batch, over the devices, stoppable by Ctrl-C."""

from __future__ import annotations

import jax
import numpy as np

from spgd_jax.samplers import forward_for, posterior_mean, sample_sharded
from spgd_jax.restore._args import UsageError
from spgd_jax.restore._progress import Progress, run_interruptibly

__all__ = ["PROGRESS", "combine_samples", "forward_identity", "restore"]

PROGRESS = Progress()  # one object for every run, reset per chunk
_COMPILED: set = set()  # the (settings, batch) of the programs this process has compiled


def restore(denoiser, operator, y, op_params, keys, config, step_sizes, batch: int, size: int, label: str,
            quiet: bool):
    """Every image (y, op_params and keys (N,), one key per image), in chunks of `batch` split over the devices
    -> dict of NumPy arrays with a leading axis L (the step sizes of a sweep; 1 without one): x, diverged,
    diverged_step, trajectory, losses, diagnostics."""
    forward = forward_for(config, operator)
    raw_keys = np.asarray(jax.random.key_data(keys))  # (N, ...) uint32: chunked and padded as the images
    parts = []
    chunks = range(0, len(y), batch)
    for number, start in enumerate(chunks):
        stop = min(start + batch, len(y))
        pad = batch - (stop - start)  # pad the last chunk so every chunk reuses one compiled call
        take = lambda a: np.concatenate([a[start:stop]] + [a[stop - 1 : stop]] * pad) if pad else a[start:stop]
        program = (id(denoiser), id(operator), config, batch, step_sizes and len(step_sizes), np.shape(y)[1:])
        PROGRESS.reset(config.steps, f"{label} {number + 1}/{len(chunks)}", not quiet, program not in _COMPILED)
        call = lambda: sample_sharded(
            denoiser, forward, take(y), take(raw_keys), config,
            jax.tree_util.tree_map(lambda a: take(np.asarray(a)), op_params),
            # progress: a run in segments, --quiet: one call; either way without host callbacks, so JAX's
            # persistent cache keeps the programs for the next process
            x_shape=(size, size, 3), progress=None if quiet else PROGRESS, step_sizes=step_sizes,
            forward_identity=forward_identity(config, operator, size),  # its programs kept on disk for the next run
        )
        try:
            result = run_interruptibly(call, PROGRESS)
        except (TypeError, ValueError) as error:
            raise UsageError(str(error)) from None
        _COMPILED.add(program)
        keep = stop - start
        result = result._asdict()
        if step_sizes is None:  # a leading axis of one step size
            result = jax.tree_util.tree_map(lambda a: np.asarray(a)[None], result)
        parts.append(jax.tree_util.tree_map(lambda a: np.asarray(a)[:, :keep], result))
    return jax.tree_util.tree_map(lambda *a: np.concatenate(a, axis=1), *parts)


def forward_identity(config, operator, size: int) -> tuple:
    """What names forward_for(config, operator) in every process, for an operator of the task registry
    (operators.get): the method (which may derive its forward from the operator) and the operator's settings."""
    return (type(config).__name__, operator.name, operator.sigma_y, operator.linear, operator.settings,
            (size, size, 3))


def combine_samples(runs: dict, samples: int) -> dict:
    """Runs of B * K items (image-major, leading axis L) -> runs of B images: x the mean of each image's
    samples that did not diverge (of all K when every one did), diverged if every sample did, diverged_step
    the first step a sample diverged at (-1: none did); with K > 1 also 'samples' (L, B, K, H, W, C) and
    'diverged_samples' (L, B), how many of the K diverged."""
    if samples == 1:
        return runs
    split = lambda a: a.reshape(a.shape[:1] + (-1, samples) + a.shape[2:])
    x, diverged, step = split(runs["x"]), split(runs["diverged"]), split(runs["diverged_step"])
    mean, all_diverged = (np.asarray(a) for a in posterior_mean(x, diverged))
    first = np.where(diverged, step, np.iinfo(np.int32).max).min(axis=2)
    return {"x": mean, "samples": x, "diverged": all_diverged,
            "diverged_step": np.where(diverged.any(axis=2), first, -1), "diverged_samples": diverged.sum(axis=2)}
