"""Compile once, reuse everywhere: the weights and the step size are traced arguments of the sampler.

Compilations are counted with jax.monitoring (one '/jax/core/compile/backend_compile_duration' event per
XLA compilation) around calls whose inputs are already on the device.
"""

import contextlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spgd_jax
from cli_helpers import random_faces
from test_unet import random_params
from spgd_jax import operators
from spgd_jax.io import checkpoint
from spgd_jax.models import adm

CONFIG = adm.CONFIGS["tiny16"]
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, duration, **kwargs: _compiles.append(name) if name == COMPILE_EVENT else None)


@contextlib.contextmanager
def count_compilations():
    start = len(_compiles)
    counted = []
    yield counted
    counted.append(len(_compiles) - start)


@pytest.fixture(autouse=True)
def no_shared_cache():
    """Compilations are counted in this process: none may come from the tests' shared cache (conftest.py)."""
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", enabled)


def _params(seed):
    return jax.tree_util.tree_map(jnp.asarray, random_params(CONFIG, seed))  # no zero-initialised output layer


@pytest.fixture(scope="module")
def problem():
    op = operators.get("sr4", 16)
    x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
    params = op.init_params(jax.random.key(2), 2, 16)
    return op, op.measure(jax.random.key(3), x, params), params


def test_other_weights_of_the_same_config_and_other_step_sizes_reuse_the_compiled_sampler(problem):
    op, y, op_params = problem
    first, second = (spgd_jax.make_denoiser(CONFIG, _params(seed)) for seed in (0, 1))
    key = jax.random.key(4)
    run = lambda denoiser, config: spgd_jax.sample(denoiser, op.forward, y, key, config, op_params,
                                                   x_shape=(16, 16, 3)).x.block_until_ready()
    spgd = spgd_jax.SPGDConfig(lr=1.0, steps=3, warmup=2)
    with count_compilations() as cold:
        a = run(first, spgd)
    with count_compilations() as warm:
        b = run(second, spgd)  # other weights, same config
        c = run(second, spgd_jax.SPGDConfig(lr=2.0, steps=3, warmup=2))  # another learning rate
    assert cold[0] >= 1 and warm[0] == 0
    assert not np.allclose(a, b) and not np.allclose(b, c)  # the weights and the rate are really used
    np.testing.assert_array_equal(c, run(second, spgd_jax.SPGDConfig(lr=2.0, steps=3, warmup=2)))

    with count_compilations() as other:
        run(second, spgd_jax.SPGDConfig(lr=1.0, steps=4, warmup=2))  # T is the program's shape: compiles
    assert other[0] >= 1


def test_the_restore_command_reuses_its_program_for_another_checkpoint(tmp_path):
    from spgd_jax import restore

    faces = random_faces(tmp_path)
    paths = [checkpoint.save(tmp_path / f"w{seed}", _params(seed), CONFIG) for seed in (0, 1)]
    fast = ["--task", "sr4", "--input", str(faces), "--steps", "3", "--warmup", "2", "--batch-size", "2",
            "--quiet", "--no-cache"]
    assert restore.main([*fast, "--weights", str(paths[0]), "--out", str(tmp_path / "a")]) == 0
    with count_compilations() as warm:
        assert restore.main([*fast, "--weights", str(paths[1]), "--out", str(tmp_path / "b"), "--lr", "3"]) == 0
    assert warm[0] == 0


@pytest.mark.parametrize("quiet", [True, False], ids=["quiet", "progress"])
def test_a_second_command_line_process_reads_the_compiled_sampler_from_the_cache(tmp_path, quiet):
    """The sampler's programs have no host callback, with --quiet (one call) or with progress (a run in
    segments), so JAX's persistent cache keeps them: the second process's XLA compile phase (cache reads
    included) is at most 20% of the first's."""
    faces = random_faces(tmp_path)
    weights = checkpoint.save(tmp_path / "w", _params(0), CONFIG)
    code = (
        "import sys, jax\n"
        "total = [0.0]\n"
        "def listen(event, seconds, **_):\n"
        "    if event == '/jax/core/compile/backend_compile_duration': total[0] += seconds\n"
        "jax.monitoring.register_event_duration_secs_listener(listen)\n"
        "from spgd_jax import restore\n"
        "assert restore.main(sys.argv[1:]) == 0\n"
        "print('compile seconds', total[0])\n"
    )
    env = {**os.environ, "SPGD_JAX_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("SPGD_JAX_NO_CACHE", None)
    seconds = []
    for run in ("a", "b"):
        arguments = ["--task", "sr4", "--input", str(faces), "--weights", str(weights), "--steps", "3", "--warmup",
                     "2", "--batch-size", "2", "--out", str(tmp_path / run)] + (["--quiet"] if quiet else [])
        done = subprocess.run([sys.executable, "-c", code, *arguments], env=env, capture_output=True, text=True,
                              timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        seconds.append(float(done.stdout.split("compile seconds")[-1]))
    assert any((tmp_path / "cache").iterdir())
    assert seconds[1] <= 0.2 * seconds[0], seconds
