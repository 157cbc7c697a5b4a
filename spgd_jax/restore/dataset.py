"""Restore a whole dataset: streaming, resumable, split over processes and hosts.

    status = run_dataset(DatasetRun(input="faces/", out=Path("runs/inpaint"), settings={...}, config=config,
                                    seed=0, batch=8, task="inpaint"), denoiser, operator, size=64)

The images of --input are listed (image_stream) and read a batch at a time by a prefetch thread; each
batch is degraded, restored on this process's devices, and its images' files and rows are written at
once (dataset_outputs, manifest). The same command continues an interrupted run (Ctrl-C, a killed or
preempted process): the images with a row are done, the others are restored. With several processes
(processes.py) each takes its share of the images not yet done, and process 0 writes the aggregate
once every share is done. An unreadable file is reported, recorded in skipped/ and left out; the exit
status then says so (EXIT_SOME_SKIPPED).

An image's randomness depends on the seed and its identity (its relative path) alone: image_key(seed,
identity) splits into the keys of its operator parameters, its measurement noise and its sampler noise
(--samples K: posterior_keys of the sampler key). Every compiled call restores `batch` samples
(a short last batch is padded with copies of its last image), so a run split any way, interrupted and
resumed, gives the same bits as one uninterrupted process on the same machine and devices per process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from spgd_jax import sharding
from spgd_jax.samplers import describe, forward_for, posterior_keys, sample_sharded
from spgd_jax.restore._args import EXIT_NO_IMAGE_FINISHED, EXIT_SOME_SKIPPED, UsageError, hint
from spgd_jax.restore._progress import Progress, run_interruptibly
from spgd_jax.restore._run import combine_samples, forward_identity
from spgd_jax.restore.dataset_outputs import write_aggregate, write_images
from spgd_jax.restore.dataset_progress import DatasetProgress
from spgd_jax.restore.image_stream import list_images, read_batches
from spgd_jax.restore.manifest import LOGS, Manifest
from spgd_jax.restore.processes import Processes, share

__all__ = ["EXIT_SOME_SKIPPED", "DatasetInterrupted", "DatasetRun", "image_key", "image_keys", "run_dataset",
           "sampler_keys"]

POLL_S = 1.0  # how often a process that finished its share looks for the others' rows


def image_key(seed: int, identity: str) -> jax.Array:
    """The typed PRNG key of one image: key(seed) folded with 64 bits of SHA-256(identity)."""
    key = jax.random.key(seed)
    for word in np.frombuffer(hashlib.sha256(identity.encode()).digest()[:8], dtype="<u4"):
        key = jax.random.fold_in(key, int(word))
    return key


@dataclasses.dataclass(frozen=True)
class DatasetRun:
    """A dataset run. settings: what the manifest records (a run into `out` with other settings is refused
    unless overwrite); config: the sampler config; batch: samples per compiled call (at most the images
    times samples); record: what config.json holds besides the settings; task: measurement.npz's task."""

    input: str
    out: Path
    settings: dict
    config: Any
    seed: int
    batch: int
    task: str
    samples: int = 1
    overwrite: bool = False
    quiet: bool = False
    record: dict = dataclasses.field(default_factory=dict)


def image_keys(seed: int, identities: list[str]) -> jax.Array:
    """(B, 3) typed keys: each image's operator, noise and sampler keys, split from image_key."""
    return jax.numpy.stack([jax.random.split(image_key(seed, identity), 3) for identity in identities])


def sampler_keys(seed: int, identities: list[str], samples: int) -> np.ndarray:
    """(B * K, 2) raw uint32 sampler keys, image-major: the images' sampler keys, drawn into K posterior
    samples each (spgd_jax.samplers.posterior_keys). A --measurement written by a dataset run (it stores the
    identities) uses them too."""
    return np.asarray(jax.random.key_data(posterior_keys(image_keys(seed, identities)[:, 2], samples)))


def _restore_batch(run: DatasetRun, denoiser, operator, size: int, truth: np.ndarray, identities: list[str],
                   progress: Progress) -> dict:
    """One batch: measurements and restorations, as dataset_outputs.write_images takes them."""
    keys = image_keys(run.seed, identities)
    params = operator.params_per_image(keys[:, 0], size)
    y = operator.measure_per_image(keys[:, 1], truth, params)
    params = {k: np.asarray(v) for k, v in dict(params or {}).items()}
    repeat = lambda a: np.repeat(np.asarray(a), run.samples, axis=0)
    count = len(identities) * run.samples
    pad = lambda a: np.concatenate([a] + [a[-1:]] * (run.batch - count)) if count < run.batch else a
    sample_keys = sampler_keys(run.seed, identities, run.samples)
    forward = forward_for(run.config, operator)
    call = lambda: sample_sharded(
        denoiser, forward, pad(repeat(y)), pad(sample_keys), run.config,
        {k: pad(repeat(v)) for k, v in params.items()}, x_shape=(size, size, 3),
        # --quiet: one compiled call, as the command's other runs (the same program, so the same bits)
        mesh=sharding.batch_mesh(jax.local_devices()), progress=None if run.quiet else progress,
        forward_identity=forward_identity(run.config, operator, size))  # its programs kept for the next run
    try:
        result = run_interruptibly(call, progress)
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None
    result = {k: np.asarray(v)[None, :count] for k, v in result._asdict().items() if k in ("x", "diverged",
                                                                                         "diverged_step")}
    result = {k: v[0] for k, v in combine_samples(result, run.samples).items()}
    return {**result, "y": np.asarray(y), "params": params}


def _wait_for_shares(manifest: Manifest, pending: set[str], progress: DatasetProgress) -> None:
    """Polls out until every pending image has a row or a skipped record (the other processes' shares)."""
    reported = None
    while True:
        left = pending - manifest.finished() - set(manifest.skipped())
        if not left:
            return
        if reported != len(left):
            progress.write(f"{progress.label}: waiting for the other processes ({len(left)} image(s) left)")
            reported = len(left)
        time.sleep(POLL_S)


class DatasetInterrupted(KeyboardInterrupt):
    """Ctrl-C in a dataset run; its message says what was kept."""


def run_dataset(run: DatasetRun, denoiser, operator, size: int) -> int:
    """Restores every image of run.input into run.out (continuing a run of the same settings there);
    returns the exit status: 0, EXIT_SOME_SKIPPED or EXIT_NO_IMAGE_FINISHED. Ctrl-C raises
    DatasetInterrupted (the finished images are kept). UsageError for a bad input, folder or refused
    settings. A folder this run created is removed again when it ends (error, Ctrl-C) with no image done."""
    processes, manifest = Processes(), Manifest(run.out)
    created = processes.count == 1 and not run.out.exists()
    try:
        return _run(run, denoiser, operator, size, processes, manifest)
    except BaseException as error:
        kept = len(manifest.finished()) if run.out.is_dir() else 0
        if created and not kept:
            shutil.rmtree(run.out, ignore_errors=True)
        if isinstance(error, KeyboardInterrupt):
            raise DatasetInterrupted(
                f"interrupted: {kept} restored image(s) kept in {run.out}; run the same command again to continue"
                if kept else "interrupted: nothing of this run was written; --out is as it was") from None
        raise


def _run(run: DatasetRun, denoiser, operator, size: int, processes: Processes, manifest: Manifest) -> int:
    try:
        entries = list_images(run.input)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None
    continuing = manifest.check(run.settings, run.overwrite)
    if processes.main:
        manifest.start(run.settings, continuing, len(entries))
    processes.barrier("spgd-restore-started")
    done = manifest.finished()
    processes.barrier("spgd-restore-listed")  # no process writes a row before every one has listed them
    pending = [e for e in entries if e.name not in done]
    mine = share(pending, processes.index, processes.count)
    label = str(processes) if processes.count > 1 else "restore"
    progress = DatasetProgress(len(mine), label, run.out / LOGS / f"process-{processes.index}.log", not run.quiet)
    if done:
        progress.write(f"{label}: continuing: {len(done)} of {len(entries)} image(s) already restored in {run.out}")
    advice = hint(describe()[run.settings["sampler"]])  # e.g. "a smaller --lr"
    steps = Progress(stream=sys.stderr)
    batch = dataclasses.replace(run, batch=min(run.batch, len(entries) * run.samples))
    for part in read_batches(mine, size, max(1, batch.batch // run.samples)):
        for notice in [] if run.quiet else part.notices:
            print(f"notice: {notice}", file=sys.stderr)
        for entry, reason in part.skipped:
            print(f"warning: skipped {entry.path}: {reason}", file=sys.stderr)
            manifest.write_skipped(entry.name, entry.identity, reason)
        if part.entries:  # the steps of the first batch (it compiles the sampler), of every one on a terminal
            first = progress.done == 0
            steps.reset(run.config.steps, label, not run.quiet and (first or sys.stderr.isatty()), first)
            result = _restore_batch(batch, denoiser, operator, size, part.truth, [e.identity for e in part.entries],
                                    steps)
            write_images(manifest, part.entries, part.truth, result, operator, advice)
        progress.advance(len(part.entries) + len(part.skipped))
    progress.close()
    if processes.count > 1:
        _wait_for_shares(manifest, {e.name for e in pending}, progress)
    skipped = manifest.skipped()
    if processes.main:
        summary = write_aggregate(manifest, entries, size, run.task, {**run.settings, **run.record})
        if not run.quiet:
            shown = "  ".join(f"{k} {v['mean']:.4f}" for k, v in summary.items() if v["mean"] is not None)
            print(f"wrote {len(entries) - len(skipped)} restored image(s) to {run.out}"
                  + (f"\n  {shown}" if shown else ""), file=sys.stderr)
    if processes.main and skipped:
        files = ", ".join(record["identity"] for record in skipped.values())
        print(f"warning: {len(skipped)} unreadable file(s) skipped ({files}); listed in {run.out}/manifest.json and "
              "metrics.json", file=sys.stderr)
    if skipped:
        return EXIT_SOME_SKIPPED
    if not _any_restored(manifest, entries):
        print(f"error: no image finished: every one diverged (flags in {run.out}/metrics.json); try {advice}",
              file=sys.stderr)
        return EXIT_NO_IMAGE_FINISHED
    return 0


def _any_restored(manifest: Manifest, entries) -> bool:
    """Whether some finished image did not diverge."""
    done = manifest.finished()
    return any(not row["diverged"] for _, row, _ in manifest.rows([e.name for e in entries if e.name in done]))
