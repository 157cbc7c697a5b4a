"""Tests for spgd_jax.operators against independent references (scipy, NumPy, Pillow)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from PIL import Image

from spgd_jax import operators as ops

LINEAR_TASKS = ("sr4", "inpaint", "inpaint_box", "gauss_deblur", "motion_deblur")


def _image(seed: int, shape) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), shape, jnp.float32, -1.0, 1.0)


def _small(task: str, size: int = 32) -> ops.Operator:
    """Registry operators at test size; the blurs keep the reference's 61x61 kernels."""
    big_kernel = {"gauss_deblur": {"kernel_size": 61}, "motion_deblur": {"kernel_size": 61}}
    return ops.get(task, size, **big_kernel.get(task, {}))


# ---------------------------------------------------------------- linearity and adjoints


@pytest.mark.parametrize("task", LINEAR_TASKS)
def test_linear_operators_pass_the_adjoint_test(task):
    op = _small(task)
    assert op.linear
    params = jax.tree_util.tree_map(lambda p: p[0], op.init_params(jax.random.key(3), 1, 32))
    x = _image(0, (32, 32, 3))
    forward = lambda v: op.forward(v, params)
    ax = forward(x)
    y = _image(1, ax.shape)
    (aty,) = jax.linear_transpose(forward, x)(y)
    _, vjp = jax.vjp(forward, x)
    (aty_vjp,) = vjp(y)
    lhs = float(jnp.vdot(ax, y))
    assert lhs == pytest.approx(float(jnp.vdot(x, aty)), rel=1e-4, abs=1e-3)
    assert lhs == pytest.approx(float(jnp.vdot(x, aty_vjp)), rel=1e-4, abs=1e-3)
    # and forward really is linear
    x2 = _image(2, x.shape)
    np.testing.assert_allclose(forward(2.0 * x - 3.0 * x2), 2.0 * ax - 3.0 * forward(x2), atol=1e-5)


@pytest.mark.parametrize("task", ("phase_retrieval", "hdr"))
def test_nonlinear_operators_are_marked_and_differentiable(task):
    op = ops.get(task, 16)
    assert not op.linear
    x = _image(0, (16, 16, 3)).at[0, 0, 0].set(0.0)
    grad = jax.grad(lambda v: jnp.sum(op.forward(v, {}) ** 2))(x)
    assert grad.shape == x.shape and bool(jnp.all(jnp.isfinite(grad)))
    assert not np.allclose(op.forward(2 * x, {}), 2 * op.forward(x, {}), atol=1e-3)


# ---------------------------------------------------------------- blur


@pytest.mark.parametrize("size,std,truncate", [(61, 3.0, 4.0), (61, 3.0, 10.0), (15, 3.0, 4.0), (15, 1.3, 4.0)])
def test_gaussian_kernel_is_scipys_impulse_response(size, std, truncate):
    # (61, 3.0, 4.0): the reference kernel; truncate 10 fills the 61x61 window;
    # (15, 3.0): the Gaussian overflows the window and scipy folds it back by reflection.
    impulse = np.zeros((size, size))
    impulse[size // 2, size // 2] = 1.0
    expected = scipy.ndimage.gaussian_filter(impulse, sigma=std, truncate=truncate)
    kernel = ops.gaussian_kernel(size, std, truncate)
    assert kernel.dtype == np.float32 and kernel.shape == (size, size)
    np.testing.assert_allclose(kernel, expected, rtol=1e-6, atol=1e-9)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-5)


def test_blur_is_reflect_padded_cross_correlation():
    # An asymmetric kernel pins down orientation; scipy's 'mirror' is torch's reflect padding.
    kernel = np.random.default_rng(0).uniform(size=(7, 7)).astype(np.float32)
    kernel[0, :] = 0.0
    x = np.asarray(_image(4, (12, 10, 2)))
    out = np.asarray(ops.blur(jnp.asarray(x), jnp.asarray(kernel)))
    for c in range(2):
        expected = scipy.ndimage.correlate(x[:, :, c].astype(np.float64), kernel, mode="mirror")
        np.testing.assert_allclose(out[:, :, c], expected, atol=1e-5)


def test_blur_rejects_images_too_small_for_the_kernel():
    with pytest.raises(ValueError, match="too small for a 61x61 kernel"):
        ops.blur(jnp.zeros((30, 40, 3)), jnp.ones((61, 61)) / 61**2)
    ops.blur(jnp.zeros((31, 31, 3)), jnp.ones((61, 61)) / 61**2)  # 31 > 30 is enough
    with pytest.raises(ValueError, match="odd"):
        ops.blur(jnp.zeros((31, 31, 3)), jnp.ones((4, 4)))
    with pytest.raises(ValueError, match="smaller kernel_size"):
        ops.get("gauss_deblur", 16, kernel_size=61)


# ---------------------------------------------------------------- motion kernels


def test_motion_kernels_sum_to_one_and_are_reproducible_from_their_key():
    key = jax.random.key(7)
    a = ops.motion_kernel(key, 61, 0.5)
    b = ops.motion_kernel(key, 61, 0.5)
    c = ops.motion_kernel(jax.random.key(8), 61, 0.5)
    assert a.shape == (61, 61) and a.dtype == np.float32
    assert a.sum() == pytest.approx(1.0, abs=1e-5) and a.min() >= 0
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # A raw uint32 key with the same bits gives the same kernel.
    np.testing.assert_array_equal(ops.motion_kernel(jax.random.PRNGKey(7), 61, 0.5), a)


def test_motion_kernels_batch_and_small_sizes():
    op = ops.get("motion_deblur", 64)
    params = op.init_params(jax.random.key(1), 3, 64)
    kernels = np.asarray(params["kernel"])
    size = dict(op.settings)["kernel_size"]
    assert kernels.shape == (3, size, size)
    np.testing.assert_allclose(kernels.sum(axis=(1, 2)), 1.0, atol=1e-5)
    np.testing.assert_array_equal(kernels, np.asarray(op.init_params(jax.random.key(1), 3, 64)["kernel"]))
    assert not np.array_equal(kernels[0], kernels[1])
    # The original draws nothing below 54x54 (line width 0); the port keeps a 1 px line.
    for seed in range(5):
        assert np.isfinite(ops.motion_kernel(jax.random.key(seed), 9, 0.5)).all()


def test_motion_kernel_rng_port_accepts_numpy_generators():
    a = ops.motion_kernel_from_rng(np.random.RandomState(0), 61, 0.5)
    b = ops.motion_kernel_from_rng(np.random.RandomState(0), 61, 0.5)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="intensity"):
        ops.motion_kernel(jax.random.key(0), 61, 1.5)


# ---------------------------------------------------------------- resize (MATLAB imresize)


def _matlab_imresize_1d(signal: np.ndarray, scale: float) -> np.ndarray:
    """Independent antialiased bicubic imresize along axis 0, one output pixel at a time.

    MATLAB: u = x / scale + 0.5 * (1 - 1 / scale) (1-based), kernel h(t) = scale * cubic(scale * t)
    of width 4 / scale when shrinking, weights normalised per pixel, symmetric padding.
    """

    def cubic(t):
        t = abs(t)
        if t <= 1:
            return 1.5 * t**3 - 2.5 * t**2 + 1
        if t <= 2:
            return -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2
        return 0.0

    n = signal.shape[0]
    m = math.ceil(n * scale)
    shrink = scale < 1
    width = 4.0 / scale if shrink else 4.0
    pad = int(width) + 4
    padded = np.pad(signal, [(pad, pad)] + [(0, 0)] * (signal.ndim - 1), mode="symmetric")
    out = np.zeros((m,) + signal.shape[1:])
    for x in range(1, m + 1):
        u = (x - (m - n * scale) / 2) / scale + 0.5 * (1 - 1 / scale)
        left = math.floor(u - width / 2)
        taps = [left + j for j in range(int(math.ceil(width)) + 2)]
        w = np.array([scale * cubic(scale * (u - i)) if shrink else cubic(u - i) for i in taps])
        w = w / w.sum()
        for weight, i in zip(w, taps):
            out[x - 1] += weight * padded[i - 1 + pad]
    return out


@pytest.mark.parametrize("shape,scale", [((32, 24, 3), 0.25), ((32, 32, 1), 1 / 3), ((20, 20, 2), 0.5), ((8, 6, 1), 2.0)])
def test_resize_matches_independent_matlab_imresize(shape, scale):
    x = np.asarray(_image(5, shape), np.float64)
    expected = _matlab_imresize_1d(_matlab_imresize_1d(x, scale).swapaxes(0, 1), scale).swapaxes(0, 1)
    out = np.asarray(ops.resize(jnp.asarray(x, jnp.float32), scale))
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, atol=2e-6)


def test_resize_interior_matches_pillow_bicubic():
    # Pillow's antialiased BICUBIC uses the same a = -0.5 kernel; it renormalises at the
    # borders instead of reflecting, so only the interior must agree.
    x = np.asarray(_image(6, (64, 64, 1)))[:, :, 0]
    pil = np.asarray(Image.fromarray(x, mode="F").resize((16, 16), Image.BICUBIC, reducing_gap=None))
    out = np.asarray(ops.downsample(jnp.asarray(x)[:, :, None], 4))[:, :, 0]
    np.testing.assert_allclose(out[3:-3, 3:-3], pil[3:-3, 3:-3], atol=1e-5)
    assert np.abs(out - pil).max() > 1e-3  # the borders do differ: reflection is really used


def test_resize_rows_sum_to_one_and_errors():
    for n, s in [(256, 0.25), (85, 1 / 3), (7, 3.0)]:
        np.testing.assert_allclose(ops.resize_matrix(n, s).sum(axis=1), 1.0, atol=1e-12)
    assert ops.resize_matrix(192, 1 / 3).shape == (64, 192)
    with pytest.raises(ValueError, match="integer"):
        ops.downsample(jnp.zeros((8, 8, 3)), 2.5)
    with pytest.raises(ValueError, match="integer"):
        ops.get("sr4", 32, factor=1.5)


# ---------------------------------------------------------------- inpainting


def test_random_mask_keeps_the_reference_count_per_image():
    op = ops.get("inpaint", 16)
    masks = np.asarray(op.init_params(jax.random.key(0), 4, 16)["mask"])
    assert masks.shape == (4, 16, 16, 1)
    assert set(np.unique(masks)) == {0.0, 1.0}
    kept = 256 - int(256 * 0.8)  # the reference removes int(H*W * 0.8) pixels
    np.testing.assert_array_equal(masks.sum(axis=(1, 2, 3)), kept)
    assert len({m.tobytes() for m in masks}) == 4
    np.testing.assert_array_equal(masks, np.asarray(op.init_params(jax.random.key(0), 4, 16)["mask"]))
    x = _image(0, (4, 16, 16, 3))
    y = op.measure(jax.random.key(1), x, {"mask": jnp.asarray(masks)}, sigma_y=0.0)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x) * masks)  # same mask on every channel


def test_box_mask_position_range_and_size():
    size, box, margin = 64, 32, 8
    masks = np.asarray(ops.get("inpaint_box", size).init_params(jax.random.key(0), 200, size)["mask"])[..., 0]
    tops, lefts = [], []
    for m in masks:
        rows, cols = np.nonzero(m == 0)
        assert len(rows) == box * box
        assert rows.max() - rows.min() == box - 1 and cols.max() - cols.min() == box - 1
        tops.append(rows.min())
        lefts.append(cols.min())
    # np.random.randint(margin, size - margin - box): [8, 24) at 64 px
    assert min(tops) == margin and max(tops) == size - margin - box - 1
    assert min(lefts) == margin and max(lefts) == size - margin - box - 1
    with pytest.raises(ValueError, match="does not fit"):
        ops.get("inpaint_box", 64, box_size=50)


# ---------------------------------------------------------------- phase retrieval, HDR


def test_phase_retrieval_matches_centred_orthonormal_fft():
    x = np.asarray(_image(8, (16, 16, 3)))
    out = np.asarray(ops.phase_retrieval(jnp.asarray(x), 2.0))
    pad = 4  # oversample 2: size / 4 on each side
    assert out.shape == (24, 24, 3)
    padded = np.pad((x.astype(np.float64) + 1) / 2, ((pad, pad), (pad, pad), (0, 0)))
    # fastMRI's fft2c: ifftshift, orthonormal FFT, fftshift
    spectrum = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(padded, axes=(0, 1)), axes=(0, 1), norm="ortho"), axes=(0, 1))
    np.testing.assert_allclose(out, np.abs(spectrum), atol=1e-4)


def test_hdr_clips_twice_the_image():
    x = jnp.array([-0.8, -0.3, 0.0, 0.4, 0.6]).reshape(1, 5, 1)
    np.testing.assert_allclose(ops.hdr(x), [[[-1.0], [-0.6], [0.0], [0.8], [1.0]]])


# ---------------------------------------------------------------- registry and measure


def test_registry_names_and_reference_defaults_at_256():
    assert tuple(ops.TASKS) == ("sr4", "inpaint", "inpaint_box", "gauss_deblur", "motion_deblur", "phase_retrieval", "hdr")
    expected = {
        "sr4": (0.01, {"factor": 4}),
        "inpaint": (0.01, {"keep_fraction": 0.2}),
        "inpaint_box": (0.05, {"box_size": 128, "margin": 32}),
        "gauss_deblur": (0.01, {"kernel_size": 61, "std": 3.0, "truncate": 4.0}),
        "motion_deblur": (0.01, {"kernel_size": 61, "intensity": 0.5}),
        "phase_retrieval": (0.05, {"oversample": 2.0}),
        "hdr": (0.05, {"scale": 2.0}),
    }
    for task, (sigma_y, settings) in expected.items():
        op = ops.get(task, 256)
        assert op.name == task and op.sigma_y == sigma_y and dict(op.settings) == settings


def test_registry_rejects_bad_input_clearly():
    with pytest.raises(ValueError, match="sr4, inpaint, inpaint_box"):
        ops.get("deblur", 64)
    with pytest.raises(ValueError, match="unknown option.*kernel_size"):
        ops.get("hdr", 64, kernel_size=3)
    with pytest.raises(ValueError, match="image_size"):
        ops.get("hdr", 0)
    with pytest.raises(ValueError, match="sigma_y"):
        ops.get("hdr", 64, sigma_y=-1.0)
    assert ops.get("gauss_deblur", 64, std=2.0, sigma_y=0.1).sigma_y == 0.1
    assert "std" in ops.options("gauss_deblur")


def test_smaller_images_get_smaller_kernels_and_interpolated_defaults():
    settings = {s: dict(ops.get("gauss_deblur", s).settings) for s in (64, 96, 128, 256, 512)}
    stds = [settings[s]["std"] for s in (64, 96, 128, 256, 512)]
    assert stds == sorted(stds) and len(set(stds)) == 5
    assert settings[64]["kernel_size"] == 15 and settings[128]["kernel_size"] == 31
    assert dict(ops.get("inpaint_box", 64).settings) == {"box_size": 32, "margin": 8}
    motion = [dict(ops.get("motion_deblur", s).settings)["kernel_size"] for s in (64, 96, 128, 256)]
    assert motion == sorted(motion) and all(k % 2 == 1 for k in motion)


@pytest.mark.parametrize("task", ops.TASKS)
def test_measure_shapes_noise_and_jit(task):
    op = ops.get(task, 32, **({"kernel_size": 9} if "deblur" in task else {}))
    params = op.init_params(jax.random.key(0), 2, 32)
    x = _image(1, (2, 32, 32, 3))
    clean = jax.vmap(op.forward)(x, params)
    y = jax.jit(op.measure)(jax.random.key(2), x, params)
    assert y.shape == clean.shape and y.dtype == jnp.float32
    assert float(jnp.std(y - clean)) == pytest.approx(op.sigma_y, rel=0.15)
    np.testing.assert_allclose(op.measure(jax.random.key(2), x, params, sigma_y=0.0), clean, atol=1e-6)
    # the sampler differentiates a per-image loss through the forward model
    grad = jax.grad(lambda v: jnp.sum((jax.vmap(op.forward)(v, params) - y) ** 2))(x)
    assert bool(jnp.all(jnp.isfinite(grad)))


def test_measure_input_checks_and_user_operators():
    op = ops.get("inpaint", 8)
    params = op.init_params(jax.random.key(0), 2, 8)
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        op.measure(jax.random.key(0), jnp.zeros((8, 8, 3)), params)
    with pytest.raises(ValueError, match="leading batch axis of size 3"):
        op.measure(jax.random.key(0), jnp.zeros((3, 8, 8, 3)), params)
    mine = ops.Operator("mine", sigma_y=0.0, linear=False, forward=lambda x, params: jnp.tanh(x))
    assert mine.init_params(jax.random.key(0), 2, 8) == {}
    x = _image(0, (2, 8, 8, 3))
    np.testing.assert_allclose(mine.measure(jax.random.key(0), x), jnp.tanh(x), atol=1e-6)


@pytest.mark.parametrize("task", ["inpaint", "sr4", "gauss_deblur"])
def test_linear_algebra_of_an_operator_given_as_a_function(task):
    op = ops.get(task, 16)
    params = op.init_params(jax.random.key(0), 1, 16)
    one = jax.tree_util.tree_map(lambda a: a[0], params) if params else None
    x, truth = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    y = op.forward(truth, one)
    # <A x, v> = <x, A^T v>
    v = jax.random.normal(jax.random.key(2), y.shape)
    np.testing.assert_allclose(jnp.vdot(op.forward(x, one), v), jnp.vdot(x, ops.adjoint(op.forward, one, x.shape)(v)),
                               rtol=1e-4)
    projected = jax.jit(lambda x: ops.project(op.forward, one, y, x, 60))(x)
    assert float(jnp.max(jnp.abs(op.forward(projected, one) - y))) < 1e-3 * float(jnp.max(jnp.abs(y)))
    moved = projected - x  # the projection moves x orthogonally to the null space: in the range of A^T
    assert abs(float(jnp.vdot(moved, projected - truth))) < 1e-3 * float(jnp.vdot(moved, moved))
    prox = ops.proximal(op.forward, one, y, x, 0.5, 60)
    objective = lambda z: jnp.sum((op.forward(z, one) - y) ** 2) + 0.5 * jnp.sum((z - x) ** 2)
    assert float(jnp.max(jnp.abs(jax.grad(objective)(prox)))) < 1e-3


def test_linear_algebra_refuses_a_nonlinear_operator_by_name():
    op = ops.get("hdr", 16)
    with pytest.raises(ValueError, match="needs a linear forward operator"):
        ops.project(op.forward, None, jnp.zeros((16, 16, 3)), jnp.zeros((16, 16, 3)))
