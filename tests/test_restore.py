"""The restore CLI end to end on a tiny random-weight prior (16 px): outputs, refusals, reproducibility."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from spgd_jax import checkpoint, restore
from spgd_jax.unet import CONFIGS, UNet

FAST = ["--steps", "3", "--warmup", "2", "--quiet"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    config = CONFIGS["tiny16"]
    params = UNet(config).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,)))["params"]
    return str(checkpoint.save(tmp_path_factory.mktemp("w") / "tiny16", params, config))


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def first_run(weights, faces, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "inpaint"
    code = restore.main(["--task", "inpaint", "--input", str(faces), "--weights", weights, "--out", str(out),
                         "--batch-size", "2", *FAST])
    assert code == 0
    return out


def test_writes_every_output(first_run):
    out = first_run
    for name in ("a", "b", "c"):
        for sub in ("restored", "measurement"):
            image = np.asarray(Image.open(out / sub / f"{name}.png"))
            assert image.shape == (16, 16, 3)
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (3 * 16, 3 * 16, 3)  # rows: images; columns: input | measurement | restored
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["name"] for r in metrics["images"]] == ["a", "b", "c"]
    for record in metrics["images"]:
        assert np.isfinite([record["psnr"], record["ssim"]]).all()
        assert "lpips" not in record  # undefined below 32 px
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == "inpaint" and config["sampler_config"]["steps"] == 3
    assert config["sampler_config"]["warmup"] == 2 and config["sampler_config"]["lr"] == 2.5
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary files left


def test_existing_outputs_are_not_overwritten(first_run, faces, weights):
    before = (first_run / "grid.png").read_bytes()
    with pytest.raises(SystemExit, match="already exist.*--overwrite"):
        restore.main(["--task", "inpaint", "--input", str(faces), "--weights", weights, "--out", str(first_run), *FAST])
    assert (first_run / "grid.png").read_bytes() == before


def test_measurement_file_reproduces_the_run(first_run, weights, tmp_path):
    out = tmp_path / "again"
    code = restore.main(["--task", "inpaint", "--measurement", str(first_run / "measurement.npz"),
                         "--weights", weights, "--out", str(out), "--batch-size", "2", *FAST])
    assert code == 0
    for name in ("a", "b", "c"):
        np.testing.assert_array_equal(np.asarray(Image.open(out / "restored" / f"{name}.png")),
                                      np.asarray(Image.open(first_run / "restored" / f"{name}.png")))
    assert json.loads((out / "metrics.json").read_text())["mean_std_over_finite_images"] == {}


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--task", "sr4", "--weights", "/nonexistent/w"], "cannot load weights"),
        (["--task", "sr4", "--input", "/nonexistent/*.png"], "no image file"),
        (["--task", "sr4", "--batch-size", "0"], "batch-size"),
        (["--task", "sr4", "--sampler", "dps", "--lr", "1"], "SPGD setting"),
        (["--task", "sr4", "--warmup", "0"], "warmup"),
        (["--task", "sr4", "--input", "x.png", "--measurement", "m.npz"], "not both"),
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
        restore.main(["--task", "sr4", "--input", str(faces), "--weights", weights, "--out", str(blocker / "out"), *FAST])


def test_measurement_picture_shows_fourier_data_on_a_log_scale():
    magnitudes = np.abs(np.random.default_rng(0).normal(size=(24, 24, 3))) * 50
    picture = restore._measurement_picture(magnitudes, 16)
    assert picture.shape == (16, 16, 3) and picture.min() >= -1 and picture.max() <= 1
