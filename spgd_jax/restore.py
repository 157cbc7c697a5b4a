"""The command line: degrade images with a task's operator, restore them, write the results.

    python -m spgd_jax.restore --task sr4                       # the demo photo, the default prior
    python -m spgd_jax.restore --task inpaint --input faces/ --out runs/inpaint
    python -m spgd_jax.restore --task sr4 --measurement runs/sr4/measurement.npz

Writes into --out: restored/NAME.png, measurement/NAME.png (a picture of y),
measurement.npz (y and the operator's per-image parameters: feed it back with
--measurement), grid.png (input | measurement | restored), metrics.json (PSNR,
SSIM, LPIPS against the input, when the input is the ground truth) and
config.json (every setting used). Existing outputs are never replaced without
--overwrite; every file is written atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from spgd_jax import checkpoint, images, metrics, operators, presets
from spgd_jax.denoiser import make_denoiser
from spgd_jax.sampling import sample
from spgd_jax.unet import UNet

__all__ = ["main", "build_parser", "default_weights_path"]


def default_weights_path() -> Path:
    """The project's default 64 px face prior (weights/default64 beside the package)."""
    return Path(__file__).resolve().parent.parent / "weights" / "default64"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m spgd_jax.restore",
        description="Restore degraded images with SPGD (or DPS) and a diffusion prior.",
    )
    parser.add_argument("--task", required=True, choices=operators.TASKS, help="degradation to undo")
    parser.add_argument("--input", help="image file, folder or glob (default: matplotlib's Grace Hopper photo)")
    parser.add_argument("--measurement", help="restore this measurement (.npz written by this tool) instead of degrading --input")
    parser.add_argument("--weights", help="checkpoint directory (default: the embedded 64 px face prior)")
    parser.add_argument("--out", help="output folder (default: restored-TASK)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--sampler", choices=("spgd", "dps"), default="spgd")
    parser.add_argument("--steps", type=int, help="outer steps T (default 100 for SPGD, 500 for DPS: equal NFEs)")
    parser.add_argument("--warmup", type=int, help="SPGD warm-up iterations N per step (default 5)")
    parser.add_argument("--lr", type=float, help="SPGD learning rate (default: the task's)")
    parser.add_argument("--beta", type=float, help="SPGD ADM momentum (default 0.9)")
    parser.add_argument("--adm", choices=("paper", "off", "reference_cosine"), help="ADM variant (default paper)")
    parser.add_argument("--zeta", type=float, help="DPS step size (default: the task's)")
    parser.add_argument("--sigma-y", type=float, help="measurement noise std in [-1, 1] units (default: the task's)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed for operator, noise and sampler")
    parser.add_argument("--batch-size", type=int, default=4, help="images restored per compiled call")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or notices")
    return parser


class _ProgressBar:
    """A one-line progress bar over the outer steps, fed from inside the compiled loop."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled = total, label, enabled
        self.done, self.start = 0, time.perf_counter()

    def __call__(self, step: int) -> None:
        self.done += 1
        if not self.enabled:
            return
        width = 30
        filled = width * self.done // self.total
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {elapsed:6.1f}s")
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _fail(message: str) -> None:
    raise SystemExit(f"error: {message}")


def _sampler_config(args, task: str):
    if args.sampler == "spgd":
        if args.zeta is not None:
            _fail("--zeta is a DPS setting; use --lr with --sampler spgd")
        return presets.spgd_config(task, steps=args.steps, warmup=args.warmup, lr=args.lr, beta=args.beta, adm=args.adm)
    for flag, value in (("--warmup", args.warmup), ("--lr", args.lr), ("--beta", args.beta), ("--adm", args.adm)):
        if value is not None:
            _fail(f"{flag} is an SPGD setting; use --zeta and --steps with --sampler dps")
    return presets.dps_config(task, steps=args.steps, zeta=args.zeta)


def _unique_names(paths: list[Path]) -> list[str]:
    names, seen = [], {}
    for path in paths:
        stem = path.stem
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


def _planned_outputs(out: Path, names: list[str]) -> list[Path]:
    fixed = [out / n for n in ("grid.png", "metrics.json", "config.json", "measurement.npz")]
    per_image = [out / sub / f"{name}.png" for name in names for sub in ("restored", "measurement")]
    return fixed + per_image


def _prepare_out(out: Path, names: list[str], overwrite: bool) -> None:
    existing = [p for p in _planned_outputs(out, names) if p.exists()]
    if existing and not overwrite:
        shown = ", ".join(str(p) for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
        _fail(f"{len(existing)} output file(s) already exist ({shown}); pass --overwrite to replace them or choose another --out")
    try:
        for sub in ("restored", "measurement"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        _fail(f"cannot write to output folder {out} ({error.strerror}); choose a writable --out")


def _measurement_picture(y: np.ndarray, size: int) -> np.ndarray:
    """A (size, size, 3) picture in [-1, 1] of one measurement: images as they are (upsampled by
    nearest neighbour when smaller), anything else (e.g. Fourier magnitudes) on a log scale."""
    y = np.asarray(y, dtype=np.float32)
    if y.ndim != 3 or y.shape[-1] != 3:
        y = np.broadcast_to(y.reshape(y.shape[0], -1, 1)[..., :1], (y.shape[0], y.shape[0], 3)) if y.ndim >= 2 else np.zeros((size, size, 3), np.float32)
    if y.min() < -1.5 or y.max() > 1.5:  # not an image in [-1, 1]: show log magnitude
        y = np.log1p(np.abs(y))
        y = 2 * (y - y.min()) / max(float(y.max() - y.min()), 1e-12) - 1
    if y.shape[0] != size:
        idx = np.arange(size) * y.shape[0] // size
        y = y[idx][:, idx]
    return np.clip(y, -1, 1)


def _load_measurement(path: str):
    """(y (B, ...), params pytree, names) from a measurement.npz written by this tool."""
    try:
        data = np.load(path, allow_pickle=False)
        y = data["y"]
        params = {key[len("param_"):]: data[key] for key in data.files if key.startswith("param_")}
        names = [str(n) for n in data["names"]] if "names" in data.files else [f"image{i:03d}" for i in range(len(y))]
    except FileNotFoundError:
        _fail(f"measurement file {path} does not exist")
    except (OSError, ValueError, KeyError) as error:
        _fail(f"{path} is not a measurement .npz written by spgd_jax.restore (needs an array 'y'): {error}")
    return y, params, names


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    task = args.task
    if args.batch_size < 1:
        _fail(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.measurement and args.input:
        _fail("give either --input (images to degrade) or --measurement (an existing measurement), not both")
    try:
        config = _sampler_config(args, task)
    except (TypeError, ValueError) as error:
        _fail(str(error))

    weights = Path(args.weights) if args.weights else default_weights_path()
    try:
        params_unet, unet_config = checkpoint.load(weights)
    except (FileNotFoundError, ValueError) as error:
        _fail(f"cannot load weights from {weights}: {error}")
    size = unet_config.image_size
    denoiser = make_denoiser(UNet(unet_config), params_unet)
    try:
        operator = operators.get(task, size, **({} if args.sigma_y is None else {"sigma_y": args.sigma_y}))
    except ValueError as error:
        _fail(str(error))

    notices: list[str] = []
    truth = None
    key = jax.random.key(args.seed)
    key_operator, key_noise, key_sample = jax.random.split(key, 3)
    if args.measurement:
        y, op_params, names = _load_measurement(args.measurement)
    else:
        paths = [images.demo_image_path()] if args.input is None else None
        try:
            paths = paths or images.find_images(args.input)
            truth = np.stack([images.load_image(p, size, notices) for p in paths])
        except (FileNotFoundError, ValueError) as error:
            _fail(str(error))
        names = _unique_names(paths)
        op_params = operator.init_params(key_operator, len(truth), size)
        y = np.asarray(operator.measure(key_noise, jnp.asarray(truth), op_params))
    if not args.quiet:
        for notice in notices:
            print(f"notice: {notice}", file=sys.stderr)

    out = Path(args.out or f"restored-{task}")
    _prepare_out(out, names, args.overwrite)

    restored, diverged, diverged_step = [], [], []
    batch = min(args.batch_size, len(y))
    chunks = range(0, len(y), batch)
    for number, start in enumerate(chunks):
        stop = min(start + batch, len(y))
        pad = batch - (stop - start)  # pad the last chunk so every chunk reuses one compiled call
        take = lambda a: np.concatenate([a[start:stop]] + [a[stop - 1 : stop]] * pad) if pad else a[start:stop]
        label = f"{args.sampler} {task} {number + 1}/{len(chunks)}"
        progress = _ProgressBar(config.steps, label, not args.quiet)
        try:
            result = sample(
                denoiser,
                operator.forward,
                jnp.asarray(take(y)),
                jax.random.fold_in(key_sample, number),
                config,
                jax.tree_util.tree_map(lambda a: jnp.asarray(take(np.asarray(a))), op_params),
                x_shape=(size, size, 3),
                progress=progress,
            )
        except (TypeError, ValueError) as error:
            _fail(str(error))
        keep = stop - start
        restored.append(np.asarray(result.x)[:keep])
        diverged.append(np.asarray(result.diverged)[:keep])
        diverged_step.append(np.asarray(result.diverged_step)[:keep])
    restored = np.concatenate(restored)
    diverged, diverged_step = np.concatenate(diverged), np.concatenate(diverged_step)

    per_image = [{"name": name} for name in names]
    for record, flag, step in zip(per_image, diverged, diverged_step):
        record["diverged"] = bool(flag)
        if flag:
            record["diverged_at_step"] = int(step)
            print(f"warning: {record['name']} diverged at outer step {int(step)}; it keeps its last finite state. "
                  f"Try a smaller learning rate (--lr) or step size (--zeta).", file=sys.stderr)
    summary = {}
    if truth is not None:
        values = {k: np.asarray(v) for k, v in metrics.all_metrics(jnp.asarray(restored), jnp.asarray(truth)).items()}
        for i, record in enumerate(per_image):
            record.update({k: float(v[i]) for k, v in values.items()})
        finite = ~diverged
        summary = {k: {"mean": float(v[finite].mean()) if finite.any() else None,
                       "std": float(v[finite].std()) if finite.any() else None} for k, v in values.items()}

    for name, x, yi in zip(names, restored, y):
        images.save_png(out / "restored" / f"{name}.png", x)
        images.save_png(out / "measurement" / f"{name}.png", _measurement_picture(yi, size))
    rows = []
    for i, x in enumerate(restored):
        picture = _measurement_picture(y[i], size)
        rows.append(np.concatenate(([truth[i]] if truth is not None else []) + [picture, x], axis=1))
    images.save_png(out / "grid.png", np.concatenate(rows, axis=0))
    _write_npz(out / "measurement.npz", y=np.asarray(y), names=np.asarray(names),
               **{f"param_{k}": np.asarray(v) for k, v in dict(op_params or {}).items()})
    _write_json(out / "metrics.json", {"lpips": metrics.LPIPS_NAME, "mean_std_over_finite_images": summary,
                                       "images": per_image})
    _write_json(out / "config.json", {
        "task": task,
        "operator": {"sigma_y": operator.sigma_y, **dict(operator.settings)},
        "sampler": args.sampler,
        "sampler_config": dataclasses.asdict(config),
        "weights": str(weights),
        "unet_config": unet_config.to_dict(),
        "seed": args.seed,
        "batch_size": batch,
        "input": None if args.measurement else (args.input or str(images.demo_image_path())),
        "measurement": args.measurement,
        "versions": {"jax": jax.__version__, "spgd_jax": _version()},
        "device": str(jax.devices()[0]),
    })
    if not args.quiet:
        print(f"wrote {len(names)} restored image(s) to {out}", file=sys.stderr)
        if summary:
            print("  " + "  ".join(f"{k} {v['mean']:.4f}" for k, v in summary.items() if v["mean"] is not None), file=sys.stderr)
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spgd-jax")
    except PackageNotFoundError:
        return "unknown"


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _write_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as stream:
        np.savez(stream, **arrays)
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
