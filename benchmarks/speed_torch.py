"""The speed benchmark's PyTorch phase: the reference SPGD (benchmarks/torch_spgd.py) timed per variant and batch,
and the cross-check's PyTorch outputs (benchmarks/speed.py)."""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

import numpy as np

from benchmarks.speed_setup import LR, SEED, Deadline, Preset, cpu_model, host_info, is_oom, loadavg, make_inputs, write_json


def torch_phase(preset: Preset, work: Path, budget_s: float) -> None:
    """Times the PyTorch baseline for each (variant, batch) of the preset -> WORK/torch.json, and writes the
    cross-check's PyTorch outputs -> WORK/xcheck_<precision>.npz."""
    import torch

    from spgd_jax.convert import torch_adm as tr

    deadline = Deadline(budget_s)
    if preset.threads is not None:
        torch.set_num_threads(preset.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {"info": _info(torch), "rows": [], "xcheck": _cross_check(preset, work, device), "skipped": []}
    out = work / "torch.json"
    model = tr.from_config(preset.unet, SEED).to(device)
    for variant in preset.torch_variants:
        for batch in preset.torch_batches:
            name = f"torch {variant} b{batch}"
            expected = next((r["run_s"] * (1 + preset.repeats) * batch / r["batch"] for r in result["rows"]
                             if r["variant"] == variant and r["status"] == "ok"), 0.0)
            if deadline.left() < expected + 5:
                result["skipped"].append(f"{name}: time budget")
                continue
            row = _timed_row(preset, model, variant, batch, device)
            result["rows"].append(row)
            print(f"[torch] {name}: {row['status']} {row.get('run_s', float('nan')):.3f} s "
                  f"for {preset.timed_steps} outer steps", flush=True)
            write_json(out, result)
    if device.type == "cpu":
        import resource

        result["info"]["process_max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["info"]["host"]["loadavg_end"] = loadavg()
    write_json(out, result)


def _info(torch) -> dict:
    from benchmarks import torch_spgd

    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if cuda else f"CPU: {cpu_model()}",
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "default_flags": torch_spgd.precision_flags(),
        "host": host_info(),
    }


def _nchw(a: np.ndarray, device):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(device)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _cross_check(preset: Preset, work: Path, device) -> dict:
    """The cross-check's PyTorch run per precision (ADM off, the small UNet) -> WORK/xcheck_<precision>.npz."""
    from benchmarks import torch_spgd
    from spgd_jax.convert import torch_adm as tr

    xc = preset.xcheck
    model = tr.from_config(xc.unet, SEED).to(device)
    inputs = make_inputs(xc.batch, xc.unet.image_size)
    mask = _nchw(inputs["mask"], device)
    checks = {}
    for precision in preset.xcheck_precisions:
        with torch_spgd.settings(model, "reference", true_float32=precision == "highest"):
            flags = torch_spgd.precision_flags()
            x = torch_spgd.spgd(model, lambda z: z * mask, _nchw(inputs["y"], device), _nchw(inputs["x_T"], device),
                                lr=LR, steps=xc.steps, warmup=xc.warmup)
        np.savez(work / f"xcheck_{precision}.npz", x=x.cpu().numpy().transpose(0, 2, 3, 1))
        checks[precision] = {"torch_flags": flags}
    return checks


def spgd_runner(preset: Preset, model, variant: str, batch: int, device):
    """A call run(steps=preset.timed_steps) -> seconds of one run of the baseline under `variant` (the
    preset's inputs at `batch`, N warm-up iterations per outer step)."""
    from benchmarks import torch_spgd

    inputs = make_inputs(batch, preset.unet.image_size)
    mask, y, x_t = (_nchw(inputs[k], device) for k in ("mask", "y", "x_T"))
    forward = lambda z: z * mask  # noqa: E731

    def run(steps: int = preset.timed_steps) -> float:
        with torch_spgd.settings(model, variant):
            start = time.perf_counter()
            torch_spgd.spgd(model, forward, y, x_t, lr=LR, steps=steps, warmup=preset.warmup)
            _sync(device)
            return time.perf_counter() - start

    return run


def _timed_row(preset: Preset, model, variant: str, batch: int, device) -> dict:
    """One row: timed_steps outer steps of the baseline, once untimed, then `repeats` times timed (the fastest)."""
    import torch

    from benchmarks import torch_spgd

    row = {"framework": "torch", "variant": variant, "dtype": torch_spgd.VARIANT_DTYPES[variant], "batch": batch,
           "status": "ok", "loadavg_before": loadavg()}
    cuda = device.type == "cuda"
    try:
        with torch_spgd.settings(model, variant):
            row["flags"] = torch_spgd.precision_flags()
        run = spgd_runner(preset, model, variant, batch, device)
        run(2)  # untimed: cuDNN setup
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = [run() for _ in range(preset.repeats)]
        row["run_s"], row["run_s_all"] = min(times), times
        if cuda:
            row["peak_bytes"] = torch.cuda.max_memory_allocated()
            row["peak_kind"] = "torch.cuda.max_memory_allocated"
    except Exception as error:  # noqa: BLE001  (record, go on with the next row)
        row["status"] = "out of memory" if is_oom(error) else f"error: {type(error).__name__}: {error}"
        traceback.print_exc()
        if cuda:
            torch.cuda.empty_cache()
    row["loadavg_after"] = loadavg()
    return row


def serve(preset: Preset, programs: list[tuple[str, int]]) -> None:
    """The baseline's programs (variant, batch) set up (one untimed run each), then timed on request, in a
    process of their own (benchmarks/versus_torch.py): prints 'ready', then for each line 'VARIANT BATCH' read
    from stdin prints the seconds of one run."""
    import torch

    from spgd_jax.convert import torch_adm as tr

    if preset.threads is not None:
        torch.set_num_threads(preset.threads)
    device = torch.device("cpu")
    model = tr.from_config(preset.unet, SEED).to(device)
    runners = {f"{variant} {batch}": spgd_runner(preset, model, variant, batch, device) for variant, batch in programs}
    for run in runners.values():
        run(2)  # untimed
    print("ready", flush=True)
    for line in sys.stdin:
        print(runners[line.strip()](), flush=True)


if __name__ == "__main__":
    from benchmarks.speed_setup import PRESETS

    serve(PRESETS[sys.argv[1]], [(variant, int(batch)) for variant, batch in (a.split(":") for a in sys.argv[2:])])
