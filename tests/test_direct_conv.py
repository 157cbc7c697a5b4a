"""The native float32 3x3 convolution (spgd_jax/xla_setup/direct_conv.py, spgd_jax/models/adm/_direct.py), direct
and as Winograd's F(2x2, 3x3) and F(4x4, 3x3): the handler's values against a float64 convolution on shapes that
reach every code path (edges, partial blocks, the three register blockings, chunks and tasks of tiles), gradients against lax's,
vmap, which convolutions take the route and which algorithm, clear errors, the UNet through it against XLA's
convolutions, and the build in a fresh process (cached, no compiler, turned off)."""

from __future__ import annotations

import platform
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from native_kernel_checks import assert_built_once_with_fallbacks, assert_conv_vmaps, assert_stored_gradient_reads_back
from jax import lax

from spgd_jax.models.adm import _conv, _direct, _onednn, _winograd
from spgd_jax.xla_setup import direct_conv, onednn

needs_kernel = pytest.mark.skipif(not direct_conv.route()[0], reason=f"no direct kernel: {direct_conv.route()[1]}")

# (B, H, W, C, D) that Winograd leaves to the direct sums: 64 / 32 / 16 output channels (the three blockings of 6,
# 12 and 24 pixels), widths below, at and above a block with a partial last block, one row or one column, 3 input
# channels, output channels not in 16s (3, 20: stored through a mask), and too few tiles for either Winograd.
DIRECT_SHAPES = [(1, 6, 10, 64, 64), (2, 5, 7, 3, 16), (1, 1, 1, 5, 48), (3, 2, 13, 96, 32), (1, 6, 14, 8, 128),
                 (2, 9, 1, 7, 16), (1, 3, 31, 12, 96), (2, 4, 25, 17, 32), (2, 5, 7, 32, 3), (1, 6, 9, 8, 20)]
# Shapes F(2x2, 3x3) takes in float32 (even sides not both in 4s, 48 tiles or more, C a multiple of 16), which the
# direct sums are tested on too: the three blockings, several chunks of tiles (96 for 16 channels) and tasks, a
# last block of tiles with fewer than P, a tile count at the minimum, an RGB output, 20 output channels.
WINOGRAD_SHAPES = [(1, 18, 18, 32, 64), (2, 34, 22, 16, 16), (4, 6, 34, 48, 32), (2, 14, 26, 128, 64),
                   (1, 14, 14, 16, 48), (1, 18, 18, 32, 3), (2, 14, 18, 16, 20)]
# Shapes F(4x4, 3x3) takes (sides in 4s, 4 tiles or more, C a multiple of 16): the same cases, the UNet's 8 and
# 16 px images, a tile count at the minimum.
WINOGRAD4_SHAPES = [(1, 16, 16, 32, 64), (2, 48, 40, 16, 16), (3, 16, 12, 48, 32), (2, 8, 24, 128, 64),
                    (1, 8, 8, 64, 64), (1, 16, 16, 32, 3), (2, 12, 16, 16, 20)]
CONVS = {"direct": _direct.direct_conv3x3, "winograd2x2": _direct.winograd_float32_conv3x3,
         "winograd4x4": _direct.winograd_float32_conv3x3}
# Per algorithm: its shapes, and the error it may add to a float32 convolution's, as a multiple of XLA's own
# (F(4x4, 3x3)'s larger transform coefficients: 4-32x in these tests, about 1e-5 of the output's scale).
SHAPES = {"direct": DIRECT_SHAPES + WINOGRAD_SHAPES + WINOGRAD4_SHAPES, "winograd2x2": WINOGRAD_SHAPES,
          "winograd4x4": WINOGRAD4_SHAPES}
XLA_ERRORS = {"direct": 8, "winograd2x2": 8, "winograd4x4": 64}
# The same for the tolerances of the tests against lax's gradients below.
ROUND_OFF = {"direct": 1, "winograd2x2": 1, "winograd4x4": 10}


def _float64(x, kernel):
    """The convolution in float64 (NumPy), x (B, H, W, C), kernel (3, 3, C, D)."""
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    h, w = x.shape[1:3]
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(padded[:, i:i + h, j:j + w] @ kernel[i, j] for i in range(3) for j in range(3))


def _lax(x, kernel):
    return lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_conv.NHWC,
                                    precision=lax.Precision.HIGHEST)


PLAIN = dict(bias=False, residual=False)  # the handler's attributes for a call with nothing added to its output


def _inputs(shape, seed=0):
    b, h, w, c, d = shape
    kx, kk = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (b, h, w, c)), jax.random.normal(kk, (3, 3, c, d)) / np.sqrt(9 * c)


@needs_kernel
@pytest.mark.parametrize("name,shape", [(name, s) for name, shapes in SHAPES.items() for s in shapes])
def test_values_are_the_convolution_to_float32_round_off(name, shape):
    x, kernel = _inputs(shape)
    got = jax.jit(CONVS[name])(x, kernel)
    assert got.dtype == jnp.float32 and got.shape == shape[:3] + (shape[4],)
    ref = _float64(x, kernel)
    # Sums of 9 C products in float32: within a few ulps of the terms' scale (|terms| about 1 here); F(4x4, 3x3)
    # within ten times that.
    atol = (20e-6 if name == "winograd4x4" else 2e-6) * np.sqrt(9 * shape[3])
    np.testing.assert_allclose(got, ref, rtol=0, atol=atol)
    xla_error = np.abs(np.asarray(_lax(x, kernel)) - ref).max()
    assert np.abs(np.asarray(got) - ref).max() <= XLA_ERRORS[name] * xla_error + 1e-7  # as close as XLA's, to a factor


@needs_kernel
def test_winograd_takes_the_shapes_it_can_and_leaves_the_rest_to_the_direct_sums():
    for tile, shapes in ((2, WINOGRAD_SHAPES), (4, WINOGRAD4_SHAPES)):
        for shape in shapes:
            assert _direct.winograd_tile(*shape[1:4]) == tile and _direct.uses_winograd(*shape[1:4])
            x, kernel = _inputs(shape, seed=1)
            # Another order of the sums: not the direct kernel's bits (a call that fell back would be).
            assert not np.array_equal(_direct.winograd_float32_conv3x3(x, kernel), _direct.direct_conv3x3(x, kernel))
    # 21 tiles of 2x2 and sides not in 4s; one 4x4 tile; 24 input channels
    for shape in DIRECT_SHAPES + [(1, 6, 14, 16, 16), (1, 4, 4, 16, 16), (1, 16, 16, 24, 16)]:
        assert _direct.winograd_tile(*shape[1:4]) == 0 and not _direct.uses_winograd(*shape[1:4])
        x, kernel = _inputs(shape, seed=1)
        np.testing.assert_array_equal(_direct.winograd_float32_conv3x3(x, kernel), _direct.direct_conv3x3(x, kernel))
    # Decided per image: an image's result is the same alone as in a batch.
    x, kernel = _inputs((4, 16, 16, 16, 32), seed=2)
    np.testing.assert_array_equal(_direct.winograd_float32_conv3x3(x, kernel)[2:3],
                                  _direct.winograd_float32_conv3x3(x[2:3], kernel))


# Per algorithm, (B, H, W) of the images for the tests below: the direct kernel's odd sides, F(2x2, 3x3)'s 51
# tiles, F(4x4, 3x3)'s 12.
SIZES = {"direct": (3, 6, 7), "winograd2x2": (3, 6, 34), "winograd4x4": (3, 8, 24)}


@needs_kernel
@pytest.mark.parametrize("name", CONVS)
def test_gradients_are_the_convolutions_gradients(name):
    x, kernel = _inputs(SIZES[name] + (16, 32), seed=2)
    weights = jax.random.normal(jax.random.key(3), SIZES[name] + (32,))

    def loss(conv):
        return lambda x, k: jnp.sum(jnp.sin(conv(x, k)) * weights)

    got = jax.grad(loss(CONVS[name]), argnums=(0, 1))(x, kernel)
    ref = jax.grad(loss(_lax), argnums=(0, 1))(x, kernel)
    for g, r in zip(got, ref):  # the kernel's: sums over 500 pixels of terms moved by the forward's round-off
        np.testing.assert_allclose(g, r, rtol=1e-5 * ROUND_OFF[name], atol=1e-6 * ROUND_OFF[name] * np.abs(r).max())
    # A convolution to 3 channels: computed in 16s, 3 stored; its input gradient is a 3 -> 16 one (direct: 3 input
    # channels).
    x, kernel = _inputs(SIZES[name] + (16, 3), seed=4)
    got = jax.grad(lambda x: jnp.sum(CONVS[name](x, kernel) ** 2))(x)
    np.testing.assert_allclose(got, jax.grad(lambda x: jnp.sum(_lax(x, kernel) ** 2))(x), rtol=1e-5 * ROUND_OFF[name],
                               atol=1e-5 * ROUND_OFF[name])


@needs_kernel
@pytest.mark.parametrize("name", CONVS)
def test_vmap_over_images_kernels_or_both(name):
    assert_conv_vmaps(CONVS[name], *_inputs(SIZES[name] + (16, 16), seed=4))


@needs_kernel
@pytest.mark.parametrize("name", CONVS)
def test_input_gradients_with_a_kernel_per_image_and_a_kernel_that_changes_in_place(name):
    conv = CONVS[name]
    x, kernel = _inputs(SIZES[name] + (16, 32), seed=6)
    kernels = jnp.stack([kernel, -kernel, 2 * kernel])
    loss = lambda conv: lambda xi, k: jnp.sum(jnp.sin(conv(xi[None], k)))
    got = jax.vmap(jax.grad(loss(conv)))(x, kernels)
    tol = 1e-5 * ROUND_OFF[name]
    np.testing.assert_allclose(got, jax.vmap(jax.grad(loss(_lax)))(x, kernels), rtol=tol, atol=tol)

    # The handler keeps the kernels it prepared (flipped, transformed): a kernel updated in a loop (XLA may keep
    # it at one address) must be prepared again from its new values.
    def descend(conv):
        def step(_, carry):
            x, k = carry
            g = jax.grad(lambda x: jnp.sum(jnp.sin(conv(x, k))))(x)
            return x - 0.1 * g, k * 0.5 + 0.01
        return jax.jit(lambda x, k: lax.fori_loop(0, 4, step, (x, k))[0])

    np.testing.assert_allclose(descend(conv)(x, kernel), descend(_lax)(x, kernel), rtol=tol, atol=tol)


@needs_kernel
@pytest.mark.parametrize("name", CONVS)
def test_runs_inside_scan_and_an_empty_batch(name):
    conv = CONVS[name]
    b, h, w = SIZES[name]
    x, kernel = _inputs((b, h, w, 16, 16), seed=5)

    def step(h, _):
        return jnp.tanh(conv(h, kernel)), None

    out, _ = jax.jit(lambda x: lax.scan(step, x, None, length=3))(x)
    ref = x
    for _ in range(3):
        ref = jnp.tanh(conv(ref, kernel))
    np.testing.assert_array_equal(out, ref)
    assert conv(x[:0], kernel).shape == (0, h, w, 16)
    np.testing.assert_array_equal(conv(x[..., :0], kernel[:, :, :0]), jnp.zeros((b, h, w, 16)))


needs_bf16_products = pytest.mark.skipif(not direct_conv.bf16_products()[0],
                                         reason=f"no bfloat16 products: {direct_conv.bf16_products()[1]}")


def _bfloat16_winograd(x, kernel):
    """Winograd's F(2x2, 3x3) in JAX with its transformed operands rounded to bfloat16 and float32 sums (the
    bfloat16 route of spgd_jax/models/adm/_winograd.py), with the flipped-kernel input gradient."""
    return _winograd._winograd(x, kernel, jnp.bfloat16)


@needs_bf16_products
@pytest.mark.parametrize("shape", WINOGRAD_SHAPES + WINOGRAD4_SHAPES)
def test_bfloat16_products_are_winograds_with_its_operands_rounded_to_bfloat16(shape):
    x, kernel = _inputs(shape, seed=9)
    got = jax.jit(_direct.winograd_bfloat16_conv3x3)(x, kernel)
    assert got.dtype == jnp.float32 and got.shape == shape[:3] + (shape[4],)
    # The same roundings as the JAX transcription; the sums in another order (float32 round-off).
    np.testing.assert_allclose(got, _bfloat16_winograd(x, kernel), rtol=0, atol=2e-6 * np.sqrt(9 * shape[3]))
    # bfloat16's error, not float32's: a hundred times the float32 kernel's (a thousand times F(2x2, 3x3)'s).
    error = np.abs(np.asarray(got) - _float64(x, kernel)).max()
    assert 1e2 * np.abs(np.asarray(_direct.winograd_float32_conv3x3(x, kernel)) - _float64(x, kernel)).max() < error
    assert error < 2 ** -7 * np.abs(_float64(x, kernel)).max()


@needs_bf16_products
def test_bfloat16_products_leave_the_shapes_winograd_cannot_take_to_float32_direct_sums():
    for shape in DIRECT_SHAPES[1:4]:  # odd sides, one pixel, 96 channels on 2 x 13 px
        assert not _direct.uses_winograd(*shape[1:4], bf16_products=True)
        x, kernel = _inputs(shape, seed=10)
        np.testing.assert_array_equal(_direct.winograd_bfloat16_conv3x3(x, kernel), _direct.direct_conv3x3(x, kernel))
    # F(2x2, 3x3) always, with 8 x 8 px images (16 tiles) too; F(2x2, 3x3) needs 48 tiles in float32.
    assert _direct.winograd_tile(8, 8, 64, bf16_products=True) == 2 and _direct.winograd_tile(8, 8, 64) == 4
    assert _direct.winograd_tile(6, 10, 64, bf16_products=True) == 0
    x, kernel = _inputs((1, 8, 8, 64, 64), seed=10)
    np.testing.assert_allclose(_direct.winograd_bfloat16_conv3x3(x, kernel), _bfloat16_winograd(x, kernel), rtol=0,
                               atol=2e-6 * 24)


@needs_bf16_products
def test_bfloat16_products_gradients_vmap_and_a_kernel_that_changes():
    x, kernel = _inputs(SIZES["winograd4x4"] + (16, 32), seed=11)
    weights = jax.random.normal(jax.random.key(12), SIZES["winograd4x4"] + (32,))
    loss = lambda conv: lambda x: jnp.sum(jnp.sin(conv(x, kernel)) * weights)  # noqa: E731
    reference = _conv.with_same_3x3_gradient(_bfloat16_winograd)
    np.testing.assert_allclose(jax.grad(loss(_direct.winograd_bfloat16_conv3x3))(x), jax.grad(loss(reference))(x),
                               rtol=1e-5, atol=1e-6)
    assert_conv_vmaps(_direct.winograd_bfloat16_conv3x3, *_inputs(SIZES["winograd4x4"] + (16, 16), seed=13))
    # A kernel prepared in bfloat16 pairs is not the float32 kernel's preparation, nor that of other values.
    step = jax.jit(lambda x, k: lax.fori_loop(0, 3, lambda _, c: (jnp.tanh(_direct.winograd_bfloat16_conv3x3(
        _direct.winograd_float32_conv3x3(c[0], c[1]), c[1])), c[1] * 0.5), (x, k))[0])
    plain = lambda x, k: lax.fori_loop(0, 3, lambda _, c: (jnp.tanh(reference(  # noqa: E731
        _direct.winograd_float32_conv3x3(c[0], c[1]), c[1])), c[1] * 0.5), (x, k))[0]
    kernel = _inputs(SIZES["winograd4x4"] + (16, 16), seed=14)[1]
    np.testing.assert_allclose(step(x[..., :16], kernel), plain(x[..., :16], kernel), rtol=1e-5, atol=1e-5)


def test_float32_convolutions_at_bfloat16_precision_take_one_route(monkeypatch):
    calls = []
    monkeypatch.setattr(_direct, "winograd_bfloat16_conv3x3", lambda x, k: calls.append("native") or _lax(x, k))
    monkeypatch.setattr(_onednn, "onednn_conv3x3", lambda x, k: calls.append("onednn") or _lax(x, k))
    x, kernel = _inputs((1, 8, 8, 16, 16))
    conv = lambda x, k: _onednn.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),  # noqa: E731
                                                     dimension_numbers=_conv.NHWC, precision="bfloat16")
    for native, amx, onednn_target, expected in [(True, False, "o", "native"), (True, True, "o", "onednn"),
                                                 (False, False, "o", "onednn"), (False, False, None, None)]:
        monkeypatch.setattr(direct_conv, "bf16_products", lambda native=native: (native, "stand-in"))
        monkeypatch.setattr(onednn, "uses_amx", lambda amx=amx: amx)
        monkeypatch.setattr(onednn, "conv_target", lambda target=onednn_target: target)
        calls.clear()
        conv(x, kernel)
        assert calls == ([expected] if expected else [])
        assert _onednn.float32_target() == {"native": direct_conv.TARGET, "onednn": "o", None: None}[expected]
    # bfloat16 networks stay with oneDNN.
    monkeypatch.setattr(direct_conv, "bf16_products", lambda: (True, "stand-in"))
    monkeypatch.setattr(onednn, "conv_target", lambda: "o")
    calls.clear()
    conv(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
    assert calls == ["onednn"]
    # Where the CPU lacks the instructions, a direct call says so.
    monkeypatch.setattr(direct_conv, "bf16_products", lambda: (False, "this CPU lacks AVX512-BF16"))
    with pytest.raises(RuntimeError, match=r"bfloat16-product convolution kernel is not available here \(this CPU "
                                           r"lacks AVX512-BF16\)"):
        _direct._checked_call("winograd_bfloat16_conv3x3", x, kernel, winograd=True, bf16_products=True)


def test_wrong_inputs_are_clear_errors(monkeypatch):
    x, kernel = _inputs((1, 8, 8, 4, 16))
    with pytest.raises(TypeError, match="float32 x and kernel, got bfloat16 and float32"):
        _direct.direct_conv3x3(x.astype(jnp.bfloat16), kernel)
    with pytest.raises(ValueError, match=r"kernel \(3, 3, C, D\), got \(1, 8, 8, 4\) and \(3, 3, 5, 16\)"):
        _direct.direct_conv3x3(x, jnp.zeros((3, 3, 5, 16)))
    with pytest.raises(ValueError, match=r"got \(8, 8, 4\) and"):
        _direct.direct_conv3x3(x[0], kernel)
    monkeypatch.setattr(direct_conv, "route", lambda: (False, "off for this test"))
    for conv in CONVS.values():
        with pytest.raises(RuntimeError, match=r"not available here \(off for this test\); use lax.conv_general_d"):
            conv(x, kernel)


@needs_kernel
def test_a_wrong_call_of_the_handler_is_a_clear_error():
    call = jax.ffi.ffi_call(direct_conv.TARGET, jax.ShapeDtypeStruct((1, 4, 4, 16), jnp.float32))
    token = jnp.zeros((), jnp.int32)
    direct, f2, f4 = np.int32(0), np.int32(2), np.int32(4)
    with pytest.raises(Exception, match="3x3 'same' convolution"):
        jax.block_until_ready(call(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 3, 16)), token, flipped=False,
                                   winograd=direct, bf16_products=False, **PLAIN))
    with pytest.raises(Exception, match="3x3 'same' convolution"):  # flipped: the kernel is (3, 3, out, in)
        jax.block_until_ready(call(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 3, 16)), token, flipped=True,
                                   winograd=direct, bf16_products=False, **PLAIN))
    sides_error = "winograd needs a height and width that are multiples of its tile and in channels a multiple of 16"
    with pytest.raises(Exception, match=sides_error):
        jax.block_until_ready(call(jnp.ones((1, 4, 4, 8)), jnp.ones((3, 3, 8, 16)), token, flipped=False,
                                   winograd=f2, bf16_products=False, **PLAIN))
    with pytest.raises(Exception, match="winograd is a tile of 2 or 4, or 0"):
        jax.block_until_ready(call(jnp.ones((1, 4, 4, 16)), jnp.ones((3, 3, 16, 16)), token, flipped=False,
                                   winograd=np.int32(3), bf16_products=False, **PLAIN))
    with pytest.raises(Exception, match="one token per kernel"):
        jax.block_until_ready(call(jnp.ones((1, 4, 4, 16)), jnp.ones((3, 3, 16, 16)), jnp.zeros(2, jnp.int32),
                                   flipped=True, winograd=direct, bf16_products=False, **PLAIN))
    call = jax.ffi.ffi_call(direct_conv.TARGET, jax.ShapeDtypeStruct((1, 5, 4, 16), jnp.float32))
    with pytest.raises(Exception, match=sides_error):
        jax.block_until_ready(call(jnp.ones((1, 5, 4, 16)), jnp.ones((3, 3, 16, 16)), token, flipped=False,
                                   winograd=f2, bf16_products=False, **PLAIN))
    call = jax.ffi.ffi_call(direct_conv.TARGET, jax.ShapeDtypeStruct((1, 6, 4, 16), jnp.float32))
    with pytest.raises(Exception, match=sides_error):  # even, not in 4s
        jax.block_until_ready(call(jnp.ones((1, 6, 4, 16)), jnp.ones((3, 3, 16, 16)), token, flipped=False,
                                   winograd=f4, bf16_products=False, **PLAIN))
    prepare = jax.ffi.ffi_call(direct_conv.PREPARE_TARGET, jax.ShapeDtypeStruct((), jnp.int32))
    with pytest.raises(Exception, match=r"spgd_prepare_conv3x3_kernel: the kernel is not \(..., 3, 3, in, out\)"):
        jax.block_until_ready(prepare(jnp.ones((3, 2, 16, 16)), flipped=True, winograd=direct, bf16_products=False))
    for winograd in (direct, f4):
        with pytest.raises(Exception, match=r"bfloat16 products are F\(2x2, 3x3\)'s only"):
            jax.block_until_ready(prepare(jnp.ones((3, 3, 16, 16)), flipped=False, winograd=winograd,
                                          bf16_products=True))
        with pytest.raises(Exception, match=r"bfloat16 products are F\(2x2, 3x3\)'s only"):
            jax.block_until_ready(call(jnp.ones((1, 6, 4, 16)), jnp.ones((3, 3, 16, 16)), token, flipped=False,
                                       winograd=winograd, bf16_products=True, **PLAIN))
    with pytest.raises(Exception, match="winograd is a tile of 2 or 4, or 0"):
        jax.block_until_ready(prepare(jnp.ones((3, 3, 16, 16)), flipped=False, winograd=np.int32(1),
                                      bf16_products=False))


@needs_kernel
@pytest.mark.parametrize("flipped, tile", [(False, 2), (True, 0), (True, 2), (False, 4), (True, 4)])
def test_a_token_whose_kernel_is_no_longer_kept_prepares_it_again(flipped, tile):
    side = 14 if tile == 2 else 16  # 49 tiles of 2x2 (sides not in 4s), or 16 of 4x4
    x, kernel = _inputs((2, side, side, 16, 32), seed=7)
    assert _direct.winograd_tile(side, side, 16) == (tile or 4)
    kernel = jnp.swapaxes(kernel, 2, 3) if flipped else kernel  # flipped: the buffer is (3, 3, out, in)
    out = jax.ShapeDtypeStruct((2, side, side, 32), jnp.float32)
    call = jax.ffi.ffi_call(direct_conv.TARGET, out)
    expected = _direct._call(x, kernel, flipped, tile > 0)
    for token in (-1, 0, 2**31 - 1):  # no preparation has these tokens
        got = call(x, kernel, jnp.array(token, jnp.int32), flipped=flipped, winograd=np.int32(tile),
                   bf16_products=False, **PLAIN)
        np.testing.assert_array_equal(got, expected)


def _plus_inputs(shape, seed):
    x, kernel = _inputs(shape, seed)
    kb, kr = jax.random.split(jax.random.key(seed + 1))
    return x, kernel, jax.random.normal(kb, kernel.shape[-1:]), jax.random.normal(kr, x.shape[:-1] + kernel.shape[-1:])


@needs_kernel
@pytest.mark.parametrize("shape,bf16", [(DIRECT_SHAPES[1], False), (DIRECT_SHAPES[8], False),
                                        (WINOGRAD_SHAPES[0], False), (WINOGRAD_SHAPES[6], False),
                                        (WINOGRAD4_SHAPES[1], False), (WINOGRAD4_SHAPES[5], False),
                                        (WINOGRAD_SHAPES[0], True), (WINOGRAD_SHAPES[5], True)])
def test_bias_and_residual_added_in_the_call_are_the_additions_after_it_bit_for_bit(shape, bf16):
    if bf16 and not direct_conv.bf16_products()[0]:
        pytest.skip("no AVX512-BF16")
    x, kernel, bias, residual = _plus_inputs(shape, seed=11)
    conv = _direct.winograd_bfloat16_conv3x3 if bf16 else _direct.winograd_float32_conv3x3

    def after(x, kernel, bias, residual):  # what nn.Conv and the ResBlock's residual addition compute
        y = conv(x, kernel) + bias
        return y if residual is None else residual + y

    for r in (residual, None):
        np.testing.assert_array_equal(_direct.conv3x3_plus(x, kernel, bias, r, bf16), after(x, kernel, bias, r))
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)) * jnp.arange(a[3].size).reshape(a[3].shape) / a[3].size)
    fused = jax.grad(loss(lambda *a: _direct.conv3x3_plus(*a, bf16)), argnums=(0, 1, 2, 3))(x, kernel, bias, residual)
    plain = jax.grad(loss(after), argnums=(0, 1, 2, 3))(x, kernel, bias, residual)
    for name, got, want in zip(("x", "kernel", "bias", "residual"), fused, plain):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * float(jnp.abs(want).max()), err_msg=name)
    np.testing.assert_array_equal(fused[0], plain[0])  # the input gradient: the same call
    np.testing.assert_array_equal(fused[3], plain[3])


@needs_kernel
def test_bias_and_residual_follow_vmaps_images_and_kernels():
    x, kernel, bias, residual = _plus_inputs((3, 16, 16, 16, 32), seed=12)
    expected = (_direct.winograd_float32_conv3x3(x, kernel) + bias) + residual
    per_image = jax.vmap(lambda xi, ri: _direct.conv3x3_plus(xi[None], kernel, bias, ri[None])[0])(x, residual)
    np.testing.assert_array_equal(per_image, expected)
    # kernels and biases batched, x and the residual shared: each kernel's images take the same residual
    kernels, biases = jnp.stack([kernel, -kernel]), jnp.stack([bias, 2 * bias])
    grouped = jax.vmap(lambda k, b: _direct.conv3x3_plus(x, k, b, residual))(kernels, biases)
    for g in range(2):
        want = (_direct.winograd_float32_conv3x3(x, kernels[g]) + biases[g]) + residual
        np.testing.assert_array_equal(grouped[g], want)


@needs_kernel
def test_the_networks_convolution_plus_takes_the_native_call_where_the_convolution_would(monkeypatch):
    import flax.linen as nn
    from spgd_jax.models.adm import _network

    x, kernel, bias, residual = _plus_inputs((2, 16, 16, 16, 32), seed=14)
    after = lambda precision: _onednn.conv_general_dilated(  # noqa: E731
        x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_conv.NHWC, precision=precision) + bias + residual
    for precision in (None, "bfloat16"):
        text = jax.jit(lambda *a: _onednn.conv3x3_plus(*a, precision=precision)).lower(
            x, kernel, bias, residual).as_text()
        native = precision is None or _onednn.float32_target() == direct_conv.TARGET
        assert ("bias = true" in text and "residual = true" in text) == native, precision
        np.testing.assert_array_equal(_onednn.conv3x3_plus(x, kernel, bias, residual, precision), after(precision))
    # the module: nn.Conv's parameters and values, plus the residual
    module = _network._Conv3x3Plus(32, jnp.float32)
    params = module.init(jax.random.key(0), x)
    reference = nn.Conv(32, (3, 3), padding=((1, 1), (1, 1)), conv_general_dilated=_onednn.conv_general_dilated)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, reference.init(jax.random.key(0), x))
    np.testing.assert_array_equal(module.apply(params, x, residual), reference.apply(params, x) + residual)
    monkeypatch.setattr(direct_conv, "route", lambda: (False, "off for this test"))  # elsewhere: the additions
    text = jax.jit(lambda *a: _onednn.conv3x3_plus(*a)).lower(x, kernel, bias, residual).as_text()
    assert direct_conv.TARGET not in text
    np.testing.assert_allclose(_onednn.conv3x3_plus(x, kernel, bias, residual), after(None), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_wrong_addends_are_clear_errors():
    x, kernel, bias, residual = _plus_inputs((1, 8, 8, 16, 16), seed=13)
    with pytest.raises(ValueError, match=r"a float32 bias \(16,\), got float32 \(8,\)"):
        _direct.conv3x3_plus(x, kernel, bias[:8], residual)
    with pytest.raises(ValueError, match=r"a float32 residual shaped as the output \(1, 8, 8, 16\), got float32 "
                                         r"\(1, 8, 4, 16\)"):
        _direct.conv3x3_plus(x, kernel, bias, residual[:, :, :4])
    call = jax.ffi.ffi_call(direct_conv.TARGET, jax.ShapeDtypeStruct((1, 8, 8, 16), jnp.float32))
    token, direct = jnp.zeros((), jnp.int32), np.int32(0)
    attributes = dict(flipped=False, winograd=direct, bf16_products=False)
    with pytest.raises(Exception, match="one operand after the tokens per addend"):
        jax.block_until_ready(call(x, kernel, token, bias, bias=True, residual=True, **attributes))
    with pytest.raises(Exception, match=r"the bias is not \(..., out channels\), one per kernel"):
        jax.block_until_ready(call(x, kernel, token, bias[:8], bias=True, residual=False, **attributes))
    with pytest.raises(Exception, match="the residual is not shaped as the output"):
        jax.block_until_ready(call(x, kernel, token, residual[:, :4], bias=False, residual=True, **attributes))
    # no input channels: no products, the output is the addends alone
    empty = call(jnp.zeros((1, 8, 8, 0)), jnp.zeros((3, 3, 0, 16)), token, bias, residual, bias=True, residual=True,
                 **attributes)
    np.testing.assert_array_equal(empty, (jnp.zeros(16) + bias) + residual)


@needs_kernel
def test_the_kernels_are_prepared_once_outside_a_loop_that_does_not_change_them():
    # SPGD's loops pass the same weights at every step: their preparation (comparison, flip, Winograd's transform)
    # depends on nothing else, so XLA hoists it out of the loops, and the convolutions inside take its tokens.
    x, kernel = _inputs((2, 16, 16, 16, 16), seed=8)
    conv = _direct.winograd_float32_conv3x3

    def descend(x, kernel):  # the weights an argument, as a Denoiser passes them
        def step(_, x):
            return x - 0.1 * jax.grad(lambda x: jnp.sum(jnp.sin(conv(x, kernel))))(x)
        return lax.fori_loop(0, 3, lambda i, x: lax.fori_loop(0, 2, step, x), x)

    text = jax.jit(descend).lower(x, kernel).compile().as_text()
    computations = {part.split("\n", 1)[0]: part for part in re.split(r"\n(?=\S)", text)}
    calling = [name for name, body in computations.items() if direct_conv.PREPARE_TARGET in body]
    assert len(calling) == 1 and calling[0].startswith("ENTRY"), calling
    assert computations[calling[0]].count(direct_conv.PREPARE_TARGET) == 2  # Winograd's kernel, the flipped one
    assert any(direct_conv.TARGET + '"' in body for name, body in computations.items() if name != calling[0])
    ref = x
    for _ in range(6):
        ref = ref - 0.1 * jax.grad(lambda x: jnp.sum(jnp.sin(_lax(x, kernel))))(ref)
    np.testing.assert_allclose(jax.jit(descend)(x, kernel), ref, rtol=1e-5, atol=1e-5)


def test_only_float32_same_3x3_convolutions_on_the_cpu_take_the_route(monkeypatch):
    calls = []
    monkeypatch.setattr(direct_conv, "route", lambda: (True, "stand-in"))
    monkeypatch.setattr(_direct, "winograd_float32_conv3x3", lambda x, k: calls.append(x.shape) or _lax(x, k))
    x, kernel = _inputs((1, 8, 8, 4, 16))
    same, dims = ((1, 1), (1, 1)), ("NHWC", "HWIO", "NHWC")
    _onednn.conv_general_dilated(x, kernel, (1, 1), same, dimension_numbers=dims)
    _onednn.conv_general_dilated(x[:, :7], kernel, (1, 1), same, dimension_numbers=dims)  # odd sizes too
    assert calls == [(1, 8, 8, 4), (1, 7, 8, 4)]
    # Stride 2, other padding, 1x1 kernels, float16: lax's convolution.
    _onednn.conv_general_dilated(x, kernel, (2, 2), same, dimension_numbers=dims)
    _onednn.conv_general_dilated(x, kernel, (1, 1), ((0, 0), (0, 0)), dimension_numbers=dims)
    _onednn.conv_general_dilated(x, kernel[:1, :1], (1, 1), ((0, 0), (0, 0)), dimension_numbers=dims)
    _onednn.conv_general_dilated(x.astype(jnp.float16), kernel.astype(jnp.float16), (1, 1), same,
                                 dimension_numbers=dims)
    assert len(calls) == 2
    monkeypatch.setattr(direct_conv, "route", lambda: (False, "off for this test"))
    np.testing.assert_array_equal(_direct.conv_general_dilated(x, kernel, (1, 1), same, dimension_numbers=dims),
                                  _conv.conv_general_dilated(x, kernel, (1, 1), same, dimension_numbers=dims))
    assert len(calls) == 2


@needs_kernel
def test_unet_through_the_kernel_agrees_with_xlas_convolutions(monkeypatch):
    from spgd_jax.models.adm import CONFIGS, UNet

    model = UNet(CONFIGS["tiny16"])
    x, t = jax.random.normal(jax.random.key(0), (2, 16, 16, 3)), jnp.array([10.0, 500.0])
    params = model.init(jax.random.key(1), x, t)["params"]
    leaves, tree = jax.tree_util.tree_flatten(params)  # every weight random (zero-initialised layers hide nothing)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree_util.tree_unflatten(tree, [a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])

    def run():
        forward = lambda x: model.apply({"params": params}, x, t)
        loss = lambda x: jnp.sum(forward(x) ** 2)
        return forward(x), jax.grad(loss)(x), jax.jit(jax.grad(loss)).lower(x).as_text()

    out, grad, text = run()
    assert text.count(direct_conv.TARGET) >= 2  # forward and input-gradient convolutions
    monkeypatch.setattr(direct_conv, "route", lambda: (False, "off for this test"))
    plain_out, plain_grad, plain_text = run()
    assert direct_conv.TARGET not in plain_text
    for got, ref in ((out, plain_out), (grad, plain_grad)):  # F(4x4, 3x3) at 16 and 8 px: about 1e-5 per layer
        scale = float(jnp.abs(ref).max())
        np.testing.assert_allclose(got, ref, rtol=0, atol=5e-5 * scale)


_REPORT = """
    import warnings
    warnings.simplefilter("always")
    import jax, jax.numpy as jnp
    from spgd_jax.models.adm import _onednn
    from spgd_jax.xla_setup import direct_conv
    x = jnp.arange(2 * 5 * 6 * 3, dtype=jnp.float32).reshape(2, 5, 6, 3) % 7
    k = jnp.arange(3 * 3 * 3 * 16, dtype=jnp.float32).reshape(3, 3, 3, 16) % 5 - 2
    y = jax.jit(lambda x, k: _onednn.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                                          dimension_numbers=("NHWC", "HWIO", "NHWC")))(x, k)
    print("route", direct_conv.route())
    print("y", float(jnp.abs(y).sum()))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64", reason="built on x86-64 Linux only")
def test_built_once_into_the_cache_and_loaded_by_the_next_process(tmp_path):
    assert_built_once_with_fallbacks(_REPORT, direct_conv.HANDLERS, tmp_path)  # integer sums: exact either way


@needs_kernel
def test_a_stored_program_that_calls_it_runs_in_a_fresh_process(tmp_path):
    assert_stored_gradient_reads_back(
        "from spgd_jax.models.adm import direct_conv3x3",
        "x = jnp.arange(2 * 6 * 6 * 4, dtype=jnp.float32).reshape(2, 6, 6, 4) % 7; "
        "k = jnp.arange(3 * 3 * 4 * 16, dtype=jnp.float32).reshape(3, 3, 4, 16) % 5 - 2",
        "jnp.sum(jnp.sin(direct_conv3x3(x, k)))", direct_conv.TARGET, tmp_path)
