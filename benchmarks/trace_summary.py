"""Where a compiled sampler spends its device time: a summary of a jax.profiler Perfetto trace.

    with jax.profiler.trace(folder, create_perfetto_trace=True): compiled(*args).block_until_ready()
    summary = summarize(next(Path(folder).rglob("perfetto_trace.json.gz")))

Op executions: on a GPU, the events of the device processes (``/device:GPU:0``: kernels and copies,
named by their ``hlo_op`` argument where the trace gives one, else by the kernel; the profiler's
derived summary lines such as "XLA Ops" are skipped so nothing counts twice); on a CPU, the
XLA:CPU thunks (the host events whose args name an ``hlo_op``). They are grouped by kind
(convolution, matmul, reduction, copy/transpose, library fusion, native kernel (spgd_jax's FFI
handlers), elementwise fusion, other) from the HLO op and kernel names, and the busy time (the
union of the op intervals) is compared with the span from
the first op's start to the last op's end: the gap is time the device waited (launches, host
work, synchronisation). On a CPU an op's time also counts the idle time after it, until the next
op starts: XLA:CPU runs convolutions (Eigen) and library dots asynchronously, so their thunk's
event ends when the work is handed to the thread pool, and the next op waits for the work.
"""

from __future__ import annotations

import collections
import gzip
import json
from pathlib import Path

# (kind, substrings of the lower-cased "kernel name | hlo op"), checked in order.
# "conv" alone would also match XLA's "convert" fusions.
KINDS = (
    ("convolution", ("convolution", "convolve", "cudnn", "conv-", "conv.", "conv_general", "xmma", "implicit_gemm",
                     "fprop", "dgrad", "wgrad")),
    ("matmul", ("gemm", "dot", "cublas", "matmul", "cutlass")),
    ("reduction", ("reduce", "softmax", "norm")),
    ("copy/transpose", ("copy", "transpose", "memcpy", "memset", "dynamic-update-slice", "dynamic_update_slice")),
    ("library fusion (XNNPACK/YNNPACK on CPU)", ("ynn_fusion", "xnn_fusion")),
    ("native kernel (FFI custom call)", ("ffi_call", "custom-call", "custom_call")),
    ("elementwise fusion", ("fusion", "loop_", "wrapped_")),
)
TOP_OPS = 12
# Thread names of the profiler's derived lines on a device (they repeat the kernels' time).
DERIVED_LINES = ("XLA Modules", "XLA Ops", "XLA TraceMe", "Steps", "Framework", "TensorFlow", "Source")


def op_kind(name: str, hlo_op: str) -> str:
    """The kind of one op execution from its kernel (event) name and HLO op name."""
    text = f"{name} | {hlo_op}".lower()
    return next((kind for kind, keys in KINDS if any(key in text for key in keys)), "other")


def _events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as file:
        data = json.load(file)
    return data["traceEvents"] if isinstance(data, dict) else data


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def _idle_after_us(intervals: list[tuple[float, float]]) -> list[float]:
    """For each interval, the idle time that follows it when it is the last to end before a gap in their
    union (0 otherwise): the time until the next interval starts."""
    idle = [0.0] * len(intervals)
    last, end = None, float("-inf")
    for i in sorted(range(len(intervals)), key=lambda i: intervals[i]):
        start, stop = intervals[i]
        if last is not None and start > end:
            idle[last] += start - end
        if stop > end:
            last, end = i, stop
    return idle


def summarize(path: str | Path, top: int = TOP_OPS) -> dict:
    """Device-time summary of a Perfetto trace (.json or .json.gz); times in milliseconds.

    Returns {'source': 'device' (GPU kernels) or 'host' (XLA:CPU), 'ops': number of op executions,
    'span_ms', 'busy_ms', 'busy_fraction', 'op_ms' (the sum of op times; above busy_ms where ops overlap; on a
    CPU each op's time includes the idle time after it, see above), 'kinds': [{kind, ms, fraction of op_ms, count}],
    'top_ops': [{hlo_op, kind, ms, fraction, count, kernel}]}. Raises ValueError when the trace holds no
    op executions (a trace of nothing, or a profiler that records none).
    """
    events = _events(Path(path))
    process = {e.get("pid"): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
    thread = {(e.get("pid"), e.get("tid")): e.get("args", {}).get("name", "") for e in events
              if e.get("ph") == "M" and e.get("name") == "thread_name"}
    devices = {pid for pid, name in process.items() if "/device:" in name}
    complete = [e for e in events if e.get("ph") == "X" and "ts" in e]
    if devices:
        ops = [e for e in complete if e.get("pid") in devices
               and not thread.get((e.get("pid"), e.get("tid")), "").startswith(DERIVED_LINES)]
    else:
        ops = [e for e in complete if isinstance(e.get("args"), dict) and e["args"].get("hlo_op")]
    if not ops:
        raise ValueError(f"{path}: no op executions in this trace (no device events, no host events with an hlo_op)")
    intervals = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))) for e in ops]
    span = max(stop for _, stop in intervals) - min(start for start, _ in intervals)
    busy = _union_us(intervals)
    idle = [0.0] * len(ops) if devices else _idle_after_us(intervals)
    times = [stop - start + wait for (start, stop), wait in zip(intervals, idle)]
    total = sum(times)

    by_kind: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    by_op: dict[str, dict] = {}
    for event, us in zip(ops, times):
        hlo_op = (event.get("args") or {}).get("hlo_op") or event.get("name", "?")
        kind = op_kind(event.get("name", ""), hlo_op)
        by_kind[kind][0] += us
        by_kind[kind][1] += 1
        entry = by_op.setdefault(hlo_op, {"hlo_op": hlo_op, "kind": kind, "us": 0.0, "count": 0, "kernel": event.get("name", "?")})
        entry["us"] += us
        entry["count"] += 1

    def share(us: float) -> float:
        return us / total if total else 0.0

    kinds = [{"kind": kind, "ms": us / 1e3, "fraction": share(us), "count": count}
             for kind, (us, count) in sorted(by_kind.items(), key=lambda item: -item[1][0])]
    top_ops = [{"hlo_op": o["hlo_op"], "kind": o["kind"], "ms": o["us"] / 1e3, "fraction": share(o["us"]),
                "count": o["count"], "kernel": o["kernel"][:80]}
               for o in sorted(by_op.values(), key=lambda o: -o["us"])[:top]]
    return {"source": "device" if devices else "host", "ops": len(ops), "span_ms": span / 1e3, "busy_ms": busy / 1e3,
            "busy_fraction": busy / span if span else 1.0, "op_ms": total / 1e3, "kinds": kinds, "top_ops": top_ops}


def markdown_lines(summary: dict) -> list[str]:
    """The summary as markdown: busy time, a table by kind, the most expensive ops."""
    lines = [
        f"{summary['ops']} op executions over {summary['span_ms']:.1f} ms: the device was busy "
        f"{summary['busy_ms']:.1f} ms ({100 * summary['busy_fraction']:.1f}%); op time adds up to "
        f"{summary['op_ms']:.1f} ms" + ("." if summary["source"] == "device" else
                                          " (each op's time includes the idle time after it, until the next op "
                                          "starts: XLA:CPU runs convolutions and library dots asynchronously)."),
        "",
        "| kind | ms | share of op time | executions |",
        "|---|---|---|---|",
    ]
    lines += [f"| {k['kind']} | {k['ms']:.1f} | {100 * k['fraction']:.1f}% | {k['count']} |" for k in summary["kinds"]]
    lines += ["", "| HLO op | kind | ms | share | executions | kernel |", "|---|---|---|---|---|---|"]
    lines += [f"| `{o['hlo_op']}` | {o['kind']} | {o['ms']:.1f} | {100 * o['fraction']:.1f}% | {o['count']} | "
              f"`{o['kernel']}` |" for o in summary["top_ops"]]
    return lines
