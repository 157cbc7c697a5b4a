"""The speed benchmark's presets (what one run measures), inputs and host helpers (benchmarks/speed.py)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np

from spgd_jax.models.adm import CONFIGS, UNetConfig  # no JAX backend is started by this import

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


# The README quick start's network: the default 64 px face prior's config (random weights here; the
# speed does not depend on them).
DEFAULT64 = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(
    (REPO / "weights" / "default64" / "config.json").read_text())["config"].items()})


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
    dtypes: tuple[str, ...]  # keys of benchmarks.compute.COMPUTE
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
    # backward) as separate jitted calls, no loop: the reference point of CPU_NOTE (on a CPU the sampler now
    # runs faster than it; the field keeps its first name).
    ceiling: tuple[tuple[str, int], ...] = ()
    # (dtype, batch) of the sampler row to profile once more after its timing (jax.profiler trace,
    # summarised by benchmarks/trace_summary.py); None: no profile.
    profile: tuple[str, int] | None = None
    # Batches of the profile's dtype whose sampler rows are profiled too, for the report's table of op time per
    # image-NFE by kind of op and batch (what batching saves, and what it costs as activations outgrow caches).
    profile_batches: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()
    # (batch, goal): issue 15's targets, JAX images/s over the PyTorch reference's, on a goals_device backend
    speedup_goals: tuple[tuple[int, float], ...] = ((1, 5.0), (16, 3.0))
    goals_device: str = "gpu"


CPU_NOTE = (
    "The `nfe only` row was meant as the sampler's ceiling; since the changes listed in the README's speed "
    "section the sampler runs faster than it (1.4-1.6x on the default prior at batch 4, on a 2-core AMD EPYC "
    "and a 2-core Intel Xeon), so it is a reference point only. Before commit a89f84f the sampler ran far "
    "below it: JAX's transpose rule emits each backward (input-gradient) convolution with the "
    "kernel's in/out dimensions swapped (dim_labels b01f_01oi->b01f), XLA:CPU runs only HWIO kernels "
    "through Eigen, and its ConvCanonicalization pass, which would insert the transposes, walks only the "
    "entry computation (xla/service/cpu/conv_canonicalization.cc), so inside the sampler's lax.scan / "
    "fori_loop those convolutions ran as unoptimised elemental loops: about 6 NFE/s against the `nfe only` "
    "row's 22 at batch 4 (JAX then at 0.3-0.5x the PyTorch reference). Since a89f84f the UNet's convolutions "
    "compute their input gradient with an explicitly transposed HWIO kernel (spgd_jax/models/adm/_conv.py)."
)

CPU64_NOTE = (
    "XLA:CPU's library fusions are off but for single dots (spgd_jax/xla_setup/cpu_flags.py, applied on "
    "`import spgd_jax`; the XLA_FLAGS above): with jaxlib 0.10's defaults, which hand convolutions, dots, "
    "reductions and element-wise ops to XNNPACK/YNNPACK, the same rows took 13.10 s/image at batch 1 (1.00x the "
    "PyTorch reference) and 11.87 at batch 4 (0.76x); YNNPACK's convolutions ran at about 100 GFLOP/s against "
    "Eigen's 160-185, its single dots at 130-165 against XLA's own 60-100 (32-128 input channels). GroupNorm32 has a hand-written gradient (spgd_jax/models/adm/_group_norm.py): the "
    "likelihood gradient 4-10% faster, the profile's reductions 33% -> 18% of the op time. Batching gains JAX "
    "little: per kind of op, batch 4 costs 2.3x (copies) to 3.9x (element-wise fusions) batch 1's time, about "
    "0.9x per image in all, because a compiled program has no per-op dispatch cost to amortise; the eager "
    "reference's batch-1 -> 8 gain (1.66x) is mostly that cost. A batched gradient of the summed loss (instead "
    "of vmap of the per-image gradient) measured no faster (69 / 75 against 67-79 / 62-64 ms per image-NFE at "
    "batch 1 / 4). XLA:CPU runs bfloat16 convolutions in float32 (as fast as float32 ones) and its plain "
    "bfloat16 dots without the CPU's BF16 instructions (a 2048^2 matmul at 180 GFLOP/s against 213 in float32, "
    "PyTorch's oneDNN 432), but its YNNPACK dots multiply bfloat16 at up to 376. The bfloat16 rows run the UNet's "
    "3x3 convolutions through oneDNN where it can be set up (spgd_jax/xla_setup/onednn.py; AMX on CPUs that have "
    "it), else as Winograd F(2x2, 3x3) with bfloat16 channel products (spgd_jax/models/adm/_winograd.py)."
)

PRESETS = {
    "cpu-tiny": Preset(
        description="CPU, 32x32 UNet (BENCH32), T=10, N=2, one thread per framework",
        unet=BENCH32, steps=10, warmup=2, timed_steps=10, batches=(1, 4), dtypes=("float32",),
        torch_batches=(1, 4), threads=1, ceiling=(("float32", 4),), profile=("float32", 4), notes=(CPU_NOTE,),
    ),
    "cpu-64": Preset(
        description="CPU, 64x64 UNet (CPU64, 4.47M parameters), T=20, N=5, the CPU's default threads",
        unet=CPU64, steps=20, warmup=5, timed_steps=4, batches=(1, 2, 4, 8),
        dtypes=("float32", "float32-bf16conv"), torch_batches=(1, 2, 4, 8),
        torch_variants=("reference", "tuned", "tuned-bf16"), ceiling=(("float32", 4),), profile=("float32", 4), notes=(CPU_NOTE, CPU64_NOTE),
        profile_batches=(1, 2, 4, 8),
        speedup_goals=((1, 2.0), (4, 2.0)), goals_device="cpu",
    ),
    "cpu-default64": Preset(
        description="CPU, the default 64 px prior's UNet (random weights), T=20, N=5, the CPU's default threads",
        unet=DEFAULT64, steps=20, warmup=5, timed_steps=4, batches=(1, 2, 4, 8),
        dtypes=("float32", "bfloat16", "float32-bf16conv"), torch_batches=(1, 4),
        torch_variants=("reference", "tuned-bf16"), ceiling=(("float32", 4),), profile=("float32", 4),
        profile_batches=(1, 2, 4, 8), notes=(CPU_NOTE,),
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


def write_report(out: Path, stem: str, result: dict, text: str) -> None:
    """A small benchmark's result as out/STEM.json and its table as out/STEM.md (each written whole); prints it."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{stem}.json", result)
    tmp = out / f"{stem}.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / f"{stem}.md")
    print(text)


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
