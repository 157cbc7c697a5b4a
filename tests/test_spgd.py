import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sampler_toys import (
    PRIOR_VAR,
    SHAPE,
    conv_denoiser,
    counting,
    gaussian_denoiser,
    matrix_forward,
    random_problem,
)
from spgd_jax.samplers._loop import run_schedule
from spgd_jax import samplers
from spgd_jax.samplers import sample
from spgd_jax.samplers.spgd import SPGDConfig, adm_update, get_warmup_fn, learning_rates

TINY = SPGDConfig(lr=0.5, steps=4, warmup=3)
CONV = conv_denoiser()  # one object: sample() compiles once per shape for it


def assert_close_at_scale(actual, expected, floor):
    """Within rtol 1e-5, or within floor x max|expected| near zero: two programs (jit or not, another
    batch size, extra outputs) fuse and contract (FMA) float32 arithmetic differently, and a toy run
    starting from sigma_max * noise (|x| ~ 300) leaves round-off of that size in its near-zero pixels.
    The floors: 3e-5 with the nonlinear conv net CONV (jit against eager measured 5.7e-6 on AVX-512 and
    AVX2 builds of XLA), 1e-5 with the Gaussian denoiser (elementwise and 32-term products)."""
    expected = np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=floor * np.abs(expected).max())


# ---------------------------------------------------------------- independent NumPy references (float64)


def numpy_adm(grads, beta, mode):
    """Update directions for a sequence of raw gradients (H, W, C), SPEC 3.2 / the reference code."""

    def cosine(a, b, axis):
        clamped_norm = lambda v: np.maximum(np.linalg.norm(v, axis=axis), 1e-8)
        return np.sum(a * b, axis) / (clamped_norm(a) * clamped_norm(b))

    directions, m = [], None
    for j, g in enumerate(grads):
        if mode == "off":
            directions.append(g)
            continue
        if j == 0:
            m = g
        else:
            cos = cosine(g.ravel(), m.ravel(), 0) if mode == "paper" else np.mean(cosine(g, m, -1))
            alpha = (1 + cos) / 2
            m = alpha * beta * m + (1 - alpha * beta) * g
        directions.append(m)
    return directions


def numpy_spgd(x_init, matrices, y, config):
    """SPEC section 3 for D(x; s) = x v/(v+s^2) and A = M vec(x): one image at a time, float64."""
    T, N = config.steps, config.warmup
    hi, lo = config.sigma_max ** (1 / config.rho), config.sigma_min ** (1 / config.rho)
    t = [(hi + i / (T - 1) * (lo - hi)) ** config.rho for i in range(T)] + [0.0]
    out, losses = [], []
    for x, M, yb in zip(np.asarray(x_init, np.float64), np.asarray(matrices, np.float64), np.asarray(y, np.float64)):
        image_losses = np.zeros((T, N))
        for i in range(T):
            c = PRIOR_VAR / (PRIOR_VAR + t[i] ** 2)
            eta = config.lr * (1 + (i / T) * (config.lr_min_ratio - 1))
            grads = []
            for j in range(N):
                image_losses[i, j] = np.sum((M @ (c * x.ravel()) - yb) ** 2)
                grads.append((2 * c * M.T @ (M @ (c * x.ravel()) - yb)).reshape(x.shape))
                direction = numpy_adm(grads, config.beta, config.adm)[-1]
                x_eval, x = x, x - eta * direction
            x = x + (1 - t[i + 1] / t[i]) * (c * x_eval - x_eval)
        out.append(x)
        losses.append(image_losses)
    return np.stack(out), np.stack(losses)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=1), "steps"),
        (dict(adm="momentum"), r"'paper', 'off', 'reference_cosine'"),
        (dict(lr=0.0), "lr"),
        (dict(lr=-1.0), "lr"),
        (dict(warmup=0), "warmup"),
        (dict(beta=1.0), "beta"),
        (dict(lr_min_ratio=1.5), "lr_min_ratio"),
        (dict(trajectory_every=-2), "trajectory_every"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SPGDConfig(**{"lr": 1.0, **kwargs})
    with pytest.raises(TypeError, match="lr"):
        SPGDConfig()


def test_learning_rate_decay():
    config = SPGDConfig(lr=2.0, steps=100)
    lrs = learning_rates(config)
    np.testing.assert_allclose(lrs, [2.0 * (1 + (i / 100) * (0.01 - 1)) for i in range(100)], rtol=1e-14)
    assert lrs[0] == 2.0 and np.isclose(lrs[-1], 2.0 * (0.01 + 0.99 / 100))


# ---------------------------------------------------------------- ADM and the warm-up


@pytest.mark.parametrize("mode", ["paper", "reference_cosine", "off"])
def test_adm_matches_numpy_for_three_steps(mode):
    grads = np.random.default_rng(1).standard_normal((3,) + SHAPE)
    grads[1] = -0.5 * grads[0] + 0.3 * grads[1]  # a partly opposed gradient: alpha well below 1
    expected = numpy_adm(list(grads), 0.9, mode)
    momentum = jnp.zeros(SHAPE)
    for j in range(3):
        direction, momentum = adm_update(jnp.asarray(grads[j], jnp.float32), momentum, jnp.int32(j), 0.9, mode)
        np.testing.assert_allclose(direction, expected[j], rtol=1e-5, atol=1e-6)
    if mode != "off":
        assert not np.allclose(expected[2], grads[2], atol=1e-2)  # ADM really smooths


def test_reference_cosine_matches_torch_cosine_similarity():
    torch = pytest.importorskip("torch")
    g, m = np.random.default_rng(2).standard_normal((2,) + SHAPE).astype(np.float32)
    direction, _ = adm_update(jnp.asarray(g), jnp.asarray(m), jnp.int32(1), 0.9, "reference_cosine")
    # the reference code: NCHW gradients, cosine_similarity over dim=1, mean over (H, W)
    tg, tm = (torch.from_numpy(a).permute(2, 0, 1)[None] for a in (g, m))
    alpha = (torch.cosine_similarity(tg, tm, dim=1).mean(dim=(1, 2)) + 1) / 2
    expected = (alpha * 0.9) * tm + (1 - alpha * 0.9) * tg
    np.testing.assert_allclose(direction, expected[0].permute(1, 2, 0).numpy(), rtol=1e-5, atol=1e-6)


def test_proposition_4_1_warmup_never_increases_the_likelihood():
    """beta = 0, lr <= 1/L: L(x) = ||M c x - y||^2 has a 2 c^2 ||M||_2^2 -Lipschitz gradient."""
    matrices, _, y, _ = random_problem(1, m=20)
    sigma = 1.5
    c = PRIOR_VAR / (PRIOR_VAR + sigma**2)
    lipschitz = 2 * c**2 * np.linalg.norm(np.asarray(matrices[0], np.float64), 2) ** 2
    x = jnp.asarray(np.random.default_rng(3).standard_normal(SHAPE) * 3, jnp.float32)

    def likelihood(x):
        return float(np.sum((np.asarray(matrices[0]) @ (c * np.asarray(x).ravel()) - np.asarray(y[0])) ** 2))

    def warm_up(lr):
        config = SPGDConfig(lr=1.0, warmup=8, beta=0.0)
        warmup = jax.jit(get_warmup_fn(gaussian_denoiser, matrix_forward, config))
        state = warmup(x, jnp.float32(sigma), jnp.float32(lr), y[0], matrices[0])
        return np.append(np.asarray(state.losses), likelihood(state.x))

    losses = warm_up(1.0 / lipschitz)
    np.testing.assert_allclose(losses[0], likelihood(x), rtol=1e-5)
    assert np.all(np.diff(losses) <= 1e-6 * losses[:-1]), losses
    assert losses[-1] < 0.9 * losses[0]
    assert np.any(np.diff(warm_up(3.0 / lipschitz)) > 0)  # beyond 2/L the guarantee (and this test) fails


def test_warmup_and_euler_match_numpy_reference():
    matrices, _, y, x_init = random_problem(2)
    for adm in ("paper", "off"):
        config = dataclasses.replace(TINY, adm=adm, steps=5, warmup=3, lr=2.0)
        result = jax.jit(lambda x: samplers.run(gaussian_denoiser, matrix_forward, y, x, config, matrices))(x_init)
        expected_x, expected_losses = numpy_spgd(x_init, matrices, y, config)
        np.testing.assert_allclose(result.x, expected_x, rtol=1e-4, atol=1e-5)
        assert result.losses.shape == (2, config.steps, config.warmup)
        np.testing.assert_allclose(result.losses, expected_losses, rtol=1e-4)


# ---------------------------------------------------------------- batching, jit, determinism, NFEs


def test_batched_equals_per_image_in_any_order():
    denoiser = CONV
    matrices, _, y, _ = random_problem(3)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    run = lambda keys, y, mats: sample(denoiser, matrix_forward, y, keys, TINY, mats, x_shape=SHAPE).x
    batched = run(keys, y, matrices)
    for b in range(3):
        alone = run(keys[b : b + 1], y[b : b + 1], matrices[b : b + 1])[0]
        np.testing.assert_allclose(alone, batched[b], rtol=1e-5, atol=1e-5)
    order = np.array([2, 0, 1])
    np.testing.assert_allclose(run(keys[order], y[order], matrices[order]), batched[order], rtol=1e-5, atol=1e-5)


def test_jit_and_no_jit_agree_and_same_key_same_bits():
    matrices, _, y, _ = random_problem(2)
    key, config = jax.random.PRNGKey(4), dataclasses.replace(TINY, steps=2, warmup=2)
    first = sample(CONV, matrix_forward, y, key, config, matrices, x_shape=SHAPE)
    second = sample(CONV, matrix_forward, y, key, config, matrices, x_shape=SHAPE)
    assert np.array_equal(first.x, second.x)
    with jax.disable_jit():
        eager = sample(CONV, matrix_forward, y, key, config, matrices, x_shape=SHAPE)
    assert_close_at_scale(eager.x, first.x, 3e-5)  # an lr off by 1e-3: 14x this, a warm-up step more 6e3x
    other = sample(CONV, matrix_forward, y, jax.random.PRNGKey(5), config, matrices, x_shape=SHAPE)
    assert not np.allclose(other.x, first.x)


def test_one_compilation_per_shape_and_config():
    traces = []

    def traced_denoiser(x, sigma):  # Python runs this only while JAX traces a new program
        traces.append(x.shape)
        return CONV(x, sigma)

    config = dataclasses.replace(TINY, steps=2, warmup=2)
    for seed in range(3):  # new measurements, keys and operator params: the same program
        matrices, _, y, _ = random_problem(2, seed=seed)
        sample(traced_denoiser, matrix_forward, y, jax.random.PRNGKey(seed), dataclasses.replace(config), matrices,
               x_shape=SHAPE).x.block_until_ready()
    assert len(traces) == 1
    matrices, _, y, _ = random_problem(3)  # a new batch size: one new program
    sample(traced_denoiser, matrix_forward, y, jax.random.PRNGKey(0), config, matrices, x_shape=SHAPE)
    assert len(traces) == 2


def test_exactly_t_times_n_denoiser_evaluations():
    record = []
    matrices, _, y, x_init = random_problem(2)
    config = SPGDConfig(lr=0.5, steps=3, warmup=4)
    run = jax.jit(lambda x: samplers.run(counting(gaussian_denoiser, record), matrix_forward, y, x, config, matrices))
    run(x_init).x.block_until_ready()
    jax.effects_barrier()
    sigmas = [(100 ** (1 / 7) + i / 2 * (0.1 ** (1 / 7) - 100 ** (1 / 7))) ** 7 for i in range(3)]
    assert len(record) == 3 * 4 * 2  # T * N per image
    np.testing.assert_allclose(sorted(record), sorted(sigmas * 4 * 2), rtol=1e-6)


# ---------------------------------------------------------------- trajectory, divergence, progress


def test_trajectory_does_not_change_the_result():
    matrices, _, y, x_init = random_problem(2)
    run = lambda every: jax.jit(
        lambda x: samplers.run(CONV, matrix_forward, y, x, dataclasses.replace(TINY, steps=5, trajectory_every=every), matrices)
    )(x_init)
    plain, every_one, every_two = run(0), run(1), run(2)
    assert plain.trajectory is None and every_two.trajectory.shape == (2, 3) + SHAPE
    # Three programs (recording changes what XLA fuses): equal to round-off. An lr off by 1e-3 exceeds the
    # bound 11x, a trajectory one step out of place 1.5e4x.
    assert_close_at_scale(every_one.x, plain.x, 3e-5)
    assert_close_at_scale(every_two.x, plain.x, 3e-5)
    assert_close_at_scale(every_two.trajectory, every_one.trajectory[:, ::2], 3e-5)


def test_loop_flags_a_nan_with_its_step_and_freezes_only_that_image():
    steps = 5
    poison = jnp.array([-1, 3, -1, 0])  # image b becomes NaN at outer step poison[b]

    def step_fn(x, step, _key, poison_step):
        x_next = x + 1.0
        return jnp.where(step.inputs == poison_step, jnp.nan, x_next), x_next, None

    result = run_schedule(step_fn, jnp.zeros((4, 2, 2, 1)), np.linspace(5.0, 0.0, steps + 1), jnp.arange(steps), poison)
    np.testing.assert_array_equal(result.diverged_step, [-1, 3, -1, 0])
    np.testing.assert_array_equal(result.diverged, [False, True, False, True])
    np.testing.assert_array_equal(result.x[:, 0, 0, 0], [5.0, 3.0, 5.0, 0.0])  # the last finite states


def test_loop_freezes_a_pytree_state_when_any_leaf_diverges_and_hands_each_image_its_own_key():
    steps = 4
    keys = jax.random.split(jax.random.key(0), 3)

    def step_fn(state, step, key, poison_step):
        x, count = state
        noise = jax.random.normal(key, x.shape)
        count = jnp.where(step.i == poison_step, jnp.inf, count + 1.0)
        return (x + noise, count), x, None

    init = (jnp.zeros((3, 2, 2, 1)), jnp.zeros((3,)))
    result = run_schedule(step_fn, init, np.linspace(5.0, 0.0, steps + 1), None, jnp.array([-1, 2, -1]),
                          keys=keys, output=lambda state: state[0])
    assert result.diverged.tolist() == [False, True, False] and result.diverged_step.tolist() == [-1, 2, -1]
    expected = [sum(jax.random.normal(jax.random.fold_in(keys[b], i), (2, 2, 1)) for i in range(steps if b != 1 else 2))
                for b in range(3)]
    np.testing.assert_allclose(result.x, np.stack(expected), rtol=1e-6, atol=1e-6)
    alone = run_schedule(step_fn, jax.tree_util.tree_map(lambda a: a[2:], init), np.linspace(5.0, 0.0, steps + 1), None,
                         jnp.array([-1]), keys=keys[2:], output=lambda state: state[0])
    np.testing.assert_array_equal(alone.x[0], result.x[2])  # an image's noise depends on its own key only


def test_spgd_divergence_is_confined_to_its_image():
    matrices, _, y, x_init = random_problem(3)
    matrices = matrices.at[1].multiply(1e4)  # image 1: a huge operator norm, the step size is far beyond 2/L
    config = dataclasses.replace(TINY, lr=5.0, steps=6)
    run = jax.jit(lambda x, y, m: samplers.run(gaussian_denoiser, matrix_forward, y, x, config, m))
    result = run(x_init, y, matrices)
    assert result.diverged.tolist() == [False, True, False] and result.diverged_step[1] >= 0
    assert np.all(np.isfinite(result.x))
    for b in (0, 2):
        alone = run(x_init[b : b + 1], y[b : b + 1], matrices[b : b + 1])
        assert_close_at_scale(result.x[b], alone.x[0], 1e-5)  # batch 3 vs 1; lr off by 1e-3: 200x this


def test_progress_called_once_per_outer_step_without_changing_the_result():
    calls = []
    matrices, _, y, _ = random_problem(2)
    key = jax.random.PRNGKey(0)
    with_progress = sample(
        gaussian_denoiser, matrix_forward, y, key, TINY, matrices, x_shape=SHAPE, progress=calls.append
    )
    jax.effects_barrier()
    assert sorted(calls) == list(range(TINY.steps))
    plain = sample(gaussian_denoiser, matrix_forward, y, key, TINY, matrices, x_shape=SHAPE)
    assert_close_at_scale(with_progress.x, plain.x, 1e-5)  # the callback makes another program; lr off by 1e-3: 37x


# ---------------------------------------------------------------- the public entry point


def test_sample_rejects_bad_inputs_clearly():
    matrices, _, y, _ = random_problem(2)
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="x_shape"):
        sample(gaussian_denoiser, matrix_forward, y, key, TINY, matrices, x_shape=(4, 4, 3))
    with pytest.raises(ValueError, match="leading batch axis"):
        sample(gaussian_denoiser, matrix_forward, y, key, TINY, matrices[:1], x_shape=SHAPE)
    with pytest.raises(ValueError, match="batch of 2 keys"):
        sample(gaussian_denoiser, matrix_forward, y, jax.random.split(key, 3), TINY, matrices, x_shape=SHAPE)
    with pytest.raises(TypeError, match="config must be one of SPGDConfig, DPSConfig, .*EulerConfig, got dict"):
        sample(gaussian_denoiser, matrix_forward, y, key, {"lr": 1.0}, matrices, x_shape=SHAPE)


def test_sample_is_differentiable_in_y():
    """With adm='off' and linear D and A, y -> x is affine: the gradient equals a finite difference."""
    matrices, _, y, _ = random_problem(1)
    config = dataclasses.replace(TINY, adm="off")
    key = jax.random.PRNGKey(0)
    direction = jax.random.normal(jax.random.PRNGKey(1), y.shape)
    g = lambda y: jnp.sum(sample(gaussian_denoiser, matrix_forward, y, key, config, matrices, x_shape=SHAPE).x)
    grad = jax.grad(g)(y)
    np.testing.assert_allclose(jnp.vdot(grad, direction), g(y + direction) - g(y), rtol=1e-3, atol=1e-4)
