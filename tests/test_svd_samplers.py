"""DDRM, DiffPIR, PnP-ADMM and the operators' SVDs (spgd_jax.operators.svd)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sampler_toys import (PRIOR_VAR, SHAPE, MatrixSVD, counting, gaussian_denoiser, matrix_forward, random_problem,
                          svd_params)
from spgd_jax import operators
from spgd_jax.samplers import (DDRMConfig, DiffPIRConfig, PnPADMMConfig, SAMPLERS, Step, image_keys, initial_noise, run,
                               sample, step_keys)
from spgd_jax.samplers.ddrm import ddrm_sigmas, get_step_fn as ddrm_step
from spgd_jax.samplers.diffpir import diffpir_sigmas, get_step_fn as diffpir_step

MATRIX_SVD = MatrixSVD()


def posterior(matrix, y, sigma_y):
    """Exact posterior mean (n,) and marginal stds (n,) of x ~ N(0, v I), y = M x + N(0, sigma_y^2 I), float64."""
    matrix, y = np.asarray(matrix, np.float64), np.asarray(y, np.float64)
    gram = PRIOR_VAR * matrix @ matrix.T + sigma_y**2 * np.eye(len(y))
    mean = PRIOR_VAR * matrix.T @ np.linalg.solve(gram, y)
    cov = PRIOR_VAR * np.eye(matrix.shape[1]) - PRIOR_VAR**2 * matrix.T @ np.linalg.solve(gram, matrix)
    return mean, np.sqrt(np.diag(cov))


def apply(matrices, x):
    return jnp.einsum("bmn,bn->bm", matrices, x.reshape(x.shape[0], -1))


# ---------------------------------------------------------------- SVDs of the task operators


@pytest.mark.parametrize("task", ["inpaint", "gauss_deblur", "sr4"])
def test_svd_factors_reproduce_the_task_forward_and_are_orthonormal(task):
    operator = operators.get(task, 64)
    svd = operators.svd(operator)
    params = jax.tree_util.tree_map(lambda p: p[0], operator.init_params(jax.random.PRNGKey(0), 1, 64))
    x = jax.random.uniform(jax.random.PRNGKey(1), (64, 64, 3), minval=-1.0, maxval=1.0)
    y = operator.forward(x, params)
    s = svd.singulars(params, x.shape)
    assert svd(x, params) is not None and hash(svd) == hash(operators.svd(operator))  # static under jit
    np.testing.assert_allclose(svd.u(s * svd.vt(x, params), params), y, atol=1e-5)  # U S V^T x = A x
    np.testing.assert_allclose(svd.ut(y, params, x.shape), s * svd.vt(x, params), atol=1e-5)  # U^T A x = S V^T x
    np.testing.assert_allclose(svd.v(svd.vt(x, params), params), x, atol=1e-5)  # V V^T = I
    np.testing.assert_allclose(jnp.linalg.norm(svd.vt(x, params)), jnp.linalg.norm(x), rtol=1e-5)  # V^T isometric
    measured = jnp.broadcast_to(s, x.shape) > 0
    c = jnp.where(measured, jax.random.normal(jax.random.PRNGKey(2), x.shape), 0.0)
    np.testing.assert_allclose(svd.ut(svd.u(c, params), params, x.shape), c, atol=1e-5)  # U^T U = I
    assert float(s.min()) >= 0.0


def test_svd_is_refused_for_motion_deblur_and_non_linear_tasks():
    with pytest.raises(ValueError, match="motion_deblur.*DDRM"):
        operators.svd(operators.get("motion_deblur", 64))
    with pytest.raises(ValueError, match="no SVD.*phase_retrieval"):
        operators.svd(operators.get("phase_retrieval", 64))


def test_ddrm_refuses_a_forward_without_svd():
    matrices, _, y, x_init = random_problem(1)
    with pytest.raises(ValueError, match="DDRM needs the SVD"):
        run(gaussian_denoiser, matrix_forward, y, x_init, DDRMConfig(steps=3), matrices,
             keys=jax.random.split(jax.random.PRNGKey(0), 1))


# ---------------------------------------------------------------- configs and registry


@pytest.mark.parametrize("make, error, match", [
    (lambda: DDRMConfig(eta=1.5), ValueError, "eta"),
    (lambda: DDRMConfig(sigma_y=-0.1), ValueError, "sigma_y"),
    (lambda: DDRMConfig(steps=0), ValueError, "steps"),
    (lambda: DiffPIRConfig(lam=0.0, zeta=0.3), ValueError, "lam"),
    (lambda: DiffPIRConfig(lam=1.0, zeta=1.2), ValueError, "zeta"),
    (lambda: DiffPIRConfig(lam="1", zeta=0.3), TypeError, "lam"),
    (lambda: PnPADMMConfig(penalty=0.0), ValueError, "penalty"),
    (lambda: PnPADMMConfig(iterations=0), ValueError, "iterations"),
])
def test_config_validation(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_registration_and_schedules():
    assert SAMPLERS["ddrm"].linear_only and SAMPLERS["diffpir"].linear_only and SAMPLERS["pnp_admm"].linear_only
    assert SAMPLERS["diffpir"].step_size == "lam" and SAMPLERS["pnp_admm"].step_size == "penalty"
    alpha_bar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    sigma = lambda k: np.sqrt(1 / alpha_bar[k] - 1)
    np.testing.assert_allclose(ddrm_sigmas(20)[[0, 1, -2, -1]], [sigma(950), sigma(900), sigma(0), 0.0])
    assert len(ddrm_sigmas(3)) == 4 and len(diffpir_sigmas(7)) == 8  # T levels and the final 0, for any T
    np.testing.assert_allclose(diffpir_sigmas(20)[[0, 1, -2, -1]], [sigma(999), sigma(999 - 229), sigma(0), 0.0])
    assert DDRMConfig().sigma_max == pytest.approx(sigma(950)) and DiffPIRConfig(lam=1, zeta=1).sigma_max > 157


# ---------------------------------------------------------------- one step against NumPy float64


def test_one_ddrm_step_matches_the_papers_case_rule():
    matrices, _, y, _ = random_problem(1, m=12)
    params = jax.tree_util.tree_map(lambda p: p[0], svd_params(matrices))
    config = DDRMConfig(eta=0.85, eta_b=0.7, sigma_y=0.3, singular_floor=0.0)
    sigma, sigma_next = 2.0, 0.5  # s_i * 0.5 lies on both sides of sigma_y = 0.3: all three cases occur
    x = np.random.default_rng(3).standard_normal(SHAPE) * 2
    key = jax.random.PRNGKey(5)
    info = Step(jnp.int32(0), jnp.float32(sigma), jnp.float32(sigma_next), jnp.float32(0.0), None)
    x_next, _, _ = jax.jit(ddrm_step(gaussian_denoiser, MATRIX_SVD, config))(
        jnp.asarray(x, jnp.float32), info, key, (y[0], params))
    noise = np.asarray(jax.random.normal(key, SHAPE), np.float64).ravel()
    u, s, vt = np.linalg.svd(np.asarray(matrices[0], np.float64), full_matrices=True)
    s = np.append(s, np.zeros(vt.shape[0] - len(s)))
    uty = np.append(u.T @ np.asarray(y[0], np.float64), np.zeros(vt.shape[0] - len(u)))
    x0 = x.ravel() * PRIOR_VAR / (PRIOR_VAR + sigma**2)
    c, e = vt @ x0, vt @ (x.ravel() - x0) / sigma
    expected = np.empty_like(c)
    for i in range(len(c)):
        if s[i] == 0:
            expected[i] = c[i] + np.sqrt(1 - 0.85**2) * sigma_next * e[i] + 0.85 * sigma_next * noise[i]
        elif s[i] * sigma_next < 0.3:
            ybar = uty[i] / s[i]
            expected[i] = (c[i] + np.sqrt(1 - 0.85**2) * sigma_next * (ybar - c[i]) / (0.3 / s[i])
                           + 0.85 * sigma_next * noise[i])
        else:
            expected[i] = (0.3 * c[i] + 0.7 * uty[i] / s[i]
                           + np.sqrt(sigma_next**2 - 0.3**2 * 0.7**2 / s[i] ** 2) * noise[i])
    assert (s[:12] * sigma_next < 0.3).any() and (s[:12] * sigma_next >= 0.3).any()
    np.testing.assert_allclose(np.asarray(x_next).ravel(), vt.T @ expected, rtol=1e-4, atol=1e-5)


def test_one_diffpir_step_matches_algorithm_1():
    matrices, _, y, _ = random_problem(1, m=12)
    sigma, sigma_next, rho, zeta = 2.0, 1.0, 0.05, 0.3
    x = np.random.default_rng(4).standard_normal(SHAPE) * 2
    key = jax.random.PRNGKey(6)
    info = Step(jnp.int32(0), jnp.float32(sigma), jnp.float32(sigma_next), jnp.float32(0.0), jnp.float32(rho))
    x_next, x0_out, _ = jax.jit(diffpir_step(gaussian_denoiser, matrix_forward, DiffPIRConfig(lam=1.0, zeta=zeta, cg_iterations=60)))(
        jnp.asarray(x, jnp.float32), info, key, (y[0], matrices[0]))
    matrix, y64 = np.asarray(matrices[0], np.float64), np.asarray(y[0], np.float64)
    denoised = x.ravel() * PRIOR_VAR / (PRIOR_VAR + sigma**2)
    x0 = np.linalg.solve(matrix.T @ matrix + rho * np.eye(matrix.shape[1]), matrix.T @ y64 + rho * denoised)
    noise = np.asarray(jax.random.normal(key, SHAPE), np.float64).ravel()
    expected = x0 + sigma_next * (np.sqrt(1 - zeta) * (x.ravel() - x0) / sigma + np.sqrt(zeta) * noise)
    np.testing.assert_allclose(np.asarray(x0_out).ravel(), x0, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(x_next).ravel(), expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- the Gaussian toy: known answers


def test_ddrm_reproduces_noiseless_measurements_exactly():
    matrices, x0, _, _ = random_problem(2, m=12)
    y = apply(matrices, x0)
    result = sample(gaussian_denoiser, MATRIX_SVD, y, jax.random.PRNGKey(0), DDRMConfig(sigma_y=0.0),
                    svd_params(matrices), x_shape=SHAPE)
    np.testing.assert_allclose(apply(matrices, result.x), y, atol=2e-5)
    assert result.losses.shape == (2, 20) and not result.diverged.any()


@pytest.mark.parametrize("method", ["ddrm", "diffpir"])
def test_samplers_average_to_the_exact_posterior_mean(method):
    """The mean of K = 128 samples of one toy problem lies within 4.5 posterior standard errors of the exact
    posterior mean in every coordinate (both methods are unbiased here; their spread is narrower than the
    posterior's, so the bound is loose on purpose), and the samples fit y (the residual falls from ||y||^2)."""
    k = 128
    matrices, _, y, _ = random_problem(1, m=12)
    mean, std = posterior(matrices[0], y[0], 0.01)
    many_matrices, many_y = jnp.repeat(matrices, k, 0), jnp.repeat(y, k, 0)
    if method == "ddrm":
        forward, config, params = MATRIX_SVD, DDRMConfig(), svd_params(many_matrices)
    else:
        forward, config, params = matrix_forward, DiffPIRConfig(lam=1.0, zeta=1.0), many_matrices
    result = sample(gaussian_denoiser, forward, many_y, jax.random.PRNGKey(1), config, params, x_shape=SHAPE)
    samples = np.asarray(result.x, np.float64).reshape(k, -1)
    assert np.abs(samples.mean(0) - mean).max() < 4.5 * std.max() / np.sqrt(k)
    residual = np.linalg.norm(apply(many_matrices, result.x) - many_y, axis=1) ** 2
    assert np.median(residual) < 0.03 * np.linalg.norm(y) ** 2  # from ||y||^2 at x = 0 (the noise: 1.2e-3)
    if method == "diffpir":  # losses: ||A x0 - y||^2 per step, the last one of the returned x0
        np.testing.assert_allclose(result.losses[:, -1], residual, rtol=1e-3, atol=1e-7)


def test_pnp_admm_converges_to_the_posterior_mean_with_the_map_rho():
    """For the Gaussian prior D(.; sigma_d) is the proximal map of the prior, so with rho = (sigma_y/sigma_d)^2
    ADMM solves the MAP problem, whose solution is the exact posterior mean; 10 iterations suffice here."""
    matrices, _, y, _ = random_problem(2, m=12)
    sigma_d = 0.5
    config = PnPADMMConfig(penalty=(0.01 / sigma_d) ** 2, sigma_d=sigma_d)
    result = sample(gaussian_denoiser, matrix_forward, y, jax.random.PRNGKey(0), config, matrices, x_shape=SHAPE)
    for b in range(2):
        mean, _ = posterior(matrices[b], y[b], 0.01)
        # 10 iterations leave 1.3e-4; rho off by 2x in either direction lands 6.9e-4 or more away
        np.testing.assert_allclose(np.asarray(result.x[b]).ravel(), mean, atol=2.5e-4)
    assert result.losses.shape == (2, 10) and (result.losses[:, -1] <= result.losses[:, 0] + 1e-6).all()


# ---------------------------------------------------------------- loop contracts


SMALL = {  # name: (config, uses the SVD forward)
    "ddrm": (DDRMConfig(steps=4), True),
    "diffpir": (DiffPIRConfig(lam=2.0, zeta=0.5, steps=4, cg_iterations=12), False),
    "pnp_admm": (PnPADMMConfig(iterations=4, cg_iterations=12), False),
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_dispatch_jit_batch_independence_and_exact_nfe(name):
    """sample() (jitted; counting exactly 4 evaluations per image) == the run function called without jit;
    image 1 of a batch is unchanged when the other images' problems and keys change."""
    config, uses_svd = SMALL[name]
    forward = MATRIX_SVD if uses_svd else matrix_forward
    as_params = svd_params if uses_svd else (lambda m: m)
    matrices, _, y, _ = random_problem(3, m=12)
    keys = image_keys(jax.random.PRNGKey(3), 3)
    record = []
    denoiser = counting(gaussian_denoiser, record)
    batch = sample(denoiser, forward, y, keys, config, as_params(matrices), x_shape=SHAPE).x
    jax.effects_barrier()
    assert len(record) == 4 * 3
    x_init = initial_noise(keys, 3, SHAPE, config.sigma_max)
    direct = run(gaussian_denoiser, forward, y, x_init, config, as_params(matrices), keys=step_keys(keys)).x
    np.testing.assert_allclose(direct, batch, rtol=1e-5, atol=1e-5)
    other_matrices, _, other_y, _ = random_problem(3, m=12, seed=9)
    mix = lambda a, b: jnp.concatenate([b[:1], a[1:2], b[2:]])
    other_keys = mix(keys, image_keys(jax.random.PRNGKey(11), 3))
    mixed = sample(denoiser, forward, mix(y, other_y), other_keys, config, as_params(mix(matrices, other_matrices)),
                   x_shape=SHAPE).x
    np.testing.assert_allclose(mixed[1], batch[1], rtol=1e-6, atol=1e-6)
    assert not np.allclose(mixed[0], batch[0])


@pytest.mark.parametrize("config", [DiffPIRConfig(lam=1.0, zeta=0.5, steps=3), PnPADMMConfig(iterations=3)])
def test_non_linear_operator_is_refused(config):
    matrices, _, y, _ = random_problem(1, m=12)
    squared = lambda x, matrix: (matrix @ x.reshape(-1)) ** 2
    with pytest.raises(ValueError, match="linear"):
        sample(gaussian_denoiser, squared, y, jax.random.PRNGKey(0), config, matrices, x_shape=SHAPE)


@pytest.mark.parametrize("task", ["inpaint", "gauss_deblur"])  # sr4: covered by the factor test
def test_ddrm_on_task_operators_fits_noiseless_measurements(task):
    """sample() with operators.svd(task operator): at sigma_y = 0 every measured spectral component (singular
    value >= the floor) of A x equals that of y; for inpaint (no value below the floor) A x = y."""
    operator = operators.get(task, 16)
    forward = operators.svd(operator)
    params = operator.init_params(jax.random.PRNGKey(0), 2, 16)
    x_true = 0.5 * jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
    y = operator.measure(jax.random.PRNGKey(2), x_true, params, sigma_y=0.0)
    config = DDRMConfig(steps=4, sigma_y=0.0)
    x = sample(gaussian_denoiser, forward, y, jax.random.PRNGKey(3), config, params, x_shape=(16, 16, 3)).x
    for b in range(2):
        one = jax.tree_util.tree_map(lambda p: p[b], params)
        s = jnp.broadcast_to(forward.singulars(one, x.shape[1:]), x.shape[1:])
        kept = s >= config.singular_floor
        np.testing.assert_allclose(jnp.where(kept, s * forward.vt(x[b], one), 0.0),
                                   jnp.where(kept, forward.ut(y[b], one, x.shape[1:]), 0.0), atol=2e-5)
        if task != "gauss_deblur":
            np.testing.assert_allclose(forward(x[b], one), y[b], atol=2e-5)
