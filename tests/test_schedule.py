import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sampler_toys import SHAPE, counting, gaussian_denoiser
from spgd_jax.samplers.schedule import edm_sigmas, euler_coefficients, euler_step
from spgd_jax.samplers import EulerConfig, run


@pytest.mark.parametrize("steps, sigma_max, sigma_min, rho", [(100, 100.0, 0.1, 7.0), (5, 80.0, 0.002, 3.0)])
def test_edm_sigmas_match_spec_formula(steps, sigma_max, sigma_min, rho):
    expected = [
        (sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
        for i in range(steps)
    ] + [0.0]
    sigmas = edm_sigmas(steps, sigma_max, sigma_min, rho)
    assert sigmas.dtype == np.float64 and sigmas.shape == (steps + 1,)
    np.testing.assert_allclose(sigmas, expected, rtol=1e-13, atol=0)
    assert math.isclose(sigmas[0], sigma_max) and math.isclose(sigmas[-2], sigma_min) and sigmas[-1] == 0


def test_euler_coefficients_and_step():
    sigmas = edm_sigmas(4)
    coefficients = euler_coefficients(sigmas)
    np.testing.assert_allclose(coefficients, [1 - sigmas[i + 1] / sigmas[i] for i in range(4)], rtol=1e-15)
    assert coefficients[-1] == 1.0
    x, x0_hat = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.5])
    np.testing.assert_allclose(euler_step(x, x0_hat, 0.25), [1.0 + 0.25 * -0.5, -2.0 + 0.25 * 2.5])


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(steps=1), ValueError),
        (dict(steps=2.0), TypeError),
        (dict(sigma_min=100.0), ValueError),
        (dict(sigma_min=0.0), ValueError),
        (dict(rho=0.0), ValueError),
        (dict(sigma_max=float("nan")), TypeError),
        (dict(trajectory_every=-1), ValueError),
    ],
)
def test_bad_schedule_settings_raise_clear_errors(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs)).split("_every")[0]):
        EulerConfig(**kwargs)


def test_unconditional_euler_matches_numpy_loop():
    """Against an independent float64 loop of SPEC section 2; T evaluations per image."""
    steps, batch = 6, 2
    x_init = 100.0 * np.random.default_rng(0).standard_normal((batch,) + SHAPE)
    record = []
    result = jax.jit(lambda x: run(counting(gaussian_denoiser, record), None, None, x, EulerConfig(steps=steps)))(
        jnp.asarray(x_init, jnp.float32)
    )
    sigmas = [(100 ** (1 / 7) + i / (steps - 1) * (0.1 ** (1 / 7) - 100 ** (1 / 7))) ** 7 for i in range(steps)] + [0]
    x = x_init
    for i in range(steps):
        x = x + (sigmas[i] - sigmas[i + 1]) / sigmas[i] * (x * 0.25 / (0.25 + sigmas[i] ** 2) - x)
    np.testing.assert_allclose(result.x, x, rtol=2e-5, atol=1e-6)
    assert len(record) == steps * batch
    np.testing.assert_allclose(sorted(record), sorted(sigmas[:-1] * batch), rtol=1e-6)
    assert not result.diverged.any() and result.trajectory is None


def test_unconditional_euler_converges_to_exact_ode_solution():
    """For data ~ N(0, v I) the probability-flow ODE scales x by sqrt(v + t^2): exact down to sigma_min = 0.1,
    then the last step (coefficient 1) lands on the Tweedie estimate D(x; 0.1) = x * v / (v + 0.01)."""
    x_init = 100.0 * jax.random.normal(jax.random.PRNGKey(0), (2,) + SHAPE)
    result = run(gaussian_denoiser, None, None, x_init, EulerConfig(steps=400))
    at_sigma_min = x_init * np.sqrt((0.25 + 0.1**2) / (0.25 + 100.0**2))
    np.testing.assert_allclose(result.x, at_sigma_min * 0.25 / (0.25 + 0.1**2), rtol=1e-2, atol=1e-6)


def test_sample_dispatches_unconditional_euler_on_a_batch_of_keys():
    from spgd_jax.samplers import sample

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    config = EulerConfig(steps=4)
    result = sample(gaussian_denoiser, None, None, keys, config, x_shape=SHAPE)
    x_init = 100.0 * jax.vmap(lambda k: jax.random.normal(k, SHAPE))(keys)
    # sample's vmapped, jitted program against euler's: every term of a step is proportional to the pixel,
    # so each pixel carries a relative error of ~16 float32 roundings (4 steps), up to 1e-6; 8e-7 seen on
    # XLA built for AVX (no FMA). 1e-5 keeps 12x; sigma_max or x_init off by 1e-3 exceeds it 100x, rho 37x.
    np.testing.assert_allclose(result.x, run(gaussian_denoiser, None, None, x_init, config).x, rtol=1e-5)
    with pytest.raises(ValueError, match="batch of B keys"):
        sample(gaussian_denoiser, None, None, keys[0], config, x_shape=SHAPE)


def test_ddpm_sigmas_are_the_respaced_guided_diffusion_levels():
    from spgd_jax.samplers.schedule import ddpm_sigmas

    alpha_bar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    full = ddpm_sigmas(1000)
    np.testing.assert_allclose(full[:-1], np.sqrt(1 / alpha_bar - 1)[::-1], rtol=1e-12)
    assert full[-1] == 0 and np.all(np.diff(full) < 0)
    # space_timesteps(1000, "20"): round(j * 999 / 19), e.g. 0, 53, 105, ..., 999
    np.testing.assert_allclose(ddpm_sigmas(20)[-2::-1][:3], np.sqrt(1 / alpha_bar[[0, 53, 105]] - 1), rtol=1e-12)
    with pytest.raises(ValueError, match="steps"):
        ddpm_sigmas(1001)


def test_ddim_step_spans_the_ode_step_and_the_ancestral_posterior():
    from spgd_jax.samplers.schedule import ddim_step

    rng = np.random.default_rng(0)
    x, x0_hat = rng.standard_normal((2, 1, 50_000)).astype(np.float32)
    sigma, sigma_next = 2.0, 0.5
    np.testing.assert_allclose(ddim_step(x, x0_hat, sigma, sigma_next, 0.0, 0 * x), euler_step(x, x0_hat, 0.75),
                               rtol=1e-5, atol=1e-6)
    # eta = 1: q(x_next | x, x0) of the variance-exploding chain, mean x0 + (s'/s)^2 (x - x0), var s'^2 (1 - (s'/s)^2)
    noise = rng.standard_normal(x.shape).astype(np.float32)
    step = np.asarray(ddim_step(x, x0_hat, sigma, sigma_next, 1.0, noise))
    mean = x0_hat + (sigma_next / sigma) ** 2 * (x - x0_hat)
    std = np.sqrt(sigma_next**2 * (1 - (sigma_next / sigma) ** 2))
    np.testing.assert_allclose(step - mean, std * noise, atol=2e-6)
    np.testing.assert_array_equal(ddim_step(x, x0_hat, sigma, 0.0, 1.0, noise), x0_hat)  # the last step lands on x0_hat
