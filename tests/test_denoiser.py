"""Tests of the VP preconditioning against a float64 NumPy evaluation of SPEC section 1."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_unet import random_params

from spgd_jax import denoisers as dn
from spgd_jax.models.adm import CONFIGS, UNet

SIGMAS = [100.0, 5.0, 0.1, 0.01]


def numpy_c_in_c_noise(sigma):
    """EDM VPPrecond coefficients in float64: beta_d 19.9, beta_min 0.1, M 1000."""
    sigma = np.asarray(sigma, np.float64)
    sigma_inv = (np.sqrt(0.1**2 + 2 * 19.9 * np.log(1 + sigma**2)) - 0.1) / 19.9
    return 1 / np.sqrt(sigma**2 + 1), 999 * sigma_inv


def toy_eps(x, t):
    """A nonlinear stand-in for a learn_sigma network: 2C channels, depends on x and t."""
    scale = t[:, None, None, None] / 1000.0
    return jnp.concatenate([jnp.sin(3 * x) * (1 + scale) + 0.2 * x, 5.0 + x], axis=-1)


def numpy_toy_eps(x, t):
    return np.sin(3 * x) * (1 + t[:, None, None, None] / 1000.0) + 0.2 * x


def test_timestep_matches_numpy_and_spans_the_ddpm_range():
    sigma = np.array(SIGMAS + [0.0, 80.0])
    timesteps = dn.sigma_to_timestep(jnp.asarray(sigma, jnp.float32))
    np.testing.assert_allclose(timesteps, numpy_c_in_c_noise(sigma)[1], rtol=2e-6, atol=1e-5)
    assert float(dn.sigma_to_timestep(jnp.float32(0.0))) == 0.0


@pytest.mark.parametrize("sigma", SIGMAS)
def test_vp_preconditioning_matches_numpy(sigma):
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (2, 8, 8, 3))
    x = (x0 + sigma * rng.standard_normal(x0.shape)).astype(np.float32)
    sig = np.full(2, sigma, np.float32)
    seen = {}

    def eps_fn(x_in, t):
        seen["x_in"], seen["t"] = x_in, t
        return toy_eps(x_in, t)

    out = dn.vp_preconditioning(eps_fn, jnp.asarray(x), jnp.asarray(sig))
    c_in, c_noise = numpy_c_in_c_noise(sig)
    x64 = x.astype(np.float64)
    expected = x64 - sigma * numpy_toy_eps(c_in[:, None, None, None] * x64, c_noise)
    np.testing.assert_allclose(seen["t"], c_noise, rtol=2e-6)
    np.testing.assert_allclose(seen["x_in"], c_in[:, None, None, None] * x64, rtol=2e-6, atol=1e-7)
    scale = max(1.0, sigma)  # eps errors of float32 size are multiplied by sigma
    np.testing.assert_allclose(out, expected, atol=1e-5 * scale)
    assert out.shape == x.shape and out.dtype == jnp.float32


def test_per_image_sigmas_and_transforms():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 8, 8, 3)), jnp.float32)
    sigma = jnp.asarray(SIGMAS, jnp.float32)
    d = lambda x, s: dn.vp_preconditioning(toy_eps, x, s)  # noqa: E731
    plain = d(x, sigma)
    # A batch of one is another program than the batch of four, like jit and vmap below: sin, and
    # x - sigma * eps (FMA or not), may round differently, by ulps of |D| ~ 15 at sigma = 100 (ulp 1e-6;
    # jit differs by 1.9e-6), so atol 1e-4 as below, not 1e-5 (7e-7 of the scale). Another image's sigma
    # moves D by >= 0.14 (1400x), a sigma off by 1e-3 by up to 1.2e-2 (120x, at sigma 5).
    for i, s in enumerate(SIGMAS):
        np.testing.assert_allclose(plain[i : i + 1], d(x[i : i + 1], sigma[i : i + 1]), rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(jax.jit(d)(x, sigma), plain, rtol=1e-6, atol=1e-4)
    stacked = jax.vmap(d)(jnp.stack([x, -x]), jnp.stack([sigma, sigma]))
    np.testing.assert_allclose(stacked[0], plain, rtol=1e-6, atol=1e-4)
    grad = jax.grad(lambda x: jnp.sum(d(x, sigma) ** 2))(x)
    assert grad.shape == x.shape and bool(jnp.all(jnp.isfinite(grad)))


@pytest.mark.parametrize(
    "x_shape, sigma_shape, message",
    [
        ((2, 8, 8, 3), (), r"sigma must have shape \(B,\) = \(2,\)"),
        ((2, 8, 8, 3), (2, 1), "sigma must have shape"),
        ((2, 8, 8, 3), (3,), "sigma must have shape"),
        ((8, 8, 3), (1,), r"x must be a \(B, H, W, C\) batch"),
    ],
)
def test_shape_errors(x_shape, sigma_shape, message):
    with pytest.raises(ValueError, match=message):
        dn.vp_preconditioning(toy_eps, jnp.zeros(x_shape), jnp.ones(sigma_shape))


def test_eps_fn_with_too_few_channels_is_reported():
    with pytest.raises(ValueError, match="the network returned shape"):
        dn.vp_preconditioning(lambda x, t: x[..., :1], jnp.zeros((1, 8, 8, 3)), jnp.ones((1,)))


@pytest.fixture(scope="module")
def tiny_unet():
    cfg = CONFIGS["tiny16"]
    return UNet(cfg), random_params(cfg)


def test_make_denoiser_wraps_the_unet(tiny_unet):
    model, params = tiny_unet
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 16, 16, 3)), jnp.float32)
    sigma = np.array([5.0, 0.1], np.float32)
    denoise = jax.jit(dn.make_denoiser(model.config, params))
    out = denoise(x, jnp.asarray(sigma))
    c_in, c_noise = numpy_c_in_c_noise(sigma)
    eps = jax.jit(model.apply)(
        {"params": params},
        jnp.asarray(c_in[:, None, None, None] * np.asarray(x), jnp.float32),
        jnp.asarray(c_noise, jnp.float32),
    )
    assert eps.shape[-1] == 6
    expected = np.asarray(x) - sigma[:, None, None, None] * np.asarray(eps)[..., :3]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4 * sigma.max())  # eps error x sigma

    bf16 = jax.jit(dn.make_denoiser(model.config, params, dtype="bfloat16"))(x, jnp.asarray(sigma))
    assert bf16.dtype == jnp.float32
    assert 0 < float(jnp.max(jnp.abs(bf16 - out))) < 0.05 * float(jnp.max(jnp.abs(out)))


def test_make_denoiser_errors(tiny_unet):
    model, params = tiny_unet
    with pytest.raises(TypeError, match=r"variables\['params'\]"):
        dn.make_denoiser(model.config, {"params": params})
    with pytest.raises(TypeError, match="not the config of a registered network family"):
        dn.make_denoiser(model, params)  # the module, not its config
    with pytest.raises(ValueError, match="class_labels"):
        dn.make_denoiser(model.config, params, class_labels=jnp.zeros((2,), jnp.int32))
    cond = UNet(CONFIGS["tiny16_cond"])
    with pytest.raises(ValueError, match="class_labels"):
        dn.make_denoiser(cond.config, params)
    with pytest.raises(ValueError, match="dtype"):
        dn.make_denoiser(model.config, params, dtype="float16")


def test_class_conditional_denoiser_uses_labels():
    cfg = dataclasses.replace(CONFIGS["tiny16_cond"], dropout=0.0)
    model, params = UNet(cfg), random_params(cfg)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 16, 16, 3)), jnp.float32)
    sigma = jnp.full((2,), 1.0)

    def run(labels):
        return dn.make_denoiser(model.config, params, class_labels=jnp.asarray(labels, jnp.int32))(x, sigma)

    a, b = jax.jit(lambda: (run([1, 2]), run([1, 3])))()
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6, atol=1e-6)
    assert float(jnp.max(jnp.abs(a[1] - b[1]))) > 1e-3
