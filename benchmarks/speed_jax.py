"""The speed benchmark's JAX phase: spgd_jax.sample compiled once per (dtype, batch) and timed, the loop-free
'nfe only' ceiling, the cross-check against the PyTorch outputs, the profile (benchmarks/speed.py)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import time
import traceback
from pathlib import Path

import numpy as np

from benchmarks import peak_matmul, roofline, trace_summary
from benchmarks.speed_setup import (GIB, LR, SEED, XCHECK_RTOL, Deadline, Preset, host_info, is_oom, largest_batch,
                                    loadavg, make_inputs, write_json)
from spgd_jax.models.adm import UNetConfig


def _memory_bytes(compiled) -> int | None:
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001  (not every backend reports it)
        return None
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
               - stats.alias_size_in_bytes)


def jax_plan(preset: Preset) -> list[tuple[str, int | str]]:
    """The JAX rows in the order they run: (dtype, batch or 'largest').

    The profiled row first (bfloat16 batch 16 on the GPU: the s/image target, the batch-16 ratio and
    the profile in one program), then batches 1 and 16 (the targets), the largest bfloat16 batch,
    other batches, the largest float32 batch. Compiling a program can take minutes on a GPU, so the
    budget may end early; the rows it reaches are then the ones that matter most.
    """
    targeted = [(d, b) for b in preset.batches if b in (1, 16) for d in preset.dtypes]
    others = [(d, b) for b in preset.batches if b not in (1, 16) for d in preset.dtypes]
    first = [preset.profile] if preset.profile in targeted + others else []
    targeted, others = [i for i in targeted if i not in first], [i for i in others if i not in first]
    largest = [(d, "largest") for d in sorted(preset.dtypes, key=lambda d: d != "bfloat16")] if preset.largest_batch else []
    return first + targeted + largest[:1] + others + largest[1:]


def jax_phase(preset: Preset, work: Path, budget_s: float, compile_workers: int) -> None:
    import jax
    import jax.numpy as jnp

    import flax
    from spgd_jax import make_denoiser, operators, sample
    from spgd_jax.convert import to_flax_params
    from spgd_jax.convert import torch_adm as tr
    from spgd_jax.samplers import SPGDConfig, run

    deadline = Deadline(budget_s)
    device = jax.devices()[0]
    info = {
        "jax": jax.__version__,
        "jaxlib": importlib.metadata.version("jaxlib"),
        "flax": flax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "device_count": jax.device_count(),
        "jax_default_matmul_precision": getattr(jax.config, "jax_default_matmul_precision", "n/a"),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
        "XLA_PYTHON_CLIENT_PREALLOCATE": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
        "host": host_info(),
    }
    result = {"info": info, "rows": [], "xcheck": {}, "skipped": []}
    out = work / "jax.json"

    def params_of(config: UNetConfig):
        model = tr.from_config(config, SEED)
        state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
        return jax.device_put(to_flax_params(state, config))

    # Cross-check: explicit x_T through the sampler itself, ADM off.
    xc = preset.xcheck
    xc_params = params_of(xc.unet)
    inputs = make_inputs(xc.batch, xc.unet.image_size)
    op = operators.get("inpaint", xc.unet.image_size)
    config = SPGDConfig(lr=LR, steps=xc.steps, warmup=xc.warmup, adm="off")
    for precision in preset.xcheck_precisions:
        saved = work / f"xcheck_{precision}.npz"
        if not saved.is_file():
            result["skipped"].append(f"cross-check ({precision}): no PyTorch output ({saved})")
            continue
        reference = np.load(saved)["x"]

        @jax.jit
        def run_xcheck(p, x_t, y, mask):
            denoiser = make_denoiser(xc.unet, p)
            return run(denoiser, op.forward, y, x_t, config, {"mask": mask}).x

        context = jax.default_matmul_precision("highest") if precision == "highest" else contextlib.nullcontext()
        with context:
            x = np.asarray(run_xcheck(xc_params, inputs["x_T"], inputs["y"], inputs["mask"]))
        diff = float(np.abs(x.astype(np.float64) - reference).max())
        scale = float(np.abs(reference).max())
        record = {
            "unet": xc.unet.to_dict(), "steps": xc.steps, "warmup": xc.warmup, "batch": xc.batch, "lr": LR,
            "adm": "off", "max_abs_diff": diff, "max_abs_torch": scale, "rel_diff": diff / scale,
            "tolerance_rel": XCHECK_RTOL, "finite": bool(np.isfinite(x).all() and np.isfinite(reference).all()),
            "jax_matmul_precision": "highest" if precision == "highest" else "default",
        }
        within = record["finite"] and diff <= XCHECK_RTOL * scale
        record["pass"] = within if precision == "highest" else None  # 'default' may use TF32: informational
        result["xcheck"][precision] = record
        verdict = {True: "pass", False: "FAIL", None: "informational"}[record["pass"]]
        print(f"[jax] cross-check ({precision} precision): max |diff| {diff:.3g}, max |x| {scale:.3g}, "
              f"relative {diff / scale:.2e} (tolerance {XCHECK_RTOL:g}) -> {verdict}", flush=True)
    write_json(out, result)
    del xc_params

    # Timings: one ahead-of-time compiled call per (dtype, batch), UNet params as arguments.
    size = preset.unet.image_size
    unet_params = params_of(preset.unet)
    op = operators.get("inpaint", size)
    config = SPGDConfig(lr=LR, steps=preset.timed_steps, warmup=preset.warmup)
    key = jax.random.key(SEED)

    def lower(dtype: str, batch: int, variant: str):
        """The whole sampler ('sample'), or one likelihood gradient without any loop ('nfe only')."""
        def run(p, y, k, mask):
            denoiser = make_denoiser(preset.unet, p, dtype=dtype)
            return sample(denoiser, op.forward, y, k, config, {"mask": mask}, x_shape=(size, size, 3)).x

        def nfe(p, y, x, mask):
            denoiser = make_denoiser(preset.unet, p, dtype=dtype)
            residual = lambda x: jax.vmap(op.forward)(denoiser(x, jnp.full((batch,), 5.0)), {"mask": mask}) - y
            return jax.grad(lambda x: jnp.sum(residual(x) ** 2))(x)

        y = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
        mask = jax.ShapeDtypeStruct((batch, size, size, 1), jnp.float32)
        if variant == "sample":
            return jax.jit(run).lower(unet_params, y, key, mask)
        return jax.jit(nfe).lower(unet_params, y, y, mask)

    # FLOPs of one image-NFE: the loop-free 'nfe only' program at batch 1 (dtype does not change the count).
    info["flops_per_image_nfe"] = roofline.xla_cost(lower("float32", 1, "nfe only"))["flops"]
    info["peaks"] = roofline.device_peaks(info["device"]) if info["backend"] != "cpu" else None
    if info["backend"] == "cpu":  # this CPU's peak, measured: a large matmul through XLA and PyTorch
        info["cpu_matmul_gflops"] = peak_matmul.measure_peaks()
    write_json(out, result)

    def lower_item(dtype: str, batch: int, variant: str = "sample") -> dict:
        item = {"framework": "jax", "variant": variant, "dtype": dtype, "batch": batch}
        start = time.perf_counter()
        item["lowered"] = lower(dtype, batch, variant)
        item["trace_s"] = time.perf_counter() - start
        return item

    def compile_item(item: dict) -> dict:
        try:
            start = time.perf_counter()
            item["compiled"] = item.pop("lowered").compile()
            item["compile_s"] = time.perf_counter() - start
            item["xla_bytes"] = _memory_bytes(item["compiled"])
            if item["variant"] == "nfe only":  # loop-free: XLA's counts are those of one call
                cost = roofline.xla_cost(item["compiled"])
                item["xla_flops"], item["xla_bytes_accessed"] = cost["flops"], cost["bytes"]
        except Exception as error:  # noqa: BLE001
            item["status"] = "out of memory" if is_oom(error) else f"compile error: {type(error).__name__}: {error}"
            traceback.print_exc()
        return item

    def run_item(item: dict) -> dict:
        compiled = item.pop("compiled", None)
        row = dict(item, loadavg_before=loadavg())
        if compiled is not None:
            row["status"] = "ok"
            inputs = make_inputs(row["batch"], size)
            y, mask = jax.device_put(inputs["y"]), jax.device_put(inputs["mask"])
            if row["variant"] == "sample":
                args, calls = (unet_params, y, key, mask), 1
            else:  # as many gradients as the sampler rows' warm-up iterations, dispatched back to back
                args, calls = (unet_params, y, jax.device_put(inputs["x_T"] / 20), mask), preset.timed_steps * preset.warmup

            def timed_run():
                outputs = [compiled(*args) for _ in range(calls)]
                jax.block_until_ready(outputs)

            try:
                timed_run()  # untimed first run
                times = []
                for _ in range(preset.repeats):
                    start = time.perf_counter()
                    timed_run()
                    times.append(time.perf_counter() - start)
                row["run_s"], row["run_s_all"] = min(times), times
                if row["variant"] == "sample" and (row["dtype"], row["batch"]) == preset.profile:
                    profile(row, timed_run)
            except Exception as error:  # noqa: BLE001
                row["status"] = "out of memory" if is_oom(error) else f"error: {type(error).__name__}: {error}"
                traceback.print_exc()
            stats = device.memory_stats() if hasattr(device, "memory_stats") else None
            if stats and "peak_bytes_in_use" in stats:
                row["device_peak_bytes_so_far"] = stats["peak_bytes_in_use"]
        row["loadavg_after"] = loadavg()
        row["precision"] = "bfloat16 compute" if row["dtype"] == "bfloat16" else (
            f"float32, jax_default_matmul_precision={info['jax_default_matmul_precision']}")
        print(f"[jax] {row['variant']} {row['dtype']} b{row['batch']}: {row.get('status')} compile {row.get('compile_s', float('nan')):.1f} s"
              f", run {row.get('run_s', float('nan')):.3f} s for {preset.timed_steps} outer steps", flush=True)
        return row

    def profile(row: dict, timed_run) -> None:
        """One more run under jax.profiler; the trace's summary goes to result['profile']."""
        folder = work / "profile"
        shutil.rmtree(folder, ignore_errors=True)
        entry = {"dtype": row["dtype"], "batch": row["batch"], "outer_steps": preset.timed_steps}
        try:
            start = time.perf_counter()
            with jax.profiler.trace(str(folder), create_perfetto_trace=True):
                timed_run()
            entry["run_s"] = time.perf_counter() - start
            trace = next(folder.rglob("perfetto_trace.json.gz"))
            entry["summary"] = trace_summary.summarize(trace)
            shutil.copy(trace, work / "perfetto_trace.json.gz")
            entry["trace"] = "perfetto_trace.json.gz"
        except Exception as error:  # noqa: BLE001  (a profile is extra; the timings stand without it)
            entry["error"] = f"{type(error).__name__}: {error}"
            traceback.print_exc()
        result["profile"] = entry

    def record(row: dict) -> None:
        result["rows"].append(row)
        write_json(out, result)

    def estimate(dtype: str, batch: int) -> float:
        """Seconds an item will take, from the rows so far (compile + 1 + repeats runs)."""
        done = [r for r in result["rows"] if r.get("status") == "ok"]
        same = [r for r in done if r["dtype"] == dtype] or done
        if not same:
            return 0.0
        last = max(same, key=lambda r: r["batch"])
        per_image_run = last["run_s"] / last["batch"]
        return last["trace_s"] + last["compile_s"] + (1 + preset.repeats) * per_image_run * batch

    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    limit = (stats or {}).get("bytes_limit") or (preset.memory_limit_gib or 0) * GIB
    result["memory_limit_bytes"] = limit
    params_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(unet_params))

    def largest(dtype: str) -> int | None:
        """The largest batch expected to fit (None: nothing to go on), from this dtype's rows so far."""
        measured = {r["batch"]: r["xla_bytes"] for r in result["rows"] if r["dtype"] == dtype
                    and r["variant"] == "sample" and r.get("status") == "ok" and r.get("xla_bytes")}
        if not measured or not limit:
            return None
        return largest_batch(measured, params_bytes, 0.92 * limit, preset.batch_multiple, preset.batch_cap)

    def run_largest(dtype: str) -> None:
        candidate, tried = largest(dtype), []
        while True:
            done = [r["batch"] for r in result["rows"]
                    if r["dtype"] == dtype and r["variant"] == "sample" and r.get("status") == "ok"]
            if candidate is None or candidate <= max(done, default=0) or len(tried) == 2:
                note = "no memory estimate" if candidate is None else f"estimate {candidate}, tried {tried}"
                result["skipped"].append(f"jax {dtype} largest batch: {note}")
                return
            if deadline.left() < estimate(dtype, candidate):
                result["skipped"].append(f"jax {dtype} largest batch {candidate}: time budget")
                return
            row = run_item(compile_item(lower_item(dtype, candidate)))
            row["largest_batch_search"] = {"memory_limit_bytes": limit, "attempt": len(tried) + 1}
            record(row)
            tried.append(candidate)
            if row["status"] == "ok":
                return
            candidate = int(candidate * 0.8) // preset.batch_multiple * preset.batch_multiple

    plan = jax_plan(preset)
    if compile_workers > 1:  # compile all fixed-batch programs first, in parallel; then run one at a time
        from concurrent.futures import ThreadPoolExecutor

        items = [lower_item(dtype, batch) for dtype, batch in plan if batch != "largest"]
        largest_rows = [item for item in plan if item[1] == "largest"]
        start = time.perf_counter()
        with ThreadPoolExecutor(compile_workers) as pool:
            items = list(pool.map(compile_item, items))
        result["parallel_compile_wall_s"] = time.perf_counter() - start
        for item in items:
            record(run_item(item))
        plan = largest_rows
    for dtype, batch in plan:
        if batch == "largest":
            run_largest(dtype)
        elif deadline.left() < estimate(dtype, batch):
            result["skipped"].append(f"jax {dtype} b{batch}: time budget")
        else:
            record(run_item(compile_item(lower_item(dtype, batch))))
    for dtype, batch in preset.ceiling:  # lowest priority: the UNet's own rate, outside any loop
        if deadline.left() < estimate(dtype, batch):
            result["skipped"].append(f"jax nfe only {dtype} b{batch}: time budget")
        else:
            record(run_item(compile_item(lower_item(dtype, batch, "nfe only"))))
    info["host"]["loadavg_end"] = loadavg()
    write_json(out, result)


# -- report ---------------------------------------------------------------------------------------
