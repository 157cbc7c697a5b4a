"""The quick start as a new user meets it: wall time, compile and start-up of `python -m spgd_jax.restore --task
sr4`, cold (an empty compile cache) and warm (the same command again), and how fast `--help` and a bad argument
answer (issue 23 item 5). Each command runs in a fresh process; the times are those of its output lines.

    python -m benchmarks.startup --tag cpu-2core     # -> benchmarks/results/startup_TAG.{json,md}
    python -m benchmarks.startup --tag cpu-2core-bf16conv -- --conv-precision bfloat16   # the quick start + flags

Run it on a quiet machine: the load average is recorded beside the figures.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.speed_setup import loadavg, write_report

REPO = Path(__file__).resolve().parents[1]
QUICK_START = [sys.executable, "-m", "spgd_jax.restore", "--task", "sr4"]
TARGETS = {"wall_s": 30.0, "compile_s": 10.0, "warm_startup_s": 3.0, "help_s": 0.5, "bad_argument_s": 0.5}


def timed_lines(command: list[str], env: dict) -> tuple[float, int, list[tuple[float, str]]]:
    """(wall seconds, exit status, [(seconds since the start, line)]) of one run, stdout and stderr merged."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [(time.perf_counter() - start, line.rstrip()) for line in process.stdout]
    status = process.wait()
    return time.perf_counter() - start, status, lines


def quick_start(command: list[str], out: Path, env: dict) -> dict:
    """One quick-start run: wall, start-up (everything before the first sampling step: imports, loading, tracing,
    compiling or reading the cache; from the progress lines' own sampling times) and the compile time the
    command reports, in seconds."""
    wall, status, lines = timed_lines(command + ["--out", str(out), "--overwrite"], env)
    if status != 0:
        raise SystemExit(f"error: the quick start exited {status}:\n" + "\n".join(line for _, line in lines[-20:]))
    reported = next(line for _, line in lines if ", sampling" in line)
    compile_s = float(reported.split("compiled in ")[1].split(" s")[0])
    # "k/T steps, X s": sampling began X s before that line (the first such line may come with the compile line)
    started = min(t - float(line.rsplit(", ", 1)[1].split(" s")[0]) for t, line in lines if " steps, " in line)
    return {"wall_s": round(wall, 2), "startup_s": round(started, 2), "compile_s": compile_s,
            "sampling_s": round(wall - started, 2)}


def measure(command: list[str] = QUICK_START) -> dict:
    """Cold and warm runs of `command` (the quick start), then its program's --help and a bad --task."""
    program = command[: command.index("--task")]
    with tempfile.TemporaryDirectory() as work:
        env = {**os.environ, "SPGD_JAX_CACHE_DIR": str(Path(work) / "cache")}  # empty: a cold first run
        cold = quick_start(command, Path(work) / "restored", env)
        warm = quick_start(command, Path(work) / "restored", env)
        help_s, help_status, _ = timed_lines(program + ["--help"], env)
        bad_s, bad_status, _ = timed_lines(program + ["--task", "sr5"], env)
    if (help_status, bad_status) != (0, 2):
        raise SystemExit(f"error: --help exited {help_status} (want 0), a bad --task {bad_status} (want 2)")
    return {"cold": cold, "warm": warm, "help_s": round(help_s, 3), "bad_argument_s": round(bad_s, 3)}


def markdown(result: dict) -> str:
    cold, warm = result["cold"], result["warm"]
    checks = [("quick start wall, cold", cold["wall_s"], TARGETS["wall_s"]),
              ("quick start wall, warm", warm["wall_s"], TARGETS["wall_s"]),
              ("compile, cold (as reported)", cold["compile_s"], TARGETS["compile_s"]),
              ("start-up before the first step, warm", warm["startup_s"], TARGETS["warm_startup_s"]),
              ("--help", result["help_s"], TARGETS["help_s"]), ("a bad --task", result["bad_argument_s"],
                                                              TARGETS["bad_argument_s"])]
    flags = " ".join(result.get("flags", []))
    lines = [f"# Start-up of the quick start (`python -m spgd_jax.restore --task sr4{' ' + flags if flags else ''}`), "
             f"{result['tag']}", "",
             f"Host: {result['host']}; load average (1/5/15 min) before {result['load_before']}, after "
             f"{result['load_after']}. Fresh process per run; cold = empty compile cache.", "",
             "| run | wall s | start-up s | compile s | sampling s |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {r['wall_s']} | {r['startup_s']} | {r['compile_s']} | {r['sampling_s']} |"
              for name, r in (("cold", cold), ("warm", warm))]
    lines += ["", "| target | measured s | goal s | met |", "|---|---:|---:|---|"]
    lines += [f"| {name} | {value} | < {goal} | {'yes' if value < goal else 'no'} |" for name, value, goal in checks]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", required=True, help="file name tag, e.g. cpu-2core")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("flags", nargs="*", help="more arguments of the quick start, after --")
    args = parser.parse_args(argv)
    load_before = loadavg()
    result = measure(QUICK_START + args.flags)
    host = f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
    result.update(tag=args.tag, host=host, flags=args.flags, load_before=load_before, load_after=loadavg())
    write_report(Path(args.out), f"startup_{args.tag}", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
