"""RED-Diff and DAPS on the Gaussian toy: NumPy float64 versions of the official updates, the exact Gaussian
posterior, batch independence, jit, NFE counts, dispatch and config validation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sampler_toys import (PRIOR_VAR, SHAPE, counting, gaussian_denoiser, gaussian_posterior, matrix_forward,
                          random_problem)
from spgd_jax.samplers import DAPSConfig, RedDiffConfig, SAMPLERS, Step, image_keys, run, sample, step_keys
from spgd_jax.samplers.daps import DAPSStep, annealing_sigmas, get_step_fn, langevin, langevin_rates, ode_sigmas
from spgd_jax.samplers.red_diff import adam, initial_mean
from spgd_jax.samplers.red_diff import get_step_fn as red_diff_step_fn
from spgd_jax.samplers.schedule import ddpm_sigmas

RED_DIFF = RedDiffConfig(lr=0.05, steps=8)
DAPS = DAPSConfig(lr=1e-5, steps=4, ode_steps=2, langevin_steps=5)
CONFIGS = {"red_diff": RED_DIFF, "daps": DAPS}


def shrink(sigma):
    return PRIOR_VAR / (PRIOR_VAR + sigma**2)


def loop_keys(batch, seed=0):
    return step_keys(image_keys(jax.random.PRNGKey(seed), batch))


def normal(key):
    return np.asarray(jax.random.normal(key, SHAPE), np.float64).ravel()


def numpy_red_diff(mu, matrix, y, sigmas, noises, lr, lam):
    """reddiff.py's loop in float64 for D(x; s) = x v/(v+s^2), A = M vec(x), with torch.optim.Adam(betas=(0.9,
    0.99), eps=1e-8) and the code's means taken over one image."""
    m, v = np.zeros_like(mu), np.zeros_like(mu)
    for t, (sigma, eps) in enumerate(zip(sigmas, noises), start=1):
        x = mu + sigma * eps
        eps_hat = (x - shrink(sigma) * x) / sigma
        grad = lam * sigma * (eps_hat - eps) / mu.size - matrix.T @ (y - matrix @ mu) / y.size
        m, v = 0.9 * m + 0.1 * grad, 0.99 * v + 0.01 * grad**2
        mu = mu - lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.99**t)) + 1e-8)
    return mu


def numpy_daps_step(x, matrix, y, sigma, sigma_next, grid, lr, tau, langevin_steps, key):
    """One annealing step of the official DAPS in float64 (flat x); the noise drawn from key as daps.py does.
    Returns (x_next, the ODE's x0_hat, ||A x0 - y||^2 at the start of the last Langevin step)."""
    langevin_key, noise_key = jax.random.split(key)
    ode = x
    for s, s_next in zip(grid[:-1], grid[1:]):  # DiffusionPFODE, euler: dx = (x - D(x; s)) / s * (s_next - s)
        ode = ode + (s_next - s) * (ode - shrink(s) * ode) / s
    x0 = ode
    for j in range(langevin_steps):  # mcmc.py: langevin, prior_solver 'gaussian', data term grad ||Ax - y||^2 / tau^2
        score = (ode - x0) / sigma**2 - 2 * matrix.T @ (matrix @ x0 - y) / tau**2
        loss = np.sum((matrix @ x0 - y) ** 2)
        x0 = x0 + lr * score + np.sqrt(2 * lr) * normal(jax.random.fold_in(langevin_key, j))
    return x0 + sigma_next * normal(noise_key), ode, loss


def numpy_reference(name, config, matrix, y, x_init, loop_key):
    """The whole run of one image in float64: RED-Diff from A^+ y, DAPS from x_init (flat)."""
    matrix, y = np.asarray(matrix, np.float64), np.asarray(y, np.float64)
    if name == "red_diff":
        sigmas = ddpm_sigmas(config.steps)[:-1]
        noises = [normal(jax.random.fold_in(loop_key, i)) for i in range(config.steps)]
        return numpy_red_diff(np.linalg.pinv(matrix) @ y, matrix, y, sigmas, noises, config.lr, config.lam)
    x, sigmas, rates = np.asarray(x_init, np.float64).ravel(), annealing_sigmas(config), langevin_rates(config)
    for i in range(config.steps):
        x = numpy_daps_step(x, matrix, y, sigmas[i], sigmas[i + 1], ode_sigmas(sigmas[i], config), config.lr * rates[i],
                            config.tau, config.langevin_steps, jax.random.fold_in(loop_key, i))[0]
    return x


@pytest.mark.parametrize("make, error, match", [
    (lambda: RedDiffConfig(lr=0.0), ValueError, "lr"),
    (lambda: RedDiffConfig(lr="1"), TypeError, "lr"),
    (lambda: RedDiffConfig(lr=0.1, lam=-1.0), ValueError, "lam"),
    (lambda: RedDiffConfig(lr=0.1, steps=1001), ValueError, "steps"),
    (lambda: RedDiffConfig(lr=0.1, init_iterations=0), ValueError, "init_iterations"),
    (lambda: RedDiffConfig(lr=0.1, trajectory_every=-1), ValueError, "trajectory_every"),
    (lambda: DAPSConfig(lr=-1e-4), ValueError, "lr"),
    (lambda: DAPSConfig(lr=1e-4, tau=float("nan")), TypeError, "tau"),
    (lambda: DAPSConfig(lr=1e-4, ode_steps=0), ValueError, "ode_steps"),
    (lambda: DAPSConfig(lr=1e-4, langevin_steps=2.0), ValueError, "langevin_steps"),
    (lambda: DAPSConfig(lr=1e-4, ode_sigma_min=0.5), ValueError, "ode_sigma_min"),
    (lambda: DAPSConfig(lr=1e-4, steps=1), ValueError, "steps"),
])
def test_config_validation(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_official_defaults_and_schedules():
    config = DAPSConfig(lr=1e-4)
    assert (config.steps, config.ode_steps, config.langevin_steps, config.tau) == (200, 5, 100, 0.01)
    sigmas = annealing_sigmas(config)
    ramp = np.arange(200) / 200  # EDMScheduler(num_steps=200): 201 grid points, the last dropped, then 0
    expected = (100 ** (1 / 7) + ramp * (0.1 ** (1 / 7) - 100 ** (1 / 7))) ** 7
    np.testing.assert_allclose(sigmas, np.append(expected, 0.0), rtol=1e-12)
    grid = ode_sigmas(2.0, config)
    assert grid.shape == (6,) and np.allclose(grid[[0, -1]], [2.0, 0.01], rtol=1e-12)
    np.testing.assert_allclose(langevin_rates(config)[[0, 200 - 1]], [1.0, 1 + 199 / 201 * (0.01 - 1)])
    red = RedDiffConfig(lr=0.1)
    assert (red.steps, red.lam) == (1000, 0.25) and np.isclose(red.sigma_max, ddpm_sigmas(1000)[0])


def test_red_diff_starts_from_the_pseudo_inverse():
    matrices, _, y, _ = random_problem(2)  # 12 x 32 matrices of full row rank: A^+ y, the least-norm solution
    mu = jax.jit(jax.vmap(lambda y_b, m_b: initial_mean(matrix_forward, y_b, m_b, SHAPE, 30)))(y, matrices)
    for b in range(2):
        expected = np.linalg.pinv(np.asarray(matrices[b], np.float64)) @ np.asarray(y[b], np.float64)
        np.testing.assert_allclose(np.ravel(mu[b]), expected, atol=1e-5)


def test_red_diff_matches_numpy_adam_reduces_the_residual_and_uses_t_evaluations():
    matrices, _, y, x_init = random_problem(2, m=48)  # overdetermined, so that A mu_0 != y
    config, keys, record = RedDiffConfig(lr=0.01, steps=100, init_iterations=1), loop_keys(2), []
    result = run(counting(gaussian_denoiser, record), matrix_forward, y, x_init, config, matrices, keys=keys)
    jax.effects_barrier()
    assert len(record) == config.steps * 2  # one denoiser evaluation per step and image
    sigmas = ddpm_sigmas(config.steps)[:-1]
    for b in range(2):
        noises = [normal(jax.random.fold_in(keys[b], i)) for i in range(config.steps)]
        matrix, y64 = np.asarray(matrices[b], np.float64), np.asarray(y[b], np.float64)
        mu = matrix.T @ y64 * (y64 @ y64) / (y64 @ matrix @ matrix.T @ y64)  # one CG iteration from 0
        expected = numpy_red_diff(mu, matrix, y64, sigmas, noises, config.lr, config.lam)
        np.testing.assert_allclose(np.ravel(result.x[b]), expected, atol=2e-4)
    assert result.losses.shape == (2, config.steps) and np.all(result.losses[:, -1] < 0.1 * result.losses[:, 0])


def test_red_diff_with_lambda_zero_finds_the_least_squares_fit():
    matrices, _, y, x_init = random_problem(2, m=48)  # overdetermined: a unique least-squares fit
    config = RedDiffConfig(lr=0.01, lam=0.0, init_iterations=1)
    result = run(gaussian_denoiser, matrix_forward, y, x_init, config, matrices, keys=loop_keys(2))
    for b in range(2):
        matrix, y64 = np.asarray(matrices[b], np.float64), np.asarray(y[b], np.float64)
        least_squares = np.linalg.lstsq(matrix, y64, rcond=None)[0]
        np.testing.assert_allclose(np.ravel(result.x[b]), least_squares, atol=2e-3)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_daps_step_matches_numpy(jit):
    matrices, _, y, _ = random_problem(1)
    config = DAPSConfig(lr=1e-3, ode_steps=3, langevin_steps=4, tau=0.3)
    x = 2.0 * np.random.default_rng(1).standard_normal(SHAPE)
    sigma, sigma_next, lr, key = 2.0, 1.5, 7e-4, jax.random.key(3)
    grid = ode_sigmas(sigma, config)
    info = Step(jnp.int32(0), jnp.float32(sigma), jnp.float32(sigma_next), jnp.float32(0.0),
                DAPSStep(jnp.asarray(grid, jnp.float32), jnp.float32(lr)))
    step = get_step_fn(gaussian_denoiser, matrix_forward, config)
    x_next, x0_hat, loss = (jax.jit(step) if jit else step)(jnp.asarray(x, jnp.float32), info, key, (y[0], matrices[0]))
    expected = numpy_daps_step(x.ravel(), np.asarray(matrices[0], np.float64), np.asarray(y[0], np.float64), sigma,
                               sigma_next, grid, lr, 0.3, 4, key)
    for actual, wanted in zip((x_next, x0_hat, loss), expected):
        np.testing.assert_allclose(np.ravel(actual), np.ravel(wanted), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_red_diff_step_jit_and_eager_agree(jit):
    matrices, _, y, _ = random_problem(1)
    mu = jnp.asarray(np.random.default_rng(1).standard_normal(SHAPE), jnp.float32)
    optimizer, key = adam(0.1), jax.random.key(3)
    info = Step(jnp.int32(0), jnp.float32(2.0), jnp.float32(1.5), jnp.float32(0.25), jnp.float32(0.5))
    step = red_diff_step_fn(gaussian_denoiser, matrix_forward, RedDiffConfig(lr=0.1))
    step = jax.jit(step) if jit else step
    (mu_next, _), x0_hat, data = step((mu, optimizer.init(mu)), info, key, (y[0], matrices[0]))
    matrix, y64 = np.asarray(matrices[0], np.float64), np.asarray(y[0], np.float64)
    expected = numpy_red_diff(np.ravel(mu).astype(np.float64), matrix, y64, [2.0], [normal(key)], 0.1, 0.5 / 2.0)
    np.testing.assert_allclose(np.ravel(mu_next), expected, rtol=1e-5, atol=1e-6)
    x = np.ravel(mu) + 2.0 * normal(key)
    np.testing.assert_allclose(np.ravel(x0_hat), shrink(2.0) * x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(data, np.mean((y64 - matrix @ np.ravel(mu)) ** 2) / 2, rtol=1e-5)


def test_daps_langevin_samples_the_exact_gaussian_posterior_mean():
    matrices, _, y, _ = random_problem(1)
    matrix, y0 = matrices[0], y[0]
    x0_hat = 0.5 * jnp.asarray(np.random.default_rng(2).standard_normal(SHAPE), jnp.float32)
    sigma, tau, chains = 0.5, 0.5, 1000
    keys = jax.random.split(jax.random.key(5), chains)
    run = jax.jit(jax.vmap(lambda k: langevin(matrix_forward, x0_hat, jnp.float32(sigma), jnp.float32(0.005), tau,
                                              400, y0, matrix, k)[0]))
    samples = np.asarray(run(keys), np.float64).reshape(chains, -1)
    # the code's target: N(x0_hat, sigma^2 I) times exp(-||A x - y||^2 / tau^2), a likelihood of variance tau^2/2
    mean, covariance = gaussian_posterior(matrix, y0, x0_hat, sigma**2, tau**2 / 2)
    z = (samples.mean(0) - mean) / np.sqrt(np.diag(covariance) / chains)
    assert np.max(np.abs(z)) < 4.5, z
    prior_only = (samples.mean(0) - np.ravel(x0_hat)) / np.sqrt(np.diag(covariance) / chains)
    assert np.max(np.abs(prior_only)) > 10  # the data term moved the chains


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sample_matches_numpy_is_batch_independent_and_traces_the_step_size(name):
    config = CONFIGS[name]
    matrices, _, y, _ = random_problem(3)
    keys = jax.random.split(jax.random.PRNGKey(4), 3)  # raw uint32 keys, one per image
    batch = sample(gaussian_denoiser, matrix_forward, y, keys, config, matrices, x_shape=SHAPE)  # jit, lr traced
    x_init = config.sigma_max * jax.vmap(lambda k: jax.random.normal(k, SHAPE))(keys)
    for b, loop_key in enumerate(step_keys(image_keys(keys, 3))):
        expected = numpy_reference(name, config, matrices[b], y[b], x_init[b], loop_key)
        np.testing.assert_allclose(np.ravel(batch.x[b]), expected, rtol=1e-4, atol=2e-4)
    assert not batch.diverged.any() and batch.losses.shape == (3, config.steps)
    # image 1 among other images (other measurements, operators and keys): the same result
    others_matrices, _, others_y, _ = random_problem(3, seed=7)
    mixed = sample(gaussian_denoiser, matrix_forward, others_y.at[1].set(y[1]), keys[::-1].at[1].set(keys[1]), config,
                   others_matrices.at[1].set(matrices[1]), x_shape=SHAPE)
    np.testing.assert_allclose(mixed.x[1], batch.x[1], rtol=1e-6, atol=1e-7)
    assert not np.allclose(mixed.x[0], batch.x[0])
    # another step size reuses the compilation (it is traced) and changes the result
    other = sample(gaussian_denoiser, matrix_forward, y, keys, dataclasses.replace(config, lr=config.lr / 2), matrices,
                   x_shape=SHAPE)
    assert not np.allclose(other.x, batch.x)


def test_red_diff_refuses_a_nonlinear_operator_and_both_methods_need_keys():
    matrices, _, y, x_init = random_problem(2)
    assert SAMPLERS["red_diff"].linear_only and not SAMPLERS["daps"].linear_only
    nonlinear = lambda x, matrix: jnp.abs(matrix_forward(x, matrix))
    with pytest.raises(ValueError, match="linear"):
        run(gaussian_denoiser, nonlinear, y, x_init, RED_DIFF, matrices, keys=loop_keys(2))
    for config in (RED_DIFF, DAPS):
        with pytest.raises(ValueError, match="keys"):
            run(gaussian_denoiser, matrix_forward, y, x_init, config, matrices)


def test_daps_nfe_trajectory_and_a_nonlinear_operator():
    matrices, _, y, _ = random_problem(2)
    nonlinear = lambda x, matrix: jnp.abs(matrix_forward(x, matrix))
    config, record = dataclasses.replace(DAPS, trajectory_every=3), []
    result = sample(counting(gaussian_denoiser, record), nonlinear, jnp.abs(y), jax.random.PRNGKey(0), config, matrices,
                    x_shape=SHAPE)
    jax.effects_barrier()
    assert len(record) == DAPS.steps * DAPS.ode_steps * 2  # K Euler steps per annealing step and image
    assert result.trajectory.shape == (2, 2) + SHAPE and np.isfinite(result.x).all() and not result.diverged.any()
