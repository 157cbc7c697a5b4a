"""spgd_jax's native CPU kernels against XLA's own ops: the whole SPGD sampler of a speed preset, both routes
compiled in one process and timed in turn, A B A B (issue 23). The kernels: GroupNorm's sums and GroupNorm
+ SiLU (spgd_jax.xla_setup.group_norm_kernels, against XLA's reductions and loops), the direct float32 3x3
convolution (spgd_jax.xla_setup.direct_conv, against XLA's convolution) or float32 attention
(spgd_jax.xla_setup.attention_kernels, against XLA's ops).

    python -m benchmarks.native_kernels --kernels group-norm --tag cpu-2core
    # -> benchmarks/results/group_norm_kernels_TAG.{json,md} (direct_conv_kernels_TAG, attention_kernels_TAG)

Each case (a compute of benchmarks.compute, a batch) is compiled with the kernels off (A) and on (B); then
`rounds` times A and B are each run once, and the row gives ms per image-NFE and the ratio A/B of each round
(above 1: the kernels are faster), with its median, so that the host's drift between rounds cancels. The
outputs of A and B are compared too: they differ by float32 round-off, amplified by the run.
Run it on a quiet machine: the load average is recorded beside the figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import spgd_jax  # noqa: F401  (the CPU flags the library compiles with)
import jax
import numpy as np

from benchmarks.speed_jax import Timings, make_inputs
from benchmarks.speed_setup import PRESETS, loadavg, write_report
from spgd_jax.xla_setup import attention_kernels, direct_conv, group_norm_kernels

REPO = Path(__file__).resolve().parents[1]
# name -> (the module of the kernels, an FFI target that a program using them calls, XLA's side, default cases)
KERNELS = {
    "group-norm": (group_norm_kernels, group_norm_kernels.MOMENTS_TARGET, "XLA's reductions and loops",
                   (("float32", 1), ("float32", 4), ("float32-bf16conv", 8))),
    "direct-conv": (direct_conv, direct_conv.TARGET, "XLA's convolution", (("float32", 1), ("float32", 4))),
    "attention": (attention_kernels, attention_kernels.FORWARD_TARGET, "XLA's ops",
                  (("float32", 1), ("float32", 4), ("float32-bf16conv", 8))),
}

__all__ = ["compare", "main"]


def _compiled(timings: Timings, kernels: str, compute: str, batch: int, on: bool):
    """The sampler of `timings` compiled with `kernels` on or off (the route is decided when tracing)."""
    module, target = KERNELS[kernels][:2]
    before = os.environ.get(module.ENV_OFF)
    os.environ[module.ENV_OFF] = "1" if on else "0"
    jax.clear_caches()
    try:
        lowered = timings.lower(compute, batch, "sample")
        return lowered.compile(), target in lowered.as_text()
    finally:
        if before is None:
            os.environ.pop(module.ENV_OFF)
        else:
            os.environ[module.ENV_OFF] = before
        jax.clear_caches()


def compare(timings: Timings, kernels: str, compute: str, batch: int, rounds: int) -> dict:
    """One case: A (kernels off) and B (on) compiled, run in turn `rounds` times; ms per image-NFE and ratios."""
    inputs = make_inputs(batch, timings.size)
    args = (timings.unet_params, jax.device_put(inputs["y"]), timings.key, jax.device_put(inputs["mask"]))
    (a, a_used), (b, b_used) = (_compiled(timings, kernels, compute, batch, on) for on in (False, True))
    if a_used or not b_used:
        raise RuntimeError(f"the routes were not as asked (kernels off: {a_used}, on: {b_used}); "
                           f"{KERNELS[kernels][0].route()}")
    out_a, out_b = (np.asarray(jax.block_until_ready(p(*args))) for p in (a, b))
    nfe = batch * timings.config.steps * timings.config.warmup

    def ms(program) -> float:
        start = time.perf_counter()
        jax.block_until_ready(program(*args))
        return 1000 * (time.perf_counter() - start) / nfe

    load_before, pairs = loadavg(), []
    for _ in range(rounds):
        pairs.append((ms(a), ms(b)))
    ratios = [ta / tb for ta, tb in pairs]
    return {"compute": compute, "batch": batch, "ms_xla": [round(t, 2) for t, _ in pairs],
            "ms_kernels": [round(t, 2) for _, t in pairs], "ratios": [round(r, 3) for r in ratios],
            "median_ratio": round(float(np.median(ratios)), 3),
            "output_difference": float(np.abs(out_a - out_b).max() / np.abs(out_a).max()),
            "load_before": load_before, "load_after": loadavg()}


def markdown(result: dict) -> str:
    xla = KERNELS[result["kernels"]][2]
    lines = [f"# spgd_jax's {result['kernels']} CPU kernels against {xla} ({result['tag']})", "",
             f"The `{result['preset']}` preset's SPGD sampler ({result['steps']} outer x {result['warmup']} inner "
             f"steps, random weights), both routes compiled in one process and run in turn, {result['rounds']} "
             f"rounds; ms per image-NFE; ratio = {xla} / the kernels' (above 1: the kernels are faster). "
             f"{result['host']}. Kernels: {result['route']}.", "",
             f"| compute | batch | {xla}, ms | kernels, ms | ratio per round | median ratio | "
             "outputs differ by (of their scale) | load before / after |", "|---|---:|---|---|---|---:|---:|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['compute']} | {row['batch']} | {' '.join(map(str, row['ms_xla']))} | "
                     f"{' '.join(map(str, row['ms_kernels']))} | {' '.join(map(str, row['ratios']))} | "
                     f"**{row['median_ratio']:.3f}** | {row['output_difference']:.1e} | "
                     f"{row['load_before'][0]} / {row['load_after'][0]} |")
    return "\n".join(lines) + "\n"


def _case(text: str) -> tuple[str, int]:
    compute, _, batch = text.rpartition(":")
    if not compute or not batch.isdigit():
        raise argparse.ArgumentTypeError(f"a case is COMPUTE:BATCH (e.g. float32:4), got {text!r}")
    return compute, int(batch)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", default="group-norm", choices=sorted(KERNELS))
    parser.add_argument("--tag", required=True, help="file name tag, e.g. cpu-2core")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--preset", default="cpu-default64", choices=sorted(PRESETS))
    parser.add_argument("--case", type=_case, action="append", help="COMPUTE:BATCH, repeatable (default: "
                        + "; ".join(f"{name}: {' '.join(f'{c}:{b}' for c, b in spec[3])}" for name, spec in KERNELS.items())
                        + ")")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    module, _, _, cases = KERNELS[args.kernels]
    if not module.route()[0]:
        print(f"The {args.kernels} kernels are unavailable here: {module.route()[1]}", file=sys.stderr)
        return 1
    preset = PRESETS[args.preset]
    with tempfile.TemporaryDirectory() as work:
        timings = Timings(preset, Path(work), None, {"info": {}})
        rows = [compare(timings, args.kernels, compute, batch, args.rounds) for compute, batch in args.case or cases]
    host = f"{os.cpu_count()} CPUs, jax {jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    result = {"tag": args.tag, "kernels": args.kernels, "preset": args.preset, "steps": preset.timed_steps, "warmup": preset.warmup,
              "rounds": args.rounds, "rows": rows, "host": host, "route": module.route()[1]}
    write_report(Path(args.out), f"{args.kernels.replace('-', '_')}_kernels_{args.tag}", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
