"""GroupNorm32's hand-written gradient (spgd_jax.models.adm._group_norm) against jax.grad of flax's plain one."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from custom_vjp_checks import assert_matches_plain

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
    assert_matches_plain(group_norm, plain, (x, scale, bias), weight)

def test_module_has_flax_group_norms_parameters():
    x = jnp.ones((1, 4, 4, 64))
    ours = GroupNorm32().init(jax.random.key(0), x)
    flax_norm = nn.GroupNorm(num_groups=NORM_GROUPS).init(jax.random.key(0), x)
    assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype, float(a.sum())), ours) == \
        jax.tree_util.tree_map(lambda a: (a.shape, a.dtype, float(a.sum())), flax_norm)
