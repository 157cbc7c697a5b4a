import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spgd_jax import metrics


def _pair(seed=0, shape=(2, 32, 32, 3), noise=0.1):
    rng = np.random.default_rng(seed)
    ref = rng.uniform(-1, 1, shape).astype(np.float32)
    x = np.clip(ref + noise * rng.standard_normal(shape), -1, 1).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(ref)


def test_psnr_matches_numpy_definition_on_unit_range():
    x, ref = _pair()
    a, b = (np.asarray(x) + 1) / 2, (np.asarray(ref) + 1) / 2
    mse = ((a - b) ** 2).reshape(2, -1).mean(axis=1)
    np.testing.assert_allclose(metrics.psnr(x, ref), 10 * np.log10(1.0 / mse), rtol=1e-5)


def test_ssim_is_one_for_identical_and_lower_for_noisy():
    x, ref = _pair()
    np.testing.assert_allclose(metrics.ssim(ref, ref), 1.0, atol=1e-5)
    assert np.all(np.asarray(metrics.ssim(x, ref)) < 0.99)


def test_lpips_zero_for_identical_and_grows_with_noise():
    small, ref = _pair(noise=0.05)
    large, _ = _pair(noise=0.4)
    np.testing.assert_allclose(metrics.lpips(ref, ref), 0.0, atol=1e-6)
    d_small, d_large = np.asarray(metrics.lpips(small, ref)), np.asarray(metrics.lpips(large, ref))
    assert d_small.shape == (2,)
    assert np.all(d_small > 0) and np.all(d_large > d_small)


def test_lpips_vgg_is_another_network_zero_for_identical_and_growing_with_noise():
    small, ref = _pair(noise=0.05)
    large, _ = _pair(noise=0.4)
    np.testing.assert_allclose(metrics.lpips(ref, ref, "vgg16"), 0.0, atol=1e-6)
    d_small, d_large = np.asarray(metrics.lpips(small, ref, "vgg16")), np.asarray(metrics.lpips(large, ref, "vgg16"))
    assert np.all(d_small > 0) and np.all(d_large > d_small)
    assert not np.allclose(d_small, metrics.lpips(small, ref), rtol=0.05)  # not AlexNet's numbers again
    values = metrics.all_metrics(small, ref, vgg=True)
    np.testing.assert_array_equal(values["lpips_vgg"], d_small)
    with pytest.raises(ValueError, match="net must be one of"):
        metrics.lpips(small, ref, "resnet")


def test_shape_mismatch_is_a_clear_error():
    x, ref = _pair()
    with pytest.raises(ValueError, match="one size"):
        metrics.psnr(x[:, :16], ref)
    with pytest.raises(ValueError, match="same shape"):
        metrics.ssim(x[:, :16], ref)


def test_lpips_refuses_images_too_small_and_all_metrics_leaves_it_out():
    x, ref = _pair(shape=(1, 16, 16, 3))
    with pytest.raises(ValueError, match="at least 32"):
        metrics.lpips(x, ref)
    assert set(metrics.all_metrics(x, ref)) == {"psnr", "ssim"}


def test_psnr_equals_dm_pix_and_broadcasts_leading_axes():
    import dm_pix

    x, ref = _pair()
    unit = lambda a: jnp.clip((a + 1) / 2, 0, 1)
    np.testing.assert_allclose(metrics.psnr(x, ref), dm_pix.psnr(unit(ref), unit(x)), rtol=1e-5)
    stacked = metrics.psnr(jnp.stack([x, ref, x]), ref)  # (L, B): one row per step size
    assert stacked.shape == (3, 2) and np.isinf(np.asarray(stacked[1])).all()
    # (L, B) and (B,) inputs are two programs: each mse sums 3072 squares, perhaps in another order (<= ~7e-7
    # relative), so PSNR (~26 dB) may move by 4.3 dB x 7e-7, 1.2e-7 of itself: rtol 1e-6, not numpy's 1e-7.
    # x off by 1e-4 relative moves PSNR by 2e-5 (20x).
    np.testing.assert_allclose(stacked[0], metrics.psnr(x, ref), rtol=1e-6)



def test_all_metrics_one_program_equals_each_metric_in_order():
    x = jax.random.uniform(jax.random.key(0), (2, 40, 40, 3), minval=-1, maxval=1)
    reference = jnp.clip(x + 0.2 * jax.random.normal(jax.random.key(1), x.shape), -1, 1)
    values = metrics.all_metrics(x, reference, vgg=True)
    assert list(values) == ["psnr", "ssim", "lpips", "lpips_vgg"]
    alone = {"psnr": metrics.psnr(x, reference), "ssim": metrics.ssim(x, reference),
             "lpips": metrics.lpips(x, reference), "lpips_vgg": metrics.lpips(x, reference, "vgg16")}
    for name, value in values.items():
        assert value.shape == (2,)
        np.testing.assert_allclose(value, alone[name], rtol=1e-5, err_msg=name)
    assert list(metrics.all_metrics(x[:, :16, :16], reference[:, :16, :16])) == ["psnr", "ssim"]
