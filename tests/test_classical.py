import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spgd_jax import classical, metrics, operators


def _smooth_image(size=32, seed=0):
    """A smooth random image in [-1, 1]: low-frequency cosines."""
    rng = np.random.default_rng(seed)
    grid = np.arange(size) / size
    image = np.zeros((size, size, 3))
    for _ in range(6):
        fy, fx = rng.integers(0, 3, 2)
        image += rng.normal(0, 0.2, 3) * np.cos(2 * np.pi * (fy * grid[:, None, None] + fx * grid[None, :, None]) + rng.uniform(0, 6))
    return jnp.asarray(np.clip(image, -1, 1), jnp.float32)


def test_harmonic_inpaint_keeps_pixels_and_fills_constants_exactly():
    mask = operators.random_mask(jax.random.key(0), 16, 16, 0.2)
    constant = jnp.ones((16, 16, 3)) * jnp.array([0.3, -0.2, 0.7])
    np.testing.assert_allclose(classical.harmonic_inpaint(constant * mask, mask), constant, atol=1e-5)
    x = _smooth_image(16)
    restored = classical.harmonic_inpaint(x * mask, mask)
    np.testing.assert_array_equal(np.asarray(restored)[np.asarray(mask[..., 0]) > 0], np.asarray(x)[np.asarray(mask[..., 0]) > 0])


def test_wiener_undoes_a_gaussian_blur_far_better_than_nothing():
    x = _smooth_image(32)[None]
    op = operators.get("gauss_deblur", 32, std=1.5, kernel_size=9)
    y = op.measure(jax.random.key(1), x, None, sigma_y=0.0)
    restored = jax.vmap(classical.restorer(op, 32, noise_to_signal=1e-2))(y, None)
    assert float(metrics.psnr(restored, x)[0]) > float(metrics.psnr(y, x)[0]) + 5.0


def test_bicubic_upsample_restores_smooth_images():
    x = _smooth_image(32)[None]
    op = operators.get("sr4", 32)
    y = op.measure(jax.random.key(2), x, None, sigma_y=0.0)
    restored = jax.vmap(classical.restorer(op, 32))(y, None)
    assert restored.shape == x.shape and float(metrics.psnr(restored, x)[0]) > 25.0


def test_no_classical_baseline_for_phase_retrieval():
    with pytest.raises(ValueError, match="no classical baseline"):
        classical.restorer(operators.get("phase_retrieval", 32), 32)


def test_naive_inverse_is_the_measurement_as_an_image():
    y = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1.5, maxval=1.5)
    up = classical.naive_inverse("sr4", y, 64)
    assert up.shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(up[:, 4 * 5 + 3, 4 * 7 + 1], jnp.clip(y[:, 5, 7], -1, 1))
    image = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3), minval=-3, maxval=3)
    np.testing.assert_array_equal(classical.naive_inverse("gauss_deblur", image, 64), jnp.clip(image, -1, 1))
    np.testing.assert_array_equal(classical.naive_inverse("hdr", image, 64), jnp.clip(image / 2, -1, 1))
    with pytest.raises(ValueError, match="no naive inverse for task 'phase_retrieval'.*sr4"):
        classical.naive_inverse("phase_retrieval", image, 64)
