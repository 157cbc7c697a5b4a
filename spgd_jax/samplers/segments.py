"""A run in segments: several compiled calls instead of one, with progress reported between them.

A sampler given a progress function calls it from inside its compiled loop (a host callback); JAX keys
such a program by the callback's address, which differs in every process, so its persistent cache never
keeps it. Run in segments, every program is free of callbacks and is cached like any other:

    result = run_in_segments(call, progress)

call(segment) runs the sampler with `segment` (a spgd_jax.samplers._loop.Segment) in place of its progress
function and returns its result (device or host arrays; `spgd_jax.sharding.sample_sharded` passes one that
runs over the devices). The run is three programs: the initial carry (a segment of no steps), the steps
start .. start + L - 1 (L = segment_length(T), at most T / 10 and 25, called T / L times with the carry of the call before), and
the SampleResult of the last carry. The result equals one call's to float32 round-off; on a CPU it is the
same bits (tests/test_segments.py).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from spgd_jax.samplers._loop import SampleResult, Segment, SegmentResult

__all__ = ["LONGEST", "PARTS", "run_in_segments", "segment_length"]

PARTS = 10  # a run of T outer steps reports progress about every T / PARTS steps,
LONGEST = 25  # and at least every LONGEST steps


def segment_length(steps: int, parts: int = PARTS, longest: int = LONGEST) -> int:
    """The largest divisor of `steps` that is at most steps / parts and at most `longest` (at least 1):
    equal segments, so one program runs them all."""
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"a schedule has at least one outer step, got {steps!r}")
    limit = max(1, min(int(steps) // parts, longest))
    return max(d for d in range(1, limit + 1) if steps % d == 0)


def run_in_segments(call: Callable[[Segment], Any], progress: Callable[[int], None] | None = None) -> SampleResult:
    """The sampler's SampleResult, computed in segments; progress(i) is called once for every outer step i,
    in order, after the segment that ran it (an exception from progress stops the run there)."""
    first = call(Segment(0, 0))
    if not isinstance(first, SegmentResult):
        raise TypeError(f"call(segment) must return the sampler's SegmentResult, got {type(first).__name__}")
    steps = int(np.asarray(first.steps).reshape(-1)[0])
    length = segment_length(steps)
    carry = first.carry
    for start in range(0, steps, length):
        carry = call(Segment(start, length, carry)).carry
        for i in range(start, start + length):
            if progress is not None:
                progress(i)
    return call(Segment(0, 0, carry, final=True))
