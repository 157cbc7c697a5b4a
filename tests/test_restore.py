"""The restore CLI end to end on a tiny random-weight prior (16 px): outputs, refusals, reproducibility.

More refusals and recoveries: test_robustness.py; diagnostics, sweeps and videos: test_diagnostics.py.
"""

import io
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli_helpers import FAST, picture, random_faces, temporary_files, tiny_weights
from spgd_jax import restore
from spgd_jax.io import checkpoint
from spgd_jax.models.adm import CONFIGS, UNet
from spgd_jax.samplers import SAMPLERS
from spgd_jax.restore import _command
from spgd_jax.restore._args import check_arguments
from spgd_jax.restore import _progress
from spgd_jax.restore._progress import Cancelled, Progress
from spgd_jax.restore._run import combine_samples
from spgd_jax.restore._writers import measurement_picture


def sampler_config(args, tuned):
    """The sampler config the command builds from parsed arguments."""
    return _command.sampler_config(check_arguments(args), args.task, tuned)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_weights(tmp_path_factory)


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    return random_faces(tmp_path_factory.mktemp("faces"))


def run(faces, weights, out, *extra):
    return restore.main(["--task", "inpaint", "--input", str(faces), "--weights", weights, "--out", str(out),
                         *FAST, *extra])


@pytest.fixture(scope="module")
def first_run(weights, faces, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "inpaint"
    assert run(faces, weights, out) == 0
    return out


def test_writes_every_output(first_run):
    out = first_run
    for name in ("a", "b", "c"):
        for sub in ("restored", "measurement"):
            image = picture(out / sub / f"{name}.png")
            assert image.shape == (16, 16, 3)
    grid = picture(out / "grid.png")
    assert grid.shape == (3 * 16, 3 * 16, 3)  # rows: images; columns: input | measurement | restored
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["name"] for r in metrics["images"]] == ["a", "b", "c"]
    for record in metrics["images"]:
        assert np.isfinite([record["psnr"], record["ssim"], record["residual_rms"]]).all()
        assert "lpips" not in record  # undefined below 32 px
        assert record["diverged"] is False
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == "inpaint" and config["sampler_config"]["steps"] == 3
    assert config["sampler_config"]["warmup"] == 2 and config["sampler_config"]["lr"] == 2.5
    assert temporary_files(out) == []


def test_dps_sampler_writes_every_output(faces, weights, tmp_path):
    out = tmp_path / "dps"
    assert restore.main(["--task", "sr4", "--sampler", "dps", "--zeta", "0.2", "--steps", "4", "--input", str(faces),
                         "--weights", weights, "--out", str(out), "--batch-size", "2", "--quiet"]) == 0
    assert picture(out / "restored" / "a.png").shape == (16, 16, 3)
    records = json.loads((out / "metrics.json").read_text())["images"]
    assert len(records) == 3 and all(np.isfinite(r["psnr"]) for r in records)
    config = json.loads((out / "config.json").read_text())
    assert config["sampler"] == "dps" and config["sampler_config"]["zeta"] == 0.2
    assert config["sampler_config"]["steps"] == 4


def test_any_config_field_is_set_from_the_command_line_with_its_type():
    parser = restore.build_parser()
    args = parser.parse_args(["--task", "sr4", "--set", "warmup=3", "--set", "lr-min-ratio=0.5", "--set", "adm=off"])
    config = sampler_config(args, tuned=True)
    assert (config.warmup, config.lr_min_ratio, config.adm) == (3, 0.5, "off")
    assert sampler_config(parser.parse_args(["--task", "sr4", "--sampler", "dps", "--set", "zeta=2"]), True).zeta == 2.0
    choices = next(a.choices for a in parser._actions if a.dest == "sampler")
    assert set(choices) == {n for n, s in SAMPLERS.items() if s.conditional} and "euler" not in choices


def test_reduced_precision_is_recorded_and_close_to_float32(faces, tmp_path):
    from spgd_jax.models.adm import _onednn
    # tiny16 with every weight random: its zero-initialised output layers would hide the compute dtype.
    config = CONFIGS["tiny16"]
    params = UNet(config).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,)))["params"]
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [leaf + 0.05 * jax.random.normal(key, leaf.shape) for leaf, key in zip(leaves, keys)]
    checkpoint.save(tmp_path / "weights", jax.tree_util.tree_unflatten(tree, noisy), config)
    flags = {"float32": (), "bfloat16": ("--dtype", "bfloat16"), "conv": ("--conv-precision", "bfloat16")}
    runs = {name: tmp_path / name for name in flags}
    for name, out in runs.items():
        assert run(faces, str(tmp_path / "weights"), out, *flags[name]) == 0
        recorded = json.loads((out / "config.json").read_text())
        assert recorded["unet_config"]["dtype"] == ("bfloat16" if name == "bfloat16" else "float32")
        assert recorded["conv_precision"] == ("bfloat16" if name == "conv" else "float32")
        assert jax.config.values["jax_default_matmul_precision"] is None  # the process's setting is given back
    ref = [r["residual_rms"] for r in _results(runs["float32"])[2]]
    for name in ("bfloat16", "conv"):
        got = [r["residual_rms"] for r in _results(runs[name])[2]]
        if name == "conv" and _onednn.float32_target() is None:  # a CPU without a bfloat16 route: nothing changes
            assert got == ref
            continue
        assert got != ref and np.allclose(got, ref, rtol=0.05)  # another computation, the same restorations nearly
    # A run continues only with the dtype and convolution precision it began with.
    with pytest.raises(SystemExit, match=r"unet_config.dtype: 'bfloat16' -> 'float32'.*--overwrite"):
        run(faces, str(tmp_path / "weights"), runs["bfloat16"], "--dtype", "float32")
    with pytest.raises(SystemExit, match=r"conv_precision: 'bfloat16' -> '\(unset\)'.*--overwrite"):
        run(faces, str(tmp_path / "weights"), runs["conv"])


def test_step_sizes_tuned_for_the_default_prior_apply_only_to_it(faces, weights, tmp_path):
    from spgd_jax.samplers import presets

    parser = restore.build_parser()
    args = parser.parse_args(["--task", "gauss_deblur"])
    assert sampler_config(args, tuned=True).lr == presets.TUNED_SPGD["gauss_deblur"]["lr"]
    assert sampler_config(args, tuned=False).lr == presets.PAPER_LR["gauss_deblur"]
    args = parser.parse_args(["--task", "gauss_deblur", "--lr-min-ratio", "0.5"])
    assert sampler_config(args, tuned=True).lr_min_ratio == 0.5
    out = tmp_path / "deblur"  # other weights than the default prior: the paper's learning rate
    assert restore.main(["--task", "gauss_deblur", "--input", str(faces), "--weights", weights, "--out", str(out),
                         *FAST]) == 0
    assert json.loads((out / "config.json").read_text())["sampler_config"]["lr"] == presets.PAPER_LR["gauss_deblur"]


def test_existing_outputs_are_not_overwritten(first_run, faces, weights):
    before = (first_run / "grid.png").read_bytes()
    with pytest.raises(SystemExit, match="other settings.*seed: 0 -> 1.*--overwrite"):
        run(faces, weights, first_run, "--seed", "1")
    assert (first_run / "grid.png").read_bytes() == before
    assert run(faces, weights, first_run) == 0  # the same command continues the run: here, nothing is left to do
    assert (first_run / "grid.png").read_bytes() == before


def test_measurement_file_reproduces_the_run(first_run, weights, tmp_path):
    out = tmp_path / "again"
    code = restore.main(["--task", "inpaint", "--measurement", str(first_run / "measurement.npz"),
                         "--weights", weights, "--out", str(out), *FAST])
    assert code == 0
    for name in ("a", "b", "c"):
        np.testing.assert_array_equal(picture(out / "restored" / f"{name}.png"),
                                      picture(first_run / "restored" / f"{name}.png"))
    again, first = (json.loads((o / "metrics.json").read_text()) for o in (out, first_run))
    assert set(again["mean_std_over_finite_images"]) == {"residual_rms"}  # no ground truth: no PSNR
    assert [r["residual_rms"] for r in again["images"]] == [r["residual_rms"] for r in first["images"]]


def _results(out):
    """Everything a run computed: restored and measurement pictures, y and operator params, metric values."""
    pngs = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.png"))}
    with np.load(out / "measurement.npz") as data:
        arrays = {k: data[k] for k in data.files}
    return pngs, arrays, json.loads((out / "metrics.json").read_text())["images"]


def test_same_seed_same_bits_other_seed_differs(first_run, faces, weights, tmp_path):
    assert run(faces, weights, tmp_path / "same") == 0
    pngs, arrays, records = _results(tmp_path / "same")
    first_pngs, first_arrays, first_records = _results(first_run)
    assert pngs == first_pngs and records == first_records  # metric values as float64 from the float32 results
    assert arrays.keys() == first_arrays.keys()
    for k in arrays:
        np.testing.assert_array_equal(arrays[k], first_arrays[k])
    assert run(faces, weights, tmp_path / "other", "--seed", "1") == 0
    _, other_arrays, other_records = _results(tmp_path / "other")
    assert not np.array_equal(other_arrays["y"], arrays["y"])
    assert not np.array_equal(other_arrays["param_mask"], arrays["param_mask"])
    assert [r["residual_rms"] for r in other_records] != [r["residual_rms"] for r in records]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--task", "sr4", "--weights", "/nonexistent/w"], "cannot load weights"),
        (["--task", "sr4", "--input", "/nonexistent/*.png"], "no image file"),
        (["--task", "sr4", "--batch-size", "0"], "batch-size"),
        (["--task", "sr4", "--sampler", "dps", "--lr", "1"], "--lr is not a setting of --sampler dps"),
        (["--task", "sr4", "--sampler", "dps", "--lr-min-ratio", "1"], "--lr-min-ratio is not a setting of --sampler"),
        (["--task", "sr4", "--lr-min-ratio", "2"], "lr_min_ratio must be in"),
        (["--task", "sr4", "--warmup", "0"], "warmup"),
        (["--task", "sr4", "--input", "x.png", "--measurement", "m.npz"], "not both"),
        (["--task", "sr4", "--samples", "0"], "--samples must be >= 1"),
        (["--task", "sr4", "--samples", "2", "--video"], "follow one sample's run"),
    ],
)
def test_bad_arguments_are_clear_errors(arguments, message, weights):
    if "--weights" not in arguments:
        arguments = arguments + ["--weights", weights]
    with pytest.raises(SystemExit, match=message):
        restore.main(arguments + ["--quiet"])


def test_unknown_task_lists_the_choices(capsys):
    with pytest.raises(SystemExit):
        restore.main(["--task", "denoise"])
    assert "invalid choice" in capsys.readouterr().err


def test_unwritable_output_folder(weights, faces, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit, match="cannot write to output folder"):
        restore.main(["--task", "sr4", "--input", str(faces), "--weights", weights, "--out", str(blocker / "out"),
                      *FAST])
    assert not (blocker.parent / "out").exists()


def test_measurement_picture_shows_fourier_data_on_a_log_scale():
    magnitudes = np.abs(np.random.default_rng(0).normal(size=(24, 24, 3))) * 50
    picture = measurement_picture(magnitudes, 16)
    assert picture.shape == (16, 16, 3) and picture.min() >= -1 and picture.max() <= 1


def test_samples_write_their_mean_std_and_each_sample(faces, weights, tmp_path):
    from spgd_jax.io import images

    out = tmp_path / "samples"
    assert run(faces, weights, out, "--samples", "3") == 0
    with np.load(out / "samples.npz") as data:
        samples, std, names = data["samples"], data["std"], list(data["names"])
    assert samples.shape == (3, 3, 16, 16, 3) and names == ["a", "b", "c"]
    assert not np.allclose(samples[:, 0], samples[:, 1])  # independent noise per sample
    np.testing.assert_allclose(std, samples.std(axis=1).mean(axis=-1), rtol=1e-5, atol=1e-6)
    for b, name in enumerate(names):
        np.testing.assert_array_equal(picture(out / "restored" / f"{name}.png"), images.to_uint8(samples[b].mean(0)))
        assert picture(out / "std" / f"{name}.png").shape == (16, 16, 3)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] == 3
    for record, image_samples, image_std in zip(metrics["images"], samples, std):
        assert len(record["sample_psnr"]) == 3 and record["std_mean"] == pytest.approx(float(image_std.mean()))
        assert record["diverged"] is False
    assert json.loads((out / "config.json").read_text())["samples"] == 3
    assert picture(out / "grid.png").shape == (3 * 16, 3 * 16, 3)  # the grid shows the mean
    assert temporary_files(out) == []


def test_combine_samples_averages_the_samples_that_did_not_diverge():
    x = np.arange(6, dtype=np.float32).reshape(1, 6, 1, 1, 1) * np.ones((1, 6, 2, 2, 3), np.float32)
    diverged = np.array([[False, True, False, True, True, True]])  # image 0: sample 1; image 1: all three
    step = np.array([[-1, 5, -1, 7, 4, 9]], np.int32)
    combined = combine_samples({"x": x, "diverged": diverged, "diverged_step": step}, 3)
    np.testing.assert_allclose(combined["x"][0, :, 0, 0, 0], [(0 + 2) / 2, (3 + 4 + 5) / 3])
    np.testing.assert_array_equal(combined["diverged"], [[False, True]])  # only when no sample is left
    np.testing.assert_array_equal(combined["diverged_step"], [[5, 4]])
    np.testing.assert_array_equal(combined["diverged_samples"], [[1, 3]])
    assert combined["samples"].shape == (1, 2, 3, 2, 2, 3)
    single = {"x": x, "diverged": diverged, "diverged_step": step}
    assert combine_samples(single, 1) is single


class _Stream(io.StringIO):
    def __init__(self, terminal: bool):
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_says_it_compiles_and_writes_no_carriage_returns_into_logs(terminal):
    stream = _Stream(terminal)
    progress = Progress(stream)
    progress.reset(100, "spgd sr4 1/1", True, compiling=True)
    for step in range(100):
        progress(step)
        progress(step)  # another device reports the same step
    text = stream.getvalue()
    assert text.startswith("spgd sr4 1/1: compiling the sampler") and "compiled in" in text
    assert ("\r" in text) == terminal
    if not terminal:
        lines = text.splitlines()[2:]
        assert len(lines) == 10 and lines[-1].startswith("spgd sr4 1/1: 100/100 steps")
    progress.cancel.set()
    with pytest.raises(Cancelled):
        progress(0)


def test_progress_says_when_the_sampler_was_read_from_the_cache(monkeypatch):
    """Next to nothing traced or compiled between reset and the first step (the executable store): said so."""
    stream = _Stream(False)
    progress = Progress(stream)
    progress.reset(10, "spgd sr4 1/1", True, compiling=True)
    jax.jit(lambda x: x * 3 + 1)(np.arange(7.0))  # a tiny program, as the run's input handling compiles
    progress(0)
    # the tiny program's wall time may show as 0.1 s on a loaded machine
    assert re.search(r"spgd sr4 1/1: compiled in \d+\.\d s \(read from the cache\), sampling", stream.getvalue())
    clock, compiled = [100.0], [_progress.compile_seconds()]
    monkeypatch.setattr(_progress, "compile_seconds", lambda: compiled[0])
    monkeypatch.setattr(_progress.time, "perf_counter", lambda: clock[0])
    progress.reset(10, "spgd sr4 1/1", True, compiling=True)
    clock[0] += 3.0
    compiled[0] += 2.0  # a sampler built: 2 of the 3 s before the first step
    progress(0)
    assert stream.getvalue().count("(read from the cache)") == 1 and "compiled in 2.0 s, sampling" in stream.getvalue()
    progress.reset(5, "again", False)
    progress(0)  # a new run is not cancelled


def test_train_help_lists_every_set_key(capsys):
    from spgd_jax import train

    with pytest.raises(SystemExit):
        train.main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for key in ("num_channels", "channel_mult", "batch_size", "lr", "ema_decay", "num_res_blocks", "time_limit_minutes"):
        assert key in shown
