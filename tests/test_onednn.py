"""oneDNN's bfloat16 convolutions (spgd_jax/xla_setup/onednn.py, spgd_jax/models/adm/_onednn.py): the handler
built and registered, its values and gradients against lax's convolution, vmap, which convolutions take the
route, the fallback when it cannot be built, and stored programs that call it read back in a fresh process."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_helpers import fresh_python
from native_kernel_checks import assert_conv_vmaps
from jax import lax

from spgd_jax.models.adm import _conv, _direct, _onednn, _winograd
from spgd_jax.xla_setup import direct_conv, onednn

pytestmark = pytest.mark.skipif(onednn.conv_target() is None, reason=f"oneDNN unavailable: {onednn.route()[1]}")

SHAPES = [(1, 8, 8, 3, 32), (2, 16, 12, 32, 32), (3, 7, 5, 64, 3), (2, 4, 6, 20, 12)]  # (B, H, W, C, D)


def _plain(x, kernel):
    """lax's convolution in float32 of the same (bfloat16) values."""
    return lax.conv_general_dilated(x.astype(jnp.float32), kernel.astype(jnp.float32), (1, 1), ((1, 1), (1, 1)),
                                    dimension_numbers=_conv.NHWC, precision=lax.Precision.HIGHEST)


def _inputs(shape, seed=0):
    b, h, w, c, d = shape
    kx, kk = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (b, h, w, c)).astype(jnp.bfloat16)
    return x, (jax.random.normal(kk, (3, 3, c, d)) / np.sqrt(9 * c)).astype(jnp.bfloat16)


def _rel(got, ref):
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    return float(np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref ** 2)))


@pytest.mark.parametrize("shape", SHAPES)
def test_values_are_the_convolution_rounded_to_bfloat16(shape):
    x, kernel = _inputs(shape)
    got = jax.jit(_onednn.onednn_conv3x3)(x, kernel)
    assert got.dtype == jnp.bfloat16 and got.shape == shape[:3] + (shape[4],)
    ref = _plain(x, kernel)
    # Products of bfloat16 values are exact in float32: what remains is the output's rounding to bfloat16
    # (2^-9 relative at most) and float32 summation.
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=2 ** -8, atol=1e-5)
    assert _rel(got, ref) > 1e-5  # rounded to bfloat16, not float32 by mistake


def test_gradients_are_the_convolutions_gradients():
    x, kernel = _inputs((2, 8, 10, 16, 8), seed=2)
    weights = jax.random.normal(jax.random.key(3), (2, 8, 10, 8))

    def loss(conv):
        return lambda x, k: jnp.sum(jnp.sin(conv(x, k).astype(jnp.float32)) * weights)

    got = jax.grad(loss(_onednn.onednn_conv3x3), argnums=(0, 1))(x, kernel)
    ref = jax.grad(loss(_plain), argnums=(0, 1))(x, kernel)
    for g, r in zip(got, ref):
        assert g.dtype == jnp.bfloat16
        assert _rel(g, r) < 1e-2


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_values_are_the_float32_convolution_of_the_bfloat16_roundings(shape):
    x, kernel = (a.astype(jnp.float32) + 1e-3 * jax.random.normal(jax.random.key(9), a.shape) for a in _inputs(shape, 6))
    got = jax.jit(_onednn.onednn_conv3x3)(x, kernel)
    assert got.dtype == jnp.float32 and got.shape == shape[:3] + (shape[4],)
    rounded = _plain(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
    np.testing.assert_allclose(got, rounded, rtol=1e-5, atol=1e-5)  # float32 sums, not rounded to bfloat16
    error = _rel(got, _plain(x, kernel))
    assert 1e-4 < error < 1e-2  # the operands' rounding, nothing more


def test_float32_gradients_are_the_convolutions_gradients():
    x, kernel = (a.astype(jnp.float32) for a in _inputs((2, 8, 10, 16, 8), seed=7))
    weights = jax.random.normal(jax.random.key(8), (2, 8, 10, 8))

    def loss(conv):
        return lambda x, k: jnp.sum(jnp.sin(conv(x, k)) * weights)

    got = jax.grad(loss(_onednn.onednn_conv3x3), argnums=(0, 1))(x, kernel)
    ref = jax.grad(loss(_plain), argnums=(0, 1))(x, kernel)
    assert got[0].dtype == got[1].dtype == jnp.float32
    assert 1e-5 < _rel(got[0], ref[0]) < 1e-2  # the input gradient: a convolution of rounded operands again
    assert _rel(got[1], ref[1]) < 1e-5  # the kernel gradient (training): lax's, in float32
    # The input gradient is the convolution of the output gradient with the flipped kernel, both rounded.
    g = jax.random.normal(jax.random.key(10), (2, 8, 10, 8))
    _, vjp = jax.vjp(_onednn.onednn_conv3x3, x, kernel)
    flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
    np.testing.assert_allclose(vjp(g)[0], _plain(g.astype(jnp.bfloat16), flipped.astype(jnp.bfloat16)),
                               rtol=1e-5, atol=1e-5)


def test_vmap_over_images_kernels_or_both():
    assert_conv_vmaps(_onednn.onednn_conv3x3, *_inputs((3, 6, 8, 8, 4), seed=4))


def test_runs_inside_scan_and_an_empty_batch():
    x, kernel = _inputs((2, 8, 8, 4, 4), seed=5)

    def step(h, _):
        return _onednn.onednn_conv3x3(h, kernel), None

    out, _ = jax.jit(lambda x: lax.scan(step, x, None, length=3))(x)
    ref = x
    for _ in range(3):
        ref = _onednn.onednn_conv3x3(ref, kernel)
    np.testing.assert_array_equal(out, ref)
    assert _onednn.onednn_conv3x3(x[:0], kernel).shape == (0, 8, 8, 4)


def test_wrong_inputs_are_clear_errors(monkeypatch):
    x, kernel = _inputs((1, 8, 8, 4, 4))
    with pytest.raises(TypeError, match="both bfloat16 or both float32, got float32 and bfloat16"):
        _onednn.onednn_conv3x3(x.astype(jnp.float32), kernel)
    with pytest.raises(TypeError, match="got float16 and float16"):
        _onednn.onednn_conv3x3(x.astype(jnp.float16), kernel.astype(jnp.float16))
    with pytest.raises(ValueError, match=r"kernel \(3, 3, C, D\), got \(1, 8, 8, 4\) and \(3, 3, 5, 4\)"):
        _onednn.onednn_conv3x3(x, jnp.zeros((3, 3, 5, 4), jnp.bfloat16))
    monkeypatch.setattr(onednn, "conv_target", lambda: None)
    with pytest.raises(RuntimeError, match="not available here .* use winograd_conv3x3"):
        _onednn.onednn_conv3x3(x, kernel)


def test_only_bfloat16_same_3x3_convolutions_on_the_cpu_take_the_route(monkeypatch):
    calls = []
    monkeypatch.setattr(_onednn, "onednn_conv3x3", lambda x, k: calls.append(x.shape) or _plain(x, k))
    x, kernel = _inputs((1, 8, 8, 4, 4))
    same, dims = ((1, 1), (1, 1)), ("NHWC", "HWIO", "NHWC")
    _onednn.conv_general_dilated(x, kernel, (1, 1), same, dimension_numbers=dims)
    _onednn.conv_general_dilated(x[:, :7], kernel, (1, 1), same, dimension_numbers=dims)  # odd sizes too
    assert calls == [(1, 8, 8, 4), (1, 7, 8, 4)]
    # float32 (bit for bit the float32 route's), stride 2, other padding, 1x1 kernels: the routes after it.
    x32, k32 = x.astype(jnp.float32), kernel.astype(jnp.float32)
    np.testing.assert_array_equal(_onednn.conv_general_dilated(x32, k32, (1, 1), same, dimension_numbers=dims),
                                  _direct.conv_general_dilated(x32, k32, (1, 1), same, dimension_numbers=dims))
    _onednn.conv_general_dilated(x, kernel, (2, 2), same, dimension_numbers=dims)
    _onednn.conv_general_dilated(x, kernel, (1, 1), ((0, 0), (0, 0)), dimension_numbers=dims)
    _onednn.conv_general_dilated(x, kernel[:1, :1], (1, 1), ((0, 0), (0, 0)), dimension_numbers=dims)
    assert len(calls) == 2
    # With the route unavailable, bfloat16 goes to the Winograd route.
    winograd = []
    monkeypatch.setattr(onednn, "conv_target", lambda: None)
    monkeypatch.setattr(_winograd, "winograd_conv3x3", lambda x, k: winograd.append(x.shape) or _plain(x, k))
    _onednn.conv_general_dilated(x, kernel, (1, 1), same, dimension_numbers=dims)
    assert len(calls) == 2 and winograd == [(1, 8, 8, 4)]


def test_float32_takes_the_route_only_at_bfloat16_precision(monkeypatch):
    calls = []
    monkeypatch.setattr(direct_conv, "bf16_products", lambda: (False, "off for this test"))  # oneDNN's route, not ours
    monkeypatch.setattr(_onednn, "onednn_conv3x3", lambda x, k: calls.append(x.dtype) or _plain(x, k))
    x, kernel = (a.astype(jnp.float32) for a in _inputs((1, 8, 8, 4, 4)))
    conv = lambda x, k, **kw: _onednn.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                                          dimension_numbers=_conv.NHWC, **kw)
    for name in ("bfloat16", "BF16_BF16_F32"):
        with jax.default_matmul_precision(name):
            conv(x, kernel)
    conv(x, kernel, precision="bfloat16")
    conv(x, kernel, precision=lax.DotAlgorithmPreset.BF16_BF16_F32)
    assert calls == [jnp.float32] * 4
    conv(x, kernel)  # JAX's default: XLA's float32 convolution
    for name in ("float32", "highest", "tensorfloat32", "default"):
        with jax.default_matmul_precision(name):
            conv(x, kernel)
    with jax.default_matmul_precision("bfloat16"):
        conv(x, kernel, precision=lax.Precision.HIGHEST)  # the call's own precision wins
        conv(x.astype(jnp.float16), kernel.astype(jnp.float16))
        _onednn.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=_conv.NHWC)  # stride 2
    assert len(calls) == 4


def test_bfloat16_precision_unet_is_close_to_float32_and_retraced():
    from spgd_jax.models.adm import CONFIGS, UNet

    config = CONFIGS["tiny16"]
    model = UNet(config)
    x, t = jax.random.normal(jax.random.key(0), (2, 16, 16, 3)), jnp.array([10.0, 500.0])
    params = model.init(jax.random.key(1), x, t)["params"]
    leaves, tree = jax.tree_util.tree_flatten(params)  # every weight random (zero-initialised layers hide nothing)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree_util.tree_unflatten(tree, [a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x, t))
    plain = forward(params, x)
    with jax.default_matmul_precision("bfloat16"):
        rounded = forward(params, x)  # the same jitted function, traced again under the new precision
        text = forward.lower(params, x).as_text()
    target = _onednn.float32_target()  # oneDNN's, or spgd_jax's Winograd kernel with bfloat16 products
    assert f"@{target}(" in text and ("bf16_products = true" in text) == (target == direct_conv.TARGET)
    assert 1e-5 < _rel(rounded, plain) < 2e-2
    np.testing.assert_array_equal(forward(params, x), plain)  # and back: float32 bit for bit
    assert "bf16_products = true" not in (plain_text := forward.lower(params, x).as_text())
    assert onednn.TARGET not in plain_text


_REPORT = """
    import warnings
    warnings.simplefilter("always")
    import jax.numpy as jnp
    from spgd_jax.xla_setup import onednn
    from spgd_jax.models.adm import _onednn
    print("route", onednn.route())
    x = jnp.ones((1, 4, 4, 2), jnp.bfloat16)
    out = _onednn.conv_general_dilated(x, jnp.ones((3, 3, 2, 3), jnp.bfloat16), (1, 1), ((1, 1), (1, 1)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    print("centre", float(out[0, 1, 1, 0]))
"""


def test_built_once_into_the_cache_and_loaded_by_the_next_process(tmp_path):
    first = fresh_python(_REPORT, XDG_CACHE_HOME=str(tmp_path))
    assert first.returncode == 0, first.stderr
    assert "route ('spgd_onednn_conv2d'," in first.stdout and "centre 18.0" in first.stdout
    built = list(tmp_path.glob("spgd-jax/onednn-*/libspgd_onednn_conv.so"))
    assert len(built) == 1 and not list(tmp_path.rglob("*.tmp"))
    stamp = built[0].stat().st_mtime_ns
    second = fresh_python(_REPORT, XDG_CACHE_HOME=str(tmp_path), CXX="/bin/false")  # no compiler needed now
    assert second.returncode == 0 and "centre 18.0" in second.stdout, second.stderr
    assert built[0].stat().st_mtime_ns == stamp
    assert "OnednnUnavailableWarning" not in first.stderr + second.stderr


def test_a_failed_build_warns_once_and_falls_back(tmp_path):
    run = fresh_python(_REPORT, XDG_CACHE_HOME=str(tmp_path), CXX="/bin/false")
    assert run.returncode == 0, run.stderr
    assert "route (None, 'compiling onednn_conv.cc failed" in run.stdout
    assert "centre 18.0" in run.stdout  # the Winograd route's value
    assert run.stderr.count("OnednnUnavailableWarning") == 1 and "SPGD_JAX_ONEDNN=0" in run.stderr
    assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("*.tmp"))


def test_turned_off_by_the_environment_without_a_warning(tmp_path):
    run = fresh_python(_REPORT, XDG_CACHE_HOME=str(tmp_path), SPGD_JAX_ONEDNN="0")
    assert run.returncode == 0, run.stderr
    assert "route (None, 'turned off (SPGD_JAX_ONEDNN=0)')" in run.stdout and "Warning" not in run.stderr
    assert not list(tmp_path.rglob("*.so"))


def test_a_stored_program_that_calls_it_runs_in_a_fresh_process(tmp_path):
    code = f"""
        import jax, jax.numpy as jnp
        from spgd_jax.models.adm import _onednn
        from spgd_jax.xla_setup import enable_compilation_cache, executables
        enable_compilation_cache({str(tmp_path / "cache")!r})
        x, k = jnp.ones((2, 8, 8, 4), jnp.bfloat16), jnp.ones((3, 3, 4, 5), jnp.bfloat16)
        program = executables.load_or_compile(jax.jit(_onednn.onednn_conv3x3), (x, k), ("onednn-test", 1))
        print("sum", float(program(x, k).astype(jnp.float32).sum()))
    """
    first, second = fresh_python(code), fresh_python(code)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "sum 19360.0" in first.stdout and "sum 19360.0" in second.stdout
    assert len(list((tmp_path / "cache" / "executables").glob("*.bin"))) == 1
    assert "ExecutableStoreWarning" not in second.stderr  # read back, not compiled again after a failed read


def test_a_float32_process_compiles_no_handler(tmp_path):
    code = f"""
        import jax, jax.numpy as jnp
        from spgd_jax.models.adm import _onednn
        from spgd_jax.xla_setup import enable_compilation_cache, executables, onednn
        enable_compilation_cache({str(tmp_path / "cache")!r})
        x, k = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 5))
        conv = lambda x, k: _onednn.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        program = executables.load_or_compile(jax.jit(conv), (x, k), ("float32-test", 1))
        print("sum", float(program(x, k).sum()), "fingerprint", onednn.fingerprint(), onednn.route.cache_info().currsize)
    """
    run = fresh_python(code, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    assert run.returncode == 0, run.stderr
    assert "sum 9680.0 fingerprint onednn-" in run.stdout and run.stdout.strip().endswith(" 0")
    assert not list(tmp_path.rglob("*onednn*.so"))


def test_a_cpu_with_only_onednns_reference_code_takes_no_route():
    class Handle:
        def __init__(self, names):
            self.SpgdOnednnConvImplementation = lambda f32_out: names[f32_out].encode()

    assert onednn._slow_implementation(Handle(["brgconv:avx512_core_amx"] * 2)) is None
    why = onednn._slow_implementation(Handle(["ref:any", "ref:any"]))
    assert why.startswith("oneDNN has no fast bfloat16 convolution for this CPU (it offers ref:any and ref:any)")
    assert "(it offers jit:avx512_core_bf16 and none)" in onednn._slow_implementation(Handle(["jit:avx512_core_bf16", ""]))
    # This CPU's own library (the tests run only where it has a fast implementation, for both outputs).
    import ctypes

    assert onednn._slow_implementation(ctypes.CDLL(onednn.route()[1])) is None
