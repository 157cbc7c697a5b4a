"""The restore command's arguments: the parser and the sampler config they describe."""

from __future__ import annotations

import argparse
import dataclasses
import math

from spgd_jax import operators
from spgd_jax.samplers import SAMPLERS, presets

__all__ = ["EXIT_INTERRUPTED", "EXIT_NO_IMAGE_FINISHED", "EXIT_SOME_SKIPPED", "UsageError", "build_parser",
           "sampler_config", "settings"]

EXIT_NO_IMAGE_FINISHED = 3  # every image diverged: the outputs (with their flags) are written, nothing restored
EXIT_INTERRUPTED = 130  # Ctrl-C: nothing of this run was written (but an --input run's finished images)
EXIT_SOME_SKIPPED = 4  # an --input run finished, but some input files were unreadable (listed in the manifest)
VIDEO_FRAMES = 50  # at most this many x0_hat frames (plus the result) per video


class UsageError(Exception):
    """A bad argument, file or combination: the command exits with `error: <message>` (status 1)."""


def _restoring_samplers() -> tuple[str, ...]:
    return tuple(name for name, sampler in SAMPLERS.items() if sampler.conditional)


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not FIELD=VALUE (e.g. eta=0.85)")
    return name.strip().replace("-", "_"), value.strip()


def _learning_rates(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number or a comma-separated list of numbers (e.g. 2.5 or 0.5,1,2,4)") from None
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r} lists a learning rate twice; give each once")
    return values


_EPILOG = f"""--input runs (one image, a folder or a glob) stream the images a batch at a time and write each
image's outputs when its batch is done; the same command continues an interrupted run (manifest.json in
--out), and with --coordinator (or --distributed) several processes share the images. exit status: 0
done (images that diverged are flagged in metrics.json); 1 an error (the message names it and the fix);
2 a malformed command line; {EXIT_NO_IMAGE_FINISHED} no image finished (every one diverged; the outputs are
written with their flags: try a smaller --lr or --zeta); {EXIT_SOME_SKIPPED} done, but some input files were
unreadable and skipped (listed in manifest.json); {EXIT_INTERRUPTED} interrupted (Ctrl-C; the finished images of
an --input run are kept, nothing else is written)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m spgd_jax.restore",
        description="Restore degraded images with SPGD (or another registered sampler: --sampler) and a diffusion "
                    "prior.",
        epilog=_EPILOG,
    )
    parser.add_argument("--task", required=True, choices=operators.TASKS, help="degradation to undo")
    parser.add_argument("--input", help="image file, folder or glob (default: the face of matplotlib's Grace Hopper "
                                        "photo, cropped as the default prior's training faces)")
    parser.add_argument("--measurement",
                        help="restore this measurement (.npz written by this tool) instead of degrading --input")
    parser.add_argument("--weights", help="checkpoint directory (default: the embedded 64 px face prior)")
    parser.add_argument("--out", help="output folder (default: restored-TASK)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the outputs of an earlier run in --out (as a whole; other files are kept)")
    parser.add_argument("--sampler", choices=_restoring_samplers(), default="spgd",
                        help="the restoration method (default spgd; spgd_jax.samplers.SAMPLERS; each runs the task's "
                             "preset of spgd_jax.samplers.presets)")
    parser.add_argument("--steps", type=int, help="outer steps T (default: the sampler's preset, e.g. 100 for SPGD)")
    parser.add_argument("--set", dest="settings", metavar="FIELD=VALUE", type=_setting, action="append", default=[],
                        help="set any field of the sampler's config (repeatable), e.g. --set eta=0.85; the fields "
                             "are those of the config class (spgd_jax.samplers.SAMPLERS[name].config_type)")
    parser.add_argument("--warmup", type=int, help="SPGD warm-up iterations N per step (default 5)")
    parser.add_argument("--lr", type=_learning_rates,
                        help="SPGD learning rate (default: the task's, tuned for the default prior, else the "
                             "paper's; spgd_jax.samplers.presets); several, comma-separated, run a sweep")
    parser.add_argument("--lr-min-ratio", type=float,
                        help="SPGD learning-rate decay: the last steps use about this fraction of --lr (default: the "
                             "task's, tuned for the default prior, else the paper's 0.01; 1 = constant)")
    parser.add_argument("--beta", type=float, help="SPGD ADM momentum (default 0.9)")
    parser.add_argument("--adm", choices=("paper", "off", "reference_cosine"), help="ADM variant (default paper)")
    parser.add_argument("--zeta", type=float, help="DPS step size (default: the task's, tuned for the default prior, "
                                                   "else the DPS release's; spgd_jax.samplers.presets)")
    parser.add_argument("--sigma-y", type=float, help="measurement noise std in [-1, 1] units (default: the task's)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed for operator, noise and sampler")
    parser.add_argument("--samples", type=int, default=1,
                        help="posterior samples per image (default 1); K > 1 writes their mean as the restoration, "
                             "every sample to samples.npz and their per-pixel std to std/")
    parser.add_argument("--batch-size", type=int,
                        help="samples per compiled call (default 4 per device; a sweep holds one copy per rate)")
    parser.add_argument("--diagnostics", action="store_true",
                        help="SPGD: record gradient angles per step (the paper's Figure 2) -> diagnostics.png")
    parser.add_argument("--video", action="store_true", help="write an animated GIF of x0_hat per image -> video/")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or notices")
    parser.add_argument("--no-cache", action="store_true",
                        help="do not use JAX's persistent compilation cache (default: on, in $SPGD_JAX_CACHE_DIR or "
                             "~/.cache/spgd-jax/xla; spgd_jax.io.compile_cache)")
    from spgd_jax.restore.processes import add_process_arguments  # (it imports this module)

    add_process_arguments(parser)
    return parser


def check_arguments(args) -> None:
    """UsageError for values and combinations the parser cannot check alone."""
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.samples < 1:
        raise UsageError(f"--samples must be >= 1, got {args.samples}")
    if args.samples > 1 and (args.video or args.diagnostics):
        raise UsageError("--video and --diagnostics follow one sample's run; leave them out or use --samples 1")
    if args.measurement and args.input:
        raise UsageError("give either --input (images to degrade) or --measurement (an existing measurement), not both")


def sampler_config(args, tuned: bool):
    """The sampler config of the arguments; tuned: the default prior's step sizes (else the paper's).

    UsageError for settings of the other sampler or values the config refuses."""
    try:
        return _sampler_config(args, tuned)
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None


def _sampler_config(args, tuned: bool):
    task, name = args.task, args.sampler
    if SAMPLERS[name].linear_only and not operators.get(task, 64).linear:  # linearity does not depend on the size
        raise UsageError(f"--sampler {name} needs a linear operator (projections or SVDs of A); {task} is not "
                         "linear: use --sampler spgd, dps or another sampler that only needs gradients")
    spgd_flags = (("--warmup", args.warmup), ("--lr", args.lr), ("--lr-min-ratio", args.lr_min_ratio),
                  ("--beta", args.beta), ("--adm", args.adm))
    if name != "spgd":
        for flag, value in spgd_flags:
            if value is not None:
                raise UsageError(f"{flag} is an SPGD setting; leave it out with --sampler {name} (use --set FIELD=VALUE "
                                 "for its own settings)")
        if args.diagnostics:
            raise UsageError("--diagnostics records SPGD's warm-up gradients; use it with --sampler spgd")
    if name != "dps" and args.zeta is not None:
        raise UsageError(f"--zeta is a DPS setting; leave it out with --sampler {name}")
    flags = {"steps": args.steps}
    if name == "spgd":
        flags.update(warmup=args.warmup, beta=args.beta, adm=args.adm, lr=args.lr[0] if args.lr else None,
                     lr_min_ratio=args.lr_min_ratio, diagnostics=args.diagnostics or None)
    if name == "dps":
        flags.update(zeta=args.zeta)
    flags = {field: value for field, value in flags.items() if value is not None}
    overrides = settings(name, args.settings)
    both = sorted(set(flags) & set(overrides))
    if both:
        raise UsageError(f"{', '.join(both)} given twice: by its own option and by --set; give it once")
    overrides.update(flags)
    config = presets.config(name, task, tuned, **overrides)
    for lr in args.lr or ():
        dataclasses.replace(config, lr=lr)  # each rate passes SPGDConfig's checks
    if args.video:
        config = dataclasses.replace(config, trajectory_every=math.ceil(config.steps / VIDEO_FRAMES))
    return config


def settings(name: str, pairs: list[tuple[str, str]]) -> dict:
    """The --set FIELD=VALUE pairs as config fields of sampler `name`, each value parsed as its field's default
    (bool, int, float or str; a required field as a number). UsageError for an unknown field or a bad value."""
    fields = {f.name: f for f in dataclasses.fields(SAMPLERS[name].config_type)}
    parsed = {}
    for field, text in pairs:
        if field not in fields:
            raise UsageError(f"--set {field}: {SAMPLERS[name].config_type.__name__} has no field {field!r}; it has "
                             f"{', '.join(sorted(fields))}")
        default = fields[field].default
        kind = float if default is dataclasses.MISSING else type(default)
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                value = text.lower() in ("true", "1")
            else:
                value = kind(text)
        except ValueError:
            raise UsageError(f"--set {field}={text}: {field} takes a value of type {kind.__name__}") from None
        parsed[field] = value
    return parsed
