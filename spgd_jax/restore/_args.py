"""The restore command's arguments, checked before JAX is imported.

The sampler settings are flags made from the config fields of the registered methods (spgd_jax.catalog):
--lr, --zeta, --warmup, --steps, ... each belongs to the methods whose config has that field, and
`--set FIELD=VALUE` sets any field. The step-size field of a method (SPGD's --lr, DPS's --zeta, DiffPIR's
--lam, ...) takes several comma-separated values: a sweep, in one compiled call. `check_arguments` turns
the arguments into a `Request`, or a UsageError naming the problem and the fix (exit status 2).
"""

from __future__ import annotations

import argparse
import math
from typing import NamedTuple

from spgd_jax import catalog

__all__ = ["EXIT_INTERRUPTED", "EXIT_NO_IMAGE_FINISHED", "EXIT_SOME_SKIPPED", "EXIT_USAGE", "Request", "UsageError", "UsageExit",
           "build_parser", "check_arguments", "flag", "hint"]

EXIT_USAGE = 2  # a bad argument, file or combination: nothing is written
EXIT_NO_IMAGE_FINISHED = 3  # every image diverged: the outputs (with their flags) are written, nothing restored
EXIT_SOME_SKIPPED = 4  # an --input run finished, but some input files were unreadable (listed in the manifest)
EXIT_INTERRUPTED = 130  # Ctrl-C: nothing of this run was written (but an --input run's finished images)
VIDEO_FRAMES = 50  # at most this many x0_hat frames (plus the result) per video
# config fields without a flag of their own: --sigma-y sets the task's noise and the method's noise model,
# --video the trajectory (both still take --set FIELD=VALUE)
NOT_FLAGS = ("sigma_y", "trajectory_every")


class UsageError(Exception):
    """A bad argument, file or combination: the command exits with `error: <message>` (status 2)."""


class UsageExit(SystemExit):
    """How `main` ends on a UsageError: exit status 2; str() is the message (`entry` prints it)."""

    def __init__(self, message: str):
        super().__init__(EXIT_USAGE)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Request(NamedTuple):
    """What the arguments ask of the sampler: its name, the config fields set (values parsed to the fields'
    types; a swept field holds its first value) and the step sizes of a sweep (None: one run)."""

    sampler: str
    overrides: dict
    step_sizes: tuple[float, ...] | None


def flag(field: str) -> str:
    """The command-line flag of a config field: --FIELD (dashes for underscores), or --set FIELD=... for the
    fields without a flag of their own."""
    return f"--set {field}=..." if field in NOT_FLAGS else "--" + field.replace("_", "-")


def hint(description: dict) -> str:
    """A method's advice for a diverged run (its catalog description's hint) with each field as its flag."""
    return description["hint"].format_map({field: flag(field) for field in description["fields"]})


def _restoring() -> dict:
    return {name: d for name, d in catalog.samplers().items() if d["conditional"]}


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not FIELD=VALUE (e.g. eta=0.85)")
    return name.strip().replace("-", "_"), value.strip()


_EPILOG = f"""--input runs (one image, a folder or a glob) stream the images a batch at a time and write each
image's outputs when its batch is done; the same command continues an interrupted run (manifest.json in
--out), and with --coordinator (or --distributed) several processes share the images. exit status: 0 done
(images that diverged are flagged in metrics.json); {EXIT_USAGE} a bad argument, file or combination (the message
names it and the fix; nothing is written); {EXIT_NO_IMAGE_FINISHED} no image finished (every one diverged; the
outputs are written with their flags, and the message names the setting to change); {EXIT_SOME_SKIPPED} done, but
some input files were unreadable and skipped (listed in manifest.json); {EXIT_INTERRUPTED} interrupted (Ctrl-C; the
finished images of an --input run are kept, nothing else is written); 1 an unexpected failure."""


def build_parser() -> argparse.ArgumentParser:
    """The parser; its sampler-setting flags are the config fields of the registered restoring methods."""
    methods, tasks = _restoring(), catalog.tasks()
    default = next(iter(methods))
    parser = argparse.ArgumentParser(
        prog="python -m spgd_jax.restore", epilog=_EPILOG,
        description=f"Restore degraded images with a registered sampler (--sampler, default {default}) and a "
                    "diffusion prior.")
    parser.add_argument("--task", required=True, choices=list(tasks), help="degradation to undo")
    parser.add_argument("--input", help="image file, folder or glob (default: the face of matplotlib's Grace Hopper "
                                        "photo, cropped as the default prior's training faces)")
    parser.add_argument("--measurement",
                        help="restore this measurement (.npz written by this tool) instead of degrading --input")
    parser.add_argument("--weights", help="checkpoint directory (default: the embedded 64 px face prior)")
    parser.add_argument("--out", help="output folder (default: restored-TASK)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the outputs of an earlier run in --out (as a whole; other files are kept)")
    parser.add_argument("--sampler", choices=list(methods), default=default,
                        help=f"the restoration method (default {default}); each starts from the task's preset "
                             "(spgd_jax.samplers.presets) and takes the settings below that its config has")
    parser.add_argument("--sigma-y", type=float, help="measurement noise std in [-1, 1] units (default: the task's)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed for operator, noise and sampler")
    parser.add_argument("--samples", type=int, default=1,
                        help="posterior samples per image (default 1); K > 1 writes their mean as the restoration, "
                             "every sample to samples.npz and their per-pixel std to std/")
    parser.add_argument("--batch-size", type=int,
                        help="samples per compiled call (default 4 per device; a sweep holds one copy per value)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="the network's compute dtype (default: the checkpoint's, float32 for the embedded prior); "
                             "bfloat16 runs SPGD 1.2-1.4x faster on a CPU with AMX (through oneDNN) and up to 1.2x on "
                             "others (README)")
    parser.add_argument("--conv-precision", choices=("float32", "bfloat16"), default="float32",
                        help="the float32 network's 3x3 convolutions: float32 (default), or bfloat16 operands with "
                             "float32 sums, the rest float32, like PyTorch's autocast (jax.default_matmul_precision"
                             "('bfloat16') in the API); on a CPU with AMX SPGD runs 1.3-1.8x faster (README)")
    parser.add_argument("--video", action="store_true", help="write an animated GIF of x0_hat per image -> video/")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or notices")
    parser.add_argument("--no-cache", action="store_true",
                        help="do not use JAX's persistent compilation cache nor the store of compiled samplers "
                             "(default: on, in $SPGD_JAX_CACHE_DIR or ~/.cache/spgd-jax/xla; "
                             "spgd_jax.xla_setup.compile_cache and executables)")
    settings = parser.add_argument_group(
        "sampler settings", "the config fields of --sampler's method (default: the task's preset); a method's step "
                            "size takes several comma-separated values, a sweep in one compiled call")
    settings.add_argument("--set", dest="settings", metavar="FIELD=VALUE", type=_setting, action="append", default=[],
                          help="set any field of the sampler's config (repeatable), e.g. --set eta=0.85")
    owners: dict[str, list[str]] = {}
    for name, description in methods.items():
        for field in description["fields"]:
            owners.setdefault(field, []).append(name)
    for field, names in owners.items():
        if field in NOT_FLAGS:
            continue
        kind = methods[names[0]]["fields"][field]
        swept = [n for n in names if methods[n]["step_size"] == field]
        text = f"{kind}: {', '.join(methods[n]['config'] for n in names)}.{field}"
        if swept:
            text += f" (the step size of {', '.join(swept)}: A,B,C sweeps it)"
        extra = {"nargs": "?", "const": "true", "metavar": "BOOL"} if kind == "bool" else {"metavar": kind.upper()}
        settings.add_argument(flag(field), dest=f"field_{field}", help=text, **extra)
    from spgd_jax.restore.processes import add_process_arguments  # (it imports this module)

    add_process_arguments(parser)
    return parser


def check_arguments(args) -> Request:
    """The Request of the parsed arguments; UsageError for values and combinations the parser cannot check."""
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.samples < 1:
        raise UsageError(f"--samples must be >= 1, got {args.samples}")
    if args.measurement and args.input:
        raise UsageError("give either --input (images to degrade) or --measurement (an existing measurement), not both")
    if args.measurement and not args.measurement.lower().endswith(".npz"):
        raise UsageError(f"--measurement {args.measurement} is not an .npz file; pass the measurement.npz that an "
                         "earlier run wrote into its --out folder")
    if args.sigma_y is not None and not args.sigma_y >= 0:
        raise UsageError(f"--sigma-y must be >= 0, got {args.sigma_y}")
    methods = _restoring()
    description = methods[args.sampler]
    if description["linear_only"] and not catalog.tasks()[args.task]["linear"]:
        others = [n for n, d in methods.items() if not d["linear_only"]]
        raise UsageError(f"--sampler {args.sampler} needs a linear operator (projections or SVDs of A); {args.task} "
                         f"is not linear: use --sampler {', '.join(others)} (they only need gradients)")
    request = _request(args, description)
    if args.samples > 1 and (args.video or request.overrides.get("diagnostics")):
        raise UsageError("--video and --diagnostics follow one sample's run; leave them out or use --samples 1")
    return request


def _request(args, description: dict) -> Request:
    """The config fields the arguments set (flags and --set), parsed; a comma list on the step size: a sweep."""
    fields, name = description["fields"], args.sampler
    given = {}
    for field in {key[len("field_"):] for key in vars(args) if key.startswith("field_")}:
        text = getattr(args, f"field_{field}")
        if text is None:
            continue
        if field not in fields:
            own = ", ".join(flag(f) for f in fields if f not in NOT_FLAGS)
            raise UsageError(f"{flag(field)} is not a setting of --sampler {name} ({description['config']}); leave "
                             f"it out or choose another --sampler. Its settings: {own}")
        given[field] = (flag(field), f"{flag(field)} {text}", text)
    for field, text in args.settings:
        if field not in fields:
            raise UsageError(f"--set {field}: {description['config']} has no field {field!r}; it has "
                             f"{', '.join(sorted(fields))}")
        if field in given:
            raise UsageError(f"{field} given twice: by {given[field][0]} and by --set; give it once")
        given[field] = ("--set", f"--set {field}={text}", text)
    overrides, step_sizes = {}, None
    for field, (_, shown, text) in given.items():
        parts = text.split(",") if fields[field] in ("int", "float") else [text]
        values = [_value(shown, field, fields[field], part) for part in parts]
        if len(values) > 1:
            if field != description["step_size"]:
                step = description["step_size"]
                raise UsageError(f"{shown}: only the step size takes several values (a sweep); for --sampler "
                                 f"{name} that is {flag(step) if step else 'none'}")
            if len(set(values)) != len(values):
                raise UsageError(f"{shown} lists a value twice; give each once")
            step_sizes = tuple(values)
        if field == description["step_size"]:
            for value in values:
                if not (math.isfinite(value) and value > 0):
                    raise UsageError(f"{description['config']}.{field} must be > 0 (a finite number), got {value}")
        overrides[field] = values[0]
    return Request(name, overrides, step_sizes)


def _value(shown: str, field: str, kind: str, text: str):
    """text as the field's type (bool: true/false/1/0); UsageError naming the argument and the type otherwise."""
    text = text.strip()
    try:
        if kind == "bool":
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        return {"int": int, "float": float, "str": str}[kind](text)
    except ValueError:
        raise UsageError(f"{shown}: {field} takes a value of type {kind}") from None
