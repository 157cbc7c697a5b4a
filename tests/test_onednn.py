"""oneDNN's bfloat16 convolutions (spgd_jax/xla_setup/onednn.py, spgd_jax/models/adm/_onednn.py): the handler
built and registered, its values and gradients against lax's convolution, vmap, which convolutions take the
route, the fallback when it cannot be built, and stored programs that call it read back in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from spgd_jax.models.adm import _conv, _onednn, _winograd
from spgd_jax.xla_setup import onednn

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


def test_vmap_over_images_kernels_or_both():
    x, kernel = _inputs((3, 6, 8, 8, 4), seed=4)
    kernels = jnp.stack([kernel, -kernel, 2 * kernel])
    conv = _onednn.onednn_conv3x3
    per_image = jax.vmap(lambda xi: conv(xi[None], kernel)[0])(x)
    np.testing.assert_array_equal(per_image, conv(x, kernel))
    per_kernel = jax.vmap(lambda k: conv(x, k))(kernels)
    for i in range(3):
        np.testing.assert_array_equal(per_kernel[i], conv(x, kernels[i]))
    both = jax.vmap(lambda xi, k: conv(xi[None], k)[0])(x, kernels)
    for i in range(3):
        np.testing.assert_array_equal(both[i], conv(x[i:i + 1], kernels[i])[0])
    grads = jax.vmap(jax.grad(lambda xi: jnp.sum(conv(xi[None], kernel).astype(jnp.float32) ** 2)))(x)
    np.testing.assert_array_equal(grads, jax.grad(lambda x: jnp.sum(conv(x, kernel).astype(jnp.float32) ** 2))(x))


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
    with pytest.raises(TypeError, match="takes bfloat16 x and kernel, got float32 and bfloat16"):
        _onednn.onednn_conv3x3(x.astype(jnp.float32), kernel)
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
    # float32 (bit for bit XLA's), stride 2, other padding, 1x1 kernels: the routes before it.
    x32, k32 = x.astype(jnp.float32), kernel.astype(jnp.float32)
    np.testing.assert_array_equal(_onednn.conv_general_dilated(x32, k32, (1, 1), same, dimension_numbers=dims),
                                  _conv.conv_general_dilated(x32, k32, (1, 1), same, dimension_numbers=dims))
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


def _fresh(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env,
                          timeout=600)


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
    first = _fresh(_REPORT, XDG_CACHE_HOME=str(tmp_path))
    assert first.returncode == 0, first.stderr
    assert "route ('spgd_onednn_conv2d'," in first.stdout and "centre 18.0" in first.stdout
    built = list(tmp_path.glob("spgd-jax/onednn-*/libspgd_onednn_conv.so"))
    assert len(built) == 1 and not list(tmp_path.rglob("*.tmp"))
    stamp = built[0].stat().st_mtime_ns
    second = _fresh(_REPORT, XDG_CACHE_HOME=str(tmp_path), CXX="/bin/false")  # no compiler needed now
    assert second.returncode == 0 and "centre 18.0" in second.stdout, second.stderr
    assert built[0].stat().st_mtime_ns == stamp
    assert "OnednnUnavailableWarning" not in first.stderr + second.stderr


def test_a_failed_build_warns_once_and_falls_back(tmp_path):
    run = _fresh(_REPORT, XDG_CACHE_HOME=str(tmp_path), CXX="/bin/false")
    assert run.returncode == 0, run.stderr
    assert "route (None, 'compiling onednn_conv.cc failed" in run.stdout
    assert "centre 18.0" in run.stdout  # the Winograd route's value
    assert run.stderr.count("OnednnUnavailableWarning") == 1 and "SPGD_JAX_ONEDNN=0" in run.stderr
    assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("*.tmp"))


def test_turned_off_by_the_environment_without_a_warning(tmp_path):
    run = _fresh(_REPORT, XDG_CACHE_HOME=str(tmp_path), SPGD_JAX_ONEDNN="0")
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
    first, second = _fresh(code), _fresh(code)
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
    run = _fresh(code, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    assert run.returncode == 0, run.stderr
    assert "sum 9680.0 fingerprint onednn-" in run.stdout and run.stdout.strip().endswith(" 0")
    assert not list(tmp_path.rglob("*.so"))
