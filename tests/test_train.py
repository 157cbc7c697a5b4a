"""Tests for spgd_jax.train: DDPM maths, optimiser/EMA, the recipe knobs, K updates per call, resumable
training (also from a copied run folder, as a lease hands it to the next), export with the model card and
its loss plot, CLI errors.

A one-level 8x8 UNet keeps compilation short; images are made in tmp_path (no shared data).
The data-parallel path runs with however many local devices exist; test_two_devices_match_one
re-runs it in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=2.
"""

import dataclasses
import json
import os
import shutil
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
from spgd_jax.train import _checkpoints, _data, _diffusion, _export, _state, _validation
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


def test_learning_rate_cosine_decays_to_the_floor():
    tcfg = train.TrainConfig(lr=1e-3, warmup_steps=4, lr_schedule="cosine", min_lr_ratio=0.1, num_steps=24)
    lr = _state.learning_rate(tcfg)
    np.testing.assert_allclose([float(lr(s)) for s in range(4)], [2.5e-4, 5e-4, 7.5e-4, 1e-3], rtol=1e-6)
    u = (np.arange(4, 30) - 4) / 20
    expected = 1e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * np.minimum(u, 1))))
    np.testing.assert_allclose([float(lr(s)) for s in range(4, 30)], expected, rtol=1e-5)
    assert float(lr(14)) == pytest.approx(0.55e-3, rel=1e-5) and float(lr(10**6)) == pytest.approx(1e-4, rel=1e-5)
    longer = _state.learning_rate(dataclasses.replace(tcfg, decay_steps=44))  # the horizon, not num_steps
    assert float(longer(24)) == pytest.approx(0.55e-3, rel=1e-5)
    assert _state.learning_rate(dataclasses.replace(tcfg, lr_schedule="constant"))(20) == pytest.approx(1e-3)


def test_min_snr_loss_weights():
    d = _diffusion.linear_schedule()
    t = jnp.array([0, 100, 300, 999])
    snr = d.alphas_cumprod[np.asarray(t)] / (1 - d.alphas_cumprod[np.asarray(t)])
    w = np.asarray(_diffusion.loss_weights(d, t, 5.0))
    np.testing.assert_allclose(w, np.minimum(snr, 5.0) / snr, rtol=1e-6)
    assert w[0] < 1e-3 and w[-1] == 1.0 and np.all(np.diff(w) >= 0)
    assert _diffusion.loss_weights(d, t, None) is None
    assert _diffusion.parse_loss_weighting("eps") is None and _diffusion.parse_loss_weighting("min-snr-5") == 5.0
    for bad in ("min-snr-0", "min-snr-x", "snr", "min-snr-inf"):
        with pytest.raises(ValueError, match="loss_weighting"):
            train.TrainConfig(loss_weighting=bad)
    # The weights scale the eps MSE image by image (a stand-in network: eps_hat = x_t / 2).
    class Half:
        config = TINY

        def apply(self, variables, x, t, train=False, rngs=None):
            return x / 2

    x0 = jax.random.uniform(jax.random.PRNGKey(1), (4, 8, 8, 3), minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.PRNGKey(2), x0.shape)
    plain = _diffusion.per_image_loss(Half(), d, None, x0, t, noise, None)
    weighted = _diffusion.per_image_loss(Half(), d, None, x0, t, noise, None, jnp.asarray(w))
    assert np.all(np.asarray(plain) > 0.1)
    np.testing.assert_allclose(np.asarray(weighted), w * np.asarray(plain), rtol=1e-5)


@pytest.mark.parametrize("flip", [True, False])
def test_flip_setting_is_honoured(flip, monkeypatch):
    calls = []
    real = _data.random_flip
    monkeypatch.setattr(_data, "random_flip", lambda key, x: calls.append(x.shape) or real(key, x))
    tcfg = train.TrainConfig(batch_size=2, flip=flip)
    model, tx = UNet(TINY), _state.make_optimizer(tcfg)
    state = jax.eval_shape(lambda: _state.init_state(model, tx, jax.random.PRNGKey(0)))
    jax.eval_shape(_state.make_train_step(model, _diffusion.linear_schedule(), tx, tcfg), state,
                   jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.uint8))
    assert calls == ([(2, 8, 8, 3)] if flip else [])


def test_config_validation():
    with pytest.raises(ValueError, match="batch_size"):
        train.TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="ema_decay"):
        train.TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="square"):
        train.TrainConfig(num_samples=5)
    with pytest.raises(ValueError, match="steps_per_call"):
        train.TrainConfig(steps_per_call=0)
    with pytest.raises(ValueError, match="lr_schedule"):
        train.TrainConfig(lr_schedule="linear")
    with pytest.raises(ValueError, match="min_lr_ratio"):
        train.TrainConfig(min_lr_ratio=1.5)
    with pytest.raises(ValueError, match="decay_steps"):
        train.TrainConfig(decay_steps=0)
    with pytest.raises(ValueError, match="flip"):
        train.TrainConfig(flip="yes")


def test_recipe_of_old_metadata_and_resume_checks():
    """Metadata written before the recipe fields existed reads as today's defaults (that recipe); a
    resumed run must keep its recipe, the cosine horizon included."""
    old_train = {k: v for k, v in dataclasses.asdict(train.TrainConfig()).items()
                 if k not in ("steps_per_call", "lr_schedule", "min_lr_ratio", "decay_steps", "flip", "loss_weighting")}
    assert _state.recipe(old_train) == _state.recipe(dataclasses.asdict(train.TrainConfig(steps_per_call=50)))
    assert _state.recipe(old_train)["flip"] is True and _state.recipe(old_train)["loss_weighting"] == "eps"

    def meta(**fields):
        return {"model": {"a": 1}, "train": dataclasses.asdict(train.TrainConfig(**fields)),
                "split": {"every": 50, "offset": 7}, "num_train": 10, "num_val": 1}

    _checkpoints.check_resumable({**meta(), "train": old_train}, meta(num_steps=9, steps_per_call=8))
    for changed, message in [({"flip": False}, "train.flip differs"),
                             ({"loss_weighting": "min-snr-5"}, "train.loss_weighting differs"),
                             ({"lr_schedule": "cosine"}, "train.lr_schedule differs")]:
        with pytest.raises(ValueError, match=message):
            _checkpoints.check_resumable({**meta(), "train": old_train}, meta(**changed))
    cosine = dict(lr_schedule="cosine", num_steps=1000)
    _checkpoints.check_resumable(meta(**cosine), meta(**cosine, time_limit_minutes=5.0))
    _checkpoints.check_resumable(meta(**cosine), meta(lr_schedule="cosine", num_steps=2000, decay_steps=1000))
    with pytest.raises(ValueError, match="train.decay_horizon differs"):
        _checkpoints.check_resumable(meta(**cosine), meta(lr_schedule="cosine", num_steps=2000))


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


def _hand_over(run: Path, to: Path) -> None:
    """What weights/train_gpu.sh returns from a lease and the next one resumes (pack_run): the latest
    checkpoint, metrics.jsonl, validation_split.txt."""
    latest = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    shutil.copytree(run / "checkpoints" / str(latest), to / "checkpoints" / str(latest))
    for name in ("metrics.jsonl", "validation_split.txt"):
        shutil.copy(run / name, to / name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 4-step run A (one update per call); run B: 2 steps, handed over to a new folder as
    between two leases, and resumed there to 4; run C: A's 4 updates in one call (steps_per_call=4)."""
    tmp = tmp_path_factory.mktemp("runs")
    folder = _image_folder(tmp / "images")
    quiet = lambda message: None
    a = train.train(folder, tmp / "a", TINY_E2E, train.TrainConfig(num_steps=4, **TINY_TRAIN), tmp / "cache", log=quiet)
    b2 = train.train(folder, tmp / "b", TINY_E2E, train.TrainConfig(num_steps=2, **TINY_TRAIN), tmp / "cache", log=quiet)
    b2 = jax.tree.map(np.asarray, b2)
    _hand_over(tmp / "b", tmp / "b_next")
    b4 = train.train(folder, tmp / "b_next", TINY_E2E, train.TrainConfig(num_steps=4, **TINY_TRAIN), tmp / "cache",
                     log=quiet)
    c = train.train(folder, tmp / "c", TINY_E2E, train.TrainConfig(num_steps=4, steps_per_call=4, **TINY_TRAIN),
                    tmp / "cache", log=quiet)
    return {"tmp": tmp, "folder": folder, "a": a, "b2": b2, "b4": b4, "c": c}


def test_resume_is_bit_identical_to_uninterrupted_training(runs):
    a, b4 = runs["a"], runs["b4"]
    assert int(a.step) == int(b4.step) == 4
    assert _leaves_equal(a, b4)
    assert not _leaves_equal(a.params, runs["b2"].params)  # training did change the weights
    assert not _leaves_equal(a.params, a.ema_params)


def test_k_updates_per_call_equal_k_calls(runs):
    """steps_per_call=4 (one compiled call: a lax.scan gathering the batches from the training set on the
    device) gives the result of 4 calls of one update, to float32 round-off; and it did train."""
    a, c = runs["a"], runs["c"]
    assert int(c.step) == 4
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
    assert not _leaves_equal(c.params, runs["b2"].params)
    records = [json.loads(line) for line in (runs["tmp"] / "c" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [4] and [r["step"] for r in records if "val_loss" in r] == [4]
    meta = train.export(runs["tmp"] / "c", runs["tmp"] / "w_c")
    assert meta["train_loss_updates"] == 4 and meta["train"]["steps_per_call"] == 4 and meta["train"]["flip"] is True


def test_run_folder_contents(runs):
    run = runs["tmp"] / "b_next"
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
    assert "| training updates | 4 at batch 4 (1.3 epochs of 12 images)" in text
    assert f"{meta['num_params']:,} parameters" in text
    assert "| data | 12 training and 1 validation images (every 50th file from index 7 held out) from `images` |" in text
    assert "| objective | eps MSE; random horizontal flips |" in text
    assert "(linear warm-up 2 steps, then constant)" in text
    assert meta["images_per_s"] > 0 and f"| throughput | {meta['images_per_s']:,.0f} training images/s" in text
    assert f"| final validation loss | {meta['val_loss']:.4f}" in text
    assert "![loss curves](w_loss.png)" in text and f"the last {meta['val_loss']:.4f} at update 4" in text
    assert Image.open(tmp_path / "w_loss.png").size == (700, 400)
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


def test_card_rows_of_the_recipe_and_sources(runs, tmp_path):
    meta = train.export(runs["tmp"] / "a", tmp_path / "w")
    meta.update(sources={"celeba": 9800, "utkface": 9585}, data="/x/faces64", images_per_s=None,
                train={**meta["train"], "lr_schedule": "cosine", "min_lr_ratio": 0.05, "decay_steps": 60000,
                       "flip": False, "loss_weighting": "min-snr-5"})
    card = tmp_path / "card.md"
    card.write_text(f"{train.CARD_BEGIN}\n{train.CARD_END}\n")
    _export._update_card(card, meta, tmp_path / "default64", {"training loss": ([], []), "validation loss": ([], [])})
    text = card.read_text()
    assert "from `faces64`: celeba 9,800, utkface 9,585 |" in text
    assert "| objective | eps MSE, weighted by min(SNR, 5) / SNR (min-SNR-5); no augmentation |" in text
    assert "then cosine decay to 0.05 x lr at update 60,000)" in text
    assert "| throughput | not measured |" in text and "loss curves" not in text
    assert not (tmp_path / "default64_loss.png").exists()


def test_loss_curves_from_metrics_with_a_restart(tmp_path):
    records = [{"step": 1, "loss": 0.9}, {"step": 2, "loss": 0.8}, {"step": 2, "val_loss": 0.7},
               {"step": 3, "loss": 0.6}, {"step": 4, "loss": 0.5},  # a session killed before saving step 4
               {"step": 3, "loss": 0.61}, {"step": 4, "val_loss": 0.4}, {"step": 5, "loss": 0.3}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({**r, "wall_s": 0}) + "\n" for r in records)
                                            + '{"step": 6, "lo')
    curves = _export.loss_curves(tmp_path, up_to=4)
    assert curves == {"training loss": ([1, 2, 3], [0.9, 0.8, 0.61]), "validation loss": ([2, 4], [0.7, 0.4])}
    assert _export.loss_curves(tmp_path / "nothing", 4) == {"training loss": ([], []), "validation loss": ([], [])}


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
    """Data parallel over 2 host devices, 2 updates per call (the batches gathered and split on the devices),
    gives the 1-device result of one update per call (up to reduction order)."""
    code = (
        "import json, sys, jax; assert len(jax.local_devices()) == 2, jax.local_devices()\n"
        "from spgd_jax import train; from spgd_jax.models.adm import UNetConfig\n"
        "model, tcfg = UNetConfig.from_dict(json.loads(sys.argv[4])), train.TrainConfig(**json.loads(sys.argv[5]))\n"
        "train.train(sys.argv[1], sys.argv[2], model, tcfg, sys.argv[3], log=lambda m: None)\n")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", code, str(runs["folder"]), str(tmp_path / "run"), str(runs["tmp"] / "cache"),
                    json.dumps(TINY_E2E.to_dict()), json.dumps({**TINY_TRAIN, "num_steps": 2, "steps_per_call": 2})],
                   check=True, env=env)
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
