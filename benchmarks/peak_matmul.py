"""This CPU's measured peak: GFLOP/s of a large square matmul, float32 and bfloat16, through XLA and PyTorch.

    python -m benchmarks.peak_matmul          # prints the four figures as JSON

The speed report divides its achieved GFLOP/s by the fastest of these (the dense peak a program on this
machine could reach); PyTorch reaches AMX for bfloat16 through oneDNN, XLA:CPU does not.
"""

from __future__ import annotations

import json
import time

import numpy as np

SIZE = 2048  # 17 GFLOP per product: long enough to time, small enough for a quiet window
REPEATS = 5

__all__ = ["measure_peaks"]


def _best_gflops(run, size: int, repeats: int) -> float:
    run()  # compile / warm up
    best = min(_timed(run) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def xla_gflops(dtype: str, size: int = SIZE, repeats: int = REPEATS) -> float:
    """GFLOP/s of jnp.matmul of two (size, size) arrays of dtype under jit (default precision)."""
    import jax
    import jax.numpy as jnp

    a, b = (jnp.asarray(np.random.default_rng(i).standard_normal((size, size)), dtype) for i in (0, 1))
    matmul = jax.jit(jnp.matmul)
    return _best_gflops(lambda: matmul(a, b).block_until_ready(), size, repeats)


def torch_gflops(dtype: str, size: int = SIZE, repeats: int = REPEATS) -> float | None:
    """GFLOP/s of torch.matmul of two (size, size) tensors of dtype; None without torch."""
    try:
        import torch
    except ImportError:
        return None
    a, b = (torch.randn(size, size, dtype=getattr(torch, dtype)) for _ in range(2))
    with torch.inference_mode():
        return _best_gflops(lambda: torch.matmul(a, b), size, repeats)


def measure_peaks() -> dict[str, float | None]:
    """{'xla float32', 'xla bfloat16', 'torch float32', 'torch bfloat16', 'peak'}: GFLOP/s; 'peak' is the largest."""
    peaks = {f"{name} {dtype}": measure(dtype) for name, measure in (("xla", xla_gflops), ("torch", torch_gflops))
             for dtype in ("float32", "bfloat16")}
    peaks["peak"] = max(v for v in peaks.values() if v is not None)
    return peaks


if __name__ == "__main__":
    print(json.dumps(measure_peaks(), indent=1))
