"""The image batch split over devices gives the single-device results.

Four CPU devices need XLA_FLAGS before JAX starts, so that part runs in a subprocess: the samplers
on toy problems (an uneven batch of 5 over 4 devices), then the restore CLI with the tiny UNet, whose
outputs must equal the same run on one device here. A device's slice is another program than the
whole batch (another batch size), so the results agree to float32 round-off, not bit for bit: the
bounds below are set from what that round-off does on AVX-512, AVX2 and AVX (no FMA) builds of XLA.
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import jax
import numpy as np
import pytest

from cli_helpers import FAST, picture, random_faces, tiny_weights
from sampler_toys import SHAPE, conv_denoiser, gaussian_denoiser, matrix_forward, random_problem
from spgd_jax import restore, sharding
from spgd_jax.samplers import EulerConfig, SPGDConfig, sample, sample_sharded, sweep

FOUR_DEVICES = textwrap.dedent("""
    import sys
    import dataclasses
    import jax
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from sampler_toys import SHAPE, conv_denoiser, matrix_forward, random_problem
    from spgd_jax import restore, sharding
    from spgd_jax.samplers import DPSConfig, SPGDConfig, sample, sample_sharded, sweep

    assert jax.device_count() == 4, jax.devices()
    # Each field to 3e-5 of its largest value (the toy conv net's floor, as in test_spgd): round-off
    # moved a field by <= 2.1e-7 of it, but near-zero entries by up to 4e-4 of themselves (a consecutive
    # angle of 0.004 deg off by 1.5e-6, against the old flat atol 1e-6). An lr or zeta off by 1e-3
    # exceeds this bound 26x / 8x in x, two images' keys swapped 5e3x, a step more moves x by 0.3.
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=3e-5 * np.abs(np.asarray(b, float)).max())
    denoiser = conv_denoiser()
    matrices, _, y, _ = random_problem(5)  # 5 images: padded to 8, 2 per device
    key = jax.random.key(7)
    for config in (SPGDConfig(lr=1.0, steps=4, warmup=3, diagnostics=True, trajectory_every=2),
                   DPSConfig(zeta=0.5, steps=4)):
        single = sample(denoiser, matrix_forward, y, key, config, matrices, x_shape=SHAPE)
        split = sample_sharded(denoiser, matrix_forward, y, key, config, matrices, x_shape=SHAPE)
        assert single.x.devices() == {jax.devices()[0]}
        jax.tree_util.tree_map(close, split, jax.device_get(single))
        np.testing.assert_array_equal(split.diverged_step, single.diverged_step)
    lrs = [0.5, 2.0]
    single = sweep(denoiser, matrix_forward, y, key, config := SPGDConfig(lr=1.0, steps=4, warmup=3), lrs,
                      matrices, x_shape=SHAPE)
    split = sample_sharded(denoiser, matrix_forward, y, key, config, matrices, x_shape=SHAPE, step_sizes=lrs)
    jax.tree_util.tree_map(close, split, jax.device_get(single))
    try:
        sharding.shard_batch(np.zeros((5, 2)), sharding.batch_mesh())
        raise AssertionError("5 rows over 4 devices were accepted")
    except ValueError as error:
        assert "multiple of 4" in str(error), error
    assert restore.main(sys.argv[2:]) == 0
    print("four devices: OK")
""")


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    faces = random_faces(tmp_path_factory.mktemp("faces"), names=("a", "b", "c", "d", "e"))
    return tiny_weights(tmp_path_factory), faces


def _cli_arguments(weights, faces, out):
    return ["--task", "inpaint", "--input", str(faces), "--weights", weights, "--out", str(out), *FAST]


def test_four_devices_equal_one(cli_inputs, tmp_path):
    weights, faces = cli_inputs
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    tests = Path(__file__).parent
    done = subprocess.run(
        [sys.executable, "-c", FOUR_DEVICES, str(tests), *_cli_arguments(weights, faces, tmp_path / "four")],
        env=env, capture_output=True, text=True, timeout=900, cwd=tests.parent,
    )
    assert done.returncode == 0 and "four devices: OK" in done.stdout, done.stderr[-4000:]

    assert restore.main(_cli_arguments(weights, faces, tmp_path / "one")) == 0
    four, one = tmp_path / "four", tmp_path / "one"
    assert len(json.loads((four / "config.json").read_text())["devices"]) == 4
    assert len(json.loads((one / "config.json").read_text())["devices"]) == jax.local_device_count()
    # One image per device here against two per program on one device: float32 round-off may move a
    # pixel across a rounding boundary (one 8-bit level) and a metric in its last digits, nothing more.
    # A run from another seed differs by up to 255 levels, an lr off by 1e-3 moves residual_rms by 1e-2
    # (1000x the rtol below; the saturated pictures of this random prior do not show it).
    pngs = sorted(p.relative_to(one) for p in one.rglob("*.png"))
    assert len(pngs) == 2 * 5 + 1
    for path in pngs:
        levels = np.abs(picture(four / path).astype(int) - picture(one / path))
        assert levels.max() <= 1, (path, levels.max())
    records = [json.loads((o / "metrics.json").read_text())["images"] for o in (four, one)]
    assert [sorted(r) for r in records[0]] == [sorted(r) for r in records[1]]
    for a, b in zip(*records, strict=True):
        for key, value in b.items():
            if isinstance(value, (float, list)):  # list: --samples' sample_psnr
                assert a[key] == pytest.approx(value, rel=1e-5), (b["name"], key)
            else:
                assert a[key] == value, (b["name"], key)


def test_map_images_on_this_process_pads_and_checks_inputs():
    matrices, _, y, _ = random_problem(3)
    mesh = sharding.batch_mesh()
    config = SPGDConfig(lr=1.0, steps=3, warmup=2)
    result = sample_sharded(gaussian_denoiser, matrix_forward, y, jax.random.key(0), config, matrices,
                            x_shape=SHAPE, mesh=mesh)
    assert isinstance(result.x, np.ndarray) and result.x.shape == (3,) + SHAPE
    alone = sample(gaussian_denoiser, matrix_forward, y, jax.random.key(0), config, matrices, x_shape=SHAPE)
    # shard_map over a one-device mesh compiles another program: equal to round-off (a few ulp of the
    # 32-term products here), 1e-5 of each field's scale; a wrong image's key or y moves x by O(1)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(np.asarray(b, float)).max())
    jax.tree_util.tree_map(close, result, jax.device_get(alone))
    with pytest.raises(ValueError, match="same leading image axis"):
        sharding.map_images(lambda a, b: a, y, matrices[:2], mesh=mesh)


# ---- a batch in parts side by side on one CPU (sharding.cpu_parts, map_parts) ----


@pytest.mark.parametrize("batch, most, cores, parts", [
    (4, None, 8, 2), (8, None, 8, 2), (5, None, 8, 1), (1, None, 8, 1),  # the default: at most CPU_PARTS (2)
    (6, "4", 8, 3), (12, "4", 8, 4), (12, "4", 3, 3), (4, "1", 8, 1),  # the largest divisor within both limits
])
def test_cpu_parts_is_the_largest_divisor_within_the_setting_and_the_cores(monkeypatch, batch, most, cores, parts):
    if most is None:
        monkeypatch.delenv(sharding.ENV_PARTS, raising=False)
    else:
        monkeypatch.setenv(sharding.ENV_PARTS, most)
    monkeypatch.setattr(sharding.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert sharding.cpu_parts(batch) == parts


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_cpu_parts_names_a_bad_setting(monkeypatch, value):
    monkeypatch.setenv(sharding.ENV_PARTS, value)
    with pytest.raises(ValueError, match=f"SPGD_JAX_CPU_PARTS={value!r}.*whole number >= 1"):
        sharding.cpu_parts(4)


def test_map_parts_cuts_joins_and_runs_the_parts_at_once_under_the_callers_settings():
    parts = 3
    together = threading.Barrier(parts, timeout=60)  # passes only if all three calls are running at once
    seen = []

    def fn(images, keys, nothing, columns):
        together.wait()
        seen.append((threading.get_ident(), jax.config.jax_default_matmul_precision, images.shape, columns.shape))
        assert nothing is None
        return {"sum": images * 2 + keys[:, None], "columns": columns.T + 1.0}

    images = np.arange(12.0).reshape(6, 2)
    keys = jax.numpy.arange(6.0)
    columns = np.arange(18.0).reshape(3, 6)  # image axis 1
    with jax.default_matmul_precision("bfloat16"):
        out = sharding.map_parts(fn, images, keys, None, columns, parts=parts, in_axes=(0, 0, 0, 1))
    np.testing.assert_array_equal(out["sum"], images * 2 + np.arange(6.0)[:, None])
    np.testing.assert_array_equal(out["columns"], columns.T + 1.0)
    assert len({ident for ident, *_ in seen}) == parts
    assert {precision for _, precision, *_ in seen} == {"bfloat16"}
    assert {shape for *_, shape, _ in seen} == {(2, 2)} and {c for *_, c in seen} == {(3, 2)}


def test_sample_runs_a_concrete_cpu_batch_in_parts_equal_to_one_call(monkeypatch):
    calls = []
    real = sharding.map_parts

    def spy(fn, *args, parts, **kwargs):
        calls.append(parts)
        return real(fn, *args, parts=parts, **kwargs)

    monkeypatch.setattr(sharding, "map_parts", spy)
    monkeypatch.setattr(sharding.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # on any machine
    matrices, _, y, _ = random_problem(4)
    key = jax.random.key(3)
    config = SPGDConfig(lr=1.0, steps=4, warmup=2, trajectory_every=2)
    denoiser = conv_denoiser()
    split = sample(denoiser, matrix_forward, y, key, config, matrices, x_shape=SHAPE)
    assert calls == [2]
    monkeypatch.setenv(sharding.ENV_PARTS, "1")
    whole = sample(denoiser, matrix_forward, y, key, config, matrices, x_shape=SHAPE)
    assert calls == [2, 1]
    # another program (batch 2) than the whole batch's: equal to round-off (as the devices' slices above);
    # an image's key or y swapped between the parts moves x by O(1)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=3e-5 * np.abs(np.asarray(b, float)).max())
    jax.tree_util.tree_map(close, split, whole)
    assert split.x.shape == (4,) + SHAPE and split.trajectory.shape == (4, 2) + SHAPE
    monkeypatch.delenv(sharding.ENV_PARTS)

    # segments with progress, and a sweep (its carry and results (L, B, ...)): the same, in parts
    steps = []
    segmented = sample(denoiser, matrix_forward, y, key, config, matrices, x_shape=SHAPE, progress=steps.append)
    assert steps == [0, 1, 2, 3] and set(calls[2:]) == {2}
    jax.tree_util.tree_map(close, segmented, whole)
    lrs = [0.5, 2.0]
    swept = sweep(denoiser, matrix_forward, y, key, config, lrs, matrices, x_shape=SHAPE, progress=lambda i: None)
    assert swept.x.shape == (2, 4) + SHAPE
    for index, lr in enumerate(lrs):
        one = sample(denoiser, matrix_forward, y, key, dataclasses.replace(config, lr=lr), matrices, x_shape=SHAPE)
        jax.tree_util.tree_map(close, jax.tree_util.tree_map(lambda a: a[index], swept), one)

    # unconditional sampling: the batch comes from the keys, which split with the images
    keys = jax.random.split(key, 4)
    generated = sample(denoiser, None, None, keys, EulerConfig(steps=3), x_shape=SHAPE)
    assert calls[-1] == 2
    monkeypatch.setenv(sharding.ENV_PARTS, "1")
    jax.tree_util.tree_map(close, generated, sample(denoiser, None, None, keys, EulerConfig(steps=3), x_shape=SHAPE))
    monkeypatch.delenv(sharding.ENV_PARTS)

    # inside the caller's jit: one program, no parts
    del calls[:]
    jitted = jax.jit(lambda y: sample(denoiser, matrix_forward, y, key, config, matrices, x_shape=SHAPE).x)
    jax.tree_util.tree_map(close, jitted(y), whole.x)
    assert calls == [1]
    with jax.disable_jit():  # op by op: one call
        sample(denoiser, matrix_forward, y, key, dataclasses.replace(config, steps=2), matrices, x_shape=SHAPE)
    assert calls == [1, 1]
    # arguments the whole call rejects: its message, not an error from cutting them
    with pytest.raises(ValueError, match="leading batch axis B = 4"):
        sample(denoiser, matrix_forward, y, key, config, matrices[:2], x_shape=SHAPE)


def test_map_images_on_one_cpu_device_runs_in_parts(monkeypatch):
    calls = []
    real = sharding.map_parts
    monkeypatch.setattr(sharding, "map_parts", lambda fn, *a, parts, **k: calls.append(parts) or real(fn, *a, parts=parts, **k))
    monkeypatch.setattr(sharding.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # on any machine
    matrices, _, y, _ = random_problem(4)
    config = SPGDConfig(lr=1.0, steps=3, warmup=2)
    mesh = sharding.batch_mesh(jax.devices()[:1])
    split = sample_sharded(conv_denoiser(), matrix_forward, y, jax.random.key(1), config, matrices, x_shape=SHAPE,
                           mesh=mesh)
    assert calls == [2] and isinstance(split.x, np.ndarray)
    monkeypatch.setenv(sharding.ENV_PARTS, "1")
    whole = sample_sharded(conv_denoiser(), matrix_forward, y, jax.random.key(1), config, matrices, x_shape=SHAPE,
                           mesh=mesh)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=3e-5 * np.abs(np.asarray(b, float)).max())
    jax.tree_util.tree_map(close, split, whole)
    lrs = [0.5, 2.0]  # a sweep: results (L, B, ...), joined along the image axis 1
    swept = sample_sharded(conv_denoiser(), matrix_forward, y, jax.random.key(1), config, matrices, x_shape=SHAPE,
                           mesh=mesh, step_sizes=lrs)
    monkeypatch.delenv(sharding.ENV_PARTS)
    swept_in_parts = sample_sharded(conv_denoiser(), matrix_forward, y, jax.random.key(1), config, matrices,
                                    x_shape=SHAPE, mesh=mesh, step_sizes=lrs, progress=lambda i: None)
    assert calls[-1] == 2 and swept_in_parts.x.shape == (2, 4) + SHAPE
    jax.tree_util.tree_map(close, swept_in_parts, swept)


@pytest.mark.parametrize("dtype, precision", [("float32", None), ("float32", "bfloat16"), ("bfloat16", None)])
def test_native_kernels_give_the_same_bits_in_programs_run_at_once(dtype, precision):
    """map_parts runs programs side by side: spgd_jax's native kernels (convolutions float32 and with bfloat16
    products, oneDNN's bfloat16 ones, GroupNorm, attention) must keep no state that two calls at once share.
    oneDNN's own scratchpad did: two tiny convolutions at once spoiled 337 of 400 results."""
    from test_unet import random_params

    from spgd_jax import make_denoiser
    from spgd_jax.models.adm import CONFIGS

    denoiser = make_denoiser(CONFIGS["tiny16"], random_params(CONFIGS["tiny16"]), dtype=dtype)
    gradient = jax.jit(jax.grad(lambda x, sigma: jax.numpy.sum(denoiser(x, sigma).astype(np.float32) ** 2)))
    rng = np.random.default_rng(0)
    images = jax.numpy.asarray(rng.standard_normal((4, 16, 16, 3)), np.float32)
    sigmas = jax.numpy.asarray([0.5, 2.0, 5.0, 20.0], np.float32)
    with jax.default_matmul_precision(precision):
        alone = [np.asarray(gradient(images[k:k + 2], sigmas[k:k + 2])) for k in (0, 2)]
        for _ in range(20):
            together = sharding.map_parts(lambda x, s: np.asarray(gradient(x, s)), images, sigmas, parts=2)
            np.testing.assert_array_equal(together, np.concatenate(alone))
