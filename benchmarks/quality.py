"""Restoration quality of the default prior on held-out faces: the paper's Tables 1-3.

Three stages, so that the sampling can run on a lent GPU (JAX only) and the scoring here:

    python -m benchmarks.quality images   --out val64.npz              # ground truth: split images, uint8
    python -m benchmarks.quality generate --images val64.npz --out Q   # sample (JAX only; GPU or CPU)
    python -m benchmarks.quality score    --images val64.npz --run Q   # metrics -> benchmarks/results/

Jobs may be split over machines or sessions (--jobs) and their runs joined before scoring:

    python -m benchmarks.quality merge --runs Q1 Q2 --out Q           # same images, seed, T and N

It imports spgd_jax's public API alone and runs with the package installed (pip install -e .), as a module
from the repository root. Its parts: quality_jobs (the plan), quality_generate (measurements, programs,
sampling), quality_report (merge, metrics, tables), quality_bars (SPGD against the baselines).

Images: the first TEST + TUNE names of the fixed validation split (weights/validation_split.txt;
never trained on), centre-cropped and resized to the model's size, stored as uint8. Images
0..TEST-1 are the test set of every table; images TEST.. tune the step sizes: Table 1 runs SPGD
over learning rates and DPS over zetas on all images, picks per task the value with the best mean
PSNR on the tuning images alone, and reports the test images at that value. Tables 2 and 3 and the
bfloat16 check then use the picked learning rate. Every image gets its own operator parameters,
noise and sampler key from --seed, the same for every method and value.

generate writes Q/manifest.json and one Q/<job>.npz per job: the test images' restorations at
the picked value (uint8) and the PSNR of every image at every value. It compiles every program
ahead of time (params are arguments; threads), then waits for --weights to appear if it does not
exist yet (so it can compile while the prior is still training), and runs the jobs in order of
importance within --budget-s. score computes PSNR, SSIM (dm-pix) and LPIPS (AlexNet v0.1) with
mean and std over the test images, the classical baselines, and writes quality_*_{tag}.json/.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:  # run as a file: its sibling modules are not importable as benchmarks.x
    raise SystemExit("run the quality benchmark as a module, from the repository root: python -m benchmarks.quality")

from benchmarks.quality_generate import generate, make_images  # noqa: E402
from benchmarks.quality_jobs import LR_FACTORS, METHOD_FACTORS, ZETA_FACTORS  # noqa: E402
from benchmarks.quality_report import merge, score  # noqa: E402
from spgd_jax.xla_setup.compile_cache import enable_compilation_cache  # noqa: E402
from spgd_jax.xla_setup.cpu_flags import use_fast_cpu_flags  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("images", help="write the ground-truth images (uint8 npz)")
    p.add_argument("--weights", help="for the image size (default: spgd_jax.default_weights_path())")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "faces"),
                   help="folder of the face folders (celeba/, utkface/) named in --split; not in the repository "
                        "(default: ../shared/data/faces beside the clone)")
    p.add_argument("--split", default=str(REPO / "weights" / "validation_split.txt"))
    p.add_argument("--count", type=int, default=82)
    p.add_argument("--out", required=True)
    p = sub.add_parser("generate", help="run the samplers (JAX only)")
    p.add_argument("--images", required=True)
    p.add_argument("--weights", help="weights folder; may appear later (then --config gives the architecture); "
                   "default: spgd_jax.default_weights_path()")
    p.add_argument("--config", help="a checkpoint's config.json (or folder) of the architecture, when --weights "
                   "does not exist yet")
    p.add_argument("--out", required=True)
    p.add_argument("--test", type=int, default=50)
    p.add_argument("--tune", type=int, default=32, help="tuning images (0: no sweeps, one factor each)")
    p.add_argument("--tasks", help="comma-separated (default: inpaint,gauss_deblur,motion_deblur,sr4)")
    p.add_argument("--tables", help="comma-separated subset of 1,2,3,bf16 (default: all)")
    p.add_argument("--jobs", help="comma-separated job name prefixes, e.g. t1_spgd (default: all)")
    factors = lambda text: tuple(float(v) for v in text.split(","))
    p.add_argument("--lr-factors", type=factors, default=LR_FACTORS, help="SPGD sweep, x the preset lr")
    p.add_argument("--zeta-factors", type=factors, default=ZETA_FACTORS, help="DPS sweep, x the preset zeta")
    p.add_argument("--methods", default="all",
                   help="Table 1's other methods: comma-separated registered sampler names, 'all' (default: every "
                        "restoring sampler of spgd_jax.samplers.SAMPLERS) or '' (SPGD and equal-NFE DPS only)")
    p.add_argument("--method-factors", type=factors, default=METHOD_FACTORS,
                   help="the other methods' step-size sweeps, x their presets")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=1e9, help="skip jobs that would end later than this")
    p.add_argument("--compile-workers", type=int, default=4)
    p.add_argument("--batch", type=int, default=0, help="images per compiled call (default 0: all of a job's); each "
                   "batch's rows are kept in OUT/rows/JOB, so a re-run restores only the images without a row")
    p = sub.add_parser("merge", help="join generate runs of other jobs on the same test images")
    p.add_argument("--runs", nargs="+", required=True, help="generate output folders")
    p.add_argument("--out", required=True, help="a new folder")
    p = sub.add_parser("score", help="metrics and tables from a generate (or merge) run")
    p.add_argument("--images", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--tag", required=True, help="file name tag, e.g. h200-50img")
    p.add_argument("--weights-name", help="how the tables name the weights (default: the path generate used)")
    p.add_argument("--compare", nargs="+", help="earlier results (quality_*.json, same test images and seed) whose "
                   "rows join the tables and the paired gains, e.g. SPGD's rows of another run")
    args = parser.parse_args(argv)
    use_fast_cpu_flags()  # before JAX starts its backends; SPGD_JAX_CPU_FLAGS=0 turns it off
    enable_compilation_cache()  # SPGD_JAX_NO_CACHE=1 turns it off
    return {"images": make_images, "generate": generate, "merge": merge, "score": score}[args.stage](args)


if __name__ == "__main__":
    sys.exit(main())
