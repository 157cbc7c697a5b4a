"""GroupNorm32's hand-written gradient (spgd_jax.models.adm._group_norm) against jax.grad of flax's plain one, and
GroupNorm32 + SiLU (+ the scale-shift) against jax.grad of their composition, on both routes: the native CPU
kernels (spgd_jax.xla_setup.group_norm_kernels) and XLA's ops; the kernels' accuracy, vmap, errors, build and
cache."""

import platform
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from custom_vjp_checks import assert_matches_plain
from native_kernel_checks import (assert_built_once_with_fallbacks, assert_stored_gradient_reads_back, both_routes,
                                  needs)

from spgd_jax.models.adm._config import NORM_EPS, NORM_GROUPS
from spgd_jax.models.adm import _group_norm
from spgd_jax.models.adm._group_norm import GroupNorm32, group_norm, group_norm_silu
from spgd_jax.xla_setup import group_norm_kernels


def plain(x, scale, bias):
    norm = nn.GroupNorm(num_groups=NORM_GROUPS, epsilon=NORM_EPS, use_fast_variance=False)
    return norm.apply({"params": {"scale": scale, "bias": bias}}, x)


@pytest.mark.parametrize("shape", [(2, 8, 8, 64), (3, 16, 96)])  # a conv activation, the attention's (B, HW, C)
def test_values_and_gradients_match_the_plain_group_norm(shape, route):
    keys = jax.random.split(jax.random.key(0), 4)
    x = 3.0 * jax.random.normal(keys[0], shape) + 1.5  # an offset mean, as activations have
    scale = jax.random.normal(keys[1], shape[-1:])
    bias = jax.random.normal(keys[2], shape[-1:])
    weight = jax.random.normal(keys[3], shape)
    assert _uses_kernels(group_norm, x, scale, bias) == (route == "kernels")
    assert_matches_plain(group_norm, plain, (x, scale, bias), weight)

def _loop_broadcast_shapes(compiled_text: str) -> list[tuple[int, ...]]:
    """The shapes that broadcasts make inside the element-wise loop fusions (kind=kLoop) of an optimised CPU
    program."""
    bodies = dict(re.findall(r"\n(%[\w.\-]+) \([^\n]*\) -> [^\n]*\{\n(.*?)\n\}", compiled_text, re.S))
    loops = re.findall(r"kind=kLoop, calls=(%[\w.\-]+)", compiled_text)
    assert loops, "no loop fusions found: has XLA's text format changed?"
    return [tuple(int(d) for d in dims.split(",")) for loop in loops
            for dims in re.findall(r"= f32\[([\d,]+)\]\S* broadcast\(", bodies[loop])]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's fusion of broadcasts")
def test_cpu_loops_broadcast_per_channel_values_not_per_group_ones(route):
    # XLA:CPU fuses a (B, G) -> (B, ..., C) broadcast into the loop that uses it, over a (..., G, C/G) view of
    # the activations, 4x slower (the module docstring): no loop may broadcast onto that view.
    x = jax.random.normal(jax.random.key(8), (2, 16, 16, 96))
    loss = lambda x, scale, bias: jnp.sum(jnp.sin(group_norm(x, scale, bias)))
    text = jax.jit(jax.grad(loss)).lower(x, jnp.ones(96), jnp.zeros(96)).compile().as_text()
    shapes = _loop_broadcast_shapes(text)
    assert x.shape in shapes  # the normalisation's per-channel broadcasts were found
    grouped = [shape for shape in shapes if shape[-2:] == (NORM_GROUPS, 96 // NORM_GROUPS)]
    assert not grouped, grouped


def test_module_has_flax_group_norms_parameters():
    x = jnp.ones((1, 4, 4, 64))
    ours = GroupNorm32().init(jax.random.key(0), x)
    flax_norm = nn.GroupNorm(num_groups=NORM_GROUPS).init(jax.random.key(0), x)
    assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype, float(a.sum())), ours) == \
        jax.tree_util.tree_map(lambda a: (a.shape, a.dtype, float(a.sum())), flax_norm)


# GroupNorm's native CPU kernels (spgd_jax.xla_setup.group_norm_kernels) against XLA's reductions

needs_kernels = needs(group_norm_kernels, "GroupNorm kernels")
route = both_routes(group_norm_kernels, "GroupNorm kernels")  # each test that takes it: kernels, XLA's reductions


def _uses_kernels(fn, *args) -> bool:
    text = jax.jit(fn).lower(*args).as_text()
    return group_norm_kernels.MOMENTS_TARGET in text


def _gradients(x, scale, bias, g):
    y, vjp = jax.vjp(group_norm, x, scale, bias)
    return (y, *vjp(g))


def plain_norm_silu(x, scale, bias, shift_scale, shift):
    return nn.silu(plain(x, scale, bias) * (1 + shift_scale) + shift)


@pytest.mark.parametrize("shape", [(2, 8, 8, 64), (1, 4, 6, 96), (3, 16, 32)])
@pytest.mark.parametrize("scale_shift", [True, False])
def test_norm_then_silu_matches_the_plain_composition(shape, scale_shift, route):
    keys = jax.random.split(jax.random.key(9), 6)
    x = 3.0 * jax.random.normal(keys[0], shape) + 1.5
    scale, bias = jax.random.normal(keys[1], shape[-1:]), jax.random.normal(keys[2], shape[-1:])
    per_image = (shape[0],) + (1,) * (len(shape) - 2) + shape[-1:]
    if scale_shift:  # the ResBlock's out_layers: silu(norm(x) * (1 + s) + t), s and t per image and channel
        args = (x, scale, bias, 0.5 * jax.random.normal(keys[3], per_image), jax.random.normal(keys[4], per_image))
        ours, reference = (lambda x, scale, bias, s, t: group_norm_silu(x, scale, bias, (s, t))), plain_norm_silu
    else:
        args = (x, scale, bias)
        ours, reference = group_norm_silu, lambda x, scale, bias: nn.silu(plain(x, scale, bias))
    assert _uses_kernels(ours, *args) == (route == "kernels")
    assert (group_norm_kernels.SILU_TARGET in jax.jit(ours).lower(*args).as_text()) == (route == "kernels")
    assert_matches_plain(ours, reference, args, jax.random.normal(keys[5], shape))


def _joined_concatenations(fn, *args) -> int:
    """How many concatenations in fn's lowered gradient program make an array of the joined activations' shape
    (2, 8, 8, 96)."""
    text = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(*args).as_text()
    return sum("concatenate" in line and "tensor<2x8x8x96xf32>" in line.split("->")[-1] for line in text.splitlines())


@pytest.mark.parametrize("scale_shift,widths", [(True, (64, 32)), (False, (64, 32)), (False, (40, 56))])
def test_norm_then_silu_of_parts_is_that_of_the_joined_activations(scale_shift, widths, route):
    # an output block's h and skip (64 + 32 channels: groups of 3 channels, one straddles the two parts); parts
    # not in 16s of channels (the kernels' vectors)
    keys = jax.random.split(jax.random.key(12), 7)
    h = 2.0 * jax.random.normal(keys[0], (2, 8, 8, widths[0])) + 1.0
    skip = jax.random.normal(keys[1], (2, 8, 8, widths[1]))
    scale, bias = jax.random.normal(keys[2], (96,)), jax.random.normal(keys[3], (96,))
    shift = (0.5 * jax.random.normal(keys[4], (2, 1, 1, 96)), jax.random.normal(keys[5], (2, 1, 1, 96))) \
        if scale_shift else None
    weight = jax.random.normal(keys[6], (2, 8, 8, 96))

    def loss(h, skip, scale, bias, parts):
        x = (h, skip) if parts else jnp.concatenate([h, skip], axis=-1)
        return jnp.sum(jnp.sin(group_norm_silu(x, scale, bias, shift)) * weight)

    in_parts, joined = (jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)), static_argnums=4)(
        h, skip, scale, bias, parts) for parts in (True, False))
    # the kernels read the parts in place with the same sums in the same order: the same bits either way where
    # the parts come in 16s of channels (the kernels' vectors; the UNet's do), else float32 round-off (a vector
    # loop's remainder)
    exact = all(width % 16 == 0 for width in widths)
    np.testing.assert_allclose(in_parts[0], joined[0], rtol=0, atol=0 if exact else 1e-7 * float(jnp.abs(weight).sum()))
    for got, expected in zip(in_parts[1], joined[1]):
        np.testing.assert_allclose(got, expected, rtol=0, atol=0 if exact else 1e-6 * float(jnp.abs(expected).max()))
    # ... and on the CPU route the joined activations are never stored, forward or backward
    parts_loss = lambda h, skip: loss(h, skip, scale, bias, True)  # noqa: E731
    assert _joined_concatenations(parts_loss, h, skip) == (0 if route == "kernels" else 1)
    assert _joined_concatenations(lambda h, skip: loss(h, skip, scale, bias, False), h, skip) == 1


def test_channel_parts_keeps_what_the_kernels_take_and_joins_the_rest(route):
    parts = (jnp.ones((2, 4, 4, 64)), jnp.zeros((2, 4, 4, 32)))
    kept = _group_norm.channel_parts(parts)
    assert len(kept) == (2 if route == "kernels" else 1)
    np.testing.assert_array_equal(jnp.concatenate(kept, axis=-1), jnp.concatenate(parts, axis=-1))
    assert len(_group_norm.channel_parts(tuple(jnp.ones((2, 4, 4, 16)) for _ in range(6)))) == 1  # > 4 parts
    assert len(_group_norm.channel_parts(tuple(p.astype(jnp.bfloat16) for p in parts))) == 1  # XLA's ops
    with pytest.raises(ValueError, match="activations in parts must share their leading dims and dtype"):
        _group_norm.channel_parts((jnp.ones((2, 4, 4, 64)), jnp.ones((2, 4, 5, 32))))
    with pytest.raises(ValueError, match="activations in parts must share their leading dims and dtype"):
        group_norm_silu((jnp.ones((2, 4, 4, 64)), jnp.ones((2, 4, 4, 32), jnp.bfloat16)), jnp.ones(96), jnp.zeros(96))


def test_norm_then_silu_keeps_a_bfloat16_input_on_xlas_ops():
    x = jax.random.normal(jax.random.key(10), (2, 4, 4, 64)).astype(jnp.bfloat16)
    scale, bias = jnp.full((64,), 1.5), jnp.full((64,), -0.25)
    out = jax.jit(group_norm_silu)(x, scale, bias)
    assert out.dtype == jnp.bfloat16
    assert group_norm_kernels.SILU_TARGET not in jax.jit(group_norm_silu).lower(x, scale, bias).as_text()
    expected = nn.silu(group_norm(x.astype(jnp.float32), scale, bias).astype(jnp.bfloat16))
    np.testing.assert_array_equal(out, expected)


@needs_kernels
def test_silu_kernels_extremes_and_float64():
    # the kernel's sigmoid (Cephes' expf) far out in both tails, at zero and for NaN, against float64
    y = jnp.array([-200.0, -88.0, -87.5, -30.0, -5.0, -1e-3, 0.0, 1e-3, 2.0, 17.0, 87.5, 88.0, 200.0, jnp.nan])
    x = jnp.tile(y[:, None], (1, 32)).reshape(1, 14, 32)  # one image, 14 positions, 32 channels
    zeros, ones = jnp.zeros((1, 32)), jnp.ones((1, 32))
    h = np.asarray(jax.jit(_group_norm._affine_silu)((x,), zeros, ones, zeros))[0, :, 0]
    y64 = np.asarray(y, np.float64)
    with np.errstate(over="ignore"):
        expected = y64 / (1 + np.exp(-y64))
    assert np.isnan(h[-1])
    np.testing.assert_allclose(h[:-1], expected[:-1], rtol=2e-7, atol=1e-30)
    g = jnp.ones_like(x)
    (dx,), dm, da, db = jax.jit(_group_norm._affine_silu_bwd)(((x,), zeros, ones, zeros), g)
    with np.errstate(over="ignore"):
        s = 1 / (1 + np.exp(-y64))
    np.testing.assert_allclose(np.asarray(dx)[0, :-1, 0], (s + y64 * s * (1 - s))[:-1], rtol=1e-6, atol=1e-30)
    assert np.isnan(np.asarray(dx)[0, -1, 0]) and np.isnan(np.asarray(db)).all()


def test_norm_then_silu_under_vmap(route):
    keys = jax.random.split(jax.random.key(11), 5)
    x = jax.random.normal(keys[0], (3, 2, 6, 6, 64)) + 1.0
    scale, bias = jax.random.normal(keys[1], (64,)), jax.random.normal(keys[2], (64,))
    shift_scale, shift = jax.random.normal(keys[3], (3, 2, 1, 1, 64)), jax.random.normal(keys[4], (3, 2, 1, 1, 64))

    def value_and_grad(x, s, t):
        return jax.value_and_grad(lambda x: jnp.sum(jnp.sin(group_norm_silu(x, scale, bias, (s, t)))))(x)

    batched = jax.jit(jax.vmap(value_and_grad))(x, shift_scale, shift)
    for i in range(3):
        for got, expected in zip(batched, jax.jit(value_and_grad)(x[i], shift_scale[i], shift[i])):
            np.testing.assert_allclose(got[i], expected, rtol=1e-5, atol=1e-5)


def test_a_scale_shift_of_the_wrong_shape_is_a_clear_error(route):
    x = jnp.ones((2, 4, 4, 64))
    with pytest.raises(ValueError, match=r"scale-shift's shift has shape \(2, 4, 4, 64\); it must broadcast to "
                                         r"\(2, 1, 1, 64\)"):
        group_norm_silu(x, jnp.ones(64), jnp.zeros(64), (jnp.zeros((2, 1, 1, 64)), jnp.zeros((2, 4, 4, 64))))
    with pytest.raises(ValueError, match="pass silu=True"):
        GroupNorm32().init(jax.random.key(0), x, scale_shift=(jnp.zeros((2, 1, 1, 64)),) * 2)
    # one scale-shift for every image broadcasts, as in the composition
    ours = group_norm_silu(x + jnp.arange(64.0), jnp.ones(64), jnp.zeros(64), (jnp.full((64,), 0.5), jnp.ones(64)))
    np.testing.assert_allclose(ours, nn.silu(group_norm(x + jnp.arange(64.0), jnp.ones(64), jnp.zeros(64)) * 1.5 + 1),
                               atol=1e-5)


def test_module_normalise_then_silu_shares_the_norms_parameters():
    x = jax.random.normal(jax.random.key(12), (2, 4, 4, 64))
    variables = GroupNorm32().init(jax.random.key(0), x)
    described = lambda tree: jax.tree_util.tree_map(lambda a: (a.shape, a.dtype, float(a.sum())), tree)  # noqa: E731
    assert described(variables) == described(GroupNorm32().init(jax.random.key(0), x, silu=True))
    variables = jax.tree_util.tree_map(lambda a: a + 0.5, variables)
    np.testing.assert_allclose(GroupNorm32().apply(variables, x, silu=True),
                               nn.silu(GroupNorm32().apply(variables, x)), atol=1e-5)


@needs_kernels
def test_kernels_agree_with_xlas_reductions_to_round_off(monkeypatch):
    keys = jax.random.split(jax.random.key(5), 4)
    args = (2.0 * jax.random.normal(keys[0], (3, 12, 10, 96)) - 4.0, jax.random.normal(keys[1], (96,)),
            jax.random.normal(keys[2], (96,)), jax.random.normal(keys[3], (3, 12, 10, 96)))
    assert _uses_kernels(_gradients, *args)
    native = jax.jit(_gradients)(*args)
    assert all(np.array_equal(a, b) for a, b in zip(native, jax.jit(_gradients)(*args)))  # threads change no bit
    monkeypatch.setattr(group_norm_kernels, "route", lambda: (False, "off for this test"))
    jax.clear_caches()
    assert not _uses_kernels(_gradients, *args)
    xla = jax.jit(_gradients)(*args)
    jax.clear_caches()
    for name, a, b in zip(("y", "dx", "dscale", "dbias"), native, xla):
        scale = float(jnp.max(jnp.abs(b)))
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-6 * scale, name
        assert not np.array_equal(a, b) or name == "dbias", name  # the kernels did the sums


@needs_kernels
def test_moments_over_many_positions_match_float64():
    # 256 x 256 positions (ffhq256's first GroupNorm) with a large mean: one float32 sum over the positions is
    # off by 1.2e-4 here; the kernels' float64 totals across blocks are not.
    # 64 channels, and 288 (in blocks of 128 channels, then 32)
    for x in (0.5 * jax.random.normal(jax.random.key(6), (2, 256 * 256, 64)) + 20.0,
              0.5 * jax.random.normal(jax.random.key(7), (2, 64 * 64, 288)) + 20.0):
        _assert_moments_match_float64(x)


def _assert_moments_match_float64(x):
    mean, rstd = jax.jit(_group_norm._moments)(x)
    grouped = np.asarray(x, np.float64).reshape(2, -1, NORM_GROUPS, x.shape[-1] // NORM_GROUPS)
    expected_mean = grouped.mean(axis=(1, 3), keepdims=True)
    expected_rstd = 1 / np.sqrt(((grouped - expected_mean) ** 2).mean(axis=(1, 3), keepdims=True) + NORM_EPS)
    expected_mean, expected_rstd = expected_mean.reshape(2, NORM_GROUPS), expected_rstd.reshape(2, NORM_GROUPS)
    np.testing.assert_allclose(mean, expected_mean, rtol=0, atol=1e-5)
    np.testing.assert_allclose(rstd, expected_rstd, rtol=1e-6)


def test_vmap_over_images_and_over_cotangents_alone(route):
    keys = jax.random.split(jax.random.key(7), 4)
    x = jax.random.normal(keys[0], (3, 2, 6, 6, 64)) + 1.0
    scale, bias = jax.random.normal(keys[1], (64,)), jax.random.normal(keys[2], (64,))
    g = jax.random.normal(keys[3], (3, 2, 6, 6, 64))
    assert _uses_kernels(jax.vmap(_gradients, (0, None, None, 0)), x, scale, bias, g) == (route == "kernels")
    batched = jax.jit(jax.vmap(_gradients, (0, None, None, 0)))(x, scale, bias, g)
    one_by_one = [jax.jit(_gradients)(x[i], scale, bias, g[i]) for i in range(3)]
    for got, expected in zip(batched, zip(*one_by_one)):
        np.testing.assert_allclose(got, np.stack(expected), rtol=1e-5, atol=1e-5)
    # one x, three cotangents (x unbatched, g batched): each the vjp of that cotangent
    cotangents = jax.jit(jax.vmap(_gradients, (None, None, None, 0)))(x[0], scale, bias, g)
    for i in range(3):
        for got, expected in zip(cotangents, jax.jit(_gradients)(x[0], scale, bias, g[i])):
            np.testing.assert_allclose(got[i], expected, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_a_wrong_call_of_a_kernel_is_a_clear_error():
    call = jax.ffi.ffi_call(group_norm_kernels.SUMS_TARGET, (jax.ShapeDtypeStruct((2, 64), jnp.float32),) * 2)
    with pytest.raises(Exception, match="spgd_group_norm_sums: C must be a multiple of G"):
        jax.block_until_ready(call(jnp.ones((2, 5, 64)), jnp.ones((2, 5, 64)), jnp.ones((2, 7))))


@needs_kernels
def test_a_wrong_call_of_a_silu_kernel_is_a_clear_error():
    # arguments m, a, b (..., C), then x's parts (..., P..., C_q); results s1, s2 (..., C), then dx's parts
    call = jax.ffi.ffi_call(group_norm_kernels.SILU_TARGET, jax.ShapeDtypeStruct((2, 5, 64), jnp.float32))
    with pytest.raises(Exception, match="spgd_group_norm_silu: x .* and m, a, b .* expected"):
        jax.block_until_ready(call(jnp.ones((2, 32)), jnp.ones((2, 32)), jnp.ones((2, 32)), jnp.ones((2, 5, 64))))
    with pytest.raises(Exception, match="spgd_group_norm_silu: x's parts .* must have the same images and positions"):
        jax.block_until_ready(call(*(jnp.ones((2, 64)),) * 3, jnp.ones((2, 5, 32)), jnp.ones((2, 4, 32))))
    grad = jax.ffi.ffi_call(group_norm_kernels.SILU_GRAD_TARGET, (*(jax.ShapeDtypeStruct((2, 64), jnp.float32),) * 2,
                                                                   jax.ShapeDtypeStruct((2, 5, 64), jnp.float32)))
    with pytest.raises(Exception, match="spgd_group_norm_silu_grad: g must have x's shape"):
        jax.block_until_ready(grad(jnp.ones((2, 4, 64)), *(jnp.ones((2, 64)),) * 3, jnp.ones((2, 5, 64))))
    two_parts = jax.ffi.ffi_call(group_norm_kernels.SILU_GRAD_TARGET, (
        *(jax.ShapeDtypeStruct((2, 64), jnp.float32),) * 2, jax.ShapeDtypeStruct((2, 5, 64), jnp.float32)))
    with pytest.raises(Exception, match="spgd_group_norm_silu_grad: dx must have x's parts"):
        jax.block_until_ready(two_parts(jnp.ones((2, 5, 64)), *(jnp.ones((2, 64)),) * 3, jnp.ones((2, 5, 32)),
                                        jnp.ones((2, 5, 32))))


_REPORT = """
    import warnings
    warnings.simplefilter("always")
    import jax, jax.numpy as jnp
    from spgd_jax.models.adm._group_norm import group_norm
    from spgd_jax.xla_setup import group_norm_kernels
    x = jnp.arange(2 * 3 * 64, dtype=jnp.float32).reshape(2, 3, 64) % 7
    y = jax.jit(group_norm)(x, jnp.ones(64), jnp.zeros(64))
    print("route", group_norm_kernels.route())
    print("y", round(float(y[1, 2, 5]), 4))
"""


@pytest.mark.skipif(platform.system() != "Linux", reason="the kernels are built on Linux only")
def test_built_once_into_the_cache_and_loaded_by_the_next_process(tmp_path):
    assert_built_once_with_fallbacks(_REPORT, group_norm_kernels.HANDLERS, tmp_path)


@needs_kernels
def test_a_stored_program_that_calls_them_runs_in_a_fresh_process(tmp_path):
    assert_stored_gradient_reads_back(
        "from spgd_jax.models.adm._group_norm import group_norm",
        "x = jnp.arange(2 * 3 * 64, dtype=jnp.float32).reshape(2, 3, 64) % 7",
        "jnp.sum(jnp.sin(group_norm(x, jnp.ones(64), jnp.zeros(64))))", group_norm_kernels.SUMS_TARGET, tmp_path)
