"""benchmarks/quality.py and its parts: its programs run the public sampler, its plan and its scoring helpers."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spgd_jax import CONFIGS, UNet, make_denoiser, metrics, sample
from spgd_jax.samplers import posterior_keys, presets

from benchmarks import quality, quality_bars, quality_generate, quality_jobs, quality_report

CONFIG = CONFIGS["tiny16"]


def _params():
    params = UNet(CONFIG).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,)))["params"]
    # guided-diffusion zero-initialises the output convolution; perturb every weight so the net matters
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def test_program_sweep_equals_the_public_sampler_at_each_value():
    params = _params()
    rng = np.random.default_rng(0)
    x = np.clip(rng.normal(0, 0.5, (3, 16, 16, 3)), -1, 1).astype(np.float32)
    operator, op_params, y = quality_generate.degrade("inpaint", x, seed=0)
    keys = quality_generate.sampler_keys(0, 3)
    for config, values in ((presets.spgd_config("inpaint", steps=3, warmup=2), (0.5, 2.0)),
                           (presets.dps_config("inpaint", steps=4), (0.1, 0.4))):
        program = quality_generate.make_program(CONFIG, operator, config, (16, 16, 3), "float32")
        swept, diverged = program(params, y, op_params, keys, jnp.asarray(values, jnp.float32))
        assert swept.shape == (2, 3, 16, 16, 3) and diverged.shape == (2, 3)
        denoiser = make_denoiser(CONFIG, params)
        field = "lr" if hasattr(config, "lr") else "zeta"
        for k, value in enumerate(values):
            one = sample(denoiser, operator.forward, y, keys, dataclasses.replace(config, **{field: value}), op_params,
                         x_shape=(16, 16, 3))
            # Two programs (the values vmapped in one): XLA fuses and orders the network's float32 sums
            # differently, and these runs of a random net amplify that round-off while |x| grows to ~1e3,
            # so a near-zero pixel carries round-off of the large ones (1.6e-4 seen on an AVX2 EPYC against
            # the old flat atol 1e-4). The floor is therefore 2e-6 of the run's largest |x|: the worst
            # measured ratio to this bound is 0.13 (AVX-512, AVX2 and no-FMA AVX builds). An lr off by 1e-3
            # exceeds it 140x, DPS's sigma_max off by 1e-3 440x, two images' keys swapped 2e5x, a warm-up
            # step fewer 1e5x, one weight tensor off by 1e-3 8x for SPGD (DPS barely feels it: 1.8x).
            np.testing.assert_allclose(swept[k], one.x, rtol=1e-4, atol=2e-6 * np.abs(one.x).max())
        assert not np.allclose(swept[0], swept[1])


def test_program_with_bfloat16_convolutions_is_the_public_sampler_at_that_precision():
    from spgd_jax.models.adm import _onednn

    params = _params()
    x = np.clip(np.random.default_rng(1).normal(0, 0.5, (2, 16, 16, 3)), -1, 1).astype(np.float32)
    operator, op_params, y = quality_generate.degrade("sr4", x, seed=0)
    keys, config = quality_generate.sampler_keys(0, 2), presets.spgd_config("sr4", steps=3, warmup=2)
    run = lambda compute: quality_generate.make_program(CONFIG, operator, config, (16, 16, 3), compute)(
        params, y, op_params, keys, None)[0][0]
    rounded, plain = run("float32-bf16conv"), run("float32")
    with jax.default_matmul_precision("bfloat16"):
        one = sample(make_denoiser(CONFIG, params), operator.forward, y, keys, config, op_params, x_shape=(16, 16, 3))
    np.testing.assert_allclose(rounded, one.x, rtol=1e-4, atol=2e-6 * np.abs(one.x).max())
    if _onednn.float32_target() is not None:  # elsewhere the precision changes nothing on the CPU
        assert not np.allclose(rounded, plain, rtol=1e-4, atol=2e-6 * np.abs(plain).max())


def test_program_mean_of_samples_averages_the_runs_of_the_posterior_keys():
    """K samples per image from posterior_keys, as the restore command draws them."""
    params = _params()
    x = np.clip(np.random.default_rng(3).normal(0, 0.5, (3, 16, 16, 3)), -1, 1).astype(np.float32)
    operator, op_params, y = quality_generate.degrade("sr4", x, seed=0)
    keys, values = quality_generate.sampler_keys(0, 3), jnp.asarray([4.0, 8.0])
    config = presets.spgd_config("sr4", steps=3, warmup=2)
    single = quality_generate.make_program(CONFIG, operator, config, (16, 16, 3), "float32")
    per_sample = posterior_keys(keys, 2).reshape(3, 2)  # image-major: image b's samples in a row
    first, _ = single(params, y, op_params, per_sample[:, 0], values)
    second, _ = single(params, y, op_params, per_sample[:, 1], values)
    mean, diverged = quality_generate.make_program(CONFIG, operator, config, (16, 16, 3), "float32", samples=2)(
        params, y, op_params, keys, values)
    assert mean.shape == (2, 3, 16, 16, 3) and diverged.shape == (2, 3)
    assert not np.allclose(first, second)
    # Another program than the single runs': the floor above, 2e-6 of the largest |x| (~300 here). A
    # sample from another key exceeds it 3e5x, an lr off by 1e-3 in one sample 90x.
    np.testing.assert_allclose(mean, (first + second) / 2, rtol=1e-4, atol=2e-6 * np.abs(mean).max())


def test_measurements_and_keys_of_an_image_do_not_depend_on_the_image_count():
    """score re-measures the test images alone for the classical baselines: they must get the
    operator parameters, noise and keys that generate gave them among all the images."""
    x = np.random.default_rng(1).uniform(-1, 1, (5, 16, 16, 3)).astype(np.float32)
    for task in ("inpaint", "motion_deblur"):
        _, params5, y5 = quality_generate.degrade(task, x, seed=3)
        _, params3, y3 = quality_generate.degrade(task, x[:3], seed=3)
        # y is the operator vmapped over 5 or 3 images (two programs, whose 5x5 blur may round its 25-term
        # sums differently: <= 1.5e-6), plus the noise: to 1e-5. Noise drawn for another image count
        # exceeds that 4e3x, another image's kernel 7e4x. The parameters (masks, NumPy-drawn kernels)
        # and keys are bit-exact by construction.
        np.testing.assert_allclose(np.asarray(y5)[:3], np.asarray(y3), rtol=1e-5, atol=1e-5)
        for a, b in zip(jax.tree.leaves(params5), jax.tree.leaves(params3), strict=True):
            np.testing.assert_array_equal(np.asarray(a)[:3], np.asarray(b))
    np.testing.assert_array_equal(jax.random.key_data(quality_generate.sampler_keys(3, 5))[:3],
                                  jax.random.key_data(quality_generate.sampler_keys(3, 3)))


def test_plan_orders_table1_first_and_ties_later_rows_to_its_sweeps():
    jobs = quality_jobs.plan(steps=100, warmup=5)
    names = [j.name for j in jobs]
    assert names[:8] == [f"t1_{s}_{t}" for s in ("spgd", "dps") for t in quality_jobs.TABLE1_TASKS]
    by_name = {j.name: j for j in jobs}
    for job in jobs:
        if job.values is None:
            assert job.tuned_by in by_name and by_name[job.tuned_by].values
    assert by_name["t1_spgd_sr4"].values == tuple(presets.PAPER_LR["sr4"] * f for f in quality_jobs.LR_FACTORS)
    gauss = by_name["t1_spgd_gauss_deblur"]  # the sweep keeps the default prior's tuned schedule
    assert gauss.config.lr_min_ratio == presets.TUNED_SPGD["gauss_deblur"]["lr_min_ratio"]
    assert gauss.values == tuple(presets.TUNED_SPGD["gauss_deblur"]["lr"] * f for f in quality_jobs.LR_FACTORS)
    mean = by_name[f"t1_spgd_mean{quality_jobs.MEAN_SAMPLES}_sr4"]  # the posterior-mean row at SPGD's picked lr
    assert mean.table == "1" and mean.tuned_by == "t1_spgd_sr4" and mean.samples == quality_jobs.MEAN_SAMPLES > 1
    assert names.index(mean.name) < min(names.index(j.name) for j in jobs if j.table != "1")
    dps = by_name["t1_dps_inpaint"].config
    assert dps.steps == 500  # equal NFE: T * N of SPGD
    assert {j.config.warmup for j in jobs if j.table == "3"} == {2, 10}


def test_step_size_column_names_the_spgd_schedule():
    typed = lambda config: {"type": type(config).__name__, **dataclasses.asdict(config)}  # as generate records it
    spgd = lambda task: {"picked": 0.8, "config": typed(presets.spgd_config(task))}
    assert quality_report._step_size(spgd("inpaint")) == "0.8"  # the paper's decay
    assert quality_report._step_size(spgd("gauss_deblur")) == "0.8 constant"  # the default prior's tuned schedule
    half = {"picked": 2.0, "config": typed(presets.spgd_config("sr4", lr_min_ratio=0.5))}
    assert quality_report._step_size(half) == "2 to x0.5"
    assert quality_report._step_size({"picked": 3.0, "config": typed(presets.dps_config("sr4"))}) == "3"
    assert quality_report._step_size({"task": "sr4"}) == "-"  # a classical baseline


def _row(job: str, row: str, task: str, psnr: list[float], lpips: float) -> dict:
    return {"job": job, "row": row, "task": task, "psnr": {"mean": float(np.mean(psnr))},
            "lpips": {"mean": lpips}, "per_image": {"psnr": psnr}}


def test_quality_bars_compare_paired_images_and_need_lower_lpips_over_classical():
    rows = [_row("t1_spgd_sr4", "SPGD", "sr4", [24.0, 26.0, 25.0], 0.05),
            _row("t1_classical_sr4", "classical", "sr4", [22.0, 24.5, 23.0], 0.30),
            _row("t1_dps_sr4", "DPS", "sr4", [25.0, 25.0, 26.0], 0.04),
            _row("t1_spgd_mean4_sr4", "SPGD, mean of 4", "sr4", [26.0, 27.0, 27.0], 0.40),
            _row("t1_spgd_inpaint", "SPGD", "inpaint", [30.0, 30.0, 30.0], 0.01),
            _row("t1_dps_inpaint", "DPS", "inpaint", [29.0, 29.5, 30.5], 0.02)]
    bars = {(c["task"], c["spgd"], c["against"]): c for c in quality_bars.quality_bars(rows)}
    assert set(bars) == {("sr4", "SPGD", "classical"), ("sr4", "SPGD, mean of 4", "classical"),
                         ("sr4", "SPGD", "DPS"), ("inpaint", "SPGD", "DPS")}  # no DPS row for the 4x-NFE mean
    one = bars["sr4", "SPGD", "classical"]
    diff = np.array([2.0, 1.5, 2.0])
    assert one["gain"] == pytest.approx(diff.mean()) and one["ahead"] == 3 and one["images"] == 3
    assert one["stderr"] == pytest.approx(diff.std(ddof=1) / np.sqrt(3))
    assert one["met"]  # +1.83 dB and lower LPIPS
    assert not bars["sr4", "SPGD, mean of 4", "classical"]["met"]  # +3.5 dB, but higher LPIPS
    assert not bars["sr4", "SPGD", "DPS"]["met"] and bars["sr4", "SPGD", "DPS"]["ahead"] == 1  # -0.33 dB
    assert bars["inpaint", "SPGD", "DPS"]["met"]  # +0.33 dB on average, though behind on one image
    text = quality_bars.bars_markdown(rows)
    assert "SPGD matches or beats it on 1 of 2 tasks (inpaint)" in text
    assert "open (2 of 4 tasks have a DPS row)" in text  # no verdict before every task has run
    assert "Classical baselines, SPGD: bar met on 1 of 1 tasks (sr4)" in text
    assert "Classical baselines, SPGD, mean of 4: bar met on 0 of 1 tasks (none)" in text
    rows += [_row(f"t1_{m}_{t}", m, t, [20.0, 20.0, 20.0], 0.1) for t in ("gauss_deblur", "motion_deblur")
             for m in ("spgd", "dps")]
    assert "on 3 of 4 tasks (inpaint, gauss_deblur, motion_deblur); bar 3 of 4: met" in quality_bars.bars_markdown(rows)


def _fake_run(folder: Path, names: list[str], test: int, tune: int, device: str, jobs: dict[str, float],
              seed: int = 0) -> Path:
    """A generate run: manifest.json and one npz per SPGD inpainting-like job, restoring with a fixed value."""
    folder.mkdir()
    manifest = {"weights": "w", "unet_config": CONFIG.to_dict(), "seed": seed, "test": test, "tune": tune,
                "names": names, "device": device, "jax": "0.0", "steps": 3, "warmup": 2, "jobs": {}}
    for name, value in jobs.items():
        values = [value] if not tune else [value / 2, value]
        restored = np.full((test, 32, 32, 3), 128, np.uint8)
        scores = np.tile(np.arange(test + tune, dtype=np.float32), (len(values), 1))
        np.savez(folder / f"{name}.npz", restored=restored, restored_float_psnr=scores[-1, :test], psnr=scores,
                 diverged=np.zeros(scores.shape, bool), values=np.asarray(values))
        config = {"type": "SPGDConfig", **dataclasses.asdict(presets.spgd_config("inpaint", steps=3, warmup=2))}
        manifest["jobs"][name] = {"table": "1", "row": name, "task": "inpaint", "dtype": "float32", "config": config,
                                  "values": values, "picked": value, "tuned_by": None, "seconds": 1.0,
                                  "nfe_per_image": 6}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_merge_joins_runs_of_other_jobs_and_score_names_each_device(tmp_path, capsys):
    names = [f"{k}.jpg" for k in range(4)]
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", images=x, names=np.asarray(names))
    cpu = _fake_run(tmp_path / "cpu", names[:2], 2, 0, "cpu:0", {"t1_spgd_inpaint": 2.5})
    gpu = _fake_run(tmp_path / "gpu", names, 2, 2, "cuda:0", {"t1_dps_inpaint": 5.0})
    merged = tmp_path / "merged"
    assert quality.main(["merge", "--runs", str(cpu), str(gpu), "--out", str(merged)]) == 0
    manifest = json.loads((merged / "manifest.json").read_text())
    assert sorted(manifest["jobs"]) == ["t1_dps_inpaint", "t1_spgd_inpaint"]
    assert manifest["names"] == names and manifest["tune"] == 2
    assert manifest["jobs"]["t1_spgd_inpaint"]["device"] == "cpu:0"
    assert manifest["jobs"]["t1_dps_inpaint"]["tune"] == 2
    for name in manifest["jobs"]:
        with np.load(merged / f"{name}.npz") as a, np.load((cpu if "spgd" in name else gpu) / f"{name}.npz") as b:
            np.testing.assert_array_equal(a["psnr"], b["psnr"])

    assert quality.main(["score", "--images", str(tmp_path / "images.npz"), "--run", str(merged),
                         "--out", str(tmp_path / "results"), "--tag", "t"]) == 0
    report = (tmp_path / "results" / "quality_t.md").read_text()
    assert "cpu:0 (jax 0.0) for t1_spgd_inpaint; cuda:0 (jax 0.0) for t1_dps_inpaint" in report
    assert "picked by mean PSNR on images 2-3 where the sweep table lists tuning images" in report
    # the swept job's tuning PSNRs come from its own tuning images (2 and 3: mean 2.5); the other has none
    # preset: the sweep's value at the config's own lr (2.5); naive: the inpainting measurement itself on images 2-3
    _, _, y = quality_generate.degrade("inpaint", x.astype(np.float32) / 127.5 - 1, 0)
    naive = np.mean(metrics.psnr(jnp.clip(y[2:], -1, 1), jnp.asarray(x[2:] / 127.5 - 1, jnp.float32)))
    assert f"| t1_dps_inpaint | 2.5, 5 | 2.50, 2.50 | 0.50, 0.50 | 5 | 2.50 | {naive:.2f} |" in report
    assert "| t1_spgd_inpaint | 2.5 | - | 0.50 | 2.5 | - | - |" in report
    assert "Presets not above the naive inverse on the tuning images: t1_dps_inpaint." in report
    rows = json.loads((tmp_path / "results" / "quality_t.json").read_text())["rows"]
    assert {r["row"] for r in rows} == {"t1_spgd_inpaint", "t1_dps_inpaint", "classical"}


def test_merge_refuses_runs_that_do_not_compare(tmp_path):
    names = ["a.jpg", "b.jpg"]
    one = _fake_run(tmp_path / "one", names, 2, 0, "cpu:0", {"t1_spgd_inpaint": 2.5})
    again = _fake_run(tmp_path / "again", names, 2, 0, "cpu:0", {"t1_spgd_inpaint": 2.5})
    seed = _fake_run(tmp_path / "seed", names, 2, 0, "cpu:0", {"t1_dps_inpaint": 5.0}, seed=1)
    other = _fake_run(tmp_path / "other", ["a.jpg", "c.jpg"], 2, 0, "cpu:0", {"t1_dps_inpaint": 5.0})
    cases = [((one, again), "job t1_spgd_inpaint is in both"), ((one, seed), "has seed = 1"),
             ((one, other), "other test images"), ((one, tmp_path / "missing"), "manifest.json does not exist")]
    for k, (runs, message) in enumerate(cases):
        with pytest.raises(SystemExit, match=message):
            quality.main(["merge", "--runs", *map(str, runs), "--out", str(tmp_path / f"m{k}")])
        assert not (tmp_path / f"m{k}").exists()
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit, match="exists; pass a new folder"):
        quality.main(["merge", "--runs", str(one), "--out", str(tmp_path / "taken")])


def test_generate_runs_later_rows_at_a_one_value_sweeps_value_without_running_it(tmp_path):
    from spgd_jax.io import checkpoint

    weights = tmp_path / "weights"
    checkpoint.save(weights, _params(), CONFIG)
    # --config: a checkpoint folder or its config.json (the file alone, when generate compiles before the weights exist)
    assert quality_generate.read_config(weights) == quality_generate.read_config(weights / checkpoint.CONFIG_FILE) == CONFIG
    x = np.random.default_rng(4).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", images=x, names=np.asarray(["a.jpg", "b.jpg", "c.jpg"]))
    out = tmp_path / "q"
    assert quality.main(["generate", "--images", str(tmp_path / "images.npz"), "--weights", str(weights),
                         "--out", str(out), "--test", "2", "--tune", "0", "--lr-factors", "1", "--zeta-factors", "1",
                         "--steps", "2", "--warmup", "2", "--tasks", "sr4", "--jobs", "t1_spgd_mean",
                         "--compile-workers", "1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    name = f"t1_spgd_mean{quality_jobs.MEAN_SAMPLES}_sr4"
    assert list(manifest["jobs"]) == [name]  # t1_spgd_sr4 itself did not run
    job = manifest["jobs"][name]
    assert job["picked"] == presets.spgd_config("sr4").lr and job["samples"] == quality_jobs.MEAN_SAMPLES
    assert job["nfe_per_image"] == quality_jobs.MEAN_SAMPLES * 2 * 2 and job["device"] == manifest["device"]
    with np.load(out / f"{name}.npz") as f:
        assert f["restored"].shape == (2, 16, 16, 3) and f["psnr"].shape == (1, 2)
        np.testing.assert_allclose(f["restored_float_psnr"], f["psnr"][0])
    # A later call into the same folder adds its jobs to the run's; one with other settings is refused.
    command = ["generate", "--images", str(tmp_path / "images.npz"), "--weights", str(weights), "--out", str(out),
               "--test", "2", "--tune", "0", "--lr-factors", "1", "--steps", "2", "--warmup", "2", "--tasks", "sr4",
               "--jobs", "t1_spgd_sr4", "--compile-workers", "1"]
    assert quality.main(command) == 0
    assert set(json.loads((out / "manifest.json").read_text())["jobs"]) == {name, "t1_spgd_sr4"}
    before = (out / "manifest.json").read_text()
    differences = r"holds a run with other settings \(seed: 0 -> 1; steps: 2 -> 3\); give the same settings"
    with pytest.raises(SystemExit, match=differences):
        quality.main([*command[:-4], "--seed", "1", "--steps", "3", "--jobs", "t1_spgd_sr4"])
    assert (out / "manifest.json").read_text() == before


def test_plan_tunes_other_methods_on_the_tuning_images_and_skips_tasks_they_cannot_run():
    jobs = {j.name: j for j in quality_jobs.plan(100, 5, methods=("ddrm", "diffpir", "dps"))}
    assert "t1_ddrm_motion_deblur" not in jobs and "t1_ddrm_sr4" in jobs  # DDRM has no SVD of motion blur
    assert jobs["t1_ddrm_sr4"].tuned_by is None and "tune_ddrm_sr4" not in jobs  # no step size to tune
    tune, row = jobs["tune_diffpir_gauss_deblur"], jobs["t1_diffpir_gauss_deblur"]
    assert tune.tune_only and row.tuned_by == tune.name and row.values is None
    lam = presets.config("diffpir", "gauss_deblur").lam
    assert tune.values == tuple(lam * f for f in quality_jobs.METHOD_FACTORS)
    assert (tune.rows(50, 82), row.rows(50, 82)) == (slice(50, 82), slice(0, 50))
    published = jobs["t1_dps1000_sr4"].config  # DPS's Table 1 row as published, beside the equal-NFE one
    assert (published.schedule, published.steps) == ("ddpm", 1000) and jobs["t1_dps_sr4"].config.steps == 500
    assert jobs["t1_dps1000_sr4"].row == "DPS (1000 NFE, as published)"


def test_generate_and_score_other_methods_tuned_then_tested(tmp_path):
    from spgd_jax.io import checkpoint

    weights = tmp_path / "weights"
    checkpoint.save(weights, _params(), CONFIG)
    x = np.random.default_rng(5).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", images=x, names=np.asarray(["a.jpg", "b.jpg", "c.jpg"]))
    out = tmp_path / "q"
    common = ["--images", str(tmp_path / "images.npz"), "--weights", str(weights), "--tasks", "inpaint"]
    assert quality.main(["generate", *common, "--out", str(out), "--test", "2", "--tune", "1", "--lr-factors", "1",
                         "--steps", "2", "--warmup", "1", "--methods", "ddrm,diffpir", "--method-factors", "0.5,2",
                         "--jobs", "t1_spgd_inpaint,tune_,t1_ddrm,t1_diffpir", "--compile-workers", "1"]) == 0
    jobs = json.loads((out / "manifest.json").read_text())["jobs"]
    sweep = jobs["tune_diffpir_inpaint"]
    with np.load(out / "tune_diffpir_inpaint.npz") as f:  # two values on one tuning image, or more if widened
        assert f["psnr"].shape == (len(sweep["values"]), 1) and f["values"].tolist() == sweep["values"]
        assert f["restored"].shape == (0, 16, 16, 3)
        picked = sweep["values"][int(np.argmax(f["psnr"][:, 0]))]
    assert jobs["t1_diffpir_inpaint"]["picked"] == picked and jobs["t1_diffpir_inpaint"]["nfe_per_image"] == 20
    with np.load(out / "t1_ddrm_inpaint.npz") as f:
        assert f["restored"].shape == (2, 16, 16, 3)
    assert quality.main(["score", "--images", str(tmp_path / "images.npz"), "--run", str(out), "--out",
                         str(tmp_path / "results"), "--tag", "t"]) == 0
    report = json.loads((tmp_path / "results" / "quality_t.json").read_text())
    assert {r["job"] for r in report["rows"]} == {"t1_spgd_inpaint", "t1_ddrm_inpaint", "t1_diffpir_inpaint",
                                                  "t1_classical_inpaint"}
    gains = {g["against"]: g for g in report["gains"]}
    ours = next(r for r in report["rows"] if r["job"] == "t1_spgd_inpaint")["per_image"]["psnr"]
    theirs = next(r for r in report["rows"] if r["job"] == "t1_ddrm_inpaint")["per_image"]["psnr"]
    assert gains["DDRM (20 NFE)"]["psnr"]["gain"] == pytest.approx(np.mean(np.subtract(ours, theirs)))
    markdown = (tmp_path / "results" / "quality_t.md").read_text()
    assert "| inpaint | DDRM (20 NFE) | - |" in markdown and "## SPGD minus each method" in markdown


def _sweep_to_widen(tmp_path, values, psnr_at):
    """A Generation with one finished tuning sweep over `values` on 2 tuning images, whose restorations score
    psnr_at(value) dB (no network: widen's runs go through a stand-in batch_runner)."""
    tmp_path.mkdir(exist_ok=True)
    run = object.__new__(quality_generate.Generation)
    run.out, run.n_test, run.n_all, run.names = tmp_path, 1, 3, ["t.png", "a.png", "b.png"]
    run.args, run.weights, run.x_shape = argparse.Namespace(batch=2, seed=0), tmp_path, (4, 4, 3)
    run.log = lambda text: None
    run.batch_runner = lambda program, params, task, rows, step_sizes: lambda index: (
        np.zeros((1, len(index), 4, 4, 3)), np.full((1, len(index)), psnr_at(float(step_sizes[0]))),
        np.zeros((1, len(index)), bool))
    run.manifest = {"jobs": {"tune_x": {"task": "sr4", "config": {"type": "C"}, "dtype": "float32", "samples": 1,
                                        "values": list(values), "picked": values[0], "seconds": 1.0, "images": 6}}}
    np.savez(tmp_path / "tune_x.npz", psnr=np.asarray([[psnr_at(v)] * 2 for v in values]),
             diverged=np.zeros((len(values), 2), bool))
    return run


def test_a_sweep_picking_its_edge_goes_on_past_it_until_a_value_does_worse(tmp_path):
    peak = lambda v: 30.0 - np.log(v / 0.2) ** 2  # best at 0.2, below the grid 0.5, 1, 2
    run = _sweep_to_widen(tmp_path, (0.5, 1.0, 2.0), peak)
    assert run.widen("tune_x", None, None) == 0.25  # 0.25 beats 0.5, 0.125 does worse than 0.25: stop
    record = run.manifest["jobs"]["tune_x"]
    assert record["values"] == [0.125, 0.25, 0.5, 1.0, 2.0] and record["widened"] == 2 and record["picked"] == 0.25
    with np.load(tmp_path / "tune_x.npz") as f:
        np.testing.assert_allclose(f["psnr"][:, 0], [peak(v) for v in record["values"]])
        assert f["values"].tolist() == record["values"]
    assert json.loads((tmp_path / "manifest.json").read_text())["jobs"]["tune_x"]["values"] == record["values"]
    assert run.widen("tune_x", None, None) == 0.25  # again (a resumed run): nothing more to add


def test_a_sweep_stops_widening_at_the_step_limit_and_at_a_flat_edge(tmp_path):
    run = _sweep_to_widen(tmp_path / "rising", (1.0, 2.0), lambda v: v)  # better and better upwards
    assert run.widen("tune_x", None, None) == 2.0 * 2**quality_generate.WIDEN_STEPS
    flat = _sweep_to_widen(tmp_path, (1.0, 2.0, 4.0), lambda v: 20.0)
    assert flat.widen("tune_x", None, None) == 1.0 and "widened" not in flat.manifest["jobs"]["tune_x"]


def test_rows_of_other_settings_are_kept_aside_and_the_job_restores_afresh(tmp_path):
    calls = []

    def run_batch(index):
        calls.append(index.tolist())
        return np.zeros((1, len(index), 4, 4, 3)), np.full((1, len(index)), float(len(calls))), np.zeros((1, len(index)), bool)

    restore = lambda value: quality_generate.restore_rows(tmp_path / "t1_x", {"values": [value]}, ["a", "b", "c"],
                                                          run_batch, 2, 0, lambda text: None)
    first, _, _, seconds = restore(0.5)
    assert calls == [[0, 1], [2, 2]] and first.tolist() == [[1.0, 1.0, 2.0]] and seconds >= 0
    again = restore(0.5)  # resumed: nothing left to restore; the time is the rows' own
    assert again[0].tolist() == first.tolist() and len(calls) == 2 and again[3] == seconds
    moved, _, _, _ = restore(0.25)  # the pick moved: afresh, the old rows renamed
    assert moved.tolist() == [[3.0, 3.0, 4.0]] and (tmp_path / "t1_x.superseded-1" / "manifest.json").is_file()
    with pytest.raises(SystemExit, match="seed"):  # anything else that differs is refused, the rows kept
        quality_generate.restore_rows(tmp_path / "t1_x", {"values": [0.25], "seed": 1}, ["a"], run_batch, 2, 0,
                                      lambda text: None)
    assert not (tmp_path / "t1_x.superseded-2").exists()


def test_images_stage_says_what_the_data_folder_must_hold(tmp_path):
    split = tmp_path / "split.txt"
    split.write_text("celeba/000001.jpg\nutkface/1_0_0_x.jpg\n")
    with pytest.raises(SystemExit, match=r"data folder .* does not exist; --data DIR must be the folder that holds"):
        quality_generate.load_split_images(tmp_path / "nowhere", split, 2, 16)
    (tmp_path / "faces").mkdir()
    with pytest.raises(SystemExit, match=r"2 of the 2 images are not in .*celeba/000001.jpg.*not part of the "
                                         r"repository"):
        quality_generate.load_split_images(tmp_path / "faces", split, 2, 16)


def test_compared_rows_join_only_results_over_the_same_leading_images(tmp_path):
    per_image = {"psnr": [20.0, 22.0, 30.0], "ssim": [0.5, 0.7, 0.9]}
    spgd = {"job": "t1_spgd_sr4", "row": "SPGD", "psnr": {"mean": 24.0, "std": 4.3}, "psnr_float": 24.0,
            "diverged": 1, "per_image": per_image}
    earlier = {"meta": {"test": 3, "seed": 0, "names": ["a", "b", "c"]}, "rows": [spgd, {**spgd, "job": "t1_x"}]}
    path = tmp_path / "quality_old.json"
    path.write_text(json.dumps(earlier))
    same = quality_report.compared_rows([str(path)], {"t1_x"}, {"test": 3, "seed": 0, "names": ["a", "b", "c"]})
    assert same == [{**spgd, "from": "quality_old.json"}]  # this run's own t1_x wins
    # an 8-face run joins a 50-face run's rows over its first 8 faces: the means and pairs of those alone
    (first,) = quality_report.compared_rows([str(path)], {"t1_x"}, {"test": 2, "seed": 0, "names": ["a", "b"]})
    assert first["psnr"] == {"mean": 21.0, "std": 1.0} and first["per_image"]["ssim"] == [0.5, 0.7]
    assert "diverged" not in first and "psnr_float" not in first  # counted over all 3: not this run's
    for meta in ({"test": 2, "seed": 1, "names": ["a", "b"]}, {"test": 2, "seed": 0, "names": ["b", "c"]},
                 {"test": 4, "seed": 0, "names": ["a", "b", "c", "d"]}):
        with pytest.raises(SystemExit, match="only results with the same seed over the same leading test images"):
            quality_report.compared_rows([str(path)], set(), meta)


def test_missing_rows_name_each_method_and_why():
    rows = [{"job": "t1_spgd_sr4", "table": "1", "task": "sr4"}, {"job": "t1_ddrm_inpaint", "table": "1", "task": "inpaint"}]
    lines = "\n".join(quality_report.missing_rows(rows))
    assert "- SPGD: not run on inpaint, gauss_deblur, motion_deblur." in lines
    assert "- DDRM: cannot run motion_deblur (the paper's \"-\"); not run on gauss_deblur, sr4." in lines
    assert "- DPS as published (1000 NFE): not run on inpaint, gauss_deblur, motion_deblur, sr4." in lines
