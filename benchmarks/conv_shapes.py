"""The default prior's 3x3 convolution shapes, one call each, through every route this CPU has: XLA's convolution
in float32 and bfloat16, spgd-jax's routes (the native float32 kernel's direct sums and its Winograd, oneDNN's
bfloat16 handler, Winograd with bfloat16 products through XLA's dots and through the native kernel), and PyTorch's (oneDNN) in
float32 and bfloat16 as a reference (issue 23: where the UNet's convolution time can go).

    python -m benchmarks.conv_shapes --tag cpu-2core   # -> benchmarks/results/conv_shapes_TAG.{json,md}

Median ms of REPEATS calls after two untimed ones, at one batch (default 4). NHWC inputs, HWIO kernels, padding 1.
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
import numpy as np
from jax import lax

from benchmarks.speed_setup import loadavg, write_report
from spgd_jax.models.adm import (direct_conv3x3, onednn_conv3x3, uses_winograd, winograd_bfloat16_conv3x3,
                                  winograd_conv3x3, winograd_float32_conv3x3, winograd_tile)
from spgd_jax.xla_setup import direct_conv, onednn

REPO = Path(__file__).resolve().parents[1]
# (pixels, in channels, out channels) of the default prior's 3x3 convolutions (channel_mult 1, 2, 2, 2 on 32)
SHAPES = ((64, 3, 32), (64, 32, 32), (64, 64, 32), (64, 96, 32), (64, 32, 3), (32, 32, 64), (32, 64, 64),
          (16, 64, 64), (8, 64, 64))
REPEATS = 30

__all__ = ["routes", "time_ms"]


def time_ms(call, repeats: int = REPEATS) -> float:
    """Median ms of `call()` (which blocks until its result is ready) over `repeats` calls after two untimed."""
    call()
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def _xla(x, k):
    return lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def routes(batch: int, size: int, c: int, d: int) -> dict[str, float]:
    """ms per call of each route for x (batch, size, size, c), kernel (3, 3, c, d)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, c)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, c, d)) / np.sqrt(9 * c), jnp.float32)
    xb, kb = x.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    xla = jax.jit(_xla)
    found = {"xla float32": time_ms(lambda: xla(x, k).block_until_ready()),
             "xla bfloat16": time_ms(lambda: xla(xb, kb).block_until_ready())}
    if direct_conv.route()[0]:
        program = jax.jit(direct_conv3x3)
        found["direct float32"] = time_ms(lambda: program(x, k).block_until_ready())
        if uses_winograd(size, size, c):  # F(4x4, 3x3) or F(2x2, 3x3): winograd_tile(size, size, c)
            program = jax.jit(winograd_float32_conv3x3)
            found["winograd float32"] = time_ms(lambda: program(x, k).block_until_ready())
        if uses_winograd(size, size, c, bf16_products=True) and direct_conv.bf16_products()[0]:
            program = jax.jit(winograd_bfloat16_conv3x3)
            found["winograd bfloat16 products"] = time_ms(lambda: program(x, k).block_until_ready())
    if onednn.conv_target() is not None:
        program = jax.jit(onednn_conv3x3)
        found["onednn bfloat16"] = time_ms(lambda: program(xb, kb).block_until_ready())
        # float32 in and out, from bfloat16 roundings (jax.default_matmul_precision("bfloat16")'s route)
        found["onednn float32 at bfloat16"] = time_ms(lambda: program(x, k).block_until_ready())
    if size % 2 == 0:
        program = jax.jit(winograd_conv3x3)
        found["winograd bfloat16"] = time_ms(lambda: program(xb, kb).block_until_ready())
    try:
        import torch  # noqa: PLC0415 (the benchmarks' optional reference)
    except ImportError:
        return found
    tx = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    tk = torch.from_numpy(np.array(k)).permute(3, 2, 0, 1).contiguous()
    with torch.no_grad():
        found["torch float32"] = time_ms(lambda: torch.nn.functional.conv2d(tx, tk, padding=1))
        txb, tkb = tx.bfloat16(), tk.bfloat16().contiguous(memory_format=torch.channels_last)
        found["torch bfloat16"] = time_ms(lambda: torch.nn.functional.conv2d(txb, tkb, padding=1))
    return found


def markdown(result: dict) -> str:
    names = list(dict.fromkeys(name for row in result["rows"] for name in row["ms"]))  # every route, first seen first
    lines = [f"# 3x3 convolutions, one call each ({result['tag']})", "",
             f"Batch {result['batch']}, median ms of {result['repeats']} calls (GFLOP/s in brackets); {result['host']}; "
             f"oneDNN route: {result['onednn']}; direct float32 route: {result.get('direct', '-')} (winograd float32: "
             "F(4x4, 3x3) where the sides are in 4s; winograd bfloat16 products: F(2x2, 3x3)); "
             f"load average (1/5/15 min) before {result['load_before']}, after "
             f"{result['load_after']}.", "", "| px | in -> out | " + " | ".join(names) + " |",
             "|---|---|" + "---:|" * len(names)]
    for row in result["rows"]:
        flop = 2 * result["batch"] * row["px"] ** 2 * 9 * row["in"] * row["out"]
        cells = [f"{ms:.3f} ({flop / ms / 1e6:.0f})" if ms is not None else "-" for ms in
                 (row["ms"].get(name) for name in names)]
        lines.append(f"| {row['px']} | {row['in']} -> {row['out']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", required=True, help="file name tag, e.g. cpu-2core")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args(argv)
    load_before = loadavg()
    rows = [{"px": px, "in": c, "out": d, "winograd_tile": winograd_tile(px, px, c),
             "ms": {name: round(ms, 4) for name, ms in routes(args.batch, px, c, d).items()}} for px, c, d in SHAPES]
    host = f"{os.cpu_count()} CPUs, jax {jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    result = {"tag": args.tag, "batch": args.batch, "repeats": args.repeats, "rows": rows, "host": host,
              "onednn": onednn.route()[1], "direct": direct_conv.route()[1], "bf16_products": direct_conv.bf16_products()[1],
              "load_before": load_before, "load_after": loadavg()}
    write_report(Path(args.out), f"conv_shapes_{args.tag}", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
