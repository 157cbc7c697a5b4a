"""Tests for spgd_jax.train: DDPM maths, optimiser/EMA, resumable training, export, CLI errors.

A one-level 8x8 UNet keeps compilation short; images are made in tmp_path (no shared data).
The data-parallel path runs with however many local devices exist; test_two_devices_match_one
re-runs it in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=2.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy.stats import norm

from spgd_jax import train
from spgd_jax.train import _diffusion, _state, _validation
from spgd_jax.io import checkpoint
from spgd_jax.models.adm import UNet, UNetConfig

TINY = UNetConfig(image_size=8, num_channels=32, num_res_blocks=1, channel_mult=(1,),
                  attention_resolutions=(8,), num_head_channels=32, use_scale_shift_norm=True)
# End-to-end runs use the hybrid loss (learned sigma) and dropout: every random input is exercised.
TINY_E2E = UNetConfig(**{**TINY.to_dict(), "learn_sigma": True, "dropout": 0.1})
TINY_TRAIN = dict(batch_size=4, warmup_steps=2, log_every=1, val_every=2, sample_every=4, num_samples=4,
                  sample_steps=2)


def _leaves_equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


# -- DDPM maths ----------------------------------------------------------------------------------

def test_linear_schedule_values():
    d = _diffusion.linear_schedule()
    assert d.num_timesteps == 1000
    assert d.betas[0] == pytest.approx(1e-4, abs=1e-15) and d.betas[-1] == pytest.approx(0.02, abs=1e-15)
    np.testing.assert_allclose(np.diff(d.betas), (0.02 - 1e-4) / 999, rtol=1e-9)
    product, expected = 1.0, []
    for k in range(1000):
        product *= 1.0 - (1e-4 + k * (0.02 - 1e-4) / 999)
        expected.append(product)
    np.testing.assert_allclose(d.alphas_cumprod, expected, rtol=1e-10)
    assert 4.0e-5 < d.alphas_cumprod[-1] < 4.1e-5
    short = _diffusion.linear_schedule(500)  # guided-diffusion scales the end points by 1000 / T
    assert short.betas[0] == pytest.approx(2e-4) and short.betas[-1] == pytest.approx(0.04)
    with pytest.raises(ValueError):
        _diffusion.linear_schedule(1)


def test_q_sample():
    abar = jnp.array([0.25, 0.64])
    x0 = jnp.ones((2, 1, 1, 1))
    noise = jnp.full((2, 1, 1, 1), 2.0)
    np.testing.assert_allclose(np.asarray(_diffusion.q_sample(abar, x0, noise)).ravel(),
                               [0.5 + np.sqrt(0.75) * 2, 0.8 + 0.6 * 2], rtol=1e-6)


def test_vb_term_vanishes_at_the_true_posterior_and_matches_the_decoder_nll():
    d = _diffusion.linear_schedule()
    key = jax.random.PRNGKey(0)
    x0 = jax.random.uniform(key, (3, 4, 4, 3), minval=-0.9, maxval=0.9)
    noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
    t = jnp.array([1, 500, 999])
    x_t = _diffusion.q_sample(jnp.asarray(d.alphas_cumprod, jnp.float32)[t], x0, noise)
    at_posterior = _diffusion.vb_terms_bpd(d, noise, -jnp.ones_like(x0), x0, x_t, t)
    np.testing.assert_allclose(np.asarray(at_posterior), 0.0, atol=1e-4)
    at_beta = _diffusion.vb_terms_bpd(d, noise, jnp.ones_like(x0), x0, x_t, t)
    assert float(at_beta[0]) > 0.1 and np.all(np.asarray(at_beta) >= 0)  # beta_t >> posterior var only at small t
    # t = 0 with the true noise: the mean is x0 exactly, the variance the clipped posterior one.
    t0 = jnp.zeros((3,), jnp.int32)
    x_0 = _diffusion.q_sample(jnp.full((3,), d.alphas_cumprod[0], jnp.float32), x0, noise)
    nll = _diffusion.vb_terms_bpd(d, noise, -jnp.ones_like(x0), x0, x_0, t0)
    post_var_1 = d.betas[1] * (1 - d.alphas_cumprod[0]) / (1 - d.alphas_cumprod[1])
    half_bin = (1 / 255) / np.sqrt(post_var_1)
    expected = -np.log(norm.cdf(half_bin) - norm.cdf(-half_bin)) / np.log(2)
    np.testing.assert_allclose(np.asarray(nll), expected, rtol=1e-3)


# -- optimiser and EMA ---------------------------------------------------------------------------

def test_ema_decay_and_update():
    assert float(_state.ema_decay_at(jnp.array(0), 0.999)) == pytest.approx(0.1)
    assert float(_state.ema_decay_at(jnp.array(8), 0.999)) == pytest.approx(0.5)
    assert float(_state.ema_decay_at(jnp.array(10**6), 0.999)) == pytest.approx(0.999)
    ema = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(4.0)}}
    params = {"a": jnp.array([3.0, -2.0]), "b": {"c": jnp.array(0.0)}}
    out = _state.ema_update(ema, params, jnp.float32(0.75))
    np.testing.assert_allclose(np.asarray(out["a"]), [0.75 * 1 + 0.25 * 3, 0.75 * 2 - 0.25 * 2])
    np.testing.assert_allclose(float(out["b"]["c"]), 3.0)


def test_learning_rate_warmup():
    lr = _state.learning_rate(train.TrainConfig(lr=1e-3, warmup_steps=4))
    np.testing.assert_allclose([float(lr(s)) for s in range(6)], [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3],
                               rtol=1e-6)
    constant = _state.learning_rate(train.TrainConfig(lr=1e-3, warmup_steps=0))
    assert float(constant(0)) == pytest.approx(1e-3)


def test_config_validation():
    with pytest.raises(ValueError, match="batch_size"):
        train.TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="ema_decay"):
        train.TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="square"):
        train.TrainConfig(num_samples=5)


def test_overfitting_a_batch_lowers_the_fixed_validation_loss():
    cfg = TINY
    tcfg = train.TrainConfig(batch_size=8, lr=2e-3, warmup_steps=0)
    model, diffusion, tx = UNet(cfg), _diffusion.linear_schedule(), _state.make_optimizer(tcfg)
    yy, xx = np.mgrid[0:8, 0:8]
    images = np.stack([np.stack([(xx * 32 + 16 * k) % 256, yy * 32, np.full_like(xx, 40 * k)], -1)
                       for k in range(8)]).astype(np.uint8)
    val = _validation.make_validation(images, diffusion)
    loss_batch = jax.jit(lambda p, x, t, n: _diffusion.per_image_loss(
        model, diffusion, p, x.astype(jnp.float32) / 127.5 - 1, t, n, None))
    state = _state.init_state(model, tx, jax.random.PRNGKey(0))
    before = _validation.validation_loss(loss_batch, state.params, val, 8)
    assert before == _validation.validation_loss(loss_batch, state.params, val, 8)  # deterministic
    step = jax.jit(_state.make_train_step(model, diffusion, tx, tcfg))
    losses = []
    for _ in range(40):
        state, metrics = step(state, jnp.asarray(images))
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    after = _validation.validation_loss(loss_batch, state.params, val, 8)
    assert after < 0.7 * before, (before, after)
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


# -- end-to-end runs -----------------------------------------------------------------------------

def _image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for k in range(12):
        h, w = [(8, 8), (20, 13), (9, 30)][k % 3]
        array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image = Image.fromarray(array).convert("L") if k == 5 else Image.fromarray(array)
        image.save(root / f"{k:02d}.{'png' if k % 2 else 'jpg'}")
    (root / "12_broken.png").write_bytes(b"\x89PNG truncated")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 4-step run A, and run B: 2 steps, then resumed to 4."""
    tmp = tmp_path_factory.mktemp("runs")
    folder = _image_folder(tmp / "images")
    quiet = lambda message: None
    a = train.train(folder, tmp / "a", TINY_E2E, train.TrainConfig(num_steps=4, **TINY_TRAIN), tmp / "cache", log=quiet)
    b2 = train.train(folder, tmp / "b", TINY_E2E, train.TrainConfig(num_steps=2, **TINY_TRAIN), tmp / "cache", log=quiet)
    b2 = jax.tree.map(np.asarray, b2)
    b4 = train.train(folder, tmp / "b", TINY_E2E, train.TrainConfig(num_steps=4, **TINY_TRAIN), tmp / "cache", log=quiet)
    return {"tmp": tmp, "folder": folder, "a": a, "b2": b2, "b4": b4}


def test_resume_is_bit_identical_to_uninterrupted_training(runs):
    a, b4 = runs["a"], runs["b4"]
    assert int(a.step) == int(b4.step) == 4
    assert _leaves_equal(a, b4)
    assert not _leaves_equal(a.params, runs["b2"].params)  # training did change the weights
    assert not _leaves_equal(a.params, a.ema_params)


def test_run_folder_contents(runs):
    run = runs["tmp"] / "b"
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    assert (run / "validation_split.txt").read_text() == "07.png\n"  # sorted index 7 of 13 files
    grid = np.asarray(Image.open(run / "samples" / "step_00000004.png"))
    assert grid.shape == (16, 16, 3)  # 2 x 2 images of 8 x 8


def test_resume_refuses_changed_settings(runs):
    with pytest.raises(ValueError, match="train.lr differs"):
        train.train(runs["folder"], runs["tmp"] / "a", TINY_E2E,
                    train.TrainConfig(num_steps=5, **{**TINY_TRAIN, "lr": 1e-3}), runs["tmp"] / "cache",
                    log=lambda m: None)
    with pytest.raises(ValueError, match="model config differs"):
        train.train(runs["folder"], runs["tmp"] / "a", UNetConfig(**{**TINY_E2E.to_dict(), "num_channels": 64}),
                    train.TrainConfig(num_steps=5, **TINY_TRAIN), runs["tmp"] / "cache", log=lambda m: None)


def test_export_writes_ema_weights_and_card(runs, tmp_path):
    card = tmp_path / "MODEL_CARD.md"
    card.write_text(f"# card\nprose stays\n{train.CARD_BEGIN}\nold numbers\n{train.CARD_END}\ntail\n")
    meta = train.export(runs["tmp"] / "a", tmp_path / "w", card)
    params, saved = checkpoint.load(tmp_path / "w")
    assert saved.config == TINY_E2E and meta["step"] == 4
    assert _leaves_equal(params, runs["a"].ema_params)
    text = card.read_text()
    assert "prose stays" in text and text.endswith("tail\n") and "old numbers" not in text
    assert "| training updates | 4 at batch 4" in text and f"{meta['num_params']:,} parameters" in text
    assert (tmp_path / "validation_split.txt").read_text() == "07.png\n"
    with pytest.raises(FileExistsError):
        train.export(runs["tmp"] / "a", tmp_path / "w")
    early = train.export(runs["tmp"] / "b", tmp_path / "w2", step=2)
    assert _leaves_equal(checkpoint.load(tmp_path / "w2")[0], runs["b2"].ema_params) and early["step"] == 2
    (tmp_path / "bad.md").write_text("no markers\n")
    with pytest.raises(ValueError, match="marker"):
        train.export(runs["tmp"] / "a", tmp_path / "w3", tmp_path / "bad.md")
    with pytest.raises(ValueError, match="no checkpoint at step 3"):
        train.export(runs["tmp"] / "a", tmp_path / "w4", step=3)


def test_init_starts_a_new_run_from_weights(runs, tmp_path):
    train.export(runs["tmp"] / "a", tmp_path / "w")
    start, _ = checkpoint.load(tmp_path / "w")
    tcfg = train.TrainConfig(num_steps=1, **TINY_TRAIN)
    state = train.train(runs["folder"], tmp_path / "c", TINY_E2E, tcfg, runs["tmp"] / "cache",
                        log=lambda m: None, init=tmp_path / "w")
    # One Adam update moves each weight by at most about the learning rate (here in its warm-up).
    moved = max(float(np.max(np.abs(np.asarray(p) - np.asarray(q))))
                for p, q in zip(jax.tree.leaves(state.params), jax.tree.leaves(start), strict=True))
    assert 0 < moved <= 1.01 * tcfg.lr
    card = tmp_path / "card.md"
    card.write_text(f"{train.CARD_BEGIN}\n{train.CARD_END}\n")
    train.export(tmp_path / "c", tmp_path / "w_c", card)
    assert f"| initialised from | `{(tmp_path / 'w').resolve()}`" in card.read_text()
    fresh = train.train(runs["folder"], tmp_path / "d", TINY_E2E, tcfg, runs["tmp"] / "cache", log=lambda m: None)
    assert not _leaves_equal(fresh.params, state.params)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train.train(runs["folder"], tmp_path / "c", TINY_E2E, tcfg, runs["tmp"] / "cache", log=lambda m: None,
                    init=tmp_path / "w")
    with pytest.raises(ValueError, match="another architecture"):
        train.train(runs["folder"], tmp_path / "e", UNetConfig(**{**TINY_E2E.to_dict(), "num_channels": 64}), tcfg,
                    runs["tmp"] / "cache", log=lambda m: None, init=tmp_path / "w")


def test_time_limit_stops_early_with_validation_and_checkpoint(runs, tmp_path):
    tcfg = train.TrainConfig(num_steps=1000, time_limit_minutes=1e-4, **TINY_TRAIN)
    messages = []
    state = train.train(runs["folder"], tmp_path / "run", TINY_E2E, tcfg, runs["tmp"] / "cache", log=messages.append)
    step = int(state.step)
    assert 1 <= step < 1000
    assert any("time limit" in m for m in messages)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [step]
    assert step in [int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()]
    with pytest.raises(ValueError, match="time_limit_minutes"):
        train.TrainConfig(time_limit_minutes=0)


def test_two_devices_match_one(runs, tmp_path):
    """Data parallel over 2 host devices gives the 1-device result (up to reduction order)."""
    code = (
        "import json, sys, jax; assert len(jax.local_devices()) == 2, jax.local_devices()\n"
        "from spgd_jax import train; from spgd_jax.models.adm import UNetConfig\n"
        "model, tcfg = UNetConfig.from_dict(json.loads(sys.argv[4])), train.TrainConfig(**json.loads(sys.argv[5]))\n"
        "train.train(sys.argv[1], sys.argv[2], model, tcfg, sys.argv[3], log=lambda m: None)\n")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", code, str(runs["folder"]), str(tmp_path / "run"), str(runs["tmp"] / "cache"),
                    json.dumps(TINY_E2E.to_dict()), json.dumps({**TINY_TRAIN, "num_steps": 2})], check=True, env=env)
    train.export(tmp_path / "run", tmp_path / "w")
    two, _ = checkpoint.load(tmp_path / "w")
    for x, y in zip(jax.tree.leaves(two), jax.tree.leaves(runs["b2"].ema_params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


# -- command line --------------------------------------------------------------------------------

def test_cli_reports_bad_inputs(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--data", str(tmp_path / "missing"), "--run", str(tmp_path / "run")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        train.main(["--data", str(tmp_path / "empty"), "--run", str(tmp_path / "run")])
    assert "no images" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--data", str(tmp_path), "--set", "colour=3"])
    assert "unknown --set key" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--data", str(tmp_path), "--set", "batch_size"])
    assert "key=value" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["export", "--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "w")])
    assert "no checkpoints" in capsys.readouterr().err


def test_cli_batch_must_divide_over_devices(tmp_path, capsys, monkeypatch):
    _image_folder(tmp_path / "images")
    monkeypatch.setattr(jax, "local_devices", lambda: [jax.devices()[0]] * 3)
    with pytest.raises(SystemExit):
        train.main(["--data", str(tmp_path / "images"), "--run", str(tmp_path / "run"), "--set", "batch_size=4"])
    assert "multiple of the 3 local devices" in capsys.readouterr().err
