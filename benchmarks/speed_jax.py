"""The speed benchmark's JAX phase: spgd_jax.sample compiled once per (dtype, batch) and timed, the loop-free
'nfe only' reference rows, the cross-check against the PyTorch outputs, the profile (benchmarks/speed.py)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import time
import traceback
from pathlib import Path
from typing import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import peak_matmul, roofline, trace_summary
from benchmarks.compute import COMPUTE
from benchmarks.speed_setup import (GIB, LR, SEED, XCHECK_RTOL, Deadline, Preset, host_info, is_oom, largest_batch,
                                    loadavg, make_inputs, write_json)
from spgd_jax import make_denoiser, operators, sample
from spgd_jax.models.adm import UNetConfig
from spgd_jax.samplers import SPGDConfig, run
from spgd_jax.xla_setup import attention_kernels, direct_conv, group_norm_kernels


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
    """The cross-check, then the timed rows in jax_plan's order within budget_s seconds (rows the budget has
    no room for are listed as skipped); the results go to work/jax.json, rewritten as each part ends."""
    deadline = Deadline(budget_s)
    out = work / "jax.json"
    result = {"info": environment(), "rows": [], "xcheck": {}, "skipped": []}
    result["xcheck"], result["skipped"] = cross_check(preset, work)
    write_json(out, result)
    timings = Timings(preset, work, deadline, result)
    timings.count_flops()
    timings.run_plan(compile_workers)
    result["info"]["host"]["loadavg_end"] = loadavg()
    write_json(out, result)


def environment() -> dict:
    """The software, device and XLA settings of this process: versions, backend, the first device's kind,
    the device count, the matmul precision, XLA's environment variables and the host."""
    device = jax.devices()[0]
    return {
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


def random_params(config: UNetConfig):
    """The UNet's random weights (spgd_jax.convert.torch_adm's, seed SEED: the PyTorch phase's) as Flax
    params on the device."""
    from spgd_jax.convert import to_flax_params
    from spgd_jax.convert import torch_adm

    model = torch_adm.from_config(config, SEED)
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    return jax.device_put(to_flax_params(state, config))


# -- cross-check ----------------------------------------------------------------------------------


def cross_check(preset: Preset, work: Path) -> tuple[dict, list[str]]:
    """The JAX sampler (explicit x_T, ADM off, float32) against the PyTorch phase's outputs
    (work/xcheck_<precision>.npz): ({precision: record}, what was skipped: precisions without PyTorch output)."""
    xc = preset.xcheck
    params = random_params(xc.unet)
    inputs = make_inputs(xc.batch, xc.unet.image_size)
    op = operators.get("inpaint", xc.unet.image_size)
    config = SPGDConfig(lr=LR, steps=xc.steps, warmup=xc.warmup, adm="off")
    records, skipped = {}, []
    for precision in preset.xcheck_precisions:
        saved = work / f"xcheck_{precision}.npz"
        if not saved.is_file():
            skipped.append(f"cross-check ({precision}): no PyTorch output ({saved})")
            continue
        reference = np.load(saved)["x"]

        @jax.jit
        def run_xcheck(p, x_t, y, mask):
            denoiser = make_denoiser(xc.unet, p)
            return run(denoiser, op.forward, y, x_t, config, {"mask": mask}).x

        context = jax.default_matmul_precision("highest") if precision == "highest" else contextlib.nullcontext()
        with context:
            x = np.asarray(run_xcheck(params, inputs["x_T"], inputs["y"], inputs["mask"]))
        records[precision] = xcheck_record(preset, precision, x, reference)
    return records, skipped


def xcheck_record(preset: Preset, precision: str, x: np.ndarray, reference: np.ndarray) -> dict:
    """The cross-check's record for one precision: x and reference are the JAX and PyTorch restorations
    (B, S, S, 3). Passes (pass: True) when max |x - reference| <= XCHECK_RTOL * max |reference|, at the
    'highest' precision; at 'default' (TF32 possible) pass is None, informational."""
    xc = preset.xcheck
    diff = float(np.abs(x.astype(np.float64) - reference).max())
    scale = float(np.abs(reference).max())
    record = {
        "unet": xc.unet.to_dict(), "steps": xc.steps, "warmup": xc.warmup, "batch": xc.batch, "lr": LR,
        "adm": "off", "max_abs_diff": diff, "max_abs_torch": scale, "rel_diff": diff / scale,
        "tolerance_rel": XCHECK_RTOL, "finite": bool(np.isfinite(x).all() and np.isfinite(reference).all()),
        "jax_matmul_precision": "highest" if precision == "highest" else "default",
    }
    within = record["finite"] and diff <= XCHECK_RTOL * scale
    record["pass"] = within if precision == "highest" else None
    verdict = {True: "pass", False: "FAIL", None: "informational"}[record["pass"]]
    print(f"[jax] cross-check ({precision} precision): max |diff| {diff:.3g}, max |x| {scale:.3g}, "
          f"relative {diff / scale:.2e} (tolerance {XCHECK_RTOL:g}) -> {verdict}", flush=True)
    return record


# -- timings --------------------------------------------------------------------------------------


def memory_bytes(compiled) -> int | None:
    """Bytes of the compiled call's XLA buffers (arguments + outputs + temporaries - aliased), or None where
    the backend does not report them."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001  (not every backend reports it)
        return None
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
               - stats.alias_size_in_bytes)


def compile_item(item: dict) -> dict:
    """Compiles item['lowered'] into item['compiled'] (compile_s: seconds; xla_bytes: its buffers; for a
    loop-free 'nfe only' program also XLA's FLOPs and bytes accessed per call); a failure is item['status']."""
    try:
        start = time.perf_counter()
        item["compiled"] = item.pop("lowered").compile()
        item["compile_s"] = time.perf_counter() - start
        item["xla_bytes"] = memory_bytes(item["compiled"])
        if item["variant"] == "nfe only":  # loop-free: XLA's counts are those of one call
            cost = roofline.xla_cost(item["compiled"])
            item["xla_flops"], item["xla_bytes_accessed"] = cost["flops"], cost["bytes"]
    except Exception as error:  # noqa: BLE001
        item["status"] = "out of memory" if is_oom(error) else f"compile error: {type(error).__name__}: {error}"
        traceback.print_exc()
    return item


@contextlib.contextmanager
def xla_ops_only():
    """Programs traced inside run the float32 convolutions, GroupNorm's sums and attention as XLA's own ops, not as
    spgd_jax's native CPU kernels: XLA's cost analysis counts no FLOPs in an FFI call (the 3x3 convolutions would
    count as none). JAX's trace caches are cleared on the way in and out, so that no program traced inside is reused
    outside, and the environment is restored."""
    names = (direct_conv.ENV_OFF, group_norm_kernels.ENV_OFF, attention_kernels.ENV_OFF)
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, "0"))
    jax.clear_caches()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        jax.clear_caches()


def _traced(folder: Path, timed_run) -> tuple[float, Path]:
    """timed_run() once more under jax.profiler, its trace written below `folder` (emptied first): the seconds it
    took with the profiler on, and the Perfetto trace's path."""
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    with jax.profiler.trace(str(folder), create_perfetto_trace=True):
        timed_run()
    return time.perf_counter() - start, next(folder.rglob("perfetto_trace.json.gz"))


class Timings:
    """The timed rows: one ahead-of-time compiled program per (dtype, batch, variant), the UNet params passed
    as arguments. result (work/jax.json, rewritten after each row) gathers the rows, the profile and what
    was skipped; the deadline decides which rows still fit."""

    def __init__(self, preset: Preset, work: Path, deadline: Deadline, result: dict):
        self.preset, self.work, self.deadline, self.result = preset, work, deadline, result
        self.info, self.out = result["info"], work / "jax.json"
        self.device = jax.devices()[0]
        self.size = preset.unet.image_size
        self.unet_params = random_params(preset.unet)
        self.operator = operators.get("inpaint", self.size)
        self.config = SPGDConfig(lr=LR, steps=preset.timed_steps, warmup=preset.warmup)
        self.key = jax.random.key(SEED)

    def count_flops(self) -> None:
        """FLOPs of one image-NFE (the loop-free 'nfe only' program at batch 1; the dtype does not change the
        count; with XLA's own ops, see xla_ops_only), the device's peaks, and on a CPU its measured matmul peak,
        into result['info']."""
        with xla_ops_only():
            self.info["flops_per_image_nfe"] = roofline.xla_cost(self.lower("float32", 1, "nfe only"))["flops"]
        self.info["peaks"] = roofline.device_peaks(self.info["device"]) if self.info["backend"] != "cpu" else None
        if self.info["backend"] == "cpu":  # this CPU's peak, measured: a large matmul through XLA and PyTorch
            self.info["cpu_matmul_gflops"] = peak_matmul.measure_peaks()
        write_json(self.out, self.result)

    def lower(self, dtype: str, batch: int, variant: str):
        """The lowered program: the whole sampler ('sample': (params, y, key, mask) -> x (batch, S, S, 3)), or
        one likelihood gradient without any loop ('nfe only': (params, y, x, mask) -> its gradient in x);
        y and x (batch, S, S, 3), mask (batch, S, S, 1), float32; the UNet computes as COMPUTE[dtype] says."""
        operator, config, size = self.operator, self.config, self.size
        dtype, precision = COMPUTE[dtype]

        def sampler(p, y, k, mask):
            denoiser = make_denoiser(self.preset.unet, p, dtype=dtype)
            return sample(denoiser, operator.forward, y, k, config, {"mask": mask}, x_shape=(size, size, 3)).x

        def nfe(p, y, x, mask):
            denoiser = make_denoiser(self.preset.unet, p, dtype=dtype)
            residual = lambda x: jax.vmap(operator.forward)(denoiser(x, jnp.full((batch,), 5.0)), {"mask": mask}) - y
            return jax.grad(lambda x: jnp.sum(residual(x) ** 2))(x)

        y = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
        mask = jax.ShapeDtypeStruct((batch, size, size, 1), jnp.float32)
        with jax.default_matmul_precision(precision):
            if variant == "sample":
                return jax.jit(sampler).lower(self.unet_params, y, self.key, mask)
            return jax.jit(nfe).lower(self.unet_params, y, y, mask)

    def public_call(self, dtype: str, batch: int) -> Callable[[], jax.Array]:
        """The sampler as a library user runs it: spgd_jax.sample on concrete arrays, outside any jit (on a CPU
        the batch then runs in parts side by side, spgd_jax.sharding.cpu_parts), under the precision that
        COMPUTE[dtype] sets; returns a call that runs it once and gives x (batch, S, S, 3), ready."""
        dtype, precision = COMPUTE[dtype]
        denoiser = make_denoiser(self.preset.unet, self.unet_params, dtype=dtype)
        inputs = make_inputs(batch, self.size)
        y, params = jax.device_put(inputs["y"]), {"mask": jax.device_put(inputs["mask"])}
        size = self.size

        def call() -> jax.Array:
            with jax.default_matmul_precision(precision):
                result = sample(denoiser, self.operator.forward, y, self.key, self.config, params, x_shape=(size, size, 3))
            return jax.block_until_ready(result.x)

        return call

    def lower_item(self, dtype: str, batch: int, variant: str = "sample") -> dict:
        """A row to be: its framework, variant, dtype, batch, the lowered program and trace_s (seconds)."""
        item = {"framework": "jax", "variant": variant, "dtype": dtype, "batch": batch}
        start = time.perf_counter()
        item["lowered"] = self.lower(dtype, batch, variant)
        item["trace_s"] = time.perf_counter() - start
        return item

    def run_item(self, item: dict) -> dict:
        """The row of a compiled item: its timings (time_row), the device's peak memory so far, the load
        average before and after, the precision."""
        compiled = item.pop("compiled", None)
        row = dict(item, loadavg_before=loadavg())
        if compiled is not None:
            row["status"] = "ok"
            self.time_row(row, compiled)
            stats = self.device.memory_stats() if hasattr(self.device, "memory_stats") else None
            if stats and "peak_bytes_in_use" in stats:
                row["device_peak_bytes_so_far"] = stats["peak_bytes_in_use"]
        row["loadavg_after"] = loadavg()
        network_dtype, precision = COMPUTE[row["dtype"]]
        row["precision"] = "bfloat16 compute" if network_dtype == "bfloat16" else (
            f"float32, jax_default_matmul_precision={precision or self.info['jax_default_matmul_precision']}")
        print(f"[jax] {row['variant']} {row['dtype']} b{row['batch']}: {row.get('status')} compile "
              f"{row.get('compile_s', float('nan')):.1f} s, run {row.get('run_s', float('nan')):.3f} s for "
              f"{self.preset.timed_steps} outer steps", flush=True)
        return row

    def time_row(self, row: dict, compiled) -> None:
        """One untimed run, then preset.repeats timed (row['run_s']: the fastest, s; run_s_all: each). A run
        is one call of the sampler, or ('nfe only') as many gradients as its warm-up iterations, dispatched
        back to back. The preset's profile row runs once more under the profiler. A failure is row['status']."""
        preset = self.preset
        inputs = make_inputs(row["batch"], self.size)
        y, mask = jax.device_put(inputs["y"]), jax.device_put(inputs["mask"])
        if row["variant"] == "sample":
            args, calls = (self.unet_params, y, self.key, mask), 1
        else:  # as many gradients as the sampler's warm-up iterations, dispatched back to back
            x = jax.device_put(inputs["x_T"] / 20)
            args, calls = (self.unet_params, y, x, mask), preset.timed_steps * preset.warmup

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
                self.profile(row, timed_run)
            if (row["variant"] == "sample" and preset.profile and row["dtype"] == preset.profile[0]
                    and row["batch"] in preset.profile_batches):
                self.batch_profile(row, timed_run)
        except Exception as error:  # noqa: BLE001
            row["status"] = "out of memory" if is_oom(error) else f"error: {type(error).__name__}: {error}"
            traceback.print_exc()

    def profile(self, row: dict, timed_run) -> None:
        """One more run under jax.profiler; the trace's summary goes to result['profile'], the trace beside
        jax.json (perfetto_trace.json.gz)."""
        entry = {"dtype": row["dtype"], "batch": row["batch"], "outer_steps": self.preset.timed_steps}
        try:
            entry["run_s"], trace = _traced(self.work / "profile", timed_run)
            entry["summary"] = trace_summary.summarize(trace)
            shutil.copy(trace, self.work / "perfetto_trace.json.gz")
            entry["trace"] = "perfetto_trace.json.gz"
        except Exception as error:  # noqa: BLE001  (a profile is extra; the timings stand without it)
            entry["error"] = f"{type(error).__name__}: {error}"
            traceback.print_exc()
        self.result["profile"] = entry

    def batch_profile(self, row: dict, timed_run) -> None:
        """One more run under jax.profiler; its op time by kind, per image-NFE, goes to
        result['batch_profiles'] (a list, one entry per profiled batch; the trace is not kept)."""
        image_nfe = row["batch"] * self.preset.timed_steps * self.preset.warmup
        entry = {"dtype": row["dtype"], "batch": row["batch"], "image_nfe": image_nfe}
        folder = self.work / "batch_profile"
        try:
            summary = trace_summary.summarize(_traced(folder, timed_run)[1])
            entry["ms_per_image_nfe"] = {k["kind"]: k["ms"] / image_nfe for k in summary["kinds"]}
        except Exception as error:  # noqa: BLE001  (a profile is extra; the timings stand without it)
            entry["error"] = f"{type(error).__name__}: {error}"
            traceback.print_exc()
        shutil.rmtree(folder, ignore_errors=True)
        self.result.setdefault("batch_profiles", []).append(entry)

    def record(self, row: dict) -> None:
        self.result["rows"].append(row)
        write_json(self.out, self.result)

    def estimate(self, dtype: str, batch: int) -> float:
        """Seconds an item will take, from the rows so far (compile + 1 + repeats runs)."""
        done = [r for r in self.result["rows"] if r.get("status") == "ok"]
        same = [r for r in done if r["dtype"] == dtype] or done
        if not same:
            return 0.0
        last = max(same, key=lambda r: r["batch"])
        per_image_run = last["run_s"] / last["batch"]
        return last["trace_s"] + last["compile_s"] + (1 + self.preset.repeats) * per_image_run * batch

    def run_row(self, dtype: str, batch: int, variant: str = "sample") -> None:
        """Compiles, runs and records one row, or lists it as skipped when the budget has no room for it."""
        if self.deadline.left() < self.estimate(dtype, batch):
            name = "" if variant == "sample" else f"{variant} "
            self.result["skipped"].append(f"jax {name}{dtype} b{batch}: time budget")
        else:
            self.record(self.run_item(compile_item(self.lower_item(dtype, batch, variant))))

    def run_plan(self, compile_workers: int) -> None:
        """The rows of jax_plan, then the 'nfe only' reference rows (lowest priority). compile_workers > 1:
        the fixed-batch programs are compiled first, in that many threads, then run one at a time."""
        plan, search = jax_plan(self.preset), LargestBatch(self)
        if compile_workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            items = [self.lower_item(dtype, batch) for dtype, batch in plan if batch != "largest"]
            start = time.perf_counter()
            with ThreadPoolExecutor(compile_workers) as pool:
                items = list(pool.map(compile_item, items))
            self.result["parallel_compile_wall_s"] = time.perf_counter() - start
            for item in items:
                self.record(self.run_item(item))
            plan = [item for item in plan if item[1] == "largest"]
        for dtype, batch in plan:
            if batch == "largest":
                search.run(dtype)
            else:
                self.run_row(dtype, batch)
        for dtype, batch in self.preset.ceiling:
            self.run_row(dtype, batch, "nfe only")


class LargestBatch:
    """The search for the largest sampler batch that fits in the device's memory (bytes_limit, or the
    preset's memory_limit_gib), from the XLA buffer sizes of the rows measured so far."""

    def __init__(self, timings: Timings):
        self.timings, self.preset, self.result = timings, timings.preset, timings.result
        stats = timings.device.memory_stats() if hasattr(timings.device, "memory_stats") else None
        self.limit = (stats or {}).get("bytes_limit") or (self.preset.memory_limit_gib or 0) * GIB
        self.result["memory_limit_bytes"] = self.limit
        self.params_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(timings.unet_params))

    def estimate(self, dtype: str) -> int | None:
        """The largest batch expected to fit (None: nothing to go on), from this dtype's rows so far."""
        measured = {r["batch"]: r["xla_bytes"] for r in self.result["rows"] if r["dtype"] == dtype
                    and r["variant"] == "sample" and r.get("status") == "ok" and r.get("xla_bytes")}
        if not measured or not self.limit:
            return None
        preset = self.preset
        return largest_batch(measured, self.params_bytes, 0.92 * self.limit, preset.batch_multiple, preset.batch_cap)

    def run(self, dtype: str) -> None:
        """Runs the estimated batch, then up to one 20% smaller (a multiple of preset.batch_multiple) if it
        failed; stops at a batch already measured, or one the budget has no room for."""
        timings, candidate, tried = self.timings, self.estimate(dtype), []
        while True:
            done = [r["batch"] for r in self.result["rows"]
                    if r["dtype"] == dtype and r["variant"] == "sample" and r.get("status") == "ok"]
            if candidate is None or candidate <= max(done, default=0) or len(tried) == 2:
                note = "no memory estimate" if candidate is None else f"estimate {candidate}, tried {tried}"
                self.result["skipped"].append(f"jax {dtype} largest batch: {note}")
                return
            if timings.deadline.left() < timings.estimate(dtype, candidate):
                self.result["skipped"].append(f"jax {dtype} largest batch {candidate}: time budget")
                return
            row = timings.run_item(compile_item(timings.lower_item(dtype, candidate)))
            row["largest_batch_search"] = {"memory_limit_bytes": self.limit, "attempt": len(tried) + 1}
            timings.record(row)
            tried.append(candidate)
            if row["status"] == "ok":
                return
            candidate = int(candidate * 0.8) // self.preset.batch_multiple * self.preset.batch_multiple
