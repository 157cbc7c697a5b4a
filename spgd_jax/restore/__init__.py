"""The command line: degrade images with a task's operator, restore them, write the results.

    python -m spgd_jax.restore --task sr4                       # the demo face, the default prior
    python -m spgd_jax.restore --task inpaint --input faces/ --out runs/inpaint
    python -m spgd_jax.restore --task sr4 --measurement runs/sr4/measurement.npz
    python -m spgd_jax.restore --task sr4 --lr 2,4,8,16         # a learning-rate sweep, one compiled call
    python -m spgd_jax.restore --task inpaint --diagnostics --video
    python -m spgd_jax.restore --task gauss_deblur --samples 4  # the mean of 4 posterior samples

Writes into --out: restored/NAME.png, measurement/NAME.png (a picture of y),
measurement.npz (y and the operator's per-image parameters: feed it back with
--measurement), grid.png (input | measurement | restored), metrics.json (PSNR,
SSIM, LPIPS against the input when the input is the ground truth, and the
residual RMS of A(x) - y always) and config.json (every setting used).
--diagnostics adds diagnostics.png and diagnostics.npz (gradient angles per
outer step, spgd_jax.samplers.diagnostics); --video adds video/NAME.gif (x0_hat along
the run). With several learning rates (--lr 0.5,1,2) each gets a folder
lr-VALUE/ (restored/, metrics.json, diagnostics, videos), grid.png shows every
rate side by side, and sweep.md / sweep.png compare them. With --samples K > 1
each image is restored K times from independent noise: restored/ holds the mean
of the samples (an estimate of the posterior mean: higher PSNR, smoother, K
times the work), samples.npz every sample and std/NAME.png their per-pixel
standard deviation (where the prior is unsure).

The batch is split over all local devices (spgd_jax.sharding). An --input run
(one image, a folder or a glob of any size) is a dataset run (spgd_jax.restore.dataset):
images are read a batch at a time, each image's outputs are written as its batch
ends, the same command continues an interrupted run (manifest.json), unreadable
files are skipped (exit status 4), and with --coordinator/--distributed several
processes and hosts share the images. The outputs of other runs (the demo,
--measurement, sweeps, --diagnostics, --video) replace those of an earlier run in
--out as a whole, and only with --overwrite; they appear once all of them are
complete, so an error or Ctrl-C (which stops the compiled run within an outer
step) leaves --out as it was. The same seed gives the same bits on the same
machine. Exit status: see `build_parser().epilog` (3 when no image finished).

Modules: _args (the arguments and the sampler config), _inputs (prior, operator,
measurements), _run (sampling in chunks, stoppable), _progress, _folder (staging
and replacing the outputs), _writers (the files); dataset runs: dataset,
dataset_command, image_stream, manifest, dataset_outputs, dataset_progress, processes.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
import numpy as np

from spgd_jax.io.compile_cache import enable_compilation_cache
from spgd_jax.io.cpu_flags import use_fast_cpu_flags
from spgd_jax.io.prior import default_weights_path
from spgd_jax.samplers import SAMPLERS, forward_for, presets
from spgd_jax.restore._args import (EXIT_INTERRUPTED, EXIT_NO_IMAGE_FINISHED, EXIT_SOME_SKIPPED, UsageError,
                                    build_parser, check_arguments, sampler_config)
from spgd_jax.restore._folder import OutputFolder
from spgd_jax.restore._inputs import load_prior, make_operator, measurements
from spgd_jax.restore._run import combine_samples, restore
from spgd_jax.restore._writers import step_size_flag, write_outputs
from spgd_jax.restore.dataset import run_dataset
from spgd_jax.restore.dataset_command import dataset_run, is_dataset_run, measurement_keys
from spgd_jax.restore.processes import initialize

__all__ = ["EXIT_INTERRUPTED", "EXIT_NO_IMAGE_FINISHED", "EXIT_SOME_SKIPPED", "build_parser", "entry", "main"]


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status. A UsageError ends it with SystemExit('error: ...')."""
    try:
        return _main(build_parser().parse_args(argv))
    except UsageError as error:
        raise SystemExit(f"error: {error}") from None


def _main(args) -> int:
    check_arguments(args)
    dataset = is_dataset_run(args)
    use_fast_cpu_flags()  # before JAX starts its backends
    initialize(args.coordinator, args.num_processes, args.process_id, args.distributed)
    if not args.no_cache:
        enable_compilation_cache()
    task = args.task
    batch = 4 * jax.local_device_count() if args.batch_size is None else args.batch_size
    weights = Path(args.weights) if args.weights else default_weights_path()
    default_prior = weights.resolve() == default_weights_path().resolve()
    config = sampler_config(args, tuned=default_prior)
    if default_prior and task in presets.UNSUPPORTED_BY_DEFAULT_PRIOR:
        print(f"warning: {presets.UNSUPPORTED_BY_DEFAULT_PRIOR[task]}", file=sys.stderr)
    lrs = args.lr if args.lr and len(args.lr) > 1 else None

    denoiser, unet_config = load_prior(weights)
    size = unet_config.image_size
    operator = make_operator(task, size, args.sigma_y)
    try:
        forward_for(config, operator)
    except ValueError as error:
        raise UsageError(f"--sampler {args.sampler} cannot restore {task}: {error}") from None
    if "sigma_y" in {f.name for f in dataclasses.fields(config)} and "sigma_y" not in dict(args.settings):
        config = dataclasses.replace(config, sigma_y=operator.sigma_y)  # the method's noise model is the task's
    record = {"weights": str(weights), "unet_config": unet_config.to_dict(), "seed": args.seed,
              "samples": args.samples, "devices": [str(d) for d in jax.local_devices()],
              "versions": {"jax": jax.__version__, "spgd_jax": _version()}}
    if dataset:
        run = dataset_run(args, config, operator, weights, unet_config, batch, {**record, "input": args.input})
        return run_dataset(run, denoiser, operator, size)
    key_operator, key_noise, key_sample = jax.random.split(jax.random.key(args.seed), 3)
    inputs = measurements(args, operator, size, key_operator, key_noise)
    key_sample = measurement_keys(args, len(inputs.y), key_sample)  # a dataset run's measurement: its own keys
    if not args.quiet:
        for notice in inputs.notices:
            print(f"notice: {notice}", file=sys.stderr)

    out = Path(args.out or f"restored-{task}")
    folder = OutputFolder(out, args.overwrite)
    with folder as staging:
        repeat = lambda a: np.repeat(np.asarray(a), args.samples, axis=0)  # image-major: image b's samples in a row
        batch = min(batch, len(inputs.y) * args.samples)
        runs = restore(denoiser, operator, repeat(inputs.y), {k: repeat(v) for k, v in inputs.params.items()},
                       key_sample, config, lrs, batch, size, f"{args.sampler} {task}", args.quiet)
        runs = combine_samples(runs, args.samples)
        summaries = write_outputs(staging, runs, inputs, operator, config, lrs, args, {
            **record,
            "batch_size": batch,
            "input": None if args.measurement else args.input or "demo: matplotlib's grace_hopper.jpg, face crop",
            "measurement": args.measurement,
        })
        folder.commit()
    finished = [int((~d).sum()) for d in runs["diverged"]]
    if not args.quiet:
        print(f"wrote {len(inputs.names)} restored image(s) to {out}", file=sys.stderr)
        for lr, summary, count in zip(lrs or [None], summaries, finished):
            shown = "  ".join(f"{k} {v['mean']:.4f}" for k, v in summary.items() if v["mean"] is not None)
            rate = "" if lr is None else f"lr {lr:g}: "
            print(f"  {rate}{shown or 'no image finished'}"
                  + (f" (mean of the {count} of {len(inputs.names)} that finished)" if 0 < count < len(inputs.names)
                     else ""), file=sys.stderr)
    if not any(finished):
        print(f"error: no image finished: every one diverged (flags in {out}/metrics.json); try a smaller "
              f"{step_size_flag(SAMPLERS[args.sampler].step_size)}", file=sys.stderr)
        return EXIT_NO_IMAGE_FINISHED
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spgd-jax")
    except PackageNotFoundError:
        return "unknown"


def entry() -> int:
    """main() for `python -m spgd_jax.restore`: Ctrl-C ends it with EXIT_INTERRUPTED and a message."""
    try:
        return main()
    except KeyboardInterrupt as error:  # a dataset run's says what it kept
        message = str(error) or "interrupted: nothing of this run was written; --out is as it was"
        print(f"\n{message}", file=sys.stderr)
        return EXIT_INTERRUPTED
