"""Progress of one process over its share of a dataset run: images done of total, images/s and ETA.

One line per finished batch, in the terminal (redrawn in place when stderr is a terminal) and appended
to a log file (out/logs/process-K.log), e.g.

    2026-12-05 04:40:12 process 1/2: 24/512 images (4.7%), 0.81 images/s, ETA 10m02s

The rate is measured from the end of the first batch (which also compiles the sampler) once there is
a second one.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

__all__ = ["DatasetProgress", "duration"]


def duration(seconds: float) -> str:
    """'42s', '10m02s', '3h05m'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class DatasetProgress:
    """total: images in this process's share; label: e.g. 'process 1/2'; log: the log file (appended to);
    show: write to the terminal (stderr) too."""

    def __init__(self, total: int, label: str, log: Path, show: bool, stream=None):
        self.total, self.label, self.log, self.show = total, label, Path(log), show
        self.stream = stream or sys.stderr
        self.done, self.start = 0, time.perf_counter()
        self.first: tuple[float, int] | None = None  # (time, images done) at the end of the first batch
        self.write(f"{label}: {total} image(s) to restore")

    def rate(self) -> float | None:
        """Images per second so far (None before a batch ended)."""
        now = time.perf_counter()
        if self.first is not None and self.done > self.first[1] and now > self.first[0]:
            return (self.done - self.first[1]) / (now - self.first[0])
        return self.done / (now - self.start) if self.done and now > self.start else None

    def advance(self, images: int) -> None:
        """`images` more finished (or skipped)."""
        self.done += images
        if self.first is None:
            self.first = (time.perf_counter(), self.done)
        rate = self.rate()
        left = self.total - self.done
        speed = "" if rate is None else f", {rate:.3g} images/s" + (f", ETA {duration(left / rate)}" if left else "")
        percent = 100.0 * self.done / max(self.total, 1)
        self.write(f"{self.label}: {self.done}/{self.total} images ({percent:.1f}%){speed}")

    def write(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        try:
            with open(self.log, "a", encoding="utf-8") as log:
                log.write(f"{stamp} {text}\n")
        except OSError:
            pass  # a log that cannot be written must not stop the run
        if self.show:
            terminal = bool(getattr(self.stream, "isatty", lambda: False)())
            self.stream.write(f"\r{text}\033[K" if terminal else f"{text}\n")
            self.stream.flush()

    def close(self) -> None:
        """Ends the terminal's redrawn line."""
        if self.show and getattr(self.stream, "isatty", lambda: False)():
            self.stream.write("\n")
            self.stream.flush()
