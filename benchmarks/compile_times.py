"""Where compilation time goes: trace, lower and XLA-compile seconds of the SPGD program and of one NFE.

    python -m benchmarks.compile_times                      # ffhq256, 256 px, T=100, N=5, batch 1 (minutes)
    python -m benchmarks.compile_times --config tiny16      # a toy, seconds

For each dtype (float32, bfloat16) it times, cold (no persistent cache) and apart:
- trace:   jax.jit(...).trace(...)   Python runs the sampler once to build the jaxpr;
- lower:   .lower()                  the jaxpr to StableHLO;
- compile: .compile()                XLA's optimisation and code generation,
for two programs: the whole SPGD run (`spgd_jax.sample`, the UNet's weights as arguments) and one
image-NFE (the UNet forward and its input gradient, no loop). The sampler's loops (scan over T, fori_loop
over N) hold one copy of the step, so its compile time should be close to the NFE program's; T and the
step size are not in the program's shape (T only in its constants, the step size traced).
Writes benchmarks/results/compile_times_<device>.md and .json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from spgd_jax import CONFIGS, UNet, make_denoiser, operators, sample, spgd_config

REPO = Path(__file__).resolve().parents[1]


def programs(config, dtype: str, steps: int, warmup: int, batch: int):
    """{name: (function, example arguments)} of the two programs, at abstract (ShapeDtypeStruct) arguments."""
    size = config.image_size
    params = jax.eval_shape(lambda: UNet(config).init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                                      jnp.zeros((1,)))["params"])
    op = operators.get("inpaint", size)
    op_params = jax.eval_shape(lambda: op.init_params(jax.random.key(0), batch, size))
    y = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    sampler = spgd_config("inpaint", tuned=False, steps=steps, warmup=warmup)

    def run(unet_params, y, op_params):
        denoiser = make_denoiser(config, unet_params, dtype=dtype)
        return sample(denoiser, op.forward, y, jax.random.key(0), sampler, op_params, x_shape=(size, size, 3)).x

    def nfe(unet_params, x, y, op_params):
        denoiser = make_denoiser(config, unet_params, dtype=dtype)

        def likelihood(x):
            x0_hat = denoiser(x, jnp.full((batch,), 10.0))
            return jnp.sum((jax.vmap(op.forward)(x0_hat, op_params) - y) ** 2)

        return jax.grad(likelihood)(x)

    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    return {"sampler": (run, (params, y, op_params)), "nfe": (nfe, (params, x, y, op_params))}


def time_stages(function, arguments) -> dict:
    """Seconds of trace, lower and compile of jax.jit(function) at these arguments (cold)."""
    jitted = jax.jit(function)
    t0 = time.perf_counter()
    traced = jitted.trace(*arguments)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    lowered.compile()
    t3 = time.perf_counter()
    return {"trace_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2, "total_s": t3 - t0}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Compile time of `{meta['config']}` on {meta['device']}", "",
             f"jax {meta['jax']}, {meta['machine']}; T = {meta['steps']}, N = {meta['warmup']}, batch {meta['batch']}, "
             "cold (persistent compilation cache off). `python -m benchmarks.compile_times`.", "",
             "| program | dtype | trace s | lower s | XLA compile s | total s |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['program']} | {r['dtype']} | {r['trace_s']:.1f} | {r['lower_s']:.1f} | "
                     f"{r['compile_s']:.1f} | {r['total_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="ffhq256", choices=sorted(CONFIGS))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)  # cold: every stage measured, none read back
    device = jax.devices()[0]
    rows = []
    for dtype in args.dtypes.split(","):
        for name, (function, arguments) in programs(CONFIGS[args.config], dtype, args.steps, args.warmup,
                                                    args.batch).items():
            rows.append({"program": name, "dtype": dtype, **time_stages(function, arguments)})
            print(json.dumps(rows[-1]), flush=True)
    tag = device.platform if device.platform != "cpu" else f"cpu-{jax.device_count()}dev"
    meta = {"config": args.config, "device": str(device.device_kind), "jax": jax.__version__,
            "machine": platform.processor() or platform.machine(), "steps": args.steps, "warmup": args.warmup,
            "batch": args.batch}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"compile_times_{args.config}_{tag}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(rows, meta))
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
