"""The UNet's attention with a hand-written gradient (spgd_jax.models.adm._attention) against jax.grad of the
plain einsum-softmax-einsum formulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from custom_vjp_checks import assert_matches_plain

from spgd_jax.models.adm._attention import attention


def plain(q, k, v):
    logits = jnp.einsum("bthc,bshc->bhts", q, k)
    weight = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
    return jnp.einsum("bhts,bshc->bthc", weight, v)


def _inputs(shape, dtype):
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, weight = (jax.random.normal(key, shape) for key in keys)
    return (2.0 * q).astype(dtype), k.astype(dtype), v.astype(dtype), weight  # peaked weights: every term matters


@pytest.mark.parametrize("shape", [(2, 64, 4, 16), (1, 256, 6, 16), (3, 10, 1, 8)])  # the 8 / 16 px blocks, odd sizes
def test_values_and_gradients_match_the_plain_attention(shape):
    q, k, v, weight = _inputs(shape, jnp.float32)
    assert_matches_plain(attention, plain, (q, k, v), weight)

def test_gradients_under_vmap_and_in_bfloat16():
    q, k, v, weight = _inputs((3, 1, 16, 2, 8), jnp.float32)
    per_image = lambda fn: jax.vmap(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * weight[0]), argnums=(0, 1, 2)))
    for ours, reference in zip(per_image(attention)(q, k, v), per_image(plain)(q, k, v)):
        np.testing.assert_allclose(ours, reference, atol=1e-5 * float(jnp.max(jnp.abs(reference))))
    q, k, v, _ = _inputs((2, 16, 2, 8), jnp.bfloat16)
    assert attention(q, k, v).dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(attention(q, k, v), np.float32), np.asarray(plain(q, k, v), np.float32),
                               atol=3e-2)
