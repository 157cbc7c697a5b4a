"""What a run reports besides its checkpoints: the status line, `metrics.jsonl`, the sample grids
`samples/step_XXXXXXXX.png` and `validation_split.txt`.

`metrics.jsonl` is a log: each record is appended as one complete line (a resumed run adds to it).
The other files are written atomically (`spgd_jax.io.files`, `spgd_jax.io.images.save_png`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from spgd_jax.io.files import write_text
from spgd_jax.io.images import save_png

VALIDATION_SPLIT = "validation_split.txt"


class Progress:
    """One status line: rewritten in place on a terminal, printed every `every` steps otherwise."""

    def __init__(self, total: int, every: int, stream=sys.stderr):
        self.total, self.every, self.stream = total, every, stream
        self.tty = stream.isatty()

    def update(self, step: int, loss: float, images_per_s: float, lr: float) -> None:
        width = 30
        done = int(width * step / self.total)
        line = (f"[{'#' * done}{'.' * (width - done)}] step {step}/{self.total}  loss {loss:.4f}  "
                f"{images_per_s:.1f} img/s  lr {lr:.2e}")
        if self.tty:
            self.stream.write("\r" + line)
            self.stream.flush()
        elif step % self.every == 0 or step == self.total:
            print(line, file=self.stream, flush=True)

    def message(self, text: str) -> None:
        print(("\n" if self.tty else "") + text, file=self.stream, flush=True)


class MetricsLog:
    """Appends {"step", "wall_s", **values} records to RUN/metrics.jsonl; close it after use."""

    def __init__(self, run: Path):
        self.file = open(run / "metrics.jsonl", "a")

    def record(self, step: int, wall_s: float, **values) -> None:
        self.file.write(json.dumps({"step": step, "wall_s": round(wall_s, 1), **values}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def write_validation_split(run: Path, names: list[str]) -> None:
    """RUN/validation_split.txt: the held-out files, one a line."""
    write_text(run / VALIDATION_SPLIT, "".join(n + "\n" for n in names))


def write_sample_grid(run: Path, step: int, images: np.ndarray) -> None:
    """RUN/samples/step_XXXXXXXX.png: the n*n images (n*n, S, S, C) in [-1, 1] as one n x n grid."""
    n = int(np.sqrt(len(images)))
    s, c = images.shape[1], images.shape[3]
    grid = images.reshape(n, n, s, s, c).transpose(0, 2, 1, 3, 4).reshape(n * s, n * s, c)
    (run / "samples").mkdir(exist_ok=True)
    save_png(run / "samples" / f"step_{step:08d}.png", grid)
