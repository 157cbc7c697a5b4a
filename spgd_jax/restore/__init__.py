"""The command line: degrade images with a task's operator, restore them, write the results.

    python -m spgd_jax.restore --task sr4                       # the demo face, the default prior
    python -m spgd_jax.restore --task inpaint --input faces/ --out runs/inpaint
    python -m spgd_jax.restore --task sr4 --measurement runs/sr4/measurement.npz
    python -m spgd_jax.restore --task sr4 --lr 2,4,8,16         # a step-size sweep, one compiled call
    python -m spgd_jax.restore --task sr4 --sampler dps --zeta 1,3,9   # any method's step size
    python -m spgd_jax.restore --task inpaint --diagnostics --video
    python -m spgd_jax.restore --task gauss_deblur --samples 4  # the mean of 4 posterior samples

Writes into --out: restored/NAME.png, measurement/NAME.png (a picture of y),
measurement.npz (y and the operator's per-image parameters: feed it back with
--measurement), grid.png (input | measurement | restored), metrics.json (PSNR,
SSIM, LPIPS against the input when the input is the ground truth, and the
residual RMS of A(x) - y always) and config.json (every setting used).
--diagnostics adds diagnostics.png and diagnostics.npz (gradient angles per
outer step, spgd_jax.samplers.diagnostics); --video adds video/NAME.gif (x0_hat along
the run). With several step sizes (--lr 0.5,1,2, or the step size of another
--sampler) each gets a folder FIELD-VALUE/ (restored/, metrics.json, diagnostics,
videos), grid.png shows every value side by side, and sweep.md / sweep.png
compare them. With --samples K > 1
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
machine, and the same measurements and samples as benchmarks/quality.py
(spgd_jax.samplers.run_keys). Exit status: see `build_parser().epilog` (2 for every
bad argument, 3 when no image finished, 4 when input files were skipped).

The arguments are checked before JAX is imported (--help and a typo answer at
once). Modules: _args (the arguments, from the registered methods' config fields:
spgd_jax.catalog), _command (the run once they are checked), _inputs (prior,
operator, measurements), _run (sampling in chunks, stoppable), _progress, _folder
(staging and replacing the outputs), _writers (the files); dataset runs: dataset,
dataset_command, image_stream, manifest, dataset_outputs, dataset_progress, processes.
"""

from __future__ import annotations

import sys

from spgd_jax.restore._args import (EXIT_INTERRUPTED, EXIT_NO_IMAGE_FINISHED, EXIT_SOME_SKIPPED, EXIT_USAGE, UsageError,
                                    UsageExit, build_parser, check_arguments)

__all__ = ["EXIT_INTERRUPTED", "EXIT_NO_IMAGE_FINISHED", "EXIT_SOME_SKIPPED", "EXIT_USAGE", "build_parser", "entry",
           "main"]


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status. A bad argument ends it with UsageExit (a SystemExit
    with status 2 whose message is `error: ...`); argparse's own errors exit 2 as well."""
    try:
        args = build_parser().parse_args(argv)
        request = check_arguments(args)
        from spgd_jax.restore._command import run_command  # imports JAX: only once the arguments are good

        return run_command(args, request)
    except UsageError as error:
        raise UsageExit(f"error: {error}") from None


def entry() -> int:
    """main() for `python -m spgd_jax.restore`: a usage error prints its message and returns 2; Ctrl-C ends it
    with EXIT_INTERRUPTED and a message."""
    try:
        return main()
    except UsageExit as error:
        print(error, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as error:  # a dataset run's says what it kept
        message = str(error) or "interrupted: nothing of this run was written; --out is as it was"
        print(f"\n{message}", file=sys.stderr)
        return EXIT_INTERRUPTED
