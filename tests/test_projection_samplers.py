"""MCG, Score-SDE, DPPS and DPS with schedule="ddpm" (the samplers on guided-diffusion's ancestral DDPM steps)
on the Gaussian toy prior with per-image matrix operators."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sampler_toys import PRIOR_VAR, SHAPE, counting, gaussian_denoiser, matrix_forward, random_problem
from spgd_jax import operators
from spgd_jax import samplers
from spgd_jax.samplers import SAMPLERS, DPPSConfig, DPSConfig, MCGConfig, ScoreSDEConfig, Step, sample, step_keys
from spgd_jax.samplers.dpps import candidate_counts, lift_measurement
from spgd_jax.samplers.mcg import get_step_fn as mcg_step_fn
from spgd_jax.samplers.dpps import get_step_fn as dpps_step_fn
from spgd_jax.samplers.schedule import ancestral_step, ddpm_sigmas

CONFIGS = {
    "mcg": MCGConfig(alpha=1.0, steps=5),
    "score_sde": ScoreSDEConfig(steps=5),
    "dpps": DPPSConfig(zeta=1.0, steps=5, candidates=4, aligned_init=False),
    "dps": DPSConfig(zeta=0.5, schedule="ddpm", steps=5),
}


def exact_problem(batch, seed=0):
    """random_problem with y = M vec(x0) exactly (sigma_y = 0), and per-image loop keys."""
    matrices, x0, _, x_init = random_problem(batch, seed=seed)
    y = jnp.einsum("bmn,bn->bm", matrices, x0.reshape(batch, -1))
    keys = step_keys(jax.random.split(jax.random.key(seed), batch))
    return matrices, y, x_init * 1.574, keys  # x_init ~ N(0, 157.4^2 I), the DDPM schedule's start


def run(name, denoiser, y, matrices, x_init, keys, config=None):
    config = CONFIGS[name] if config is None else config
    return samplers.run(denoiser, matrix_forward, y, x_init, config, matrices, keys=keys)


def ddpm_posterior_numpy(x, x0_hat, sigma, sigma_next, z):
    """guided-diffusion's p_sample in VP coordinates (float64), mapped back to ours: x_vp = x sqrt(abar)."""
    abar, abar_prev = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
    beta = 1 - abar / abar_prev
    coef1 = beta * np.sqrt(abar_prev) / (1 - abar)
    coef2 = (1 - abar_prev) * np.sqrt(1 - beta) / (1 - abar)
    variance = beta * (1 - abar_prev) / (1 - abar)
    x_vp = coef1 * x0_hat + coef2 * x * np.sqrt(abar) + np.sqrt(variance) * z
    return x_vp / np.sqrt(abar_prev)


def test_ancestral_step_is_the_ddpm_posterior_sample():
    sigmas = ddpm_sigmas(10)
    rng = np.random.default_rng(1)
    x, x0_hat = 3 * rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
    key = jax.random.key(3)
    z = np.asarray(jax.random.normal(key, SHAPE, jnp.float32), np.float64)
    for i in (0, 4, 8):
        got = ancestral_step(jnp.asarray(x, jnp.float32), jnp.asarray(x0_hat, jnp.float32), jnp.float32(sigmas[i]),
                             jnp.float32(sigmas[i + 1]), key)
        np.testing.assert_allclose(got, ddpm_posterior_numpy(x, x0_hat, sigmas[i], sigmas[i + 1], z), rtol=1e-4,
                                   atol=1e-5)


def test_one_mcg_step_matches_numpy():
    matrices, y, _, _ = exact_problem(1)
    M, y64 = np.asarray(matrices[0], np.float64), np.asarray(y[0], np.float64)
    x = 2 * np.random.default_rng(0).standard_normal(SHAPE)
    sigma, sigma_next, alpha = 2.0, 1.5, 0.7
    factor = np.sqrt((1 + sigma**2) * (1 + sigma_next**2))
    key = jax.random.key(5)
    info = Step(jnp.int32(0), jnp.float32(sigma), jnp.float32(sigma_next), jnp.float32(0), jnp.float32(alpha * factor))
    got, _, norm = jax.jit(mcg_step_fn(gaussian_denoiser, matrix_forward, MCGConfig()))(jnp.asarray(x, jnp.float32), info, key,
                                                                              (y[0], matrices[0]))
    k_ancestral, k_measure = jax.random.split(key)
    z = np.asarray(jax.random.normal(k_ancestral, SHAPE), np.float64)
    n = np.asarray(jax.random.normal(k_measure, SHAPE), np.float64).ravel()
    c = PRIOR_VAR / (PRIOR_VAR + sigma**2)
    residual = M @ (c * x.ravel()) - y64
    grad = (c * M.T @ residual / np.linalg.norm(residual)).reshape(SHAPE)
    x_next = (ddpm_posterior_numpy(x, c * x, sigma, sigma_next, z) - alpha * factor * grad).ravel()
    target = y64 + sigma_next * M @ n
    expected = x_next + M.T @ np.linalg.solve(M @ M.T, target - M @ x_next)
    np.testing.assert_allclose(got.ravel(), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(norm, np.linalg.norm(residual), rtol=1e-5)


def test_one_dpps_step_keeps_the_best_of_its_first_m_candidates():
    matrices, y, _, _ = exact_problem(1)
    M, y64 = np.asarray(matrices[0], np.float64), np.asarray(y[0], np.float64)
    x = 2 * np.random.default_rng(0).standard_normal(SHAPE)
    sigma, sigma_next, step_size, count, candidates = 2.0, 1.5, 0.3, 5, 8
    key = jax.random.key(7)
    info = Step(jnp.int32(0), jnp.float32(sigma), jnp.float32(sigma_next), jnp.float32(0),
                (jnp.float32(step_size), jnp.int32(count)))
    got, _, _ = jax.jit(dpps_step_fn(gaussian_denoiser, matrix_forward, DPPSConfig(zeta=1.0, candidates=candidates)))(
        jnp.asarray(x, jnp.float32), info, key, (y[0], matrices[0]))
    noises = np.asarray(jax.random.normal(key, (candidates,) + SHAPE), np.float64)
    c = PRIOR_VAR / (PRIOR_VAR + sigma**2)
    residual = M @ (c * x.ravel()) - y64
    grad = (c * M.T @ residual / np.linalg.norm(residual)).reshape(SHAPE)
    mean = ddpm_posterior_numpy(x, c * x, sigma, sigma_next, 0.0) - step_size * grad
    spread = sigma_next * np.sqrt(1 - sigma_next**2 / sigma**2)
    eps, s = (x - c * x) / sigma, 1 / np.sqrt(1 + sigma_next**2)
    distances = [np.linalg.norm(s * y64 - M @ (s * (mean + spread * z - sigma_next * eps)).ravel()) for z in noises]
    best = int(np.argmin(distances[:count]))
    assert np.argmin(distances) != best or count == candidates  # the count matters for this draw
    np.testing.assert_allclose(got, mean + spread * noises[best], rtol=1e-4, atol=1e-5)


def test_dpps_candidate_counts_follow_the_signal_to_noise_ratio():
    counts = candidate_counts(ddpm_sigmas(1000), 50)
    assert counts[0] == 2 and counts[-1] == 50 and np.all(np.diff(counts) >= 0)
    sigma = ddpm_sigmas(1000)[600]
    assert counts[600] == int(np.floor(max(50 * (1 - np.exp(-1 / sigma**2)), 2)))


def test_projection_replaces_the_kept_pixels_for_inpainting():
    mask = (np.random.default_rng(0).random((2,) + SHAPE[:2] + (1,)) < 0.3).astype(np.float32)
    forward = lambda x, m: x * m  # noqa: E731
    x0 = 0.5 * jax.random.normal(jax.random.key(0), (2,) + SHAPE)
    y = x0 * mask
    keys = step_keys(jax.random.split(jax.random.key(1), 2))
    x_init = 157.4 * jax.random.normal(jax.random.key(2), (2,) + SHAPE)
    result = jax.jit(lambda x: samplers.run(gaussian_denoiser, forward, y, x, MCGConfig(steps=3), mask,
                                                   keys=keys))(x_init)
    np.testing.assert_allclose(result.x * mask, y, atol=1e-5)


@pytest.mark.parametrize("name", ["dps", "dpps"])
def test_guidance_reduces_the_residual_of_the_unconditional_ancestral_sampler(name):
    matrices, y, x_init, keys = exact_problem(8, seed=2)
    config = dataclasses.replace(CONFIGS[name], steps=20)  # zeta 0.5 below
    step_size = SAMPLERS[name].step_size

    def residuals(size):
        out = samplers.run(gaussian_denoiser, matrix_forward, y, x_init,
                           dataclasses.replace(config, **{step_size: size}), matrices, keys=keys).x
        return jnp.linalg.norm(jnp.einsum("bmn,bn->bm", matrices, out.reshape(8, -1)) - y, axis=1)

    unconditional, guided = (float(jnp.mean(r)) for r in jax.jit(jax.vmap(residuals))(jnp.asarray([0.0, 0.5])))
    assert guided < 0.5 * unconditional, (guided, unconditional)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sample_dispatch_batch_independence_jit_and_nfe(name):
    """sample() (jitted) on a batch of 2 == the run function without jit on image 1 alone, from the x_init and
    loop keys sample() derives from the image's own key; exactly `steps` evaluations per image; the projection
    methods fit the noiseless y exactly."""
    matrices, y, _, _ = exact_problem(2)
    keys = jax.random.split(jax.random.key(4), 2)
    config = dataclasses.replace(CONFIGS[name], trajectory_every=2)
    assert config.sigma_max == pytest.approx(ddpm_sigmas(5)[0]) and 157 < config.sigma_max < 158
    record = []
    result = sample(counting(gaussian_denoiser, record), matrix_forward, y, keys, config, matrices, x_shape=SHAPE)
    jax.effects_barrier()
    assert len(record) == 5 * 2  # steps x images
    assert result.trajectory.shape == (2, 3) + SHAPE and not result.diverged.any()
    assert (result.losses is None) == (name == "score_sde")
    if result.losses is not None:
        assert result.losses.shape == (2, 5)
    x_init = config.sigma_max * jax.random.normal(keys[1], (1,) + SHAPE)
    alone = run(name, gaussian_denoiser, y[1:2], matrices[1:2], x_init, step_keys(keys)[1:2])
    np.testing.assert_allclose(alone.x[0], result.x[1], rtol=1e-4, atol=1e-4)
    if name in ("mcg", "score_sde"):
        residual = jnp.einsum("bmn,bn->bm", matrices, result.x.reshape(2, -1)) - y
        assert float(jnp.max(jnp.abs(residual))) < 1e-4


@pytest.mark.parametrize("name", ["mcg", "score_sde"])
def test_a_nonlinear_operator_is_refused(name):
    op = operators.get("hdr", 4)
    assert SAMPLERS[name].linear_only
    y = jnp.zeros((1, 4, 4, 3))
    with pytest.raises(ValueError, match="linear"):
        sample(gaussian_denoiser, op.forward, y, jax.random.key(0), CONFIGS[name], x_shape=(4, 4, 3))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_keys_are_required(name):
    matrices, y, x_init, _ = exact_problem(1)
    with pytest.raises(ValueError, match="keys"):
        run(name, gaussian_denoiser, y, matrices, x_init, None)


def test_dpps_aligned_init_starts_from_the_lifted_measurement():
    seen = []

    def denoiser(x, sigma):
        jax.debug.callback(lambda x_, s: seen.append((np.asarray(x_), float(s[0]))), x, sigma)
        return gaussian_denoiser(x, sigma)

    y = jax.random.normal(jax.random.key(0), (1, 2, 2, 2))
    forward = lambda x, _: x.reshape(2, 2, 2, 2, 2).mean(axis=(1, 3))  # noqa: E731  (2x average pooling)
    x_init = 157.4 * jax.random.normal(jax.random.key(1), (1,) + SHAPE)
    keys = step_keys(jax.random.split(jax.random.key(2), 1))
    samplers.run(denoiser, forward, y, x_init, DPPSConfig(zeta=1.0, steps=2), keys=keys)
    jax.effects_barrier()
    first = min(seen, key=lambda item: -item[1])[0]
    np.testing.assert_allclose(first[0], x_init[0] + jnp.repeat(jnp.repeat(y[0], 2, 0), 2, 1), rtol=1e-6)


def test_lift_measurement_shapes():
    assert lift_measurement(jnp.ones((2,) + SHAPE), SHAPE).shape == (2,) + SHAPE
    assert lift_measurement(jnp.ones((2, 2, 2, 2)), SHAPE).shape == (2,) + SHAPE
    with pytest.raises(ValueError, match="aligned_init=False"):
        lift_measurement(jnp.ones((2, 12)), SHAPE)


@pytest.mark.parametrize("make, error, match", [
    (lambda: MCGConfig(alpha=0.0), ValueError, "alpha"),
    (lambda: MCGConfig(alpha="1"), TypeError, "alpha"),
    (lambda: MCGConfig(steps=1), ValueError, "steps"),
    (lambda: MCGConfig(steps=1001), ValueError, "steps"),
    (lambda: MCGConfig(cg_iterations=0), ValueError, "cg_iterations"),
    (lambda: ScoreSDEConfig(steps=2.5), ValueError, "steps"),
    (lambda: ScoreSDEConfig(cg_iterations=True), ValueError, "cg_iterations"),
    (lambda: DPPSConfig(zeta=-1.0), ValueError, "zeta"),
    (lambda: DPPSConfig(zeta=1.0, candidates=1), ValueError, "candidates"),
    (lambda: DPPSConfig(zeta=1.0, aligned_init=1), TypeError, "aligned_init"),
    (lambda: DPPSConfig(zeta=1.0, trajectory_every=-1), ValueError, "trajectory_every"),
])
def test_config_validation(make, error, match):
    with pytest.raises(error, match=match):
        make()
