"""Gradient diagnostics, learning-rate sweeps and trajectory videos: the API on toy problems against
NumPy references, then the CLI (--diagnostics, --lr a,b, --video) once on the tiny 16 px prior."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cli_helpers import FAST, picture, random_faces, temporary_files, tiny_weights
from sampler_toys import PRIOR_VAR, SHAPE, conv_denoiser, gaussian_denoiser, matrix_forward, random_problem
from spgd_jax import restore
from spgd_jax.io import plots
from spgd_jax.restore._writers import sweep_markdown, video_frames
from spgd_jax.samplers import SPGDConfig, diagnostics, run, sample, sweep

CONV = conv_denoiser()
TINY = SPGDConfig(lr=0.5, steps=4, warmup=3, diagnostics=True)


def numpy_angle(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return np.degrees(np.arccos(np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1, 1)))


def test_angle_matches_numpy_and_is_accurate_near_0_and_180():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(diagnostics.angle(a, b), numpy_angle(a, b), atol=1e-4)
    # |u - v| of two float32 unit vectors is a few ulp (norms of 48 terms, summed in a CPU-dependent
    # order): 2.9e-6 deg seen, ~1.2e-5 deg at worst; arccos of the float32 cosine gives 0.02 deg here
    np.testing.assert_allclose(diagnostics.angle(a, 3 * a), 0.0, atol=1e-4)
    np.testing.assert_allclose(diagnostics.angle(a, -a), 180.0, atol=1e-4)
    tilted = a + 1e-3 * b  # about 0.05 deg: below what arccos of a float32 cosine resolves
    np.testing.assert_allclose(diagnostics.angle(a, tilted), numpy_angle(a, tilted), rtol=1e-3)
    assert diagnostics.angle(a, np.zeros_like(a)) == 90.0


def numpy_diagnostics(x_init, matrices, y, config):
    """SPEC 3 for D(x; s) = x v/(v+s^2) and A = M vec(x) in float64, recording the module docstring's angles."""
    T, N = config.steps, config.warmup
    hi, lo = config.sigma_max ** (1 / config.rho), config.sigma_min ** (1 / config.rho)
    t = [(hi + i / (T - 1) * (lo - hi)) ** config.rho for i in range(T)] + [0.0]
    out = {name: np.zeros((len(y), T)) for name in diagnostics.NAMES}
    for b, (x, M, yb) in enumerate(zip(np.asarray(x_init, np.float64), np.asarray(matrices, np.float64),
                                       np.asarray(y, np.float64))):
        for i in range(T):
            c = PRIOR_VAR / (PRIOR_VAR + t[i] ** 2)
            eta = config.lr * (1 + (i / T) * (config.lr_min_ratio - 1))
            gs, ms, ds = [], [], []
            for j in range(N):
                g = (2 * c * M.T @ (M @ (c * x.ravel()) - yb)).reshape(x.shape)
                if config.adm == "off":
                    m = g
                elif j == 0:
                    m = g
                else:
                    alpha = (1 + np.vdot(g, ms[-1]) / (np.linalg.norm(g) * np.linalg.norm(ms[-1]))) / 2
                    m = alpha * config.beta * ms[-1] + (1 - alpha * config.beta) * g
                gs.append(g), ms.append(m), ds.append(c * x - x)
                x_eval, x = x, x - eta * m
            x = x + (1 - t[i + 1] / t[i]) * (c * x_eval - x_eval)
            out["likelihood_vs_denoising"][b, i] = np.mean([numpy_angle(g, d) for g, d in zip(gs, ds)])
            for name, seq in (("likelihood_consecutive", gs), ("smoothed_consecutive", ms),
                              ("denoising_consecutive", ds)):
                out[name][b, i] = np.mean([numpy_angle(u, v) for u, v in zip(seq[1:], seq[:-1])]) if N > 1 else np.nan
    return out


@pytest.mark.parametrize("adm", ["paper", "off"])
def test_angles_match_a_numpy_reference(adm):
    matrices, _, y, x_init = random_problem(2)
    config = dataclasses.replace(TINY, adm=adm, lr=2.0, steps=5)
    result = jax.jit(lambda x: run(gaussian_denoiser, matrix_forward, y, x, config, matrices))(x_init)
    expected = numpy_diagnostics(x_init, matrices, y, config)
    assert set(result.diagnostics) == set(diagnostics.NAMES)
    for name in diagnostics.NAMES:
        assert result.diagnostics[name].shape == (2, 5)
        np.testing.assert_allclose(result.diagnostics[name], expected[name], atol=0.02, err_msg=name)
    if adm == "off":  # the update is the raw gradient
        np.testing.assert_array_equal(result.diagnostics["smoothed_consecutive"],
                                      result.diagnostics["likelihood_consecutive"])


def test_diagnostics_do_not_change_the_result_and_are_off_by_default():
    matrices, _, y, _ = random_problem(3)
    key = jax.random.key(3)
    on = sample(CONV, matrix_forward, y, key, TINY, matrices, x_shape=SHAPE)
    off = sample(CONV, matrix_forward, y, key, dataclasses.replace(TINY, diagnostics=False), matrices, x_shape=SHAPE)
    assert off.diagnostics is None and SPGDConfig(lr=1.0).diagnostics is False
    # Two programs (the angles change what XLA fuses): equal to round-off, to 3e-5 of each field's scale
    # as test_spgd's toy-conv comparisons. An lr off by 1e-3 exceeds that 19x in x, 14x in the losses.
    np.testing.assert_array_equal(on.diverged_step, off.diverged_step)
    for field in ("x", "losses"):
        expected = np.asarray(getattr(off, field))
        np.testing.assert_allclose(getattr(on, field), expected, rtol=1e-5, atol=3e-5 * np.abs(expected).max())
    assert all(np.isfinite(v).all() for v in on.diagnostics.values())


def test_one_warmup_iteration_has_no_consecutive_angles():
    matrices, _, y, _ = random_problem(1)
    config = dataclasses.replace(TINY, warmup=1)
    result = sample(gaussian_denoiser, matrix_forward, y, jax.random.key(0), config, matrices, x_shape=SHAPE)
    assert np.isfinite(result.diagnostics["likelihood_vs_denoising"]).all()
    for name in diagnostics.NAMES[1:]:
        assert np.isnan(result.diagnostics[name]).all()
    with pytest.raises(TypeError, match="diagnostics must be True or False"):
        SPGDConfig(lr=1.0, diagnostics="yes")


# ------------------------------------------------------------------ learning-rate sweeps


def test_sweep_equals_one_run_per_learning_rate():
    matrices, _, y, _ = random_problem(2)
    key, lrs = jax.random.key(5), [0.25, 1.0, 4.0]
    swept = sweep(CONV, matrix_forward, y, key, TINY, lrs, matrices, x_shape=SHAPE)
    assert swept.x.shape == (3, 2) + SHAPE and swept.losses.shape == (3, 2, 4, 3)
    assert swept.diagnostics["likelihood_vs_denoising"].shape == (3, 2, 4)
    for k, lr in enumerate(lrs):
        alone = sample(CONV, matrix_forward, y, key, dataclasses.replace(TINY, lr=lr), matrices, x_shape=SHAPE)
        # vmapped over the rates or not: another program, so round-off differs (5.7e-6 at lr 4, where
        # |x| ~ 8 and the old flat atol 1e-5 was a third used); 3e-5 of the scale keeps 50x, an lr off
        # by 1e-3 exceeds it 11x (lr 0.25) to 94x (lr 4)
        np.testing.assert_allclose(swept.x[k], alone.x, rtol=1e-5, atol=3e-5 * np.abs(alone.x).max())
        np.testing.assert_allclose(swept.losses[k], alone.losses, rtol=1e-4)
        np.testing.assert_allclose(swept.diagnostics["likelihood_vs_denoising"][k],
                                   alone.diagnostics["likelihood_vs_denoising"], atol=0.01)
    assert not np.allclose(swept.x[0], swept.x[2])


def test_sweep_flags_divergence_per_learning_rate():
    matrices, _, y, _ = random_problem(2)
    swept = sweep(gaussian_denoiser, matrix_forward, y, jax.random.key(0), TINY, [0.5, 1e30], matrices,
                     x_shape=SHAPE)
    assert swept.diverged.tolist() == [[False, False], [True, True]]
    assert (swept.diverged_step[1] >= 0).all() and np.isfinite(swept.x).all()


@pytest.mark.parametrize("lrs, error, match", [
    ([], ValueError, "at least one"),
    ([1.0, -2.0], ValueError, r"finite and > 0"),
    ([1.0, float("inf")], ValueError, r"finite and > 0"),
    ("fast", ValueError, "list of numbers"),
])
def test_sweep_rejects_bad_learning_rates(lrs, error, match):
    matrices, _, y, _ = random_problem(1)
    with pytest.raises(error, match=match):
        sweep(gaussian_denoiser, matrix_forward, y, jax.random.key(0), TINY, lrs, matrices, x_shape=SHAPE)


def test_sweep_needs_a_sampler_with_a_step_size_and_sweeps_dps_zeta_too():
    from spgd_jax.samplers import DPSConfig, EulerConfig

    matrices, _, y, _ = random_problem(2)
    with pytest.raises(TypeError, match="EulerConfig has no step size"):
        sweep(gaussian_denoiser, matrix_forward, y, jax.random.key(0), EulerConfig(), [1.0], matrices, x_shape=SHAPE)
    config, key = DPSConfig(zeta=1.0, steps=6), jax.random.key(3)
    swept = sweep(CONV, matrix_forward, y, key, config, [0.1, 2.0], matrices, x_shape=SHAPE)
    for k, zeta in enumerate([0.1, 2.0]):
        alone = sample(CONV, matrix_forward, y, key, dataclasses.replace(config, zeta=zeta), matrices, x_shape=SHAPE)
        np.testing.assert_allclose(swept.x[k], alone.x, rtol=1e-5, atol=1e-5)
    assert not np.allclose(swept.x[0], swept.x[1])


def test_markdown_table_lists_each_rate_with_mean_std_and_divergence():
    summaries = [{"psnr": {"mean": 20.5, "std": 1.25}, "residual_rms": {"mean": 0.01, "std": 0.002}},
                 {"psnr": {"mean": None, "std": None}, "residual_rms": {"mean": None, "std": None}}]
    table = sweep_markdown("lr", [0.5, 2.0], summaries, [0, 3], 3, "title")
    lines = table.splitlines()
    assert lines[0] == "# title"
    assert lines[2] == "| lr | PSNR (dB) | residual RMS | diverged |"
    assert lines[4] == "| 0.5 | 20.5 ± 1.2 | 0.01 ± 0.002 | 0 / 3 |"
    assert lines[5] == "| 2 | - | - | 3 / 3 |"


# ------------------------------------------------------------------ pictures


def test_plot_and_gif_are_written_atomically(tmp_path):
    values = {name: np.random.default_rng(0).uniform(0, 180, (3, 7)) for name in diagnostics.NAMES}
    plots.plot_angles(tmp_path / "angles.png", values, title="t")
    assert picture(tmp_path / "angles.png").shape[:2] == (400, 700)
    plots.plot_sweep(tmp_path / "sweep.png", [1, 2], [{"psnr": {"mean": 1.0, "std": 0.1}}] * 2, "t")
    frames = np.linspace(-1, 1, 5)[:, None, None, None] * np.ones((5, 16, 16, 3))
    plots.save_gif(tmp_path / "video.gif", frames)
    with Image.open(tmp_path / "video.gif") as gif:
        assert gif.n_frames == 5 and gif.size == (128, 128) and gif.info["loop"] == 0
        gif.seek(2)
        np.testing.assert_allclose(np.asarray(gif.convert("RGB")), 128, atol=1)  # the middle frame: 0 -> grey
    assert sorted(p.name for p in tmp_path.iterdir()) == ["angles.png", "sweep.png", "video.gif"]
    with pytest.raises(ValueError, match=r"\(K, H, W, 3\)"):
        plots.save_gif(tmp_path / "bad.gif", frames[0])


# ------------------------------------------------------------------ the command line


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    weights = tiny_weights(tmp_path_factory)
    faces = random_faces(tmp_path_factory.mktemp("faces"))
    out = tmp_path_factory.mktemp("sweep") / "out"
    arguments = ["--task", "inpaint", "--input", str(faces), "--weights", weights, "--out", str(out),
                 "--lr", "2.5,1e30", "--diagnostics", "--video", *FAST]
    assert restore.main(arguments) == 0
    return out, arguments


def test_cli_sweep_writes_a_folder_per_rate_a_table_and_a_plot(sweep_run):
    out, _ = sweep_run
    for folder, diverged in (("lr-2.5", False), ("lr-1e+30", True)):
        metrics = json.loads((out / folder / "metrics.json").read_text())
        assert metrics["lr"] == float(folder[3:])
        assert [r["diverged"] for r in metrics["images"]] == [diverged] * 3
        for name in ("a", "b", "c"):
            assert picture(out / folder / "restored" / f"{name}.png").shape == (16, 16, 3)
    table = (out / "sweep.md").read_text()
    assert "| 2.5 |" in table and "| 0 / 3 |" in table and "| 1e+30 | - | - | - | 3 / 3 |" in table
    assert picture(out / "sweep.png").size > 0
    assert picture(out / "grid.png").shape == (3 * 16, 4 * 16, 3)  # input | measurement | lr 2.5 | lr 1e30
    config = json.loads((out / "config.json").read_text())
    assert config["step_sizes"] == {"lr": [2.5, 1e30]} and config["sampler_config"]["lr"] == [2.5, 1e30]
    assert config["sampler_config"]["diagnostics"] is True
    assert temporary_files(out) == []


def test_cli_diagnostics_and_videos(sweep_run):
    out, _ = sweep_run
    with np.load(out / "lr-2.5" / "diagnostics.npz") as data:
        assert [str(n) for n in data["names"]] == ["a", "b", "c"]
        for name in diagnostics.NAMES:
            assert data[name].shape == (3, 3)  # 3 images, T = 3
            assert ((0 <= data[name]) & (data[name] <= 180)).all()
    assert picture(out / "lr-2.5" / "diagnostics.png").shape[:2] == (400, 700)
    for folder in ("lr-2.5", "lr-1e+30"):
        with Image.open(out / folder / "video" / "a.gif") as gif:  # x0_hat at 3 steps + result; diverged: result
            assert gif.size == (128, 128) and 1 <= gif.n_frames <= (4 if folder == "lr-2.5" else 1)


def test_cli_sweep_refuses_to_overwrite_any_rate_folder(sweep_run, tmp_path):
    out, arguments = sweep_run
    copy = tmp_path / "copy"
    shutil.copytree(out / "lr-2.5", copy / "lr-2.5")  # only one rate's outputs exist
    arguments = [str(copy) if a == str(out) else a for a in arguments]
    with pytest.raises(SystemExit, match=r"already exist \(.*lr-2.5.*--overwrite"):
        restore.main(arguments)
    assert sorted(p.name for p in copy.iterdir()) == ["lr-2.5"]


def test_video_frames_stop_before_divergence():
    trajectory = np.arange(5)[:, None, None, None] * np.ones((5, 2, 2, 3))  # x0_hat at steps 0, 2, 4, 6, 8
    last = np.full((2, 2, 3), 9.0)
    assert video_frames(trajectory, last, -1, 2)[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 9]
    assert video_frames(trajectory, last, 5, 2)[:, 0, 0, 0].tolist() == [0, 1, 2, 9]  # steps 0, 2, 4 < 5
    assert video_frames(trajectory, last, 4, 2)[:, 0, 0, 0].tolist() == [0, 1, 9]
    assert video_frames(trajectory, last, 0, 2)[:, 0, 0, 0].tolist() == [9]


@pytest.mark.parametrize("lrs", [(0.5, 1.0), (0.25, 0.5, 1.0, 2.0), (1.0, 1.5, 2.0)])
def test_sweep_plot_x_labels_are_the_rates_and_do_not_overlap(lrs):
    summary = {"psnr": {"mean": 20.0, "std": 1.0}, "residual_rms": {"mean": 0.1, "std": 0.01}}
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = plots.sweep_figure(lrs, [summary] * len(lrs), "title", "zeta")
    renderer = FigureCanvasAgg(figure).get_renderer()
    for axis in figure.axes:
        assert axis.get_xlabel() == "zeta"  # the swept field, whichever method
        labels = [t for t in axis.get_xticklabels(which="both") if t.get_visible() and t.get_text()]
        assert [t.get_text() for t in labels] == [f"{lr:g}" for lr in lrs]
        boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.x0)
        assert all(left.x1 < right.x0 for left, right in zip(boxes, boxes[1:])), [(b.x0, b.x1) for b in boxes]
