"""Roofline numbers for the speed benchmark: XLA's FLOP and byte counts against a device's peaks.

The FLOPs of one image-NFE (UNet forward + input-gradient backward at batch 1) come from XLA's
cost analysis of that program (no loop, so nothing is counted once that runs many times). With
a device's dense peak they give the fastest possible time per image, and for a timed row the
achieved TFLOP/s and its fraction of the peak: the first thing a profile has to explain.
"""

from __future__ import annotations

import re

# Dense (no sparsity) tensor-core peaks from NVIDIA's datasheets, TFLOP/s, and HBM bandwidth, TB/s.
# float32 rows run as TF32 on these GPUs: XLA's default precision for float32 convolutions and dots.
# Checked in order: the first pattern found in the lower-cased device kind wins.
DEVICE_PEAKS = (
    ("h200", {"bfloat16": 989.4, "float32": 494.7, "hbm_tb_s": 4.8, "source": "H200 SXM datasheet"}),
    ("h100 pcie", {"bfloat16": 756.0, "float32": 378.0, "hbm_tb_s": 2.0, "source": "H100 PCIe datasheet"}),
    ("h100", {"bfloat16": 989.4, "float32": 494.7, "hbm_tb_s": 3.35, "source": "H100 SXM datasheet"}),
    ("a100", {"bfloat16": 312.0, "float32": 156.0, "hbm_tb_s": 2.0, "source": "A100 80GB SXM datasheet"}),
)


def device_peaks(device_kind: str) -> dict | None:
    """The DEVICE_PEAKS entry for a jax device_kind such as 'NVIDIA H200' (None: unknown device)."""
    kind = device_kind.lower()
    return next((dict(peaks) for pattern, peaks in DEVICE_PEAKS if re.search(pattern, kind)), None)


def xla_cost(stage) -> dict:
    """{'flops', 'bytes'} from the cost analysis of a jax Lowered or Compiled stage (None where absent).

    Counts are for one call; a while loop's body is counted once, so use loop-free programs.
    """
    try:
        analysis = stage.cost_analysis()
    except Exception:  # noqa: BLE001  (not every backend reports it)
        analysis = None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    analysis = analysis or {}
    flops, accessed = analysis.get("flops"), analysis.get("bytes accessed")
    return {"flops": None if flops is None else float(flops), "bytes": None if accessed is None else float(accessed)}


def achieved(nfe_per_s: float, flops_per_nfe: float | None, peak_tflops: float | None) -> dict:
    """TFLOP/s done at nfe_per_s image-NFEs per second, and its fraction of peak_tflops (None if unknown)."""
    if not flops_per_nfe:
        return {"tflops": None, "fraction_of_peak": None}
    tflops = nfe_per_s * flops_per_nfe / 1e12
    return {"tflops": tflops, "fraction_of_peak": tflops / peak_tflops if peak_tflops else None}


def floors(flops_per_image: float, peaks: dict, bytes_per_image: dict[str, float] | None = None) -> dict:
    """Lower bounds on seconds per image per dtype: all FLOPs at the dense peak, and (where the
    bytes an image's run moves are known) all bytes at the HBM bandwidth."""
    out = {}
    for dtype in ("float32", "bfloat16"):
        entry = {"compute_s": flops_per_image / (peaks[dtype] * 1e12)}
        moved = (bytes_per_image or {}).get(dtype)
        entry["memory_s"] = None if moved is None else moved / (peaks["hbm_tb_s"] * 1e12)
        out[dtype] = entry
    return out
