"""Progress of a run, and the way to stop it.

The run goes in segments (spgd_jax.samplers.run_in_segments) and calls `Progress` once per outer step after
each segment. The time JAX spends tracing and compiling (its monitoring events) is reported as compile time
and left out of the sampling time, so the first segment, whose program compiles on its first call, shows
the time it sampled. On a terminal it draws a one-line bar; in a log (stderr not a terminal) it prints a plain
line every tenth of the run. Setting `cancel` makes the next call raise, which ends the run at the end of
its current segment (a tenth of the run at most); Ctrl-C does not wait for that (run_interruptibly).
"""

from __future__ import annotations

import sys
import threading
import time

import jax

__all__ = ["Cancelled", "Progress", "run_interruptibly"]

READ_FROM_CACHE_S = 0.5  # compile seconds below this before the first step: the sampler was read back, not built
STOP_WAIT_S = 5.0  # after Ctrl-C, how long to wait for the compiled run to reach its next step
# JAX's monitoring events of the work of a compilation: tracing, lowering, XLA's compile (or the cache's read)
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
_compile_seconds = [0.0]  # the process's total, from the listener below


def _count_compile(event: str, duration: float, *args, **kwargs) -> None:
    if event in COMPILE_EVENTS:
        _compile_seconds[0] += duration


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def compile_seconds() -> float:
    """Seconds this process has spent tracing and compiling JAX programs so far."""
    return _compile_seconds[0]


class Cancelled(Exception):
    """Raised by the progress call after a segment once the run is cancelled."""


class Progress:
    """Progress over the outer steps of one run; `reset` starts the next. It counts distinct steps (a step
    reported twice counts once)."""

    def __init__(self, stream=None):
        self.stream = stream
        self.cancel = threading.Event()
        self.reset(1, "", False)

    def reset(self, total: int, label: str, enabled: bool, compiling: bool = False) -> None:
        """Starts a run of `total` steps; compiling: say first that the program is being compiled."""
        self.total, self.label, self.enabled = total, label, enabled
        self.seen, self.start, self.compiling = set(), time.perf_counter(), compiling
        self.compiled_before = compile_seconds()
        self.cancel.clear()
        if enabled and compiling:
            self._write(f"{label}: compiling the sampler (once per settings and batch size)...\n")

    def __call__(self, step: int) -> None:
        if self.cancel.is_set():
            raise Cancelled("the run was cancelled")
        if step in self.seen or not self.enabled:
            return
        compiled = min(compile_seconds() - self.compiled_before, time.perf_counter() - self.start)
        elapsed = time.perf_counter() - self.start - compiled  # sampling time
        if not self.seen and self.compiling:
            # the executable store: no sampler traced or compiled, at most a few tiny programs
            cached = " (read from the cache)" if compiled < READ_FROM_CACHE_S else ""
            self._write(f"{self.label}: compiled in {compiled:.1f} s{cached}, sampling\n")
        self.seen.add(step)
        done = len(self.seen)
        if self._terminal():
            width = 30
            filled = width * done // self.total
            bar = f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {elapsed:6.1f}s"
            self._write(bar + ("\n" if done == self.total else ""))
        elif done == self.total or (10 * done) // self.total > (10 * (done - 1)) // self.total:
            self._write(f"{self.label}: {done}/{self.total} steps, {elapsed:.1f} s\n")

    def _terminal(self) -> bool:
        stream = self.stream or sys.stderr
        return bool(getattr(stream, "isatty", lambda: False)())

    def _write(self, text: str) -> None:
        stream = self.stream or sys.stderr
        stream.write(text)
        stream.flush()


def run_interruptibly(function, progress: Progress):
    """function() in a worker thread, waited for by this one, so that Ctrl-C is seen at once.

    On KeyboardInterrupt, progress.cancel is set (the run stops after its current segment), the
    worker is given STOP_WAIT_S to stop, and the KeyboardInterrupt goes on. A worker still compiling then
    is left to finish on its own (a daemon thread; the command line exits without waiting for it).
    """
    outcome: dict = {}

    def work():
        try:
            outcome["value"] = function()
        except BaseException as error:  # handed to the waiting thread
            outcome["error"] = error

    worker = threading.Thread(target=work, name="spgd-restore-run", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)
    except KeyboardInterrupt:
        progress.cancel.set()
        worker.join(STOP_WAIT_S)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
