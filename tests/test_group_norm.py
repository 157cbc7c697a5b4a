"""GroupNorm32's hand-written gradient (spgd_jax.models.adm._group_norm) against jax.grad of flax's plain one."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from spgd_jax.models.adm._config import NORM_EPS, NORM_GROUPS
from spgd_jax.models.adm._group_norm import GroupNorm32, group_norm


def plain(x, scale, bias):
    norm = nn.GroupNorm(num_groups=NORM_GROUPS, epsilon=NORM_EPS, use_fast_variance=False)
    return norm.apply({"params": {"scale": scale, "bias": bias}}, x)


@pytest.mark.parametrize("shape", [(2, 8, 8, 64), (3, 16, 96)])  # a conv activation, the attention's (B, HW, C)
def test_values_and_gradients_match_the_plain_group_norm(shape):
    keys = jax.random.split(jax.random.key(0), 4)
    x = 3.0 * jax.random.normal(keys[0], shape) + 1.5  # an offset mean, as activations have
    scale = jax.random.normal(keys[1], shape[-1:])
    bias = jax.random.normal(keys[2], shape[-1:])
    weight = jax.random.normal(keys[3], shape)
    np.testing.assert_allclose(group_norm(x, scale, bias), plain(x, scale, bias), atol=1e-5)

    def grads(norm):  # a non-linear loss, so every term of the gradient matters
        return jax.grad(lambda *args: jnp.sum(jnp.sin(norm(*args)) * weight), argnums=(0, 1, 2))(x, scale, bias)

    for ours, reference in zip(grads(group_norm), grads(plain)):
        np.testing.assert_allclose(ours, reference, atol=1e-5 * float(jnp.max(jnp.abs(reference))))
    check_grads(group_norm, (x, scale, bias), order=1, modes=("rev",), atol=2e-2, rtol=2e-2)


def test_module_has_flax_group_norms_parameters():
    x = jnp.ones((1, 4, 4, 64))
    ours = GroupNorm32().init(jax.random.key(0), x)
    flax_norm = nn.GroupNorm(num_groups=NORM_GROUPS).init(jax.random.key(0), x)
    assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype, float(a.sum())), ours) == \
        jax.tree_util.tree_map(lambda a: (a.shape, a.dtype, float(a.sum())), flax_norm)
