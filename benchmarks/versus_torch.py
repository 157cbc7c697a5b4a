"""JAX's SPGD against the PyTorch reference in alternating rounds, in one process, so that the host's drift
(up to 40 % within minutes on a shared machine) cancels out of each ratio (issue 23's targets).

    python -m benchmarks.versus_torch --tag cpu-2core   # -> benchmarks/results/versus_torch_TAG.{json,md}

Every program is set up once (JAX: one untimed call of spgd_jax.sample in this process, as a library user
calls it; PyTorch: one untimed run in a process of its own, benchmarks.speed_torch.serve). Then each round runs every program once, PyTorch's and JAX's
in turn, `timed_steps` outer steps of the preset each (scaled to T
like benchmarks/speed.py), and computes its ratios from that round's times alone: the reference's s/image over
JAX's at batch 1 and 4 (float32, and with bfloat16 convolutions), the fastest PyTorch program's over the
fastest JAX program's, JAX's images/s from batch 1 to 8 and from each batch to the next (rising at every step
when each step's median is above 1), and JAX's gain in images/s from batch 1 to 4 over the
reference's. That gain is split in two (float32): taking each program's s/image at batch b as a cost per image
plus a cost per call shared by the batch, t(b) = c + o / b, batches 1 and 4 give c = (4 t(4) - t(1)) / 3 and
o = 4 (t(1) - t(4)) / 3, and the report gives the reference's over JAX's for each (none, "-", in a round where
the noise makes either program's c or o zero or negative: the fit says nothing there). Batching gains as much for
both programs exactly when o / c is the same for both: a program that cuts its per-call cost more than its
per-image cost (little Python or dispatch per operation) gains less from a batch. The report gives each round
and the medians.
Run it on a quiet machine: the load average is recorded beside the figures.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import spgd_jax  # noqa: F401  (the CPU flags the library compiles with)
import jax
import numpy as np

from benchmarks.speed_jax import Timings
from benchmarks.speed_setup import PRESETS, host_info, loadavg, write_report

REPO = Path(__file__).resolve().parents[1]
JAX_COMPUTES, JAX_BATCHES = ("float32", "float32-bf16conv"), (1, 2, 4, 8)
TORCH_PROGRAMS = (("reference", 1), ("reference", 4), ("tuned-bf16", 1), ("tuned-bf16", 4), ("tuned-bf16", 8))
PAUSE_S = 0.5  # between programs: the other framework's threads stop spinning
# issue 23's goals, by the start of a ratio's name: 2x the reference's images/s at batch 1 and 4, 1.5x PyTorch's
# fastest, and images/s rising from batch 1 to 4 at least as much as the reference's
GOALS = (("reference", 2.0), ("fastest", 1.5), ("batching's gain", 1.0))

__all__ = ["costs", "main", "ratios", "rising"]


def _jax_runner(timings: Timings, compute: str, batch: int):
    """A call that runs the sampler once (timed_steps outer steps) through the public API, as a library user
    calls it (Timings.public_call: on a CPU the batch in parts side by side), and returns its seconds."""
    call = timings.public_call(compute, batch)
    call()  # traces and compiles

    def run() -> float:
        start = time.perf_counter()
        call()
        return time.perf_counter() - start

    return run


class _TorchProcess:
    """The baseline's programs in a process of their own (benchmarks.speed_torch.serve): PyTorch's threads and
    JAX's never share a process (with JAX's runtime started beside it, PyTorch ran 30 % slower here)."""

    def __init__(self, preset_name: str, programs):
        command = [sys.executable, "-m", "benchmarks.speed_torch", preset_name,
                   *(f"{variant}:{batch}" for variant, batch in programs)]
        # from the checkout's root, where `python -m` finds the benchmarks package
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the PyTorch process did not start (exit status {self.process.wait()})")

    def runner(self, variant: str, batch: int):
        def run() -> float:
            self.process.stdin.write(f"{variant} {batch}\n")
            self.process.stdin.flush()
            return float(self.process.stdout.readline())

        return run

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def costs(batch1: float, batch4: float) -> tuple[float, float]:
    """(c, o): the cost per image and per call in s of a program that takes batch1 and batch4 s/image at batch 1
    and 4, with t(b) = c + o / b."""
    return (4 * batch4 - batch1) / 3, 4 * (batch1 - batch4) / 3


def _jax_batches(seconds: dict[str, float], compute: str) -> list[int]:
    """The batches JAX's `compute` program ran at, ascending."""
    prefix = f"jax {compute} b"
    return sorted(int(name[len(prefix):]) for name in seconds if name.startswith(prefix))


def rising(median_ratios: dict[str, float | None], compute: str, batches: list[int]) -> bool:
    """Whether JAX's `compute` images/s rose at every step of the batches, in the medians of the rounds' step
    ratios (each from one round's times, as every other figure: a median of s/image over rounds can take one
    batch from a round in the host's slow phases and the next from a fast one)."""
    return all(median_ratios[f"jax {compute} images/s, batch {b} / batch {a}"] > 1
               for a, b in zip(batches, batches[1:]))


def ratios(seconds: dict[str, float]) -> dict[str, float | None]:
    """One round's figures from its s/image per program ('jax COMPUTE bB', 'torch VARIANT bB')."""
    found = {}
    for compute in JAX_COMPUTES:
        for batch in (1, 4):
            found[f"reference / jax {compute}, batch {batch}"] = seconds[f"torch reference b{batch}"] / \
                seconds[f"jax {compute} b{batch}"]
        batches = _jax_batches(seconds, compute)
        steps = list(zip(batches, batches[1:]))
        for smaller, larger in ([] if (1, 8) in steps else [(1, 8)]) + steps:  # 1 to 8, then each step
            found[f"jax {compute} images/s, batch {larger} / batch {smaller}"] = \
                seconds[f"jax {compute} b{smaller}"] / seconds[f"jax {compute} b{larger}"]
        found[f"batching's gain from batch 1 to 4, jax {compute} / reference"] = \
            (seconds[f"jax {compute} b1"] / seconds[f"jax {compute} b4"]) / \
            (seconds["torch reference b1"] / seconds["torch reference b4"])
    reference = costs(seconds["torch reference b1"], seconds["torch reference b4"])
    ours = costs(seconds["jax float32 b1"], seconds["jax float32 b4"])
    for name, theirs, mine in zip(("image", "call"), reference, ours):  # None where the round's noise beats the cost
        found[f"cost per {name} (from batch 1 and 4), reference / jax float32"] = \
            theirs / mine if theirs > 0 and mine > 0 else None
    torch_best = min((s, name) for name, s in seconds.items() if name.startswith("torch"))
    jax_best = min((s, name) for name, s in seconds.items() if name.startswith("jax"))
    found["fastest PyTorch / fastest JAX"] = torch_best[0] / jax_best[0]
    return found


def _figure(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


def _median(values: list[float | None]) -> float | None:
    """The median of the rounds that have the figure; None where none has it."""
    known = [v for v in values if v is not None]
    return float(np.median(known)) if known else None


def markdown(result: dict) -> str:
    names = list(result["rounds"][0]["s_per_image"])
    lines = [f"# JAX against PyTorch in alternating rounds ({result['tag']})", "",
             f"The `{result['preset']}` preset (T={result['steps']}, N={result['warmup']}, random weights; "
             f"timed {result['timed_steps']} outer steps, scaled to T), every program run once per round, PyTorch's "
             f"and JAX's in turn, {len(result['rounds'])} rounds in one process; {result['host']}; load average "
             f"(1/5/15 min) before {result['load_before']}, after {result['load_after']}.", "",
             "## s/image", "", "| program | " + " | ".join(f"round {i + 1}" for i in range(len(result['rounds'])))
             + " | median |", "|---|" + "---:|" * (len(result["rounds"]) + 1)]
    for name in names:
        cells = [f"{r['s_per_image'][name]:.3f}" for r in result["rounds"]]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {result['median_s_per_image'][name]:.3f} |")
    lines += ["", "## Ratios, each from one round's times", "", "| ratio | " +
              " | ".join(f"round {i + 1}" for i in range(len(result['rounds']))) + " | median | goal | met |",
              "|---|" + "---:|" * (len(result["rounds"]) + 1) + "---|---|"]
    for name, median in result["median_ratios"].items():
        goal = next((g for prefix, g in GOALS if name.startswith(prefix)), None)
        cells = [_figure(r["ratios"][name]) for r in result["rounds"]]
        met = "-" if goal is None or median is None else "yes" if median >= goal else "no"
        target = f">= {goal}x" if goal else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | **{_figure(median)}** | {target} | {met} |")
    rising = result["rising"]
    steps = ", ".join(map(str, result["batches"]))
    lines += ["", f"JAX images/s rising at every step of the batch ({steps}), in the medians of the rounds' step ratios: " +
              ", ".join(f"{compute}: {'yes' if ok else 'no'}" for compute, ok in rising.items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", required=True, help="file name tag, e.g. cpu-2core")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--preset", default="cpu-default64", choices=sorted(PRESETS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", default=",".join(map(str, JAX_BATCHES)),
                        help="JAX's batches, comma-separated; 1, 4 and 8 among them")
    args = parser.parse_args(argv)
    batches = sorted({int(b) for b in args.batches.split(",")})
    if not {1, 4, 8} <= set(batches):
        parser.error(f"--batches must include 1, 4 and 8 (the targets' batches), got {args.batches}")
    preset = PRESETS[args.preset]
    load_before, scale = loadavg(), preset.steps / preset.timed_steps
    baseline = _TorchProcess(args.preset, TORCH_PROGRAMS)
    with tempfile.TemporaryDirectory() as work:
        timings = Timings(preset, Path(work), None, {"info": {}})
        runners = {f"jax {compute} b{batch}": (batch, _jax_runner(timings, compute, batch))
                   for compute in JAX_COMPUTES for batch in batches}
    runners.update({f"torch {variant} b{batch}": (batch, baseline.runner(variant, batch))
                    for variant, batch in TORCH_PROGRAMS})
    torch_names = [n for n in runners if n.startswith("torch")]
    jax_names = [n for n in runners if n.startswith("jax")]
    order = [n for pair in zip(torch_names, jax_names) for n in pair]  # the frameworks in turn, then the rest
    order += [n for n in torch_names + jax_names if n not in order]
    rounds = []
    for index in range(args.rounds):
        seconds = {}
        for name in order:
            time.sleep(PAUSE_S)
            batch, run = runners[name]
            seconds[name] = run() * scale / batch
        rounds.append({"s_per_image": {n: seconds[n] for n in runners}, "ratios": ratios(seconds),
                       "load": loadavg()})
        print(f"round {index + 1}: " + ", ".join(f"{k} {_figure(v)}" for k, v in rounds[-1]["ratios"].items()), flush=True)
    baseline.close()
    median_s = {n: float(np.median([r["s_per_image"][n] for r in rounds])) for n in runners}
    median_ratios = {k: _median([r["ratios"][k] for r in rounds]) for k in rounds[0]["ratios"]}
    result = {"tag": args.tag, "preset": args.preset, "steps": preset.steps, "warmup": preset.warmup,
              "timed_steps": preset.timed_steps, "batches": batches, "rounds": rounds, "median_s_per_image": median_s,
              "median_ratios": median_ratios,
              "rising": {compute: rising(median_ratios, compute, batches) for compute in JAX_COMPUTES}, "load_before": load_before, "load_after": loadavg(),
              "host": f"{host_info()['cpu']} ({os.cpu_count()} CPUs), jax {jax.__version__}, "
                      f"torch {metadata.version('torch')} (in a process of its own), "
                      f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"}
    write_report(Path(args.out), f"versus_torch_{args.tag}", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
