"""Restoration quality of the default prior on held-out faces: the paper's Tables 1-3.

    python benchmarks/quality.py --table 1            # SPGD, DPS (equal NFE), classical per task
    python benchmarks/quality.py --table 2            # warm-up x ADM ablation (inpaint, sr4)
    python benchmarks/quality.py --table 3            # N in {1, 2, 5, 10} at T = 100 (inpaint)

Images: the first --count names of the fixed validation split (weights/validation_split.txt;
never trained on), centre-cropped and resized to the model's size. Every image gets its own
operator parameters, noise and sampler key from --seed, the same for every method. Writes
benchmarks/results/quality_table{N}_{device}.json and .md: mean and std over images of
PSNR, SSIM (dm-pix) and LPIPS (AlexNet v0.1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spgd_jax import checkpoint, images, metrics, operators, presets  # noqa: E402
from spgd_jax.baselines import classical  # noqa: E402
from spgd_jax.denoiser import make_denoiser  # noqa: E402
from spgd_jax.sampling import sample  # noqa: E402
from spgd_jax.unet import UNet  # noqa: E402

TABLE1_TASKS = ("inpaint", "gauss_deblur", "motion_deblur", "sr4")


def load_validation(data: Path, split: Path, count: int, size: int, skip: int = 0) -> tuple[np.ndarray, list[str]]:
    """(count, size, size, 3) in [-1, 1]: validation images skip .. skip+count-1 of the split file."""
    if not data.is_dir():
        raise SystemExit(f"error: data folder {data} does not exist; pass --data (the face folders)")
    names = [n for n in split.read_text().split("\n") if n.strip()][skip : skip + count]
    if len(names) < count:
        raise SystemExit(f"error: {split} lists {len(names)} images after skipping {skip}, fewer than --count {count}")
    return np.stack([images.load_image(data / n, size) for n in names]), names


def degrade(task: str, x: np.ndarray, seed: int):
    """(operator, params, y) with per-image parameters and noise from `seed`."""
    operator = operators.get(task, x.shape[1])
    key_params, key_noise = jax.random.split(jax.random.fold_in(jax.random.key(seed), 1))
    params = operator.init_params(key_params, len(x), x.shape[1])
    return operator, params, operator.measure(key_noise, jnp.asarray(x), params)


def restore(method, denoiser, operator, params, y, x_shape, seed: int, batch: int) -> np.ndarray:
    """Restored images (B, H, W, C); method is a sampler config or 'classical'."""
    if method == "classical":
        return np.asarray(jax.jit(jax.vmap(classical(operator, x_shape[0])))(y, params))
    key = jax.random.fold_in(jax.random.key(seed), 2)
    keys = jax.random.split(key, len(y))  # one key per image: results do not depend on the batching
    out = []
    for start in range(0, len(y), batch):
        part = slice(start, start + batch)
        result = sample(denoiser, operator.forward, y[part], keys[part], method,
                        jax.tree_util.tree_map(lambda a: a[part], params), x_shape=x_shape)
        out.append(np.asarray(result.x))
    return np.concatenate(out)


def score(restored: np.ndarray, x: np.ndarray) -> dict[str, dict[str, float]]:
    values = metrics.all_metrics(jnp.asarray(restored), jnp.asarray(x))
    return {k: {"mean": float(np.mean(v)), "std": float(np.std(v))} for k, v in values.items()}


def rows_for_table(table: int, tasks: list[str], steps: int, warmup: int):
    """[(row label, task, method)] for the table."""
    rows = []
    if table == 1:
        for task in tasks:
            rows.append(("SPGD", task, presets.spgd_config(task, steps=steps, warmup=warmup)))
            rows.append((f"DPS ({steps * warmup} steps, equal NFE)", task, presets.dps_config(task, steps=steps * warmup)))
            rows.append(("classical", task, "classical"))
    elif table == 2:
        for task in tasks:
            for label, n, adm in (("no warm-up, no ADM", 1, "off"), ("ADM only", 1, "paper"),
                                  ("warm-up only", warmup, "off"), ("warm-up + ADM", warmup, "paper")):
                rows.append((label, task, presets.spgd_config(task, steps=steps, warmup=n, adm=adm)))
    else:
        for task in tasks:
            for n in (1, 2, 5, 10):
                rows.append((f"N = {n}", task, presets.spgd_config(task, steps=steps, warmup=n)))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=int, choices=(1, 2, 3), default=1)
    parser.add_argument("--tasks", help="comma-separated tasks (default: the table's)")
    parser.add_argument("--weights", default=str(REPO / "weights" / "default64"))
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "faces"))
    parser.add_argument("--split", default=str(REPO / "weights" / "validation_split.txt"))
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--skip", type=int, default=0, help="start at this image of the split")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--tag", default="cpu", help="device name for the file names")
    args = parser.parse_args(argv)

    params_unet, unet_config = checkpoint.load(args.weights)
    denoiser = make_denoiser(UNet(unet_config), params_unet)
    size = unet_config.image_size
    x, names = load_validation(Path(args.data), Path(args.split), args.count, size, args.skip)
    default_tasks = {1: TABLE1_TASKS, 2: ("inpaint", "sr4"), 3: ("inpaint",)}[args.table]
    tasks = args.tasks.split(",") if args.tasks else list(default_tasks)

    records = []
    for label, task, method in rows_for_table(args.table, tasks, args.steps, args.warmup):
        operator, params, y = degrade(task, x, args.seed)
        start = time.perf_counter()
        restored = restore(method, denoiser, operator, params, y, (size, size, 3), args.seed, args.batch)
        seconds = time.perf_counter() - start
        record = {"row": label, "task": task, "seconds": seconds, **score(restored, x),
                  "config": "classical" if method == "classical" else {"type": type(method).__name__, **dataclasses.asdict(method)}}
        records.append(record)
        print(f"{task:14s} {label:32s} PSNR {record['psnr']['mean']:.2f}  SSIM {record['ssim']['mean']:.3f}  "
              f"LPIPS {record['lpips']['mean']:.3f}  ({seconds:.0f} s)", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"quality_table{args.table}_{args.tag}"
    meta = {"table": args.table, "weights": args.weights, "unet_config": unet_config.to_dict(), "images": names,
            "count": args.count, "skip": args.skip, "seed": args.seed, "lpips": metrics.LPIPS_NAME,
            "device": str(jax.devices()[0]), "jax": jax.__version__, "load_average": os.getloadavg()}
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": records}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(records, meta))
    print(f"wrote {stem}.json and .md")
    return 0


def markdown(records, meta) -> str:
    lines = [f"# Quality, table {meta['table']}: {meta['count']} validation faces at "
             f"{meta['unet_config']['image_size']} px, seed {meta['seed']}",
             "", f"PSNR (dB) / SSIM / {meta['lpips']}: mean ± std over images. Device: {meta['device']}.", "",
             "| task | method | PSNR | SSIM | LPIPS | seconds |", "|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['task']} | {r['row']} | {r['psnr']['mean']:.2f} ± {r['psnr']['std']:.2f} | "
                     f"{r['ssim']['mean']:.3f} ± {r['ssim']['std']:.3f} | {r['lpips']['mean']:.3f} ± {r['lpips']['std']:.3f} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
