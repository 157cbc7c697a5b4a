"""The restore command's dataset runs: which runs they are, their flags, and the DatasetRun of the arguments.

`restore --input FILE|FOLDER|GLOB` is a dataset run (spgd_jax.restore.dataset): streamed, resumable,
split over processes. A learning-rate sweep, --diagnostics and --video (analyses of a few images) keep
the run-as-a-whole path, as do the demo face and --measurement.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import jax
import numpy as np

from spgd_jax.restore._args import UsageError
from spgd_jax.restore.dataset import DatasetRun, sampler_keys

__all__ = ["dataset_run", "is_dataset_run", "measurement_keys", "weights_digest"]


def is_dataset_run(args, request) -> bool:
    """Whether the arguments (and their checked Request) ask for a dataset run; UsageError for process flags
    on any other run."""
    sweep = request.step_sizes is not None
    dataset = bool(args.input) and not (sweep or request.overrides.get("diagnostics") or args.video)
    many = args.distributed or any(v is not None for v in (args.coordinator, args.num_processes, args.process_id))
    if many and not dataset:
        raise UsageError("--distributed, --coordinator, --num-processes and --process-id split a dataset run: give "
                         "--input, without a step-size sweep, --diagnostics or --video")
    return dataset


def measurement_keys(args, count: int, key):
    """The sampler keys of a --measurement written by a dataset run (it holds the images' identities: the
    same --seed then gives the same bits, spgd_jax.restore.dataset.sampler_keys); else `key` as it is."""
    if not args.measurement:
        return key
    with np.load(args.measurement, allow_pickle=False) as data:
        identities = [str(i) for i in data["identities"]] if "identities" in data.files else None
    if identities is None or len(identities) != count:
        return key
    return jax.random.wrap_key_data(sampler_keys(args.seed, identities, args.samples))


def weights_digest(path: Path) -> str:
    """SHA-256 over a checkpoint folder's files (their relative paths and bytes), as 'sha256:HEX'."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def dataset_run(args, config, operator, weights: Path, unet_config, batch: int, record: dict) -> DatasetRun:
    """The DatasetRun of the arguments. settings (checked when a run continues): task, operator, sampler and its
    config, seed, samples, the weights' digest and the input folder; record: the rest of config.json."""
    settings = {
        "task": args.task,
        "operator": {"sigma_y": operator.sigma_y, **dict(operator.settings)},
        "sampler": args.sampler,
        "sampler_config": dataclasses.asdict(config),
        "seed": args.seed,
        "samples": args.samples,
        "weights_digest": weights_digest(weights),
        "unet_config": unet_config.to_dict(),
        # unset at float32, so that runs begun before the flag existed continue
        **({} if args.conv_precision == "float32" else {"conv_precision": args.conv_precision}),
        "input": str(Path(args.input).absolute()),
    }
    out = Path(args.out or f"restored-{args.task}")
    return DatasetRun(args.input, out, settings, config, args.seed, batch, args.task, args.samples, args.overwrite,
                      args.quiet, {**record, "batch_size": batch, "step_sizes": None, "measurement": None})
