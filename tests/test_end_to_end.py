"""Every registered task end to end with a tiny random UNet: shapes, finiteness, and the
likelihood objective falling over each warm-up phase at a small learning rate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spgd_jax
from spgd_jax.models.adm import CONFIGS, UNet

SIZE = 16


@pytest.fixture(scope="module")
def denoiser():
    config = CONFIGS["tiny16"]
    params = UNet(config).init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), jnp.zeros((1,)))["params"]
    return spgd_jax.make_denoiser(config, params)


def _measure(task, batch=2):
    operator = spgd_jax.operators.get(task, SIZE)
    key_x, key_params, key_noise = jax.random.split(jax.random.key(1), 3)
    x = jnp.tanh(jax.random.normal(key_x, (batch, SIZE, SIZE, 3)))
    params = operator.init_params(key_params, batch, SIZE)
    return operator, params, operator.measure(key_noise, x, params)


@pytest.mark.parametrize("task", spgd_jax.operators.TASKS)
def test_task_end_to_end(task, denoiser):
    operator, params, y = _measure(task)
    config = spgd_jax.spgd_config(task, steps=4, warmup=3, lr=1e-3)
    result = spgd_jax.sample(denoiser, operator.forward, y, jax.random.key(2), config, params, x_shape=(SIZE, SIZE, 3))
    assert result.x.shape == (2, SIZE, SIZE, 3)
    assert bool(jnp.all(jnp.isfinite(result.x))) and not bool(result.diverged.any())
    # The warm-up of every outer step lowers ||A(D(x)) - y||^2 at this small lr (it may stay flat
    # where the operator saturates, e.g. HDR's clip far from the data), and lowers it overall.
    losses = np.asarray(result.losses)
    assert losses.shape == (2, config.steps, config.warmup) and np.isfinite(losses).all()
    assert np.all(np.diff(losses, axis=-1) <= 0), losses
    assert np.all(losses[..., -1].sum(axis=0) < losses[..., 0].sum(axis=0)), losses
