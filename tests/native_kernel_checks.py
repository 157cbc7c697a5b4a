"""Checks shared by the tests of spgd_jax's native CPU kernels: each test of an op with two routes run on both
(its kernels and XLA's ops); a library of FFI handlers (native_build.Handlers) built once into the cache and
loaded by the next process, with XLA's own ops where it cannot be had; and a convolution handler batched by
jax.vmap over images, kernels or both."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_helpers import fresh_python


def needs(module, what: str):
    """A skip mark for tests of `module`'s kernels (an xla_setup module with route()) where they cannot be had."""
    return pytest.mark.skipif(not module.route()[0], reason=f"{what} unavailable: {module.route()[1]}")


def both_routes(module, what: str):
    """A fixture that runs each test using it twice: with `module`'s kernels (skipped where they cannot be had) and
    with XLA's ops (route() patched off); JAX's caches cleared around, as the route is decided when tracing."""

    @pytest.fixture(params=["kernels", "xla"])
    def route(request, monkeypatch):
        if request.param == "kernels" and not module.route()[0]:
            pytest.skip(f"{what} unavailable: {module.route()[1]}")
        if request.param == "xla":
            monkeypatch.setattr(module, "route", lambda: (False, "off for this test"))
        jax.clear_caches()
        yield request.param
        jax.clear_caches()

    return route


def assert_built_once_with_fallbacks(report: str, handlers, tmp_path) -> None:
    """`report`, Python run in fresh processes, prints "route ..." (the handlers' route()) and "y VALUE" (a result
    that must not depend on the route). Built into $XDG_CACHE_HOME once, loaded by the next process without a
    compiler; without a compiler or turned off by the environment, the same value, silently, nothing built."""
    first = fresh_python(report, XDG_CACHE_HOME=str(tmp_path))
    assert first.returncode == 0, first.stderr
    value = first.stdout.split("y ")[-1].strip()
    assert "Warning" not in first.stderr
    built = list(tmp_path.glob(f"spgd-jax/{handlers.name}-*/{handlers.library}"))
    assert len(built) == 1 and not list(tmp_path.rglob("*.tmp"))
    if "route (True, " not in first.stdout:  # built, but this CPU lacks the instructions the handlers use
        assert handlers.supported and "lacks the instructions" in first.stdout, first.stdout
        return
    stamp = built[0].stat().st_mtime_ns
    second = fresh_python(report, XDG_CACHE_HOME=str(tmp_path), CXX="/bin/false")  # no compiler needed now
    assert second.returncode == 0 and "route (True, " in second.stdout and f"y {value}" in second.stdout, second.stderr
    assert built[0].stat().st_mtime_ns == stamp
    for env in ({"CXX": "/bin/false"}, {handlers.env_off: "0"}):
        run = fresh_python(report, XDG_CACHE_HOME=str(tmp_path / "other"), **env)
        assert run.returncode == 0 and "Warning" not in run.stderr, run.stderr
        assert "route (False, " in run.stdout and f"y {value}" in run.stdout, run.stdout
        assert (f"compiling {handlers.source.name} failed" if "CXX" in env else "turned off") in run.stdout
        assert not list((tmp_path / "other").rglob("*.so")) and not list(tmp_path.rglob("*.tmp"))


def assert_conv_vmaps(conv, x: jax.Array, kernel: jax.Array) -> None:
    """conv(x (B, H, W, C), kernel (3, 3, C, D)) under jax.vmap over the images, over kernels, over both, and its
    input gradient per image: bit for bit the unbatched calls. x holds 3 images."""
    kernels = jnp.stack([kernel, -kernel, 2 * kernel])
    per_image = jax.vmap(lambda xi: conv(xi[None], kernel)[0])(x)
    np.testing.assert_array_equal(per_image, conv(x, kernel))
    per_kernel = jax.vmap(lambda k: conv(x, k))(kernels)
    both = jax.vmap(lambda xi, k: conv(xi[None], k)[0])(x, kernels)
    for i in range(3):
        np.testing.assert_array_equal(per_kernel[i], conv(x, kernels[i]))
        np.testing.assert_array_equal(both[i], conv(x[i:i + 1], kernels[i])[0])
    square = lambda x: jnp.sum(conv(x, kernel).astype(jnp.float32) ** 2)  # noqa: E731
    grads = jax.vmap(jax.grad(lambda xi: square(xi[None])))(x)
    np.testing.assert_array_equal(grads, jax.grad(square)(x))


def assert_stored_gradient_reads_back(imports: str, setup: str, loss: str, target: str, tmp_path) -> None:
    """The gradient of `loss` (an expression of x, after `imports` and `setup`, Python lines) stored by
    spgd_jax.xla_setup.executables in one fresh process calls the FFI `target` and is read back by the next
    one, with the same result."""
    code = f"""
        import jax, jax.numpy as jnp
        {imports}
        from spgd_jax.xla_setup import enable_compilation_cache, executables
        enable_compilation_cache({str(tmp_path / "cache")!r})
        {setup}
        loss = lambda x: {loss}
        program = executables.load_or_compile(jax.jit(jax.grad(loss)), (x,), ("native-kernel-test", 1))
        print("text", {target!r} in jax.jit(jax.grad(loss)).lower(x).as_text())
        print("sum", round(float(jnp.abs(program(x)).sum()), 3))
    """
    first, second = fresh_python(code), fresh_python(code)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "text True" in first.stdout and first.stdout.split("sum ")[-1] == second.stdout.split("sum ")[-1]
    assert len(list((tmp_path / "cache" / "executables").glob("*.bin"))) == 1
    assert "ExecutableStoreWarning" not in second.stderr  # read back, not compiled again after a failed read
