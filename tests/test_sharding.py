"""The image batch split over devices gives the single-device results.

Four CPU devices need XLA_FLAGS before JAX starts, so that part runs in a subprocess: the samplers
on toy problems (an uneven batch of 5 over 4 devices), then the restore CLI with the tiny UNet, whose
outputs must equal the same run on one device here. A device's slice is another program than the
whole batch (another batch size), so the results agree to float32 round-off, not bit for bit: the
bounds below are set from what that round-off does on AVX-512, AVX2 and AVX (no FMA) builds of XLA.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from cli_helpers import FAST, picture, random_faces, tiny_weights
from sampler_toys import SHAPE, gaussian_denoiser, matrix_forward, random_problem
from spgd_jax import restore, sharding
from spgd_jax.samplers import SPGDConfig, sample, sample_sharded

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
