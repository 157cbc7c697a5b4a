"""The HWIO-gradient convolution: same values and gradients as lax, and no swapped kernels in loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from spgd_jax.models.adm._conv import conv_general_dilated

DN = ("NHWC", "HWIO", "NHWC")


def _lax(x, k, stride, padding):
    return lax.conv_general_dilated(x, k, (stride, stride), padding, dimension_numbers=DN)


def _ours(x, k, stride, padding):
    return conv_general_dilated(x, k, (stride, stride), padding, dimension_numbers=DN)


@pytest.mark.parametrize("stride, padding, ksize", [(1, ((1, 1), (1, 1)), 3), (2, ((1, 1), (1, 1)), 3), (1, ((0, 0), (0, 0)), 1)])
def test_values_and_gradients_equal_lax(stride, padding, ksize):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 15, 18, 5)), jnp.float32)  # odd and even sides
    k = jnp.asarray(rng.normal(size=(ksize, ksize, 5, 7)), jnp.float32)
    np.testing.assert_allclose(_ours(x, k, stride, padding), _lax(x, k, stride, padding), rtol=1e-6, atol=1e-6)
    loss = lambda conv: lambda x, k: jnp.sum(jnp.sin(conv(x, k, stride, padding)))
    expected = jax.grad(loss(_lax), (0, 1))(x, k)
    actual = jax.grad(loss(_ours), (0, 1))(x, k)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)


def _compiled_loop(conv):
    k = jnp.ones((3, 3, 4, 4)) * 0.1
    grad = jax.grad(lambda x: jnp.sum(conv(x, k, 1, ((1, 1), (1, 1))) ** 2))
    loop = jax.jit(lambda x: lax.fori_loop(0, 2, lambda i, x: x - 0.1 * grad(x), x))
    return loop.lower(jnp.ones((1, 8, 8, 4))).compile().as_text()


def test_no_swapped_kernel_convolution_inside_loops_on_cpu():
    if jax.default_backend() != "cpu":
        pytest.skip("the layout issue is XLA:CPU's")
    assert "01oi" in _compiled_loop(_lax)  # what plain lax emits: the slow path this module avoids
    assert "01oi" not in _compiled_loop(_ours)
