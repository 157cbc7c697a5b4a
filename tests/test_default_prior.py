"""The shipped default prior (weights/default64): it loads, matches its model card, and denoises a face."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from spgd_jax.io import checkpoint, images
from spgd_jax.io.prior import default_weights_path, load_denoiser

WEIGHTS = default_weights_path()


def test_default_weights_load_with_their_config():
    params, meta = checkpoint.load(WEIGHTS)
    config = meta.config
    assert config.image_size == 64 and config.in_channels == 3
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    assert count * 4 <= 30e6  # the size limit for the default prior
    card = (Path(WEIGHTS).parent / "MODEL_CARD.md").read_text()
    assert f"{count:,} parameters" in card
    stored = json.loads((Path(WEIGHTS) / "config.json").read_text())
    assert (stored["family"], stored["preconditioning"], stored["config"]["image_size"]) == ("adm", "vp", 64)


def test_default_prior_denoises_the_demo_face():
    denoiser = load_denoiser(WEIGHTS)
    x = jnp.asarray(images.load_image(images.demo_image_path(), 64))[None]
    for sigma in (0.1, 0.3):
        noisy = x + sigma * jax.random.normal(jax.random.key(0), x.shape)
        restored = denoiser(noisy, jnp.full((1,), sigma))
        error_in = float(jnp.mean((noisy - x) ** 2))
        error_out = float(jnp.mean((jnp.clip(restored, -1, 1) - x) ** 2))
        assert error_out < error_in / 2, (sigma, error_in, error_out)  # > 3 dB better than the noisy input


def test_tuned_deblurring_schedule_fits_the_measurement():
    """The default prior's constant-lr schedule (spgd_jax.samplers.presets.TUNED_SPGD) fits a blurred demo face
    to about the noise level, where the paper's decay to 1 % at the same lr does not (T = 25 here)."""
    import dataclasses

    from spgd_jax import metrics, operators
    from spgd_jax.samplers import presets, sample

    denoiser = load_denoiser(WEIGHTS)
    x = jnp.asarray(images.load_image(images.demo_image_path(), 64))[None]
    operator = operators.get("gauss_deblur", 64)
    params = operator.init_params(jax.random.key(1), 1, 64)
    y = operator.measure(jax.random.key(2), x, params)
    tuned = presets.spgd_config("gauss_deblur", steps=25)
    assert tuned.lr_min_ratio == 1.0
    outcome = {}
    for config in (tuned, dataclasses.replace(tuned, lr_min_ratio=0.01)):
        result = sample(denoiser, operator.forward, y, jax.random.key(3), config, params, x_shape=(64, 64, 3))
        residual = jax.vmap(operator.forward)(result.x, params) - y
        outcome[config.lr_min_ratio] = (float(metrics.psnr(jnp.clip(result.x, -1, 1), x)[0]),
                                        float(jnp.sqrt(jnp.mean(residual**2))))
    (psnr_tuned, rms_tuned), (psnr_decayed, rms_decayed) = outcome[1.0], outcome[0.01]
    assert rms_tuned < 2 * operator.sigma_y and rms_tuned < rms_decayed / 2, outcome
    assert psnr_tuned > psnr_decayed + 1.5, outcome


def test_box_inpainting_preset_restores_the_demo_face_where_the_papers_rate_diverges():
    """Issue 14.2: `restore --task inpaint_box` blew up to NaN at outer step 6 with the paper's lr 2.5.
    The preset (lr 1.2, below the 1 / lambda = 1.35 stability limit, benchmarks/results/task_probe.md)
    finishes and beats harmonic inpainting on the demo face; the paper's rate diverges (T = 25 here)."""
    import dataclasses

    from spgd_jax import classical, metrics, operators
    from spgd_jax.samplers import presets, sample

    denoiser = load_denoiser(WEIGHTS)
    x = jnp.asarray(images.load_demo(64))[None]
    operator = operators.get("inpaint_box", 64)
    params = operator.init_params(jax.random.key(1), 1, 64)
    y = operator.measure(jax.random.key(2), x, params)
    tuned = presets.spgd_config("inpaint_box", steps=25)
    runs = {lr: sample(denoiser, operator.forward, y, jax.random.key(3), dataclasses.replace(tuned, lr=lr), params,
                       x_shape=(64, 64, 3)) for lr in (tuned.lr, presets.PAPER_LR["inpaint_box"])}
    restored = runs[tuned.lr]
    classical = jax.vmap(classical.harmonic_inpaint)(y, params["mask"])
    assert not bool(restored.diverged[0]) and bool(runs[2.5].diverged[0])
    assert float(metrics.psnr(restored.x, x)[0]) > float(metrics.psnr(classical, x)[0]) + 1.0


def _restore_demo(task: str):
    """The demo face (cut to its face box, as the command line loads it), degraded by the task's 64 px
    operator and restored with the task's preset for the default prior: (x, y, params, operator, result)."""
    from spgd_jax import operators
    from spgd_jax.samplers import presets, sample

    denoiser = load_denoiser(WEIGHTS)
    x = jnp.asarray(images.load_demo(64))[None]
    operator = operators.get(task, 64)
    params = operator.init_params(jax.random.key(1), 1, 64)
    y = operator.measure(jax.random.key(2), x, params)
    result = sample(denoiser, operator.forward, y, jax.random.key(3), presets.spgd_config(task), params,
                    x_shape=(64, 64, 3))
    return x, y, params, operator, result


def test_hdr_preset_fits_the_demo_face():
    """Issue 14.5: from sigma_max = 100 the default prior's first Tweedie estimates are noise of std 1.4,
    saturated by the clip (zero gradient) at 72 % of the pixels; the image drifted to a wrong colour
    and stayed there (residual 10x sigma_y, worse than y / 2). The preset starts at a lower noise
    level with a smaller rate; it fits the unclipped pixels and beats y / 2 (the clip's inverse)."""
    from spgd_jax import metrics

    x, y, params, operator, result = _restore_demo("hdr")
    assert not bool(result.diverged[0])
    restored = jnp.clip(result.x, -1, 1)
    residual = float(jnp.sqrt(jnp.mean((jax.vmap(operator.forward)(restored, params) - y) ** 2)))
    assert residual < 2.5 * operator.sigma_y, residual
    gain = float(metrics.psnr(restored, x)[0] - metrics.psnr(y / 2, x)[0])
    assert gain > 1.5, gain
