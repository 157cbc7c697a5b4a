"""Peak memory of a dataset run against its number of inputs: flat, because images are streamed.

    python -m benchmarks.dataset_memory                  # 64 and 1,024 inputs, a few minutes on a CPU
    python -m benchmarks.dataset_memory --counts 64,256
    git archive REV | tar -x -C /tmp/rev && python -m benchmarks.dataset_memory --source /tmp/rev --tag old
                                                         # a control: the restore command of another commit

For each count it writes that many random 16 px PNGs into a temporary folder and runs the restore
command on them (`python -m spgd_jax.restore --task inpaint --input FOLDER`, a tiny16 UNet with random
weights, SPGD with 3 steps and 2 warm-up iterations, batch 8) in a fresh process, and reads the process's
peak resident memory (getrusage's ru_maxrss) and its wall time. Everything but the number of inputs is the
same, so the peak should not grow with the count; the per-image outputs are written as each batch ends.
Writes benchmarks/results/dataset_memory_<tag>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from spgd_jax import CONFIGS, UNet
from spgd_jax.io import checkpoint

REPO = Path(__file__).resolve().parents[1]
SIZE = 16
COMMAND = ["--task", "inpaint", "--steps", "3", "--warmup", "2", "--batch-size", "8", "--quiet"]


def tiny_weights(folder: Path) -> Path:
    """A tiny16 checkpoint with random weights (nothing is trained)."""
    config = CONFIGS["tiny16"]
    params = UNet(config).init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), jnp.zeros((1,)))["params"]
    checkpoint.save(folder / "tiny16", params, config)
    return folder / "tiny16"


def random_images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(count)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / f"img{i:05d}.png")
    return folder


def measure(weights: Path, images: Path, out: Path, source: Path | None) -> dict:
    """Peak RSS (MiB) and wall seconds of one restore process over `images` (source: the package's source
    tree to run, default this one)."""
    command = [sys.executable, "-m", "spgd_jax.restore", "--input", str(images), "--weights", str(weights),
               "--out", str(out), *COMMAND]
    start = time.perf_counter()  # `python -m` imports the package of its working directory first
    process = subprocess.Popen(command, cwd=source or REPO, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    error = process.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"error: the restore command failed:\n{error}")
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "seconds": seconds,
            "images_written": len(list((out / "restored").glob("*.png")))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="64,1024", help="comma-separated input counts (default 64,1024)")
    parser.add_argument("--tag", default=f"cpu-{os.cpu_count()}core", help="results file suffix")
    parser.add_argument("--source", type=Path, help="run the restore command of this source tree (a control)")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = tiny_weights(tmp)
        measure(weights, random_images(tmp / "warm", 8), tmp / "warm-out", args.source)  # fills the compile cache
        for count in counts:
            images = random_images(tmp / f"in{count}", count)
            row = {"inputs": count, **measure(weights, images, tmp / f"out{count}", args.source)}
            print(f"{count} inputs: peak RSS {row['peak_rss_mib']:.0f} MiB, {row['seconds']:.1f} s", flush=True)
            rows.append(row)
    load = os.getloadavg()
    result = {"command": "python -m spgd_jax.restore --input FOLDER " + " ".join(COMMAND), "image_size": SIZE,
              "network": "tiny16 (random weights)", "rows": rows, "load_average": load,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "source": str(args.source or "this tree"),
              "jax": jax.__version__}
    results = REPO / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    (results / f"dataset_memory_{args.tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Peak memory of a dataset run against its number of inputs", "",
             f"`{result['command']}` ({result['source']}), {SIZE} px inputs, {result['network']}, one process each, "
             f"{result['machine']}, jax {jax.__version__}; load average after the runs "
             f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}.", "",
             "| inputs | peak RSS (MiB) | wall (s) | images/s |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['inputs']} | {r['peak_rss_mib']:.0f} | {r['seconds']:.1f} | {r['inputs'] / r['seconds']:.2f} |"
              for r in rows]
    growth = rows[-1]["peak_rss_mib"] - rows[0]["peak_rss_mib"]
    lines += ["", f"Peak RSS from {rows[0]['inputs']} to {rows[-1]['inputs']} inputs: {growth:+.0f} MiB "
              f"({100 * growth / rows[0]['peak_rss_mib']:+.1f}%). Wall time includes starting Python and JAX and "
              "loading the compiled sampler from the persistent cache (the warm-up run fills it)."]
    (results / f"dataset_memory_{args.tag}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
