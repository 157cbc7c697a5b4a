"""The PyTorch SPGD baseline (benchmarks/torch_spgd.py) against the JAX sampler, and speed.py's helpers.

The baseline is written independently (eager PyTorch, torch.optim.SGD, the reference code's VP
formulas and schedule); with ADM off the JAX sampler must reproduce it to float32 accuracy.
"""

from __future__ import annotations

import gzip
import os
import sys
import json
import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from spgd_jax import CONFIGS, edm_sigmas, make_denoiser, operators
from spgd_jax.convert import to_flax_params
from spgd_jax.convert import torch_adm as tr
from spgd_jax.samplers import SPGDConfig, run

from benchmarks import roofline, speed_jax, speed_report, speed_setup, torch_spgd, trace_summary


def nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def test_torch_baseline_matches_jax_sampler_with_adm_off():
    config = CONFIGS["tiny16"]  # learned sigma, scale-shift norm, resblock up/down, attention
    model = tr.from_config(config, seed=3)
    params = to_flax_params({k: v.numpy().copy() for k, v in model.state_dict().items()}, config)
    inputs = speed_setup.make_inputs(batch=2, size=config.image_size, seed=1)
    steps, warmup, lr = 3, 2, 1.0

    mask = nchw(inputs["mask"])
    with torch_spgd.settings(model, "reference"):
        expected = torch_spgd.spgd(model, lambda z: z * mask, nchw(inputs["y"]), nchw(inputs["x_T"]),
                                   lr=lr, steps=steps, warmup=warmup).numpy().transpose(0, 2, 3, 1)

    op = operators.get("inpaint", config.image_size)
    sampler_config = SPGDConfig(lr=lr, steps=steps, warmup=warmup, adm="off")
    program = jax.jit(lambda p, x_t, y, m: run(make_denoiser(config, p), op.forward, y, x_t, sampler_config,
                                            {"mask": m}).x)
    got = np.asarray(program(params, inputs["x_T"], inputs["y"], inputs["mask"]))

    assert np.isfinite(expected).all()
    assert np.abs(expected - inputs["x_T"]).max() > 1.0  # the run moved far from x_T
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= speed_setup.XCHECK_RTOL * scale


def test_baseline_schedule_is_the_samplers():
    for steps in (2, 10, 100):
        np.testing.assert_allclose(torch_spgd.edm_sigmas(steps), edm_sigmas(steps), rtol=1e-12, atol=0)


def test_settings_apply_and_restore_flags():
    model = torch.nn.Linear(2, 2)
    cudnn = torch.backends.cudnn
    before = (cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    with torch_spgd.settings(model, "reference"):
        assert cudnn.deterministic and not cudnn.benchmark
        assert all(p.requires_grad for p in model.parameters())
    with torch_spgd.settings(model, "tuned", true_float32=True):
        assert cudnn.benchmark and not cudnn.deterministic and not cudnn.allow_tf32
        assert not any(p.requires_grad for p in model.parameters())
    after = (cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    assert after == before and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="variant"):
        with torch_spgd.settings(model, "fast"):
            pass


def test_largest_batch_estimate():
    # 1 GiB fixed + 2 GiB per image, limit 40 GiB -> 19 images fit; multiples of 8 -> 16.
    gib = 2**30
    memory = {1: 3 * gib, 16: 33 * gib}
    assert speed_setup.largest_batch(memory, 0, 40 * gib, 1, 1024) == 19
    assert speed_setup.largest_batch(memory, 0, 40 * gib, 8, 1024) == 16
    assert speed_setup.largest_batch(memory, 0, 40 * gib, 1, 12) == 12
    assert speed_setup.largest_batch(memory, 0, 2 * gib, 1, 1024) == 0
    # One measurement: a line through the fixed bytes at batch 0.
    assert speed_setup.largest_batch({4: 9 * gib}, 1 * gib, 41 * gib, 1, 1024) == 20


def _trace_file(tmp_path, events):
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as file:
        json.dump({"traceEvents": events}, file)
    return path


def test_trace_summary_counts_device_ops_only_and_measures_idle_gaps(tmp_path):
    meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
            {"ph": "M", "pid": 7, "name": "process_name", "args": {"name": "/device:GPU:0"}}]

    def op(pid, ts, dur, name, hlo_op):
        return {"ph": "X", "pid": pid, "tid": 1, "ts": ts, "dur": dur, "name": name, "args": {"hlo_op": hlo_op}}

    events = meta + [
        op(7, 0, 60, "sm90_xmma_fprop_implicit_gemm_bf16", "cudnn-conv-bw-input.3"),
        op(7, 60, 20, "loop_convert_fusion_2", "loop_convert_fusion.2"),  # 'convert' is not a convolution
        op(7, 100, 10, "input_reduce_fusion", "reduce-window.1"),
        op(7, 110, 10, "sm90_xmma_fprop_implicit_gemm_bf16", "cudnn-conv-bw-input.3"),
        {"ph": "X", "pid": 7, "tid": 1, "ts": 120, "dur": 5, "name": "MemcpyDtoD", "args": {}},  # named by kernel
        op(1, 0, 500, "host thunk", "cudnn-conv-bw-input.3"),  # host side: ignored when device ops exist
        {"ph": "M", "pid": 7, "tid": 2, "name": "thread_name", "args": {"name": "XLA Ops"}},
        op(7, 0, 999, "cudnn-conv-bw-input.3", "cudnn-conv-bw-input.3") | {"tid": 2},  # derived line: skipped
    ]
    s = trace_summary.summarize(_trace_file(tmp_path, events))
    assert s["source"] == "device" and s["ops"] == 5
    assert s["span_ms"] == pytest.approx(0.125) and s["busy_ms"] == pytest.approx(0.105)  # idle 80..100 us
    assert s["busy_fraction"] == pytest.approx(105 / 125)
    kinds = {k["kind"]: k for k in s["kinds"]}
    assert kinds["convolution"]["ms"] == pytest.approx(0.070) and kinds["convolution"]["count"] == 2
    assert kinds["elementwise fusion"]["ms"] == pytest.approx(0.020)
    assert kinds["reduction"]["count"] == 1 and kinds["copy/transpose"]["count"] == 1
    assert s["kinds"][0]["kind"] == "convolution" and s["kinds"][0]["fraction"] == pytest.approx(70 / 105)
    assert s["top_ops"][0]["hlo_op"] == "cudnn-conv-bw-input.3" and s["top_ops"][0]["count"] == 2
    assert "| convolution | 0.1 | 66.7% | 2 |" in "\n".join(trace_summary.markdown_lines(s))

    # Overlapping host threads (XLA:CPU): busy time is the union, op time the sum.
    host = [op(1, 0, 50, "a", "fusion.1"), op(1, 25, 50, "b", "fusion.2")]
    s = trace_summary.summarize(_trace_file(tmp_path, host))
    assert s["source"] == "host" and s["busy_ms"] == pytest.approx(0.075) and s["op_ms"] == pytest.approx(0.100)
    # XLA:CPU's asynchronous convolution: its thunk returns at 10 us, the next op starts when the work is done
    # (at 90); the wait is charged to the op that ended last before it (the convolution, not the short fusion).
    host = [op(1, 0, 10, "c", "conv_general_dilated.7"), op(2, 2, 5, "f", "fusion.3"), op(1, 90, 10, "g", "fusion.4")]
    s = trace_summary.summarize(_trace_file(tmp_path, host))
    kinds = {k["kind"]: k["ms"] for k in s["kinds"]}
    assert kinds == pytest.approx({"convolution": 0.090, "elementwise fusion": 0.015})
    assert s["busy_ms"] == pytest.approx(0.020) and s["span_ms"] == pytest.approx(0.100)
    assert s["top_ops"][0]["hlo_op"] == "conv_general_dilated.7"

    with pytest.raises(ValueError, match="no op executions"):
        trace_summary.summarize(_trace_file(tmp_path, meta))


def test_trace_summary_of_a_real_profile(tmp_path):
    f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
    x = jnp.ones((64, 64))
    f(x).block_until_ready()
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        f(x).block_until_ready()
    s = trace_summary.summarize(next(tmp_path.rglob("perfetto_trace.json.gz")))
    assert s["ops"] >= 1 and 0 < s["busy_ms"] <= s["span_ms"] + 1e-9
    assert sum(k["fraction"] for k in s["kinds"]) == pytest.approx(1.0)


def test_native_kernels_have_a_kind_of_their_own_and_gpu_custom_calls_keep_theirs():
    assert trace_summary.op_kind("ffi_call.12", "ffi_call.12") == "native kernel (FFI custom call)"
    assert trace_summary.op_kind("sm90_xmma_fprop_implicit_gemm", "custom-call.3") == "convolution"
    assert trace_summary.op_kind("ampere_sgemm_128x64", "custom-call.4") == "matmul"


def test_profiles_give_a_trace_and_op_time_per_image_nfe_by_kind(tmp_path):
    preset = speed_setup.PRESETS["cpu-64"]  # timed 4 outer steps x N=5
    f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
    x = jnp.ones((64, 64))
    f(x).block_until_ready()
    timings = SimpleNamespace(work=tmp_path, preset=preset, result={})
    speed_jax.Timings.batch_profile(timings, {"dtype": "float32", "batch": 2}, lambda: f(x).block_until_ready())

    def broken():
        raise RuntimeError("no run")

    speed_jax.Timings.batch_profile(timings, {"dtype": "float32", "batch": 4}, broken)
    speed_jax.Timings.profile(timings, {"dtype": "float32", "batch": 2}, lambda: f(x).block_until_ready())
    assert timings.result["profile"]["summary"]["ops"] >= 1 and (tmp_path / timings.result["profile"]["trace"]).is_file()
    done, failed = timings.result["batch_profiles"]
    assert done["image_nfe"] == 2 * 4 * 5 and sum(done["ms_per_image_nfe"].values()) > 0
    assert failed["error"] == "RuntimeError: no run" and not (tmp_path / "batch_profile").exists()
    lines = speed_report.batch_profiles_markdown([failed, done])
    assert "| kind | batch 2 |" in lines and lines[-1] == "No profile at batch 4: RuntimeError: no run."
    total = next(line for line in lines if line.startswith("| all |"))
    assert float(total.split("|")[2]) == pytest.approx(sum(done["ms_per_image_nfe"].values()), abs=0.01)


def test_roofline_counts_and_peaks():
    m, k, n = 8, 16, 4
    lowered = jax.jit(lambda a, b: a @ b).lower(jnp.ones((m, k)), jnp.ones((k, n)))
    assert roofline.xla_cost(lowered)["flops"] == 2 * m * k * n
    assert roofline.xla_cost(object()) == {"flops": None, "bytes": None}

    assert roofline.device_peaks("NVIDIA H200")["hbm_tb_s"] == 4.8
    assert roofline.device_peaks("NVIDIA H100 PCIe")["bfloat16"] == 756.0
    assert roofline.device_peaks("NVIDIA H100 80GB HBM3")["bfloat16"] == 989.4
    assert roofline.device_peaks("cpu") is None

    rate = roofline.achieved(nfe_per_s=100.0, flops_per_nfe=5e11, peak_tflops=200.0)
    assert rate == {"tflops": pytest.approx(50.0), "fraction_of_peak": pytest.approx(0.25)}
    assert roofline.achieved(100.0, None, 200.0)["tflops"] is None

    peaks = {"bfloat16": 1000.0, "float32": 500.0, "hbm_tb_s": 4.0}
    floors = roofline.floors(2e14, peaks, {"bfloat16": 8e12})
    assert floors["bfloat16"] == {"compute_s": pytest.approx(0.2), "memory_s": pytest.approx(2.0)}
    assert floors["float32"] == {"compute_s": pytest.approx(0.4), "memory_s": None}


def test_flops_are_counted_with_xlas_own_convolutions(monkeypatch):
    """XLA's cost analysis counts no FLOPs in the native kernels' FFI calls: the speed report's count is taken
    with their routes off, and everything traced afterwards takes them again."""
    from spgd_jax.models.adm import UNet
    from spgd_jax.xla_setup import direct_conv

    monkeypatch.setenv(direct_conv.ENV_OFF, "1")
    model = UNet(CONFIGS["tiny16"])
    x, t = jnp.ones((1, 16, 16, 3)), jnp.ones((1,))
    params = model.init(jax.random.key(0), x, t)["params"]

    def lowered():
        return jax.jit(jax.grad(lambda x: jnp.sum(model.apply({"params": params}, x, t)))).lower(x)

    with speed_jax.xla_ops_only():
        inside = lowered()
    assert os.environ[direct_conv.ENV_OFF] == "1"
    after = lowered()
    assert "spgd_" not in inside.as_text()
    convolutions = 2 * 2 * 16 * 16 * 9 * 32 * 32  # two 32 -> 32 3x3 convolutions at 16 px, forward and gradient
    assert roofline.xla_cost(inside)["flops"] > convolutions
    if direct_conv.route()[0]:
        assert direct_conv.TARGET in after.as_text()
        assert roofline.xla_cost(after)["flops"] < roofline.xla_cost(inside)["flops"]


def test_speed_report_derives_speedups_targets_and_roofline(tmp_path):
    preset = speed_setup.PRESETS["gpu-ffhq256"]  # T=100, N=5, timed 4 outer steps (x25)
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    host = {"cpu": "x", "cpu_count": 16, "python": "3", "loadavg_1_5_15min": [0, 0, 0]}
    torch_rows = [{"framework": "torch", "variant": "reference", "dtype": "float32", "batch": b, "status": "ok",
                   "run_s": 35.2 * b / 25} for b in (1, 16)]  # 35.2 s/image at batch 1 (and 16: no batching gain)
    jax_rows = [
        {"framework": "jax", "variant": "sample", "dtype": "bfloat16", "batch": 16, "status": "ok", "run_s": 0.8 * 16 / 25,
         "compile_s": 60.0, "trace_s": 2.0, "xla_bytes": 2**30},
        {"framework": "jax", "variant": "sample", "dtype": "float32", "batch": 1, "status": "ok", "run_s": 5.0 / 25,
         "compile_s": 60.0, "trace_s": 2.0, "xla_bytes": 2**30},
        {"framework": "jax", "variant": "nfe only", "dtype": "bfloat16", "batch": 16, "status": "ok",
         "run_s": 0.7 * 16 / 25, "xla_bytes_accessed": 16 * 4e9},
    ]
    info = {"device": "NVIDIA H200", "backend": "gpu", "jax": "0", "jaxlib": "0", "flax": "0",
            "jax_default_matmul_precision": None, "XLA_FLAGS": "", "host": host,
            "flops_per_image_nfe": 7.7e11, "peaks": roofline.device_peaks("NVIDIA H200")}
    speed_setup.write_json(work / "torch.json", {"info": dict(speed_report._INFO_STUBS["torch"], host=host), "rows": torch_rows,
                                           "xcheck": {}, "skipped": []})
    failed_profile = {"dtype": "bfloat16", "batch": 16, "outer_steps": 4, "error": "RuntimeError: no profiler"}
    speed_setup.write_json(work / "jax.json", {"info": info, "rows": jax_rows, "xcheck": {}, "skipped": [],
                                         "profile": failed_profile})
    stem = speed_report.report("gpu-ffhq256", preset, work, out, None)
    assert stem.name == "speed_gpu-h200"
    s = json.loads(stem.with_suffix(".json").read_text())
    f32 = next(r for r in s["rows"] if r["framework"] == "jax" and r["dtype"] == "float32")
    assert f32["s_per_image"] == pytest.approx(5.0) and f32["speedup_vs_torch_reference"] == pytest.approx(35.2 / 5.0)
    assert f32["tflops"] == pytest.approx(500 / 5.0 * 7.7e11 / 1e12)
    assert f32["fraction_of_peak"] == pytest.approx(f32["tflops"] / 494.7)
    targets = {t["what"]: t for t in s["targets"]}
    assert targets["JAX float32 / PyTorch reference images/s at batch 1"]["met"]  # 7.0x >= 5x
    assert targets["JAX bfloat16 s/image at the best batch (16)"]["met"]  # 0.8 s <= 1.0 s
    assert targets["JAX bfloat16 / PyTorch reference images/s at batch 16"]["value"] == pytest.approx(35.2 / 0.8)
    roof = s["roofline"]
    assert roof["flops_per_image"] == pytest.approx(500 * 7.7e11)
    assert roof["bytes_per_image"]["bfloat16"] == pytest.approx(4e9 * 500)
    assert roof["floors_s_per_image"]["bfloat16"]["memory_s"] == pytest.approx(2e12 / 4.8e12)
    assert roof["bf16_target_fraction_of_peak"] == pytest.approx(385.0 / 989.4)
    md = stem.with_suffix(".md").read_text()
    assert "## Roofline" in md and "385 TFLOP/s, 39% of the dense bfloat16 peak" in md
    assert "No profile: RuntimeError: no profiler." in md


def test_cpu_report_checks_batch_scaling_the_fastest_torch_and_the_measured_peak(tmp_path):
    preset = speed_setup.PRESETS["cpu-64"]  # T=20, N=5, timed 4 outer steps (x5)
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    host = {"cpu": "x", "cpu_count": 2, "python": "3", "loadavg_1_5_15min": [0, 0, 0]}
    torch_s = {"reference": {1: 13.0, 2: 11.0, 4: 9.0, 8: 9.0}, "tuned-bf16": {1: 8.0, 2: 6.0, 4: 5.0, 8: 5.0}}
    torch_rows = [{"framework": "torch", "variant": v, "dtype": torch_spgd.VARIANT_DTYPES[v], "batch": b,
                   "status": "ok", "run_s": s_img * b / 5} for v, by_batch in torch_s.items() for b, s_img in by_batch.items()]
    jax_s = {"float32": {1: 6.0, 2: 5.0, 4: 4.0, 8: 4.5},  # falls at batch 8
             "float32-bf16conv": {1: 4.0, 2: 3.0, 4: 2.5, 8: 2.0}}  # rises
    jax_rows = [{"framework": "jax", "variant": "sample", "dtype": d, "batch": b, "status": "ok",
                 "run_s": s_img * b / 5, "compile_s": 9.0, "trace_s": 1.0}
                for d, by_batch in jax_s.items() for b, s_img in by_batch.items()]
    peaks = {"xla float32": 170.0, "xla bfloat16": 150.0, "torch float32": 230.0, "torch bfloat16": 650.0, "peak": 650.0}
    info = {"device": "cpu", "backend": "cpu", "jax": "0", "jaxlib": "0", "flax": "0",
            "jax_default_matmul_precision": None, "XLA_FLAGS": "", "host": host, "flops_per_image_nfe": 6.5e9,
            "peaks": None, "cpu_matmul_gflops": peaks}
    speed_setup.write_json(work / "torch.json", {"info": dict(speed_report._INFO_STUBS["torch"], host=host), "rows": torch_rows,
                                           "xcheck": {}, "skipped": []})
    profiles = [{"dtype": "float32", "batch": b, "image_nfe": 20 * b,
                 "ms_per_image_nfe": {"native kernel (FFI custom call)": 10.0, "elementwise fusion": 3.0 + b / 4}}
                for b in (8, 1)]
    speed_setup.write_json(work / "jax.json", {"info": info, "rows": jax_rows, "xcheck": {}, "skipped": [],
                                               "batch_profiles": profiles})
    stem = speed_report.report("cpu-64", preset, work, out, "cpu-test")
    md = stem.with_suffix(".md").read_text()
    assert ("| kind | batch 1 | batch 8 |\n|---|---:|---:|\n| native kernel (FFI custom call) | 10.00 | 10.00 |\n"
            "| elementwise fusion | 3.25 | 5.00 |\n| all | 13.25 | 15.00 |") in md
    s = json.loads(stem.with_suffix(".json").read_text())
    b4 = next(r for r in s["rows"] if r["framework"] == "jax" and r["dtype"] == "float32" and r["batch"] == 4)
    assert b4["speedup_vs_torch_fastest"] == pytest.approx(5.0 / 4.0)  # tuned-bf16 is the fastest at batch 4
    assert b4["fraction_of_peak"] == pytest.approx(b4["tflops"] / 0.230)  # float32: the faster framework's peak
    targets = {t["what"].split(" (")[0]: t for t in s["targets"]}
    assert not targets["JAX float32 images/s rises with the batch 1, 2, 4, 8"]["met"]
    assert targets["JAX float32-bf16conv images/s rises with the batch 1, 2, 4, 8"]["met"]
    gain = targets["JAX float32 images/s gain batch 1 -> 8 over the reference's"]
    assert gain["value"] == pytest.approx((6.0 / 4.5) / (13.0 / 9.0)) and not gain["met"]
    gain = targets["JAX float32-bf16conv images/s gain batch 1 -> 8 over the reference's"]
    assert gain["value"] == pytest.approx((4.0 / 2.0) / (13.0 / 9.0)) and gain["met"]
    ratio = targets["JAX float32-bf16conv / PyTorch reference images/s at batch 4"]
    assert ratio["value"] == pytest.approx(9.0 / 2.5) and ratio["met"]
    fastest = targets["JAX best images/s"]
    assert fastest["value"] == pytest.approx(5.0 / 2.0) and fastest["met"]  # 1.5x the fastest PyTorch


def test_jax_rows_run_in_priority_order():
    plan = speed_jax.jax_plan(speed_setup.PRESETS["gpu-ffhq256"])
    assert plan == [("bfloat16", 16), ("float32", 1), ("bfloat16", 1), ("float32", 16), ("bfloat16", "largest"),
                    ("float32", 4), ("bfloat16", 4), ("float32", "largest")]
    smoke = speed_jax.jax_plan(speed_setup.PRESETS["gpu-smoke"])  # profiled row (bfloat16, 2) first though not a target batch
    assert smoke[0] == ("bfloat16", 2) and smoke.count(("bfloat16", 2)) == 1 and len(smoke) == 6


def test_cpu64_preset_is_the_issues_configuration():
    from spgd_jax import UNet

    preset = speed_setup.PRESETS["cpu-64"]
    config = preset.unet
    shapes = jax.eval_shape(lambda: UNet(config).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1,))))
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
    assert round(count / 1e6, 2) == 4.47 and (preset.steps, preset.warmup) == (20, 5)


def test_compile_times_measures_each_stage_of_both_programs():
    from benchmarks import compile_times

    made = compile_times.programs(CONFIGS["tiny16"], "float32", steps=2, warmup=1, batch=1)
    assert set(made) == {"sampler", "nfe"}
    function, arguments = made["nfe"]
    stages = compile_times.time_stages(function, arguments)
    assert all(stages[k] > 0 for k in ("trace_s", "lower_s", "compile_s"))
    assert stages["total_s"] == pytest.approx(stages["trace_s"] + stages["lower_s"] + stages["compile_s"])
    table = compile_times.markdown([{"program": "nfe", "dtype": "float32", **stages}],
                                   {"config": "tiny16", "device": "cpu", "jax": jax.__version__, "machine": "x",
                                    "steps": 2, "warmup": 1, "batch": 1})
    assert "| nfe | float32 |" in table


def test_startup_times_each_phase_of_a_run_from_its_output_lines(tmp_path):
    from benchmarks import startup

    fake = tmp_path / "fake_restore.py"  # prints as the restore command does, with a known pause before sampling
    fake.write_text(
        "import sys, time\n"
        "if '--help' in sys.argv: sys.exit(0)\n"
        "if 'sr5' in sys.argv: sys.exit(2)\n"
        "if sys.argv[-5:-3] != ['--conv-precision', 'bfloat16']: sys.exit(3)  # the flags given, before --out\n"
        "print('spgd sr4 1/1: compiling the sampler...', flush=True)\n"
        "time.sleep(0.6)\n"
        "print('spgd sr4 1/1: compiled in 0.5 s, sampling', flush=True)\n"
        "time.sleep(0.3)\n"
        "print('spgd sr4 1/1: 10/20 steps, 0.3 s', flush=True)\n"
        "time.sleep(0.3)\n"
        "print('spgd sr4 1/1: 20/20 steps, 0.6 s', flush=True)\n"
        "print('wrote 1 restored image(s)', flush=True)\n")
    result = startup.measure([sys.executable, str(fake), "--task", "sr4", "--conv-precision", "bfloat16"])
    for run in (result["cold"], result["warm"]):
        assert run["compile_s"] == 0.5 and 0.6 <= run["startup_s"] < run["wall_s"]
        assert run["startup_s"] < 0.6 + 0.25 and run["sampling_s"] >= 0.6  # sampling began about 0.3 s before 10/20
        assert abs(run["startup_s"] + run["sampling_s"] - run["wall_s"]) < 0.02
    text = startup.markdown({**result, "tag": "t", "host": "h", "load_before": [0, 0, 0], "load_after": [0, 0, 0],
                             "flags": ["--conv-precision", "bfloat16"]})
    assert "(`python -m spgd_jax.restore --task sr4 --conv-precision bfloat16`)" in text
    assert "| compile, cold (as reported) | 0.5 | < 10.0 | yes |" in text
    assert f"| --help | {result['help_s']} | < 0.5 | {'yes' if result['help_s'] < 0.5 else 'no'} |" in text


def test_stream_bandwidth_writes_one_figure_per_array_size(tmp_path):
    from benchmarks import stream_bandwidth

    assert stream_bandwidth.main(["--tag", "t", "--out", str(tmp_path), "--sizes-mb", "0.05,0.2", "--repeats", "2"]) == 0
    result = json.loads((tmp_path / "stream_bandwidth_t.json").read_text())
    assert [mb for mb, _ in result["gbps"]] == [0.05, 0.2]
    assert all(0.01 < gbps < 10_000 for _, gbps in result["gbps"]), result["gbps"]  # GB/s, not bytes/s or GiB/ms
    table = (tmp_path / "stream_bandwidth_t.md").read_text()
    assert "| 0.05 |" in table and "| 0.2 |" in table and "load average" in table


def test_conv_shapes_times_every_route_of_every_shape(tmp_path):
    from benchmarks import conv_shapes

    assert conv_shapes.main(["--tag", "t", "--out", str(tmp_path), "--batch", "1", "--repeats", "1"]) == 0
    result = json.loads((tmp_path / "conv_shapes_t.json").read_text())
    assert [(r["px"], r["in"], r["out"]) for r in result["rows"]] == list(conv_shapes.SHAPES)
    expected = {"xla float32", "xla bfloat16", "winograd bfloat16", "torch float32", "torch bfloat16"}
    if result["onednn"].startswith("/"):  # the handler's path: the route was set up
        expected |= {"onednn bfloat16", "onednn float32 at bfloat16"}
    for row in result["rows"]:
        native = set()
        if result["direct"].startswith("/"):
            native.add("direct float32")
            if row["in"] % 16 == 0:  # Winograd: every square image of 8 px and more, channels in 16s
                assert row["winograd_tile"] == 4  # F(4x4, 3x3): sides in 4s
                native.add("winograd float32")
                if result["bf16_products"].startswith("/"):  # the CPU has AVX512-BF16
                    native.add("winograd bfloat16 products")
        assert set(row["ms"]) == expected | native and all(0 < ms < 10_000 for ms in row["ms"].values()), row
    table = (tmp_path / "conv_shapes_t.md").read_text()
    assert "| 64 | 32 -> 32 |" in table and "load average" in table and "GFLOP/s" in table
    assert ("winograd float32" in table) == result["direct"].startswith("/")


@pytest.mark.parametrize("kernels", ["group-norm", "direct-conv", "attention"])
def test_native_kernels_compares_both_routes_of_the_sampler(tmp_path, kernels):
    from benchmarks import native_kernels as bench

    module = bench.KERNELS[kernels][0]
    if not module.route()[0]:
        pytest.skip(f"{kernels} kernels unavailable: {module.route()[1]}")
    args = ["--kernels", kernels, "--tag", "t", "--out", str(tmp_path), "--preset", "cpu-tiny", "--case", "float32:2",
            "--rounds", "2"]
    assert bench.main(args) == 0
    name = f"{kernels.replace('-', '_')}_kernels_t"
    result = json.loads((tmp_path / f"{name}.json").read_text())
    (row,) = result["rows"]
    assert (result["kernels"], row["compute"], row["batch"], len(row["ratios"])) == (kernels, "float32", 2, 2)
    assert all(a > 0 and b > 0 for a, b in zip(row["ms_xla"], row["ms_kernels"]))
    assert all(abs(r - a / b) < 0.01 * r for r, a, b in zip(row["ratios"], row["ms_xla"], row["ms_kernels"]))
    assert abs(row["median_ratio"] - float(np.median(row["ratios"]))) <= 1e-3
    assert 0 < row["output_difference"] < 1e-3  # two routes, the same sampler to round-off
    assert "| float32 | 2 |" in (tmp_path / f"{name}.md").read_text()
    assert module.route()[0] and os.environ.get(module.ENV_OFF) is None  # given back


def test_versus_torch_gives_no_cost_split_where_a_rounds_noise_beats_the_cost():
    from benchmarks import versus_torch

    seconds = {f"jax {c} b{b}": 1.0 for c in versus_torch.JAX_COMPUTES for b in (1, 4, 8)} | \
        {f"torch {v} b{b}": 2.0 / b ** 0.5 for v, b in versus_torch.TORCH_PROGRAMS}
    per_call = "cost per call (from batch 1 and 4), reference / jax float32"
    per_image = "cost per image (from batch 1 and 4), reference / jax float32"
    assert versus_torch.ratios(seconds)[per_call] is None  # batch 4 no faster than 1: JAX's o = 0
    seconds["jax float32 b4"] = 1.01
    assert versus_torch.ratios(seconds)[per_call] is None  # o < 0: noise, not a negative cost
    seconds["jax float32 b4"] = 0.85  # c = 0.8, o = 0.2; the reference's: c = 2 / 3, o = 4 / 3
    found = versus_torch.ratios(seconds)
    assert np.isclose(found[per_image], (2 / 3) / 0.8) and np.isclose(found[per_call], (4 / 3) / 0.2)
    result = {"tag": "t", "preset": "cpu-tiny", "steps": 10, "warmup": 2, "timed_steps": 10, "batches": [1, 4, 8],
              "rounds": [{"s_per_image": seconds, "ratios": {per_call: None}}], "median_s_per_image": seconds,
              "median_ratios": {per_call: None}, "rising": {}, "load_before": [], "load_after": [], "host": "h"}
    assert f"| {per_call} | - | **-** | - | - |" in versus_torch.markdown(result)


def test_versus_torch_decides_rising_from_each_rounds_steps():
    from benchmarks import versus_torch

    # Batch 2's median s/image (2.31, from a slow round) is above batch 1's (2.27, from a fast one); in three rounds
    # of five batch 2 is faster: the step's median ratio says rising, and a step that falls says not.
    rounds = [(3.0, 2.6, 2.2), (2.27, 1.83, 1.7), (2.05, 2.3, 1.6), (3.1, 2.62, 2.1), (2.2, 2.31, 2.25)]
    medians = {}
    for compute in versus_torch.JAX_COMPUTES:
        for (a, b), name in (((0, 1), "batch 2 / batch 1"), ((1, 2), "batch 4 / batch 2")):
            medians[f"jax {compute} images/s, {name}"] = float(np.median([r[a] / r[b] for r in rounds]))
    assert np.median([r[0] for r in rounds]) < np.median([r[1] for r in rounds])  # the s/image medians fall
    assert versus_torch.rising(medians, "float32", [1, 2, 4])
    medians["jax float32 images/s, batch 4 / batch 2"] = 0.99
    assert not versus_torch.rising(medians, "float32", [1, 2, 4])
    seconds = {f"jax {c} b{b}": 2.0 / b for c in versus_torch.JAX_COMPUTES for b in (1, 2, 4, 8)} | \
        {f"torch {v} b{b}": 4.0 for v, b in versus_torch.TORCH_PROGRAMS}
    found = versus_torch.ratios(seconds)
    assert [found[f"jax float32 images/s, batch {b} / batch {a}"] for a, b in ((1, 8), (1, 2), (2, 4), (4, 8))] == \
        [8.0, 2.0, 2.0, 2.0]


def test_versus_torch_takes_each_ratio_from_one_rounds_times(tmp_path):
    from benchmarks import versus_torch

    args = ["--tag", "t", "--out", str(tmp_path), "--preset", "cpu-tiny", "--rounds", "2", "--batches", "8,1,4"]
    assert versus_torch.main(args) == 0
    result = json.loads((tmp_path / "versus_torch_t.json").read_text())
    assert result["batches"] == [1, 4, 8] and len(result["rounds"]) == 2
    expected = {f"jax {c} b{b}" for c in versus_torch.JAX_COMPUTES for b in (1, 4, 8)} | \
        {f"torch {v} b{b}" for v, b in versus_torch.TORCH_PROGRAMS}
    for one in result["rounds"]:
        seconds = one["s_per_image"]
        assert set(seconds) == expected and all(0 < s < 100 for s in seconds.values())
        for name, ratio in versus_torch.ratios(seconds).items():  # from this round's times, not the medians
            assert one["ratios"][name] == ratio, name
        fastest = min(s for n, s in seconds.items() if n.startswith("torch")) / \
            min(s for n, s in seconds.items() if n.startswith("jax"))
        assert abs(one["ratios"]["fastest PyTorch / fastest JAX"] - fastest) <= 1e-2 * fastest
        gain = (seconds["jax float32 b1"] / seconds["jax float32 b4"]) / \
            (seconds["torch reference b1"] / seconds["torch reference b4"])
        assert abs(one["ratios"]["batching's gain from batch 1 to 4, jax float32 / reference"] - gain) <= 1e-2 * gain
        # t(b) = c + o / b through batch 1 and 4 (c per image, o per call), the reference's over JAX's
        for name, index in (("image", 0), ("call", 1)):
            fit = [versus_torch.costs(seconds[f"{p} b1"], seconds[f"{p} b4"])[index]
                   for p in ("torch reference", "jax float32")]
            found = one["ratios"][f"cost per {name} (from batch 1 and 4), reference / jax float32"]
            assert found == fit[0] / fit[1] if min(fit) > 0 else found is None  # the times in full
    for name, median in result["median_ratios"].items():
        known = [r["ratios"][name] for r in result["rounds"] if r["ratios"][name] is not None]
        assert median == (float(np.median(known)) if known else None)
    steps = [float(np.median([r["s_per_image"][f"jax float32 b{a}"] / r["s_per_image"][f"jax float32 b{b}"]
                              for r in result["rounds"]])) for a, b in ((1, 4), (4, 8))]
    assert result["rising"]["float32"] == (min(steps) > 1)  # each step's median of the rounds' ratios
    table = (tmp_path / "versus_torch_t.md").read_text()
    assert "| reference / jax float32, batch 4 |" in table and ">= 1.5x" in table and "load average" in table
    assert re.search(r"\| batching's gain from batch 1 to 4, jax float32 / reference \|.* \| >= 1.0x \| (yes|no) \|",
                     table)
    with pytest.raises(SystemExit):
        versus_torch.main(["--tag", "t", "--out", str(tmp_path), "--batches", "1,2"])  # no batch 4 or 8


def test_costs_per_image_and_per_call_fit_both_batches():
    from benchmarks.versus_torch import costs

    c, o = costs(8.0, 6.0)  # t(b) = c + o / b
    assert (c + o, c + o / 4) == (8.0, 6.0) and o > 0
    assert costs(5.0, 5.0) == (5.0, 0.0)
