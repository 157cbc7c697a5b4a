"""The command once its arguments are checked: prior, operator, measurements, the sampler config, the run and
its outputs. Importing this module imports JAX."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from pathlib import Path

import jax
import numpy as np

from spgd_jax.xla_setup import onednn
from spgd_jax.xla_setup.compile_cache import enable_compilation_cache
from spgd_jax.xla_setup.cpu_flags import use_fast_cpu_flags
from spgd_jax.io.prior import default_weights_path
from spgd_jax.restore._args import EXIT_NO_IMAGE_FINISHED, VIDEO_FRAMES, Request, UsageError, hint
from spgd_jax.restore._folder import OutputFolder
from spgd_jax.restore._inputs import load_prior, make_operator, measurements
from spgd_jax.restore._run import combine_samples, restore
from spgd_jax.restore._writers import write_outputs
from spgd_jax.restore.dataset import run_dataset
from spgd_jax.restore.dataset_command import dataset_run, is_dataset_run, measurement_keys
from spgd_jax.restore.processes import initialize
from spgd_jax.samplers import describe, forward_for, image_keys, posterior_keys, presets, run_keys, sampler_of

__all__ = ["run_command", "sampler_config"]


def sampler_config(request: Request, task: str, tuned: bool, video: bool = False):
    """The sampler config of a Request: the task's preset (tuned: the default prior's step sizes, else the
    paper's) with the fields the arguments set; UsageError for values the config refuses."""
    try:
        config = presets.config(request.sampler, task, tuned, **request.overrides)
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None
    if video:
        config = dataclasses.replace(config, trajectory_every=math.ceil(config.steps / VIDEO_FRAMES))
    return config


def run_command(args, request: Request) -> int:
    """Runs the checked arguments; returns the exit status."""
    dataset = is_dataset_run(args, request)
    use_fast_cpu_flags()  # before JAX starts its backends
    initialize(args.coordinator, args.num_processes, args.process_id, args.distributed)
    if not args.no_cache:
        enable_compilation_cache()
    with _conv_precision(args.conv_precision, args.quiet):
        return _run(args, request, dataset)


@contextlib.contextmanager
def _conv_precision(name: str, quiet: bool):
    """jax_default_matmul_precision = name ('float32': JAX's default) for the whole process while the run lasts:
    traced into every program (and part of the stored programs' keys), in the worker threads too (the context
    manager jax.default_matmul_precision is per thread)."""
    if name == "float32":
        yield
        return
    before = jax.config.values["jax_default_matmul_precision"]
    jax.config.update("jax_default_matmul_precision", name)
    try:
        if jax.default_backend() == "cpu" and onednn.conv_target() is None and not quiet:
            print(f"notice: --conv-precision {name} changes nothing on this CPU: {onednn.route()[1]}", file=sys.stderr)
        yield
    finally:
        jax.config.update("jax_default_matmul_precision", before)


def _run(args, request: Request, dataset: bool) -> int:
    task = args.task
    batch = 4 * jax.local_device_count() if args.batch_size is None else args.batch_size
    weights = Path(args.weights) if args.weights else default_weights_path()
    default_prior = weights.resolve() == default_weights_path().resolve()
    config = sampler_config(request, task, tuned=default_prior, video=args.video)
    warning = presets.default_prior_warning(args.sampler, task) if default_prior else None
    if warning:  # a task, or a (method, task) pair, this prior cannot do
        print(f"warning: {warning}", file=sys.stderr)

    denoiser, unet_config = load_prior(weights, args.dtype)
    size = unet_config.image_size
    operator = make_operator(task, size, args.sigma_y)
    try:
        forward_for(config, operator)
    except ValueError as error:
        raise UsageError(f"--sampler {args.sampler} cannot restore {task}: {error}") from None
    if "sigma_y" in {f.name for f in dataclasses.fields(config)} and "sigma_y" not in request.overrides:
        config = dataclasses.replace(config, sigma_y=operator.sigma_y)  # the method's noise model is the task's
    record = {"weights": str(weights), "unet_config": unet_config.to_dict(), "conv_precision": args.conv_precision,
              "seed": args.seed, "samples": args.samples, "devices": [str(d) for d in jax.local_devices()],
              "versions": {"jax": jax.__version__, "spgd_jax": _version()}}
    if dataset:
        run = dataset_run(args, config, operator, weights, unet_config, batch, {**record, "input": args.input})
        return run_dataset(run, denoiser, operator, size)
    key_operator, key_noise, key_sampler = run_keys(args.seed)
    inputs = measurements(args, operator, size, key_operator, key_noise)
    if not args.quiet:
        for notice in inputs.notices:
            print(f"notice: {notice}", file=sys.stderr)

    out = Path(args.out or f"restored-{task}")
    folder = OutputFolder(out, args.overwrite)
    with folder as staging:
        repeat = lambda a: np.repeat(np.asarray(a), args.samples, axis=0)  # image-major: image b's samples in a row
        keys = posterior_keys(image_keys(key_sampler, len(inputs.y)), args.samples)
        keys = measurement_keys(args, len(inputs.y), keys)  # a dataset run's measurement: its images' own keys
        batch = min(batch, len(keys))
        runs = restore(denoiser, operator, repeat(inputs.y), {k: repeat(v) for k, v in inputs.params.items()},
                       keys, config, request.step_sizes, batch, size, f"{args.sampler} {task}", args.quiet)
        runs = combine_samples(runs, args.samples)
        summaries = write_outputs(staging, runs, inputs, operator, config, request.step_sizes, args, {
            **record,
            "batch_size": batch,
            "input": None if args.measurement else args.input or "demo: matplotlib's grace_hopper.jpg, face crop",
            "measurement": args.measurement,
        })
        folder.commit()
    return _report(args, config, request, inputs, runs, summaries, out)


def _report(args, config, request: Request, inputs, runs, summaries, out: Path) -> int:
    """The summary on stderr; EXIT_NO_IMAGE_FINISHED when every image diverged, else 0."""
    finished = [int((~d).sum()) for d in runs["diverged"]]
    field = sampler_of(config).step_size
    if not args.quiet:
        print(f"wrote {len(inputs.names)} restored image(s) to {out}", file=sys.stderr)
        for value, summary, count in zip(request.step_sizes or [None], summaries, finished):
            shown = "  ".join(f"{k} {v['mean']:.4f}" for k, v in summary.items() if v["mean"] is not None)
            rate = "" if value is None else f"{field} {value:g}: "
            print(f"  {rate}{shown or 'no image finished'}"
                  + (f" (mean of the {count} of {len(inputs.names)} that finished)" if 0 < count < len(inputs.names)
                     else ""), file=sys.stderr)
    if not any(finished):
        print(f"error: no image finished: every one diverged (flags in {out}/metrics.json); try "
              f"{hint(describe()[args.sampler])}", file=sys.stderr)
        return EXIT_NO_IMAGE_FINISHED
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spgd-jax")
    except PackageNotFoundError:
        return "unknown"
