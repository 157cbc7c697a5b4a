"""The baselines against their official code: one step of every method against a float64 NumPy
transcription of the official update (issue 25), the DDPM timesteps the network sees, and the conjugate-
gradient solver at any iteration count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from official_toys import (ABAR, CHANNEL_MIX, LEVELS, denoise_numpy, normal, official_p_sample, official_x0, our_step,
                           toy_denoiser, ve)
from sampler_toys import SHAPE, matrix_forward, random_problem
from spgd_jax import operators
from spgd_jax.denoisers import ddpm_timestep, sigma_to_timestep
from spgd_jax.io.images import load_demo
from spgd_jax.samplers import DiffPIRConfig, DPSConfig, MCGConfig, PnPADMMConfig, RedDiffConfig, ScoreSDEConfig, sample
from spgd_jax.samplers.diffpir import get_step_fn as diffpir_step
from spgd_jax.samplers.dps import get_step_fn as dps_step
from spgd_jax.samplers.mcg import get_step_fn as mcg_step
from spgd_jax.samplers.red_diff import adam
from spgd_jax.samplers.red_diff import get_step_fn as red_diff_step
from spgd_jax.samplers.score_sde import get_step_fn as score_sde_step


def test_conjugate_gradients_stop_at_convergence_and_stay_finite_at_500_iterations():
    """Float32 CG run past convergence used to lose conjugacy and diverge (Gaussian deblurring at 64 px,
    rho 2.7e-2: off by 1.5e3 at 300 iterations, NaN at 500); stopped at convergence it keeps its answer."""
    op = operators.get("gauss_deblur", 64)
    x = jnp.asarray(load_demo(64))
    params = jax.tree_util.tree_map(lambda a: a[0], op.init_params(jax.random.PRNGKey(0), 1, 64))
    y = op.forward(x, params) + 0.01 * jax.random.normal(jax.random.PRNGKey(1), x.shape)
    solve = jax.jit(lambda n: operators.proximal(op.forward, params, y, jnp.zeros_like(x), 2.7e-2, n),
                    static_argnums=0)
    converged, long = solve(100), solve(500)
    assert bool(jnp.all(jnp.isfinite(long)))
    np.testing.assert_allclose(np.asarray(long), np.asarray(converged), atol=1e-5)
    transpose = operators.adjoint(op.forward, params, x.shape)
    b = transpose(y)
    residual = transpose(op.forward(long, params)) + 2.7e-2 * long - b
    assert float(jnp.linalg.norm(residual) / jnp.linalg.norm(b)) < 1e-5


# ---------------------------------------------------------------- the trained DDPM timesteps

def test_ddpm_timestep_gives_the_trained_integers_and_interpolates_between_them():
    k = np.asarray(ddpm_timestep(jnp.asarray(LEVELS, jnp.float32)))
    np.testing.assert_array_equal(k, np.arange(1000))  # exactly, for every level in float32
    between = np.sqrt(LEVELS[:-1] * LEVELS[1:])  # the geometric midpoints
    np.testing.assert_allclose(np.asarray(ddpm_timestep(jnp.asarray(between, jnp.float32))), np.arange(999) + 0.5,
                               atol=2e-3)
    np.testing.assert_array_equal(np.asarray(ddpm_timestep(jnp.asarray([0.0, 0.005, 200.0]))), [0, 0, 999])
    continuous = np.asarray(sigma_to_timestep(jnp.asarray(LEVELS[[0, 999]], jnp.float32)))
    assert continuous[0] > 0.9 and continuous[1] > 1002  # what the continuous map gave (issue 25.2)


def problem(k, seed=0):
    """A VP state at timestep k (float64, x_vp ~ N(0, I), so x0 leaves [-1, 1]), a matrix A (12, 32) and y."""
    matrices, _, y, _ = random_problem(1, m=12, seed=seed)
    x_vp = np.random.default_rng(seed + 10).standard_normal(SHAPE)
    return x_vp, np.asarray(matrices[0], np.float64), np.asarray(y[0], np.float64), (y[0], matrices[0])


def project_numpy(A, x, target):
    """The point of {A x = target} closest to x (float64)."""
    return x + A.T @ np.linalg.solve(A @ A.T, target - A @ x)


@pytest.mark.parametrize("k, k_next", [(600, 400), (30, 10)])
def test_one_dps_mcg_and_score_sde_step_match_the_releases(k, k_next):
    """DPS (conditioning_method 'ps'), MCG and Score-SDE ('projection') as the DPS/MCG releases step: p_sample in
    VP coordinates at the integer timestep, the gradient of ||y - A x0|| in x_vp with step size zeta, and the
    projection onto A x_vp = sqrt(abar') y + sqrt(1 - abar') A n (Eq. 14). Shared noise: the steps' keys."""
    denoiser, network = toy_denoiser()  # each step function gives it the trained timesteps itself
    x_vp, A, y, image = problem(k)
    x0, jac = official_x0(network, x_vp.ravel(), k)
    residual = y - A @ x0
    grad = -(jac.T @ A.T @ residual) / np.linalg.norm(residual)
    factor = np.sqrt((1 + LEVELS[k] ** 2) * (1 + LEVELS[k_next] ** 2))
    zeta, key = 0.7, jax.random.key(7)
    scale_next = np.sqrt(ABAR[k_next])
    state = jnp.asarray(ve(x_vp, k), jnp.float32)

    got, got_x0, got_norm = our_step(dps_step(denoiser, matrix_forward, DPSConfig(zeta=zeta, schedule="ddpm")), state, k, k_next,
                                     jnp.float32(zeta * factor), key, image)
    expected = official_p_sample(x0, x_vp.ravel(), k, k_next, normal(key).ravel()) - zeta * grad
    np.testing.assert_allclose(np.asarray(got).ravel() * scale_next, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(got_x0).ravel(), x0, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(float(got_norm), np.linalg.norm(residual), rtol=1e-4)

    k_ancestral, k_measure = jax.random.split(key)
    z, n = normal(k_ancestral).ravel(), normal(k_measure).ravel()
    target = scale_next * y + np.sqrt(1 - ABAR[k_next]) * A @ n
    unguided = official_p_sample(x0, x_vp.ravel(), k, k_next, z)
    got, _, _ = our_step(mcg_step(denoiser, matrix_forward, MCGConfig(cg_iterations=60)), state, k, k_next,
                         jnp.float32(zeta * factor), key, image)
    np.testing.assert_allclose(np.asarray(got).ravel() * scale_next, project_numpy(A, unguided - zeta * grad, target),
                               rtol=1e-4, atol=2e-4)
    got, _, _ = our_step(score_sde_step(denoiser, matrix_forward, ScoreSDEConfig(cg_iterations=60)), state, k, k_next, None, key, image)
    np.testing.assert_allclose(np.asarray(got).ravel() * scale_next, project_numpy(A, unguided, target),
                               rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("k, k_next", [(600, 400), (30, 10)])
def test_one_diffpir_step_matches_the_release(k, k_next):
    """main_ddpir_*.py with model_out_type 'pred_xstart' (clip_denoised: x0 clamped to [-1, 1]), the data step
    argmin ||A x - y||^2 + rho_t ||x - x0||^2 with rho_t = lambda sigma^2 / sigma_t^2 (sigma = max(0.001,
    noise_level_img), the std in [0, 1] units: our sigma_y / 2), eps from the data step's x0, and eta = 0:
    x' = sqrt(abar') x0 + sqrt(1 - zeta) sqrt(1 - abar') eps + sqrt(zeta) sqrt(1 - abar') n."""
    denoiser, network = toy_denoiser()
    x_vp, A, y, image = problem(k, seed=1)
    lam, zeta, sigma_y, key = 6.0, 0.3, 0.1, jax.random.key(3)
    x0 = np.clip(official_x0(network, x_vp.ravel(), k)[0], -1, 1)
    assert (np.abs(official_x0(network, x_vp.ravel(), k)[0]) > 1).any()  # the clamp acts
    rho = lam * (sigma_y / 2) ** 2 / LEVELS[k] ** 2
    x0 = np.linalg.solve(A.T @ A + rho * np.eye(A.shape[1]), A.T @ y + rho * x0)
    eps = (x_vp.ravel() - np.sqrt(ABAR[k]) * x0) / np.sqrt(1 - ABAR[k])
    noise_next = np.sqrt(1 - ABAR[k_next])
    expected = np.sqrt(ABAR[k_next]) * x0 + noise_next * (np.sqrt(1 - zeta) * eps + np.sqrt(zeta) * normal(key).ravel())
    step = diffpir_step(denoiser, matrix_forward, DiffPIRConfig(lam=lam, zeta=zeta, sigma_y=sigma_y, cg_iterations=200))
    got, got_x0, _ = our_step(step, jnp.asarray(ve(x_vp, k), jnp.float32), k, k_next, jnp.float32(rho), key, image)
    np.testing.assert_allclose(np.asarray(got_x0).ravel(), x0, rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(np.asarray(got).ravel() * np.sqrt(ABAR[k_next]), expected, rtol=1e-4, atol=2e-4)


def test_one_red_diff_step_on_inpainting_averages_the_data_term_over_the_kept_pixels():
    """reddiff.py with H = inpainting (H.H returns the kept entries only): loss = mean_kept((y - H mu)^2) / 2 +
    lam sqrt(1 - abar)/sqrt(abar) mean(sg(eps_net(x_t, k) - eps) * mu), x_t = sqrt(abar) mu + sqrt(1 - abar) eps,
    then Adam(betas (0.9, 0.99), eps 1e-8). Ours: y full-size with zeros at the removed pixels."""
    denoiser, network = toy_denoiser()
    k, lr, lam = 40, 0.05, 0.25
    rng = np.random.default_rng(2)
    mask = (rng.random(SHAPE[:2] + (1,)) < 0.3).astype(np.float64)
    x_true = 0.5 * rng.standard_normal(SHAPE)
    y_full = mask * (x_true + 0.01 * rng.standard_normal(SHAPE))
    kept = np.broadcast_to(mask, SHAPE).astype(bool)
    mu = 0.5 * rng.standard_normal(SHAPE)
    key = jax.random.key(4)
    eps = normal(key)
    x_t = np.sqrt(ABAR[k]) * mu + np.sqrt(1 - ABAR[k]) * eps
    eps_net, _ = network.numpy(CHANNEL_MIX, x_t, k)
    weight = lam * np.sqrt(1 - ABAR[k]) / np.sqrt(ABAR[k])
    grad = weight * (eps_net - eps) / mu.size
    grad[kept] -= (y_full[kept] - mu[kept]) / kept.sum()  # d/dmu of mean over the kept entries / 2
    m, v = 0.1 * grad, 0.01 * grad**2  # Adam's first step
    expected = mu - lr * (m / 0.1) / (np.sqrt(v / 0.01) + 1e-8)

    forward = lambda x, params: x * params
    state = (jnp.asarray(mu, jnp.float32), adam(lr).init(jnp.asarray(mu, jnp.float32)))
    step = red_diff_step(denoiser, forward, RedDiffConfig(lr=lr, lam=lam))
    image = (jnp.asarray(y_full, jnp.float32), jnp.asarray(mask, jnp.float32))
    (got, _), _, data = our_step(step, state, k, k - 1, jnp.float32(lam * LEVELS[k]), key, image)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(data), np.mean((y_full[kept] - mu[kept]) ** 2) / 2, rtol=1e-5)


def test_pnp_admm_matches_the_reference_iterations():
    """PlugPlayADMM_general.m: v = x = 0.5 in [0, 1] (0 here), u = 0; x = argmin ||A x - y||^2 + rho ||x - (v - u)||^2;
    v = denoise(proj(x + u), sigma); u = u + x - v; returns v. Three iterations, float64."""
    denoiser, network = toy_denoiser()
    _, A, y, _ = problem(0, seed=3)
    matrices = jnp.asarray(A[None], jnp.float32)
    y = 3.0 * y  # large enough that x + u leaves [-1, 1]: the clip acts
    rho, sigma_d, clipped = 0.05, 0.2, False
    x = v = u = np.zeros(A.shape[1])
    for _ in range(3):
        x = np.linalg.solve(A.T @ A + rho * np.eye(A.shape[1]), A.T @ y + rho * (v - u))
        clipped |= bool((np.abs(x + u) > 1).any())
        v = denoise_numpy(network, np.clip(x + u, -1, 1), sigma_d)
        u = u + x - v
    assert clipped
    config = PnPADMMConfig(penalty=rho, sigma_d=sigma_d, iterations=3, cg_iterations=200)
    result = sample(denoiser, matrix_forward, jnp.asarray(y[None], jnp.float32), jax.random.key(0), config,
                    matrices, x_shape=SHAPE)
    np.testing.assert_allclose(np.asarray(result.x[0]).ravel(), v, rtol=1e-4, atol=2e-4)


def test_projection_stays_finite_where_y_leaves_the_range_of_a():
    """Our inpainting y carries noise on the removed pixels too, outside A's range (A A^T is 0 there): CG in the
    measurement space diverged from its second iteration (NaN at 5; Score-SDE and MCG inpainting gave noise,
    RED-Diff NaN). The projection keeps the kept pixels at y and x elsewhere, at any iteration count."""
    op = operators.get("inpaint", 64)
    x = jnp.asarray(load_demo(64))[None]
    params = op.init_params(jax.random.key(1), 1, 64)
    y = op.measure(jax.random.key(2), x, params)[0]
    mask = params["mask"][0]
    assert float(jnp.abs(y * (1 - mask)).max()) > 0.01  # noise outside the range
    start = 0.3 * jax.random.normal(jax.random.key(3), x.shape[1:])
    for iterations in (1, 5, 500):
        projected = operators.project(op.forward, {"mask": mask}, y, start, iterations)
        np.testing.assert_allclose(np.asarray(projected), np.asarray(mask * y + (1 - mask) * start), atol=1e-6)
