"""How fast XLA:CPU streams an element-wise program over arrays of growing size: GB/s of z = 1.5 x + y
(two arrays read, one written) from cache-sized to memory-sized arrays (issue 23 item 1: why batching pays
little here; the UNet's largest activations are 0.5-1 MB per image at 64 px).

    python -m benchmarks.stream_bandwidth --tag cpu-2core   # -> benchmarks/results/stream_bandwidth_TAG.{json,md}

Run it on a quiet machine: the load average is recorded beside the figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import spgd_jax  # noqa: F401  (the CPU flags the library compiles with)
import jax
import jax.numpy as jnp

from benchmarks.speed_setup import loadavg, write_report

REPO = Path(__file__).resolve().parents[1]
SIZES_MB = (0.5, 2, 8, 32, 128)
REPEATS = 20

__all__ = ["stream_gbps"]


def stream_gbps(size_mb: float, repeats: int = REPEATS) -> float:
    """GB/s (2**30 bytes) of z = 1.5 x + y over float32 arrays of size_mb MB each, the best of `repeats` calls."""
    n = int(size_mb * 2**20) // 4
    x, y = jnp.ones((n,), jnp.float32), jnp.ones((n,), jnp.float32)
    program = jax.jit(lambda x, y: 1.5 * x + y)
    program(x, y).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        program(x, y).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 3 * n * 4 / 2**30 / best


def markdown(result: dict) -> str:
    lines = [f"# XLA:CPU streaming bandwidth ({result['tag']})", "",
             f"z = 1.5 x + y over float32 arrays (two read, one written), the best of {result['repeats']} calls; "
             f"{result['host']}; load average (1/5/15 min) before {result['load_before']}, after "
             f"{result['load_after']}.", "", "| array MB | GB/s |", "|---:|---:|"]
    lines += [f"| {mb:g} | {gbps:.1f} |" for mb, gbps in result["gbps"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", required=True, help="file name tag, e.g. cpu-2core")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--sizes-mb", default=",".join(f"{s:g}" for s in SIZES_MB))
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args(argv)
    sizes = [float(s) for s in args.sizes_mb.split(",")]
    load_before = loadavg()
    gbps = [(mb, round(stream_gbps(mb, args.repeats), 2)) for mb in sizes]
    host = f"{os.cpu_count()} CPUs, jax {jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    result = {"tag": args.tag, "repeats": args.repeats, "gbps": gbps, "load_before": load_before,
              "load_after": loadavg(), "host": host}
    write_report(Path(args.out), f"stream_bandwidth_{args.tag}", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
