"""The command line: degrade images with a task's operator, restore them, write the results.

    python -m spgd_jax.restore --task sr4                       # the demo photo, the default prior
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
outer step, spgd_jax.diagnostics); --video adds video/NAME.gif (x0_hat along
the run). With several learning rates (--lr 0.5,1,2) each gets a folder
lr-VALUE/ (restored/, metrics.json, diagnostics, videos), grid.png shows every
rate side by side, and sweep.md / sweep.png compare them. With --samples K > 1
each image is restored K times from independent noise: restored/ holds the mean
of the samples (an estimate of the posterior mean: higher PSNR, smoother, K
times the work), samples.npz every sample and std/NAME.png their per-pixel
standard deviation (where the prior is unsure).

The batch is split over all local devices (spgd_jax.sharding). Existing outputs
are never replaced without --overwrite; every file is written atomically, so an
error or Ctrl-C leaves complete files only. The same seed gives the same bits on
the same machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from spgd_jax import checkpoint, diagnostics, images, metrics, operators, presets, sharding, sweep
from spgd_jax.denoiser import make_denoiser
from spgd_jax.unet import UNet

__all__ = ["main", "build_parser", "default_weights_path"]

VIDEO_FRAMES = 50  # at most this many x0_hat frames (plus the result) per video
STD_WHITE = 0.25  # std/NAME.png: a per-pixel std (mean over channels, [-1, 1] units) of this or more is white


def default_weights_path() -> Path:
    """The project's default 64 px face prior (weights/default64 beside the package)."""
    return Path(__file__).resolve().parent.parent / "weights" / "default64"


def _learning_rates(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number or a comma-separated list of numbers (e.g. 2.5 or 0.5,1,2,4)") from None
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r} lists a learning rate twice; give each once")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m spgd_jax.restore",
        description="Restore degraded images with SPGD (or DPS) and a diffusion prior.",
    )
    parser.add_argument("--task", required=True, choices=operators.TASKS, help="degradation to undo")
    parser.add_argument("--input", help="image file, folder or glob (default: matplotlib's Grace Hopper photo)")
    parser.add_argument("--measurement",
                        help="restore this measurement (.npz written by this tool) instead of degrading --input")
    parser.add_argument("--weights", help="checkpoint directory (default: the embedded 64 px face prior)")
    parser.add_argument("--out", help="output folder (default: restored-TASK)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--sampler", choices=("spgd", "dps"), default="spgd")
    parser.add_argument("--steps", type=int, help="outer steps T (default 100 for SPGD, 500 for DPS: equal NFEs)")
    parser.add_argument("--warmup", type=int, help="SPGD warm-up iterations N per step (default 5)")
    parser.add_argument("--lr", type=_learning_rates,
                        help="SPGD learning rate (default: the task's, tuned for the default prior, else the "
                             "paper's; spgd_jax.presets); several, comma-separated, run a sweep")
    parser.add_argument("--lr-min-ratio", type=float,
                        help="SPGD learning-rate decay: the last steps use about this fraction of --lr (default: the "
                             "task's, tuned for the default prior, else the paper's 0.01; 1 = constant)")
    parser.add_argument("--beta", type=float, help="SPGD ADM momentum (default 0.9)")
    parser.add_argument("--adm", choices=("paper", "off", "reference_cosine"), help="ADM variant (default paper)")
    parser.add_argument("--zeta", type=float, help="DPS step size (default: the task's, tuned for the default prior, else the "
                             "DPS release's; spgd_jax.presets)")
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
    return parser


class _ProgressBar:
    """A one-line progress bar over the outer steps, fed from inside the compiled loop.

    One object serves every run (it is a static argument of the compiled sampler: a new object would
    compile again); `reset` starts a run. It counts distinct steps, as every device and learning rate
    reports each step."""

    def __init__(self):
        self.reset(1, "", False)

    def reset(self, total: int, label: str, enabled: bool) -> None:
        self.total, self.label, self.enabled = total, label, enabled
        self.seen, self.start = set(), time.perf_counter()

    def __call__(self, step: int) -> None:
        if step in self.seen or not self.enabled:
            return
        self.seen.add(step)
        width, done = 30, len(self.seen)
        filled = width * done // self.total
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {elapsed:6.1f}s")
        if done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


_PROGRESS = _ProgressBar()


def _fail(message: str) -> None:
    raise SystemExit(f"error: {message}")


def _sampler_config(args, task: str, tuned: bool):
    """The sampler config of the arguments; tuned: the default prior's step sizes (else the paper's)."""
    if args.sampler == "spgd":
        if args.zeta is not None:
            _fail("--zeta is a DPS setting; use --lr with --sampler spgd")
        config = presets.spgd_config(task, tuned, steps=args.steps, warmup=args.warmup, beta=args.beta, adm=args.adm,
                                     lr=args.lr[0] if args.lr else None, lr_min_ratio=args.lr_min_ratio,
                                     diagnostics=args.diagnostics)
        for lr in args.lr or ():
            dataclasses.replace(config, lr=lr)  # each rate passes SPGDConfig's checks
    else:
        for flag, value in (("--warmup", args.warmup), ("--lr", args.lr), ("--lr-min-ratio", args.lr_min_ratio),
                            ("--beta", args.beta), ("--adm", args.adm)):
            if value is not None:
                _fail(f"{flag} is an SPGD setting; use --zeta and --steps with --sampler dps")
        if args.diagnostics:
            _fail("--diagnostics records SPGD's warm-up gradients; use it with --sampler spgd")
        config = presets.dps_config(task, tuned, steps=args.steps, zeta=args.zeta)
    if args.video:
        config = dataclasses.replace(config, trajectory_every=math.ceil(config.steps / VIDEO_FRAMES))
    return config


def _checkpoint_stamp(path: Path) -> tuple:
    """Modification times that change when a checkpoint directory is rewritten."""
    stamp = []
    for part in (path, path / checkpoint.CONFIG_FILE, path / checkpoint.PARAMS_DIR):
        try:
            stamp.append(part.stat().st_mtime_ns)
        except OSError:
            stamp.append(None)
    return tuple(stamp)


@functools.lru_cache(maxsize=2)
def _prior(path: str, stamp: tuple):
    """(denoiser, UNetConfig), cached while the checkpoint is unchanged: repeated runs in one process
    (a notebook, the tests) reuse the loaded weights and the compiled sampler."""
    del stamp  # part of the cache key only
    params, config = checkpoint.load(path)
    return make_denoiser(UNet(config), params), config


def _load_prior(weights: Path):
    if weights.is_file():
        _fail(f"--weights {weights} is a file; it needs a checkpoint directory. Convert a PyTorch .pt file "
              f"with: python -m convert {weights} --config NAME --out DIR, then pass --weights DIR")
    try:
        return _prior(str(weights.resolve()), _checkpoint_stamp(weights))
    except (FileNotFoundError, ValueError) as error:
        _fail(f"cannot load weights from {weights}: {error}")


@functools.lru_cache(maxsize=8)
def _operator(task: str, size: int, sigma_y: float | None) -> operators.Operator:
    return operators.get(task, size, **({} if sigma_y is None else {"sigma_y": sigma_y}))


def _unique_names(paths: list[Path]) -> list[str]:
    names, seen = [], {}
    for path in paths:
        stem = path.stem
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


def _run_folders(out: Path, lrs: tuple[float, ...] | None) -> list[Path]:
    """One folder per run: out itself, or out/lr-VALUE for each rate of a sweep."""
    return [out] if lrs is None else [out / f"lr-{lr:g}" for lr in lrs]


def _planned_outputs(out: Path, names: list[str], folders: list[Path], args) -> list[Path]:
    fixed = [out / n for n in ("grid.png", "config.json", "measurement.npz")]
    fixed += [out / "measurement" / f"{name}.png" for name in names]
    if len(folders) > 1 or folders[0] != out:
        fixed += [out / "sweep.md", out / "sweep.png"]
    for folder in folders:
        fixed += [folder / "metrics.json"] + [folder / "restored" / f"{name}.png" for name in names]
        fixed += [folder / n for n in ("diagnostics.png", "diagnostics.npz")] if args.diagnostics else []
        fixed += [folder / "video" / f"{name}.gif" for name in names] if args.video else []
        fixed += [folder / "samples.npz"] + [folder / "std" / f"{n}.png" for n in names] if args.samples > 1 else []
    return fixed


def _prepare_out(out: Path, planned: list[Path], overwrite: bool) -> bool:
    """Refuses existing outputs (unless overwrite) and unwritable folders; returns whether out was created."""
    existing = [p for p in planned if p.exists()]
    if existing and not overwrite:
        shown = ", ".join(str(p) for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
        _fail(f"{len(existing)} output file(s) already exist ({shown}); pass --overwrite to replace them "
              "or choose another --out")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        _fail(f"cannot write to output folder {out} ({error.strerror}); choose a writable --out")
    return created


def _measurement_picture(y: np.ndarray, size: int) -> np.ndarray:
    """A (size, size, 3) picture in [-1, 1] of one measurement: images as they are (upsampled by
    nearest neighbour when smaller), anything else (e.g. Fourier magnitudes) on a log scale."""
    y = np.asarray(y, dtype=np.float32)
    if y.ndim < 2:
        y = np.zeros((size, size, 3), np.float32)
    elif y.ndim != 3 or y.shape[-1] != 3:
        y = np.broadcast_to(y.reshape(y.shape[0], -1, 1)[..., :1], (y.shape[0], y.shape[0], 3))
    y = np.nan_to_num(y, nan=0.0, posinf=0.0, neginf=0.0)
    if y.min() < -1.5 or y.max() > 1.5:  # not an image in [-1, 1]: show log magnitude
        y = np.log1p(np.abs(y))
        y = 2 * (y - y.min()) / max(float(y.max() - y.min()), 1e-12) - 1
    if y.shape[0] != size:
        idx = np.arange(size) * y.shape[0] // size
        y = y[idx][:, idx]
    return np.clip(y, -1, 1)


def _load_measurement(path: str, task: str):
    """(y (B, ...), params dict, names) from a measurement.npz written by this tool."""
    try:
        with open(path, "rb") as stream:
            data = np.load(stream, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("it holds one unnamed array")
            y = np.asarray(data["y"], dtype=np.float32)
            params = {key[len("param_"):]: data[key] for key in data.files if key.startswith("param_")}
            default_names = [f"image{i:03d}" for i in range(len(y))]
            names = [str(n) for n in data["names"]] if "names" in data.files else default_names
            made_for = str(data["task"]) if "task" in data.files else None
    except FileNotFoundError:
        _fail(f"measurement file {path} does not exist")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        _fail(f"{path} is not a measurement .npz written by spgd_jax.restore (needs an array 'y'): {error}")
    if made_for is not None and made_for != task:
        _fail(f"{path} is a measurement of task {made_for!r}, not {task!r}; pass --task {made_for}")
    if y.ndim < 1 or len(y) == 0 or len(names) != len(y):
        _fail(f"{path} holds {len(names)} name(s) for measurements y of shape {y.shape}; write it again with this tool")
    return y, params, names


def _check_measurement(path: str, y: np.ndarray, params: dict, operator, size: int) -> None:
    """The measurement must fit the operator at the model's size: same parameter names and shapes and y shape."""
    expected_params = jax.tree_util.tree_map(np.asarray, operator.init_params(jax.random.key(0), 1, size))
    if set(params) != set(expected_params or {}):
        _fail(f"{path} holds operator parameters {sorted(params)}, but task {operator.name!r} at {size} px needs "
              f"{sorted(expected_params or {})}; make the measurement with the same --task and --weights")
    for name, value in params.items():
        if value.shape[0] != len(y) or value.shape[1:] != expected_params[name].shape[1:]:
            _fail(f"{path}: parameter {name!r} has shape {value.shape}, task {operator.name!r} at {size} px needs "
                  f"({len(y)}, {', '.join(map(str, expected_params[name].shape[1:]))}); make the measurement with "
                  f"the same --task and --weights")
    one = jax.tree_util.tree_map(lambda a: a[0], expected_params) if expected_params else None
    expected_y = jax.eval_shape(operator.forward, jax.ShapeDtypeStruct((size, size, 3), jnp.float32), one).shape
    if y.shape[1:] != expected_y:
        _fail(f"{path}: each measurement has shape {y.shape[1:]}, but task {operator.name!r} with a {size} px model "
              f"makes {expected_y}; restore it with the weights (image size) and task it was made for")


def _restore(denoiser, operator, y, op_params, key, config, lrs, batch: int, size: int, label: str, quiet: bool):
    """Every image, in chunks of `batch` split over the devices -> dict of NumPy arrays with a leading axis
    L (the learning rates; 1 without a sweep): x, diverged, diverged_step, trajectory, diagnostics."""
    parts = []
    chunks = range(0, len(y), batch)
    for number, start in enumerate(chunks):
        stop = min(start + batch, len(y))
        pad = batch - (stop - start)  # pad the last chunk so every chunk reuses one compiled call
        take = lambda a: np.concatenate([a[start:stop]] + [a[stop - 1 : stop]] * pad) if pad else a[start:stop]
        _PROGRESS.reset(config.steps, f"{label} {number + 1}/{len(chunks)}", not quiet)
        try:
            result = sharding.sample_sharded(
                denoiser, operator.forward, take(y), jax.random.fold_in(key, number), config,
                jax.tree_util.tree_map(lambda a: take(np.asarray(a)), op_params),
                x_shape=(size, size, 3), progress=_PROGRESS, lrs=lrs,
            )
        except (TypeError, ValueError) as error:
            _fail(str(error))
        keep = stop - start
        result = result._asdict()
        if lrs is None:  # a leading axis of one learning rate
            result = jax.tree_util.tree_map(lambda a: np.asarray(a)[None], result)
        parts.append(jax.tree_util.tree_map(lambda a: np.asarray(a)[:, :keep], result))
    return jax.tree_util.tree_map(lambda *a: np.concatenate(a, axis=1), *parts)


def combine_samples(runs: dict, samples: int) -> dict:
    """Runs of B * K items (image-major, leading axis L) -> runs of B images: x the mean of each image's
    samples that did not diverge (of all K when every one did), diverged if every sample did, diverged_step
    the first step a sample diverged at (-1: none did); with K > 1 also 'samples' (L, B, K, H, W, C) and
    'diverged_samples' (L, B), how many of the K diverged."""
    if samples == 1:
        return runs
    split = lambda a: a.reshape(a.shape[:1] + (-1, samples) + a.shape[2:])
    x, diverged, step = split(runs["x"]), split(runs["diverged"]), split(runs["diverged_step"])
    use = np.where(diverged.all(axis=2, keepdims=True), True, ~diverged)[..., None, None, None]
    first = np.where(diverged, step, np.iinfo(np.int32).max).min(axis=2)
    return {"x": np.sum(np.where(use, x, 0.0), axis=2) / np.sum(use, axis=2), "samples": x,
            "diverged": diverged.all(axis=2), "diverged_step": np.where(diverged.any(axis=2), first, -1),
            "diverged_samples": diverged.sum(axis=2)}


def _summary(values: dict[str, np.ndarray], finite: np.ndarray) -> dict:
    return {k: {"mean": float(v[finite].mean()) if finite.any() else None,
                "std": float(v[finite].std()) if finite.any() else None} for k, v in values.items()}


def _video_frames(trajectory: np.ndarray, x: np.ndarray, diverged_step: int, every: int) -> np.ndarray:
    """x0_hat at outer steps 0, every, 2 every, ... (those before a divergence), then the result x."""
    if diverged_step >= 0:
        trajectory = trajectory[: -(-diverged_step // every)]  # the steps s * every < diverged_step
    return np.concatenate([trajectory, x[None]])


def _residual_rms(operator, x: np.ndarray, y: np.ndarray, op_params) -> np.ndarray:
    """(B,) sqrt(mean((A(x_b) - y_b)^2)): how well each restoration explains its measurement."""
    forward = jax.vmap(operator.forward) if op_params else jax.vmap(lambda image: operator.forward(image, None))
    predicted = forward(jnp.asarray(x), *([op_params] if op_params else []))
    residual = np.asarray(predicted, np.float64) - np.asarray(y, np.float64)
    return np.sqrt(np.mean(residual**2, axis=tuple(range(1, np.ndim(y)))))


def _write_run(folder: Path, names, run: dict, truth, y, op_params, operator, config, args, lr) -> dict:
    """One run's restored/, metrics.json, diagnostics and videos in folder; returns its metric summary."""
    x, diverged, diverged_step = run["x"], run["diverged"], run["diverged_step"]
    per_image = [{"name": name, "diverged": bool(flag)} for name, flag in zip(names, diverged)]
    rate = getattr(config, "lr", None) if lr is None else lr  # None for DPS
    hint = "a smaller --zeta" if rate is None else f"a smaller --lr (this run: {rate:g})"
    where = "" if lr is None else f" at lr {lr:g}"
    lost = run.get("diverged_samples", diverged.astype(int))  # how many of the image's samples diverged
    for record, count, step in zip(per_image, lost, diverged_step):
        if not count:
            continue
        record["diverged_at_step"] = int(step)
        if args.samples == 1:
            print(f"warning: {record['name']}{where} diverged (became NaN or inf) at outer step {int(step)}; "
                  f"its image is the last finite state. Try {hint}.", file=sys.stderr)
            continue
        record["diverged_samples"] = int(count)
        rest = (f"the restoration is the mean of the other {args.samples - count}" if count < args.samples
                else "the restoration is the mean of their last finite states")
        print(f"warning: {count} of {args.samples} samples of {record['name']}{where} diverged (became NaN or inf), "
              f"the first at outer step {int(step)}; {rest}. Try {hint}.", file=sys.stderr)
    values = {"residual_rms": _residual_rms(operator, x, y, op_params)}
    if truth is not None:
        found = metrics.all_metrics(jnp.asarray(x), jnp.asarray(truth))
        values.update({k: np.asarray(v) for k, v in found.items()})
    for i, record in enumerate(per_image):
        record.update({k: float(v[i]) for k, v in values.items()})
    summary = _summary(values, ~diverged)

    (folder / "restored").mkdir(parents=True, exist_ok=True)
    for name, image in zip(names, x):
        images.save_png(folder / "restored" / f"{name}.png", image)
    if args.samples > 1:
        _write_samples(folder, names, run["samples"], truth, per_image)
    if args.video:
        (folder / "video").mkdir(exist_ok=True)
        for b, name in enumerate(names):
            frames = _video_frames(run["trajectory"][b], x[b], int(diverged_step[b]), config.trajectory_every)
            diagnostics.save_gif(folder / "video" / f"{name}.gif", frames)
    if args.diagnostics:
        angles = {k: np.asarray(v) for k, v in run["diagnostics"].items()}
        _write_npz(folder / "diagnostics.npz", names=np.asarray(names), diverged_step=diverged_step, **angles)
        diagnostics.plot_angles(folder / "diagnostics.png", {k: v[~diverged] for k, v in angles.items()},
                                title=f"{args.task}, SPGD, lr {rate:g}")
    _write_json(folder / "metrics.json", {
        **({} if lr is None else {"lr": lr}),
        **({} if args.samples == 1 else {"samples": args.samples, "restored": "the mean of the samples"}),
        "lpips": metrics.LPIPS_NAME,
        "residual_rms": "sqrt(mean((A(x) - y)^2)) per image in [-1, 1] units; compare with sigma_y",
        "mean_std_over_finite_images": summary,
        "images": per_image,
    })
    return summary


def _write_samples(folder: Path, names, samples: np.ndarray, truth, per_image: list[dict]) -> None:
    """samples.npz (every sample, (B, K, H, W, C) in [-1, 1]), std/NAME.png (per-pixel std of the samples,
    mean over channels: black 0, white STD_WHITE or more) and, against the truth, each sample's PSNR."""
    std = samples.std(axis=1).mean(axis=-1)  # (B, H, W)
    _write_npz(folder / "samples.npz", samples=samples.astype(np.float32), std=std.astype(np.float32),
               names=np.asarray(names))
    (folder / "std").mkdir(exist_ok=True)
    for name, image in zip(names, std):
        gray = np.clip(image / STD_WHITE, 0.0, 1.0) * 2.0 - 1.0
        images.save_png(folder / "std" / f"{name}.png", np.repeat(gray[..., None], 3, axis=-1))
    for record, image_std in zip(per_image, std):
        record["std_mean"] = float(image_std.mean())
    if truth is not None:
        for record, image_samples, reference in zip(per_image, samples, truth):
            scores = metrics.psnr(jnp.asarray(image_samples), jnp.broadcast_to(reference, image_samples.shape))
            record["sample_psnr"] = [float(v) for v in scores]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    task = args.task
    batch = 4 * jax.local_device_count() if args.batch_size is None else args.batch_size
    if batch < 1:
        _fail(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.samples < 1:
        _fail(f"--samples must be >= 1, got {args.samples}")
    if args.samples > 1 and (args.video or args.diagnostics):
        _fail("--video and --diagnostics follow one sample's run; leave them out or use --samples 1")
    if args.measurement and args.input:
        _fail("give either --input (images to degrade) or --measurement (an existing measurement), not both")
    weights = Path(args.weights) if args.weights else default_weights_path()
    try:
        config = _sampler_config(args, task, tuned=weights.resolve() == default_weights_path().resolve())
    except (TypeError, ValueError) as error:
        _fail(str(error))
    lrs = args.lr if args.lr and len(args.lr) > 1 else None

    denoiser, unet_config = _load_prior(weights)
    size = unet_config.image_size
    try:
        operator = _operator(task, size, args.sigma_y)
    except ValueError as error:
        _fail(str(error))

    notices: list[str] = []
    truth = None
    key_operator, key_noise, key_sample = jax.random.split(jax.random.key(args.seed), 3)
    if args.measurement:
        y, op_params, names = _load_measurement(args.measurement, task)
        _check_measurement(args.measurement, y, op_params, operator, size)
    else:
        try:
            paths = [images.demo_image_path()] if args.input is None else images.find_images(args.input)
            truth = np.stack([images.load_image(p, size, notices) for p in paths])
        except (FileNotFoundError, ValueError) as error:
            _fail(str(error))
        names = _unique_names(paths)
        op_params = operator.init_params(key_operator, len(truth), size)
        y = np.asarray(operator.measure(key_noise, jnp.asarray(truth), op_params))
    op_params = {k: np.asarray(v) for k, v in dict(op_params or {}).items()}
    if not args.quiet:
        for notice in notices:
            print(f"notice: {notice}", file=sys.stderr)

    out = Path(args.out or f"restored-{task}")
    folders = _run_folders(out, lrs)
    created = _prepare_out(out, _planned_outputs(out, names, folders, args), args.overwrite)
    try:
        repeat = lambda a: np.repeat(np.asarray(a), args.samples, axis=0)  # image-major: image b's samples in a row
        batch = min(batch, len(y) * args.samples)
        runs = _restore(denoiser, operator, repeat(y), {k: repeat(v) for k, v in op_params.items()}, key_sample,
                        config, lrs, batch, size, f"{args.sampler} {task}", args.quiet)
        runs = combine_samples(runs, args.samples)
        _write_outputs(out, folders, names, runs, truth, y, op_params, operator, config, lrs, args, weights,
                       unet_config, batch)
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()  # leave no empty folder behind an error or Ctrl-C
        raise
    return 0


def _write_outputs(out, folders, names, runs, truth, y, op_params, operator, config, lrs, args, weights,
                   unet_config, batch) -> None:
    size = unet_config.image_size
    pictures = [_measurement_picture(yi, size) for yi in y]
    (out / "measurement").mkdir(exist_ok=True)
    for name, picture in zip(names, pictures):
        images.save_png(out / "measurement" / f"{name}.png", picture)
    _write_npz(out / "measurement.npz", y=np.asarray(y), names=np.asarray(names), task=np.asarray(args.task),
               **{f"param_{k}": v for k, v in op_params.items()})
    summaries = []
    for k, folder in enumerate(folders):
        run = jax.tree_util.tree_map(lambda a: a[k], runs)
        summaries.append(_write_run(folder, names, run, truth, y, op_params, operator, config, args,
                                    None if lrs is None else lrs[k]))
    rows = [np.concatenate(([truth[i]] if truth is not None else []) + [pictures[i]] + list(runs["x"][:, i]), axis=1)
            for i in range(len(names))]
    images.save_png(out / "grid.png", np.concatenate(rows, axis=0))
    if lrs is not None:
        diverged = [int(d.sum()) for d in runs["diverged"]]
        title = f"{args.task}: SPGD learning-rate sweep ({len(names)} image(s), T={config.steps}, N={config.warmup})"
        _write_text(out / "sweep.md", sweep.markdown_table(lrs, summaries, diverged, len(names), title))
        sweep.plot_sweep(out / "sweep.png", lrs, summaries, title)
    _write_json(out / "config.json", {
        "task": args.task,
        "operator": {"sigma_y": operator.sigma_y, **dict(operator.settings)},
        "sampler": args.sampler,
        "sampler_config": {**dataclasses.asdict(config), **({} if lrs is None else {"lr": list(lrs)})},
        "learning_rates": None if lrs is None else list(lrs),
        "weights": str(weights),
        "unet_config": unet_config.to_dict(),
        "seed": args.seed,
        "samples": args.samples,
        "batch_size": batch,
        "devices": [str(d) for d in jax.local_devices()],
        "input": None if args.measurement else (args.input or str(images.demo_image_path())),
        "measurement": args.measurement,
        "versions": {"jax": jax.__version__, "spgd_jax": _version()},
    })
    if not args.quiet:
        print(f"wrote {len(names)} restored image(s) to {out}", file=sys.stderr)
        for lr, summary in zip(lrs or [None], summaries):
            shown = "  ".join(f"{k} {v['mean']:.4f}" for k, v in summary.items() if v["mean"] is not None)
            print(f"  {'' if lr is None else f'lr {lr:g}: '}{shown}", file=sys.stderr)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spgd-jax")
    except PackageNotFoundError:
        return "unknown"


def _atomic_write(path: Path, write) -> None:
    """write(stream) into a temporary file beside path, then rename it into place (never half-written)."""
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda stream: stream.write(text.encode()))


def _write_json(path: Path, data) -> None:
    _write_text(path, json.dumps(data, indent=2) + "\n")


def _write_npz(path: Path, **arrays) -> None:
    _atomic_write(path, lambda stream: np.savez(stream, **arrays))


def _entry() -> int:
    try:
        return main()
    except KeyboardInterrupt:
        print("\ninterrupted: every file written so far is complete; nothing half-written was left", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(_entry())
