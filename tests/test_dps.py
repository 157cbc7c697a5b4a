import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sampler_toys import PRIOR_VAR, SHAPE, counting, gaussian_denoiser, matrix_forward, random_problem
from spgd_jax.samplers.dps import DPSConfig, get_step_fn
from spgd_jax.samplers import run, sample
from spgd_jax.samplers._loop import Step
from spgd_jax.samplers.schedule import ddpm_sigmas, edm_sigmas


def numpy_dps_step(x, M, y, sigma, sigma_next, zeta):
    """SPEC section 5 for D(x; s) = x v/(v+s^2), A = M vec(x), float64: the gradient of the NORM at x_i."""
    c = PRIOR_VAR / (PRIOR_VAR + sigma**2)
    x0_hat = c * x
    residual = M @ x0_hat.ravel() - y
    grad = (c * M.T @ residual / np.linalg.norm(residual)).reshape(x.shape)
    return x + (1 - sigma_next / sigma) * (x0_hat - x) - zeta * grad


@pytest.mark.parametrize(
    "kwargs, error", [(dict(zeta=0.0), ValueError), (dict(zeta=1.0, steps=1), ValueError), (dict(zeta="1"), TypeError)]
)
def test_config_validation(kwargs, error):
    with pytest.raises(error, match="zeta|steps"):
        DPSConfig(**kwargs)


def test_one_dps_step_matches_numpy():
    matrices, _, y, _ = random_problem(1)
    x = np.random.default_rng(0).standard_normal(SHAPE) * 2
    step = jax.jit(get_step_fn(gaussian_denoiser, matrix_forward, DPSConfig(zeta=1.0)))
    sigma, sigma_next = 2.0, 1.5
    coefficient = jnp.float32(1 - sigma_next / sigma)
    info = Step(jnp.int32(0), jnp.float32(sigma), jnp.float32(sigma_next), coefficient, jnp.float32(0.7))
    x_next, x0_hat, norm = step(jnp.asarray(x, jnp.float32), info, None, (y[0], matrices[0]))
    matrix, y64 = np.asarray(matrices[0], np.float64), np.asarray(y[0], np.float64)
    expected = numpy_dps_step(x, matrix, y64, sigma, sigma_next, 0.7)
    np.testing.assert_allclose(x_next, expected, rtol=1e-5, atol=1e-6)
    c = PRIOR_VAR / (PRIOR_VAR + sigma**2)
    np.testing.assert_allclose(norm, np.linalg.norm(matrix @ (c * x.ravel()) - y64), rtol=1e-5)
    np.testing.assert_allclose(x0_hat, x * PRIOR_VAR / (PRIOR_VAR + sigma**2), rtol=1e-6)


def test_dps_run_matches_numpy_and_uses_t_evaluations_per_image():
    matrices, _, y, x_init = random_problem(2)
    config = DPSConfig(zeta=0.3, steps=6)
    record = []
    result = jax.jit(lambda x: run(counting(gaussian_denoiser, record), matrix_forward, y, x, config, matrices))(x_init)
    jax.effects_barrier()
    sigmas = edm_sigmas(6)
    for b in range(2):
        x = np.asarray(x_init[b], np.float64)
        for i in range(6):
            matrix, y64 = np.asarray(matrices[b], np.float64), np.asarray(y[b], np.float64)
            x = numpy_dps_step(x, matrix, y64, sigmas[i], sigmas[i + 1], 0.3)
        np.testing.assert_allclose(result.x[b], x, rtol=1e-4, atol=1e-5)
    assert result.losses.shape == (2, 6)
    assert len(record) == 6 * 2
    assert not result.diverged.any()


def test_zero_residual_gives_a_zero_gradient_not_nan():
    x = jnp.ones(SHAPE)
    step = get_step_fn(gaussian_denoiser, lambda x0, _: x0, DPSConfig(zeta=1.0))
    sigma = jnp.float32(1.0)
    y = x * PRIOR_VAR / (PRIOR_VAR + 1.0)  # = A(D(x)) exactly
    info = Step(jnp.int32(0), sigma, jnp.float32(0.5), jnp.float32(0.5), jnp.float32(1.0))
    x_next, x0_hat, _ = step(x, info, None, (y, None))
    np.testing.assert_allclose(x_next, x + 0.5 * (x0_hat - x))


def test_sample_dispatches_dps_with_trajectory_and_batched_keys():
    matrices, _, y, _ = random_problem(2)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    config = DPSConfig(zeta=0.3, steps=5, trajectory_every=2)
    result = sample(gaussian_denoiser, matrix_forward, y, keys, config, matrices, x_shape=SHAPE)
    assert result.x.shape == (2,) + SHAPE and result.trajectory.shape == (2, 3) + SHAPE
    x_init = 100.0 * jax.vmap(lambda k: jax.random.normal(k, SHAPE))(keys)
    without_trajectory = dataclasses.replace(config, trajectory_every=0)
    direct = run(gaussian_denoiser, matrix_forward, y, x_init, without_trajectory, matrices)
    np.testing.assert_allclose(result.x, direct.x, rtol=1e-5, atol=1e-6)


def test_traced_zeta_replaces_the_configs():
    matrices, _, y, x_init = random_problem(2)
    config = DPSConfig(zeta=0.3, steps=4)
    static = run(gaussian_denoiser, matrix_forward, y, x_init, config, matrices)
    swept = jax.jit(jax.vmap(lambda z: run(gaussian_denoiser, matrix_forward, y, x_init, DPSConfig(zeta=z, steps=4),
                                           matrices).x))(jnp.asarray([0.1, 0.3], jnp.float32))
    np.testing.assert_allclose(swept[1], static.x, rtol=1e-5, atol=1e-6)
    assert not np.allclose(swept[0], static.x)


def test_ddpm_schedule_step_is_the_releases_vp_step():
    """One schedule='ddpm' step == the DPS release's step in VP coordinates x_vp = x / sqrt(1 + t^2) (float64
    NumPy: p_sample, then x_vp -= zeta * grad_{x_vp} ||y - A x0_hat||), mapped back to ours."""
    from spgd_jax.samplers.schedule import vp_step_factors

    matrices, _, y, _ = random_problem(1)
    M, y64 = np.asarray(matrices[0], np.float64), np.asarray(y[0], np.float64)
    x = np.random.default_rng(0).standard_normal(SHAPE) * 2
    sigma, sigma_next, zeta = 2.0, 1.5, 0.7
    key = jax.random.key(3)
    factor = vp_step_factors(np.array([sigma, sigma_next]))[0]
    info = Step(jnp.int32(0), jnp.float32(sigma), jnp.float32(sigma_next), jnp.float32(0), jnp.float32(zeta * factor))
    got, _, _ = jax.jit(get_step_fn(gaussian_denoiser, matrix_forward, DPSConfig(zeta=1.0, schedule="ddpm")))(jnp.asarray(x, jnp.float32), info, key,
                                                                               (y[0], matrices[0]))
    z = np.asarray(jax.random.normal(key, SHAPE), np.float64)
    abar, abar_prev = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
    beta = 1 - abar / abar_prev
    x_vp = x * np.sqrt(abar)
    c = PRIOR_VAR / (PRIOR_VAR + sigma**2)
    x0_hat = c * x_vp / np.sqrt(abar)  # D as a function of x_vp
    mean = (beta * np.sqrt(abar_prev) * x0_hat + (1 - abar_prev) * np.sqrt(1 - beta) * x_vp) / (1 - abar)
    sample = mean + np.sqrt(beta * (1 - abar_prev) / (1 - abar)) * z
    residual = M @ x0_hat.ravel() - y64
    grad_vp = (c / np.sqrt(abar)) * (M.T @ residual / np.linalg.norm(residual)).reshape(SHAPE)
    expected = (sample - zeta * grad_vp) / np.sqrt(abar_prev)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_ddpm_schedule_config_and_sigma_max():
    config = DPSConfig(zeta=0.5, schedule="ddpm")
    assert config.steps == 1000 and 157.3 < config.sigma_max < 157.5
    assert dataclasses.replace(config, zeta=1.0).sigma_max == config.sigma_max  # replace keeps it valid
    assert DPSConfig(zeta=0.5).sigma_max == 100.0 and DPSConfig(zeta=0.5).schedule == "edm"
    np.testing.assert_array_equal(config.sigmas(), ddpm_sigmas(1000))
    for kwargs, match in [(dict(schedule="vp"), "schedule"), (dict(schedule="ddpm", sigma_max=100.0), "sigma_max"),
                          (dict(schedule="ddpm", rho=7.0), "sigma_min and rho"),
                          (dict(schedule="ddpm", steps=1001), "steps")]:
        with pytest.raises(ValueError, match=match):
            DPSConfig(zeta=0.5, **kwargs)


def test_ddpm_schedule_needs_keys_and_edm_ignores_them():
    matrices, _, y, x_init = random_problem(1)
    with pytest.raises(ValueError, match="keys"):
        run(gaussian_denoiser, matrix_forward, y, x_init, DPSConfig(zeta=0.5, schedule="ddpm", steps=3), matrices)
    config = DPSConfig(zeta=0.5, steps=3)
    keys = jax.random.split(jax.random.key(0), 1)
    keyed = run(gaussian_denoiser, matrix_forward, y, x_init, config, matrices, keys=keys)
    np.testing.assert_array_equal(keyed.x, run(gaussian_denoiser, matrix_forward, y, x_init, config, matrices).x)
