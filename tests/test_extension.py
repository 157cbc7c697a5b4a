"""A method added from outside the package, as the README's "Adding a method" shows: one module's worth of
code (config, schedule, step) and one register_sampler call, here in a test file. It then runs from
`sample`, `sweep` (over its step size), the sharded run and the command line, with nothing else changed."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli_helpers import random_faces, tiny_weights
from sampler_toys import SHAPE, gaussian_denoiser, matrix_forward, random_problem
from spgd_jax import restore, samplers


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShrinkConfig:
    """A toy: denoise, take a gradient step of size `pull` on ||A x0 - y||^2 / 2, re-noise to the next level."""

    pull: float = 0.5
    steps: int = 4
    sigma_max: float = 10.0
    trajectory_every: int = 0


def schedule(config: ShrinkConfig) -> samplers.Schedule:
    sigmas = samplers.edm_sigmas(config.steps, config.sigma_max)
    return samplers.Schedule(sigmas, jnp.full((config.steps,), config.pull, jnp.float32), stochastic=True)


def get_step_fn(denoiser, forward, config: ShrinkConfig):
    def step(x, step, key, image):
        y, params = image
        x0_hat = denoiser(x[None], step.sigma[None])[0]
        predicted, pullback = jax.vjp(lambda z: forward(z, params), x0_hat)
        x0 = x0_hat - step.inputs * pullback(predicted - y)[0]
        return x0 + step.sigma_next * jax.random.normal(key, x.shape), x0, jnp.sum((predicted - y) ** 2)

    return step


@pytest.fixture(scope="module")
def shrink():
    sampler = samplers.register_sampler(samplers.Sampler("toy_shrink", ShrinkConfig, schedule, get_step_fn,
                                                         step_size="pull"))
    yield sampler
    del samplers.SAMPLERS[sampler.name]  # the pytree registration of ShrinkConfig stays (harmless)


def test_it_runs_from_sample_and_sweep(shrink):
    matrices, _, y, _ = random_problem(3)
    key = jax.random.key(4)
    run = lambda pull: samplers.sample(gaussian_denoiser, matrix_forward, y, key, ShrinkConfig(pull=pull), matrices,
                                       x_shape=SHAPE)
    one = run(0.5)
    assert one.x.shape == (3,) + SHAPE and one.losses.shape == (3, 4) and not bool(one.diverged.any())
    swept = samplers.sweep(gaussian_denoiser, matrix_forward, y, key, ShrinkConfig(), [0.25, 0.5], matrices,
                           x_shape=SHAPE)
    assert swept.x.shape == (2, 3) + SHAPE
    np.testing.assert_allclose(swept.x[1], one.x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(swept.x[0], run(0.25).x, rtol=1e-5, atol=1e-5)
    assert not np.allclose(swept.x[0], swept.x[1])
    with pytest.raises(ValueError, match="toy_shrink draws noise at every step: pass keys"):
        samplers.run(gaussian_denoiser, matrix_forward, y, jnp.zeros((3,) + SHAPE), ShrinkConfig(), matrices)


def test_it_runs_sharded_with_progress(shrink):
    matrices, _, y, _ = random_problem(3)
    key = jax.random.key(4)
    calls = []
    split = samplers.sample_sharded(gaussian_denoiser, matrix_forward, y, key, ShrinkConfig(), matrices,
                                    x_shape=SHAPE, progress=calls.append)
    alone = samplers.sample(gaussian_denoiser, matrix_forward, y, key, ShrinkConfig(), matrices, x_shape=SHAPE)
    np.testing.assert_allclose(split.x, alone.x, rtol=1e-5, atol=1e-5)
    assert calls == [0, 1, 2, 3]


def test_it_runs_and_sweeps_from_the_command_line(shrink, tmp_path_factory, tmp_path):
    weights = tiny_weights(tmp_path_factory)
    faces = random_faces(tmp_path, names=("a", "b"))
    out = tmp_path / "out"
    assert restore.main(["--task", "inpaint", "--sampler", "toy_shrink", "--pull", "0.25,1", "--steps", "2",
                         "--input", str(faces), "--weights", weights, "--out", str(out), "--batch-size", "2",
                         "--quiet"]) == 0
    written = json.loads((out / "config.json").read_text())
    assert written["sampler"] == "toy_shrink" and written["step_sizes"] == {"pull": [0.25, 1.0]}
    assert written["sampler_config"]["steps"] == 2
    for folder in ("pull-0.25", "pull-1"):
        records = json.loads((out / folder / "metrics.json").read_text())["images"]
        assert len(records) == 2 and all(np.isfinite(r["psnr"]) for r in records)
    with pytest.raises(SystemExit, match="--warmup is not a setting of --sampler toy_shrink"):
        restore.main(["--task", "inpaint", "--sampler", "toy_shrink", "--warmup", "2", "--weights", weights])
