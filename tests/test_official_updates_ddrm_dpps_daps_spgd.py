"""DDRM, DPPS, DAPS and SPGD against their official code (issue 25): one step of each against a float64 NumPy
transcription of the release's update, on the toy eps-network of tests/official_toys.py with the same noise
fed to both (the step's key)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from official_toys import (ABAR, CHANNEL_MIX, LEVELS, denoise_numpy, normal, official_p_sample, official_x0, one_step,
                           our_step, toy_denoiser, ve)
from sampler_toys import N_PIXELS, SHAPE, MatrixSVD, matrix_forward
from spgd_jax.samplers import DAPSConfig, DDRMConfig, DPPSConfig, SPGDConfig
from spgd_jax.samplers.daps import get_step_fn as daps_step
from spgd_jax.samplers.daps import schedule as daps_schedule
from spgd_jax.samplers.ddrm import get_step_fn as ddrm_step
from spgd_jax.samplers.ddrm import initial_state as ddrm_initial_state
from spgd_jax.samplers.dpps import candidate_counts
from spgd_jax.samplers.dpps import get_step_fn as dpps_step
from spgd_jax.samplers.spgd import get_step_fn as spgd_step
from spgd_jax.samplers.spgd import schedule as spgd_schedule


def assert_matches(ours, reference):
    """Ours (float32, any shape) against the float64 reference (flattened): within 1e-5 relative, elementwise or
    of the reference's largest entry (float32 round-off; measured <= 9e-7 of it)."""
    np.testing.assert_allclose(np.asarray(ours).ravel(), reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


# ---------------------------------------------------------------- DDRM


def spectral_problem(seed, m=12, sigma_y=0.1):
    """A (m, n) = U diag(s) V^T[:m] with s from 0.05 to 3 (above DDRM's floor 3e-2, so every case of Eq. 7 occurs
    at small sigma'), y = A x + sigma_y n; float64 (A, U, s, V^T, y) and MatrixSVD's float32 params."""
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((m, m)))[0]
    vt = np.linalg.qr(rng.standard_normal((N_PIXELS, N_PIXELS)))[0].T
    s = np.geomspace(3.0, 0.05, m)
    A = u @ (s[:, None] * vt[:m])
    y = A @ (0.5 * rng.standard_normal(N_PIXELS)) + sigma_y * rng.standard_normal(m)
    params = {name: jnp.asarray(a, jnp.float32) for name, a in (("matrix", A), ("u", u), ("s", s), ("vt", vt))}
    return A, u, s, vt, y, params


def official_ddrm_step(network, x_vp, k, k_next, u, s, vt, y, sigma_0, eta, eta_b, n):
    """efficient_generalized_steps, one iteration from timestep k to k_next (-1: abar = 1), etaA = etaC = eta,
    etaB = eta_b, float64. Its three randn draws are one n (N(0, I) over the spectral coordinates) here: the cases
    take disjoint coordinates. Returns (x_vp', x0)."""
    m = s.size
    at, at_next = ABAR[k], (1.0 if k_next < 0 else ABAR[k_next])
    et, _ = network.numpy(CHANNEL_MIX, x_vp.ravel(), k)
    x0 = (x_vp.ravel() - et * np.sqrt(1 - at)) / np.sqrt(at)
    sigma_next = np.sqrt(1 - at_next) / np.sqrt(at_next)
    ut_y = u.T @ y
    vt_x0 = vt @ x0
    before = np.zeros(N_PIXELS, bool)
    before[:m] = s * sigma_next > sigma_0
    after = np.zeros(N_PIXELS, bool)
    after[:m] = s * sigma_next < sigma_0
    tilde = np.sqrt(sigma_next**2 - (sigma_next * eta) ** 2)
    out = vt_x0 + tilde * (vt @ et) + sigma_next * eta * n  # missing pixels
    out[after] = (vt_x0 + tilde * np.append((ut_y - s * vt_x0[:m]) / sigma_0, np.zeros(N_PIXELS - m))
                  + sigma_next * eta * n)[after]
    s_before = s[before[:m]]
    out[before] = ((ut_y / s)[before[:m]] * eta_b + (1 - eta_b) * vt_x0[before]
                   + np.sqrt(sigma_next**2 - sigma_0**2 / s_before**2 * eta_b**2) * n[before])
    return np.sqrt(at_next) * (vt.T @ out), x0


@pytest.mark.parametrize("k, k_next", [(600, 550), (100, 50), (50, -1)])
def test_one_ddrm_step_matches_the_release(k, k_next):
    """At (100, 50) the measured coordinates split between 'noisier than y' and 'less noisy than y'; (600, 550)
    has all of them noisier; the last step (sigma' = 0) has all of them less noisy. sigma_y > 0 and no singular
    value at the boundary or zero, where ddrm.py departs from the release (its module docstring)."""
    denoiser, network = toy_denoiser()
    sigma_y, eta, eta_b, key = 0.1, 0.85, 0.7, jax.random.key(5)
    _, u, s, vt, y, params = spectral_problem(seed=k)
    sigma_next = 0.0 if k_next < 0 else LEVELS[k_next]
    cases = s * sigma_next > sigma_y
    assert cases.any() == (k_next >= 0) and cases.all() == (k > 100)  # the cases the docstring names
    x_vp = np.random.default_rng(k + 1).standard_normal(SHAPE)
    expected, x0 = official_ddrm_step(network, x_vp, k, k_next, u, s, vt, y, sigma_y, eta, eta_b, normal(key).ravel())

    step = ddrm_step(denoiser, MatrixSVD(), DDRMConfig(eta=eta, eta_b=eta_b, sigma_y=sigma_y))
    got, got_x0, _ = one_step(step, jnp.asarray(ve(x_vp, k), jnp.float32), LEVELS[k], sigma_next, None, key,
                              (jnp.asarray(y, jnp.float32), params))
    assert_matches(got_x0, x0)
    got_vp = np.asarray(got).ravel() * (1.0 if k_next < 0 else np.sqrt(ABAR[k_next]))
    assert_matches(got_vp, expected)


def test_ddrm_initial_state_matches_the_release():
    """The release's x_T before its rescaling to VP coordinates (ddrm.py's docstring: it divides by sigma_T where
    sqrt(abar_T) is exact): init_y = V(ybar + sqrt(max(sigma^2 - sigma_0^2 / s^2, 0)) n) on the coordinates with
    s sigma > sigma_0, V(sigma n) elsewhere. At sigma = 1 both kinds of coordinate occur."""
    sigma, sigma_y = 1.0, 0.5
    _, u, s, vt, y, params = spectral_problem(seed=3)
    n = np.random.default_rng(4).standard_normal(N_PIXELS)
    large = np.zeros(N_PIXELS, bool)
    large[: s.size] = s * sigma > sigma_y
    assert 0 < large.sum() < s.size
    inverse = np.zeros(N_PIXELS)
    inverse[large] = sigma_y / s[large[: s.size]]
    init_y = np.zeros(N_PIXELS)
    init_y[large] = (u.T @ y)[large[: s.size]] / s[large[: s.size]]
    expected = vt.T @ (init_y + np.sqrt(np.maximum(sigma**2 - inverse**2, 0.0)) * n)
    noise = jnp.asarray(n.reshape(SHAPE), jnp.float32)
    got = ddrm_initial_state(MatrixSVD(), jnp.asarray(y, jnp.float32), params, noise, jnp.float32(sigma), sigma_y, 3e-2)
    assert_matches(got, expected)


# ---------------------------------------------------------------- DPPS


def measured(rng, sigma_y=0.01):
    """A random A (12, n) (entries N(0, 1/n)), y = A x + sigma_y n for x ~ N(0, 0.25 I), float64, and the float32
    (y, A) a step function takes."""
    A = rng.standard_normal((12, N_PIXELS)) / np.sqrt(N_PIXELS)
    y = A @ (0.5 * rng.standard_normal(N_PIXELS)) + sigma_y * rng.standard_normal(12)
    return A, y, (jnp.asarray(y, jnp.float32), jnp.asarray(A, jnp.float32))


@pytest.mark.parametrize("k", [600, 30])
def test_one_dpps_step_matches_the_release(k):
    """DPPS_code's p_sample_loop with conditioning 'dpps' (1000 steps, k -> k - 1): the ancestral mean (here with
    the fixed small variance beta_tilde, not the network's learned one: dpps.py's documented departure) minus
    scale * grad_{x_vp} ||y - A x0||; frequency = floor(max(50 (1 - exp(-abar/(1 - abar))), 2)) candidates
    x_vp' + std z_j, the one minimising ||sqrt(abar') y - A(x_vp' + std z_j - sqrt(1 - abar') eps)||. The state
    keeps x0 inside [-1, 1], so the release's clamp (the other departure) does not act. Shared noise: the first
    `frequency` of our M candidate noises."""
    denoiser, network = toy_denoiser()
    k_next, zeta, candidates, key = k - 1, 0.7, 50, jax.random.key(11)
    rng = np.random.default_rng(k)
    A, y, image = measured(rng, sigma_y=0.05)
    x_vp = np.sqrt(ABAR[k]) * 0.4 * rng.standard_normal(N_PIXELS)
    x0, jac = official_x0(network, x_vp, k)
    assert np.abs(x0).max() < 1  # the release's clamp does not act
    eps, _ = network.numpy(CHANNEL_MIX, x_vp, k)
    residual = y - A @ x0
    mean = official_p_sample(x0, x_vp, k, k_next, 0.0) + zeta * jac.T @ A.T @ residual / np.linalg.norm(residual)
    std = np.sqrt((1 - ABAR[k] / ABAR[k_next]) * (1 - ABAR[k_next]) / (1 - ABAR[k]))
    frequency = int(np.floor(max(candidates * (1 - np.exp(-ABAR[k] / (1 - ABAR[k]))), 2)))
    assert (frequency < 10) == (k == 600)  # few candidates at low signal-to-noise, all 50 at high
    assert candidate_counts(LEVELS[[k, k_next]], candidates)[0] == frequency
    noises = normal(key, (candidates,) + SHAPE).reshape(candidates, -1)[:frequency]
    samples = mean + std * noises
    distances = np.linalg.norm(np.sqrt(ABAR[k_next]) * y - (samples - np.sqrt(1 - ABAR[k_next]) * eps) @ A.T, axis=1)
    best = np.sort(distances)
    assert best[1] - best[0] > 1e-4 * best[0]  # a clear winner: float32 ranks the candidates as float64 does
    expected = samples[np.argmin(distances)]

    factor = np.sqrt((1 + LEVELS[k] ** 2) * (1 + LEVELS[k_next] ** 2))
    step = dpps_step(denoiser, matrix_forward, DPPSConfig(zeta=zeta, candidates=candidates))
    inputs = (jnp.float32(zeta * factor), jnp.int32(frequency))
    got, got_x0, got_norm = our_step(step, jnp.asarray(x_vp.reshape(SHAPE) / np.sqrt(ABAR[k]), jnp.float32), k,
                                     k_next, inputs, key, image)
    assert_matches(got_x0, x0)
    np.testing.assert_allclose(float(got_norm), np.linalg.norm(residual), rtol=1e-5)
    assert_matches(np.asarray(got) * np.sqrt(ABAR[k_next]), expected)


# ---------------------------------------------------------------- DAPS


def poly_grid(points, high, low, rho=7.0):
    """The releases' 'poly-rho' time steps: (high^(1/rho) + r (low^(1/rho) - high^(1/rho)))^rho at r = linspace(0, 1,
    points); float64."""
    r = np.linspace(0, 1, points)
    return (high ** (1 / rho) + r * (low ** (1 / rho) - high ** (1 / rho))) ** rho


def official_daps_schedule(config):
    """sampler.py's annealing levels (EDMScheduler(T): T + 1 poly-rho points, the last dropped, then 0), each step's
    ODE grid (EDMScheduler(K, sigma_max=sigma_i): K + 1 points down to its sigma_min, all kept: odeint's time grid)
    and MCMCSampler.get_lr(step / (T + 1)); float64."""
    poly = lambda points, high, low: poly_grid(points, high, low, config.rho)
    sigmas = np.append(poly(config.steps + 1, config.sigma_max, config.sigma_min)[:-1], 0.0)
    grids = np.stack([poly(config.ode_steps + 1, sigma, config.ode_sigma_min) for sigma in sigmas[:-1]])
    lrs = config.lr * (1 + np.arange(config.steps) / (config.steps + 1) * (config.lr_min_ratio - 1))
    return sigmas, grids, lrs


def official_daps_step(network, x, grid, sigma, sigma_next, lr, A, y, tau, langevin_noise, forward_noise):
    """DAPS.sample, one annealing step, float64 (flattened images): the PF-ODE by Euler on the grid through the VP
    preconditioning (continuous timestep), Langevin with score (x0_hat - x0)/sigma^2 - grad ||A x0 - y||^2 / tau^2,
    then x0 + sigma_next n. Returns (x', x0_hat)."""
    for s, s_next in zip(grid[:-1], grid[1:]):
        x = x + (1 - s_next / s) * (denoise_numpy(network, x, s) - x)
    x0_hat, x0 = x, x
    for noise in langevin_noise:
        score = (x0_hat - x0) / sigma**2 - 2 * A.T @ (A @ x0 - y) / tau**2
        x0 = x0 + lr * score + np.sqrt(2 * lr) * noise
    return x0 + sigma_next * forward_noise, x0_hat


@pytest.mark.parametrize("i", [3, 9])
def test_one_daps_annealing_step_matches_the_release(i):
    """One annealing step i of T = 10 (9: the last, sigma' = 0), K = 5 ODE steps, N = 20 Langevin steps, with our
    schedule checked against the release's. Shared noise: Langevin step j draws normal(fold_in(k_langevin, j)),
    the forward diffusion normal(k_forward), (k_langevin, k_forward) = split(key), as daps.py documents."""
    denoiser, network = toy_denoiser()
    config = DAPSConfig(lr=3e-5, steps=10, langevin_steps=20)
    sigmas, grids, lrs = official_daps_schedule(config)
    ours = daps_schedule(config)
    np.testing.assert_allclose(ours.sigmas, sigmas, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(ours.per_step.ode_sigmas), grids, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ours.per_step.lr), lrs, rtol=1e-6)

    rng = np.random.default_rng(i)
    A, y, image = measured(rng)
    x = 0.5 * rng.standard_normal(N_PIXELS) + sigmas[i] * rng.standard_normal(N_PIXELS)
    key = jax.random.key(13)
    k_langevin, k_forward = jax.random.split(key)
    langevin_noise = [normal(jax.random.fold_in(k_langevin, j)).ravel() for j in range(config.langevin_steps)]
    expected, x0_hat = official_daps_step(network, x, grids[i], sigmas[i], sigmas[i + 1], lrs[i], A, y, config.tau,
                                          langevin_noise, normal(k_forward).ravel())

    step = daps_step(denoiser, matrix_forward, config)
    inputs = jax.tree_util.tree_map(lambda a: a[i], ours.per_step)
    got, got_x0, _ = one_step(step, jnp.asarray(x.reshape(SHAPE), jnp.float32), sigmas[i], sigmas[i + 1], inputs,
                              key, image, i=i)
    assert_matches(got_x0, x0_hat)
    assert_matches(got, expected)


# ---------------------------------------------------------------- SPGD


def test_one_spgd_step_matches_the_release():
    """74587887/SPGD sampler.py, RUN.sample step i with SPGD.sample: N steps of torch SGD at lr_i = lr (1 + (i / T)
    (lr_min_ratio - 1)) on ||A D(x) - y||^2 (operator.error), D the VP preconditioning with the continuous timestep
    (model/precond.py's VPPrecond); its momentum is computed and discarded (adm 'off'); then x^N + score * factor / 2,
    score = (D(x^{N-1}) - x^{N-1}) / t_i^2 and factor = 2 t_i (t_i - t_{i+1}) (linear sigma(t) = t, poly-7 grid of T
    points, then sigma_final 0). Deterministic: no noise."""
    denoiser, network = toy_denoiser()
    config, i = SPGDConfig(lr=0.5, steps=10, warmup=3, adm="off"), 4
    times = np.append(poly_grid(config.steps, config.sigma_max, config.sigma_min), 0.0)
    lr = config.lr * (1 + i / config.steps * (config.lr_min_ratio - 1))
    ours = spgd_schedule(config)
    np.testing.assert_allclose(ours.sigmas, times, rtol=1e-12)
    np.testing.assert_allclose(float(ours.per_step[i]), lr, rtol=1e-6)

    rng = np.random.default_rng(5)
    A, y, image = measured(rng)
    x = 0.5 * rng.standard_normal(N_PIXELS) + times[i] * rng.standard_normal(N_PIXELS)
    denoise = lambda v: denoise_numpy(network, v, times[i])
    jac = np.stack([denoise(e) for e in np.eye(N_PIXELS)], axis=1)  # D is linear in x
    start = x
    for _ in range(config.warmup):
        x0_hat, x_eval = denoise(x), x
        x = x - lr * 2 * jac.T @ A.T @ (A @ x0_hat - y)
    factor = 2 * times[i] * (times[i] - times[i + 1])
    expected = x + (x0_hat - x_eval) / times[i] ** 2 * factor * 0.5

    state = jnp.asarray(start.reshape(SHAPE), jnp.float32)
    got, got_x0, losses = one_step(spgd_step(denoiser, matrix_forward, config), state, times[i], times[i + 1],
                                   ours.per_step[i], jax.random.key(0), image, i=i)
    assert_matches(got_x0, x0_hat)
    assert_matches(got, expected)
    np.testing.assert_allclose(float(losses[-1]), np.sum((A @ x0_hat - y) ** 2), rtol=1e-5)
