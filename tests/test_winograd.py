"""Winograd F(2x2, 3x3) convolutions (spgd_jax/models/adm/_winograd.py): the algorithm exact with float32
products, bfloat16's error with bfloat16 ones, gradients, and which convolutions take the route."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from spgd_jax.models.adm import _conv, _winograd

SHAPES = [(1, 8, 8, 3, 5), (2, 16, 12, 32, 32), (3, 4, 6, 64, 16)]  # (B, H, W, C, D): even H, W


def _plain(x, kernel, padding=((1, 1), (1, 1)), strides=(1, 1)):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=lax.Precision.HIGHEST)


def _inputs(shape, seed=0):
    b, h, w, c, d = shape
    kx, kk = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (b, h, w, c)), jax.random.normal(kk, (3, 3, c, d)) / np.sqrt(9 * c)


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_products_give_the_convolution_to_round_off(shape):
    x, kernel = _inputs(shape)
    got = _winograd._winograd(x, kernel, jnp.float32)
    np.testing.assert_allclose(got, _plain(x, kernel), atol=2e-5 * float(jnp.abs(x).max()), rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_bfloat16_products_have_bfloat16_error(shape):
    x, kernel = _inputs(shape, seed=1)
    ref = np.asarray(_plain(x, kernel))
    got = np.asarray(_winograd.winograd_conv3x3(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)), np.float32)
    rel = np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref ** 2))
    assert 1e-4 < rel < 2e-2  # rounded (not float32) but within a few bfloat16 ulps (2^-8 = 3.9e-3)


def test_gradients_are_the_convolutions_gradients():
    x, kernel = _inputs((2, 8, 10, 16, 8), seed=2)
    xb, kb = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    weights = jax.random.normal(jax.random.key(3), (2, 8, 10, 8))

    def loss(conv):
        return lambda x, k: jnp.sum(conv(x, k).astype(jnp.float32) * weights)

    dx, dk = jax.grad(loss(_winograd.winograd_conv3x3), argnums=(0, 1))(xb, kb)
    rx, rk = jax.grad(loss(_plain), argnums=(0, 1))(x, kernel)
    assert dx.dtype == dk.dtype == jnp.bfloat16
    for got, ref in ((dx, rx), (dk, rk)):
        got, ref = np.asarray(got, np.float32), np.asarray(ref)
        assert np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref ** 2)) < 2e-2
    # Under vmap (the samplers' per-image gradient) too.
    one = lambda x, w: jnp.sum(_winograd.winograd_conv3x3(x[None], kb).astype(jnp.float32) * w)
    per_image = jax.vmap(jax.grad(one))(xb, weights)
    np.testing.assert_allclose(np.asarray(per_image, np.float32), np.asarray(dx, np.float32), atol=0.05)


def test_only_bfloat16_same_3x3_convolutions_take_the_route(monkeypatch):
    calls = []
    monkeypatch.setattr(_winograd, "winograd_conv3x3", lambda x, k: calls.append(x.shape) or _plain(x, k))
    x, kernel = _inputs((1, 8, 8, 4, 4))
    xb, kb = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    same = ((1, 1), (1, 1))
    dims = ("NHWC", "HWIO", "NHWC")
    _winograd.conv_general_dilated(xb, kb, (1, 1), same, dimension_numbers=dims)
    assert calls == [(1, 8, 8, 4)]
    # float32 (bit for bit the plain route), stride 2, odd sizes, other padding, 1x1 kernels: lax's route.
    f32 = _winograd.conv_general_dilated(x, kernel, (1, 1), same, dimension_numbers=dims)
    np.testing.assert_array_equal(f32, _conv.conv_general_dilated(x, kernel, (1, 1), same, dimension_numbers=dims))
    _winograd.conv_general_dilated(xb, kb, (2, 2), same, dimension_numbers=dims)
    _winograd.conv_general_dilated(xb[:, :7], kb, (1, 1), same, dimension_numbers=dims)
    _winograd.conv_general_dilated(xb, kb, (1, 1), ((0, 0), (0, 0)), dimension_numbers=dims)
    _winograd.conv_general_dilated(xb, kb[:1, :1], (1, 1), ((0, 0), (0, 0)), dimension_numbers=dims)
    assert calls == [(1, 8, 8, 4)]
