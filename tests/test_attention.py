"""The UNet's attention with a hand-written gradient (spgd_jax.models.adm._attention) against jax.grad of the
plain einsum-softmax-einsum formulation, on both of its routes: the native CPU kernels
(spgd_jax.xla_setup.attention_kernels) and XLA's ops; the kernels' accuracy, vmap, errors, build and cache."""

import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from custom_vjp_checks import assert_matches_plain
from native_kernel_checks import (assert_built_once_with_fallbacks, assert_stored_gradient_reads_back, both_routes,
                                  needs)

from spgd_jax.models.adm._attention import attention
from spgd_jax.xla_setup import attention_kernels


def plain(q, k, v):
    logits = jnp.einsum("bthc,bshc->bhts", q, k)
    weight = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
    return jnp.einsum("bhts,bshc->bthc", weight, v)


def plain_float64(q, k, v):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bthc,bshc->bhts", q, k)
    weight = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return np.einsum("bhts,bshc->bthc", weight / weight.sum(axis=-1, keepdims=True), v)


def _inputs(shape, dtype, keys_shape=None, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    keys_shape = keys_shape or shape
    q, weight = jax.random.normal(keys[0], shape), jax.random.normal(keys[3], shape)
    k, v = jax.random.normal(keys[1], keys_shape), jax.random.normal(keys[2], keys_shape)
    return (2.0 * q).astype(dtype), k.astype(dtype), v.astype(dtype), weight  # peaked weights: every term matters


needs_kernels = needs(attention_kernels, "attention kernels")
route = both_routes(attention_kernels, "attention kernels")  # each test that takes it: kernels, XLA's ops


def _uses_kernels(fn, *args) -> bool:
    text = jax.jit(fn).lower(*args).as_text()
    return attention_kernels.FORWARD_TARGET in text


def _gradients(q, k, v, g):
    out, vjp = jax.vjp(attention, q, k, v)
    return (out, *vjp(g))


# the 8 / 16 px blocks (heads of 16 channels), odd sizes, more keys than queries, wide heads
@pytest.mark.parametrize("shape, keys", [((2, 64, 4, 16), 64), ((1, 256, 6, 16), 256), ((3, 10, 1, 8), 10),
                                         ((2, 33, 3, 40), 21), ((1, 5, 2, 64), 70)])
def test_values_and_gradients_match_the_plain_attention(shape, keys, route):
    q, k, v, weight = _inputs(shape, jnp.float32, shape[:1] + (keys,) + shape[2:])
    assert _uses_kernels(attention, q, k, v) == (route == "kernels")
    assert_matches_plain(attention, plain, (q, k, v), weight)
    exact = plain_float64(q, k, v)  # as close to it as XLA's float32 ops are
    assert np.max(np.abs(attention(q, k, v) - exact)) <= 1.5 * np.max(np.abs(plain(q, k, v) - exact)) + 1e-6


def test_gradients_under_vmap(route):
    q, k, v, weight = _inputs((3, 1, 16, 2, 8), jnp.float32)
    assert _uses_kernels(jax.vmap(attention), q, k, v) == (route == "kernels")
    per_image = lambda fn: jax.vmap(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * weight[0]), argnums=(0, 1, 2)))
    for ours, reference in zip(per_image(attention)(q, k, v), per_image(plain)(q, k, v)):
        np.testing.assert_allclose(ours, reference, atol=1e-5 * float(jnp.max(jnp.abs(reference))))


def test_bfloat16_takes_xlas_ops():
    q, k, v, _ = _inputs((2, 16, 2, 8), jnp.bfloat16)
    assert not _uses_kernels(attention, q, k, v)
    assert attention(q, k, v).dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(attention(q, k, v), np.float32), np.asarray(plain(q, k, v), np.float32),
                               atol=3e-2)


def _gradients_float64(q, k, v, g):
    """out, dq, dk, dv of the plain formulation in float64."""
    q, k, v, g = (np.asarray(a, np.float64) for a in (q, k, v, g))
    logits = np.einsum("bthc,bshc->bhts", q, k)
    weight = np.exp(logits - logits.max(axis=-1, keepdims=True))
    weight /= weight.sum(axis=-1, keepdims=True)
    d_weight = np.einsum("bthc,bshc->bhts", g, v)
    d_logits = weight * (d_weight - np.sum(d_weight * weight, axis=-1, keepdims=True))
    return (np.einsum("bhts,bshc->bthc", weight, v), np.einsum("bhts,bshc->bthc", d_logits, k),
            np.einsum("bhts,bthc->bshc", d_logits, q), np.einsum("bhts,bthc->bshc", weight, g))


@needs_kernels
def test_kernels_are_as_accurate_as_xlas_ops_and_do_not_depend_on_threads(monkeypatch):
    q, k, v, g = _inputs((3, 64, 8, 16), jnp.float32, seed=1)
    q = 8.0 * q  # logits up to ~100: the softmax's shift matters
    native = jax.jit(_gradients)(q, k, v, g)
    assert all(np.array_equal(a, b) for a, b in zip(native, jax.jit(_gradients)(q, k, v, g)))
    monkeypatch.setattr(attention_kernels, "route", lambda: (False, "off for this test"))
    jax.clear_caches()
    assert not _uses_kernels(_gradients, q, k, v, g)
    xla = jax.jit(_gradients)(q, k, v, g)
    jax.clear_caches()
    for name, a, b, exact in zip(("out", "dq", "dk", "dv"), native, xla, _gradients_float64(q, k, v, g)):
        scale = np.max(np.abs(exact))
        assert np.max(np.abs(a - exact)) <= 1.5 * np.max(np.abs(b - exact)) + 1e-7 * scale, name


@needs_kernels
def test_non_finite_logits_give_the_nans_xlas_ops_give(monkeypatch):
    # A diverged run must stay visibly diverged (the samplers freeze images that turn non-finite).
    q, k, v, g = _inputs((2, 16, 2, 16), jnp.float32, seed=2)
    q, k = q.at[1, 3, 0, 5].set(jnp.nan), k.at[0, 7, 1, 2].set(jnp.inf)
    native = jax.jit(_gradients)(q, k, v, g)
    monkeypatch.setattr(attention_kernels, "route", lambda: (False, "off for this test"))
    jax.clear_caches()
    xla = jax.jit(_gradients)(q, k, v, g)
    jax.clear_caches()
    for name, a, b in zip(("out", "dq", "dk", "dv"), native, xla):
        assert np.isnan(b).any() and np.array_equal(np.isnan(a), np.isnan(b)), name
        np.testing.assert_allclose(np.where(np.isnan(b), 0, a), np.where(np.isnan(b), 0, b), atol=1e-4, err_msg=name)


@needs_kernels
def test_a_wrong_call_of_a_kernel_is_a_clear_error():
    call = jax.ffi.ffi_call(attention_kernels.FORWARD_TARGET, (jax.ShapeDtypeStruct((2, 5, 2, 16), jnp.float32),
                                                               jax.ShapeDtypeStruct((2, 2, 5), jnp.float32)))
    with pytest.raises(Exception, match="spgd_attention_forward: q .* do not match"):
        jax.block_until_ready(call(jnp.ones((2, 5, 2, 16)), jnp.ones((2, 7, 2, 16)), jnp.ones((2, 7, 3, 16))))


_REPORT = """
    import warnings
    warnings.simplefilter("always")
    import jax, jax.numpy as jnp
    from spgd_jax.models.adm._attention import attention
    from spgd_jax.xla_setup import attention_kernels
    x = (jnp.arange(2 * 16 * 2 * 16, dtype=jnp.float32).reshape(2, 16, 2, 16) % 7) / 7
    y = jax.jit(attention)(x, x, x)
    print("route", attention_kernels.route())
    print("y", round(float(y[1, 2, 1, 5]), 4))
"""


@pytest.mark.skipif(platform.system() != "Linux", reason="the kernels are built on Linux only")
def test_built_once_into_the_cache_and_loaded_by_the_next_process(tmp_path):
    assert_built_once_with_fallbacks(_REPORT, attention_kernels.HANDLERS, tmp_path)


@needs_kernels
def test_a_stored_program_that_calls_them_runs_in_a_fresh_process(tmp_path):
    assert_stored_gradient_reads_back(
        "from spgd_jax.models.adm._attention import attention",
        "x = (jnp.arange(2 * 16 * 2 * 16, dtype=jnp.float32).reshape(2, 16, 2, 16) % 7) / 7",
        "jnp.sum(jnp.sin(attention(x, 0.5 * x, x)))", attention_kernels.BACKWARD_TARGET, tmp_path)
