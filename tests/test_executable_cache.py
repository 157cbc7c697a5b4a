"""The store of compiled programs (spgd_jax.xla_setup.executables): a later process runs the sampler's programs
without tracing them, with the same results; any change of what a program is made from changes its key; a
damaged entry is compiled again and replaced.

Tracing is counted with jax.monitoring: one '/jax/core/compile/jaxpr_trace_duration' event, named by the
traced function (`restore`, the sampler's per-device program), per program traced.
"""

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spgd_jax
from cli_helpers import random_faces
from spgd_jax import operators, sharding
from spgd_jax.io import checkpoint
from spgd_jax.models import adm
from spgd_jax.xla_setup import executables
from test_unet import random_params

TESTS = Path(__file__).resolve().parent
CONFIG = adm.CONFIGS["tiny16"]
# Counts the traces of the sampler's programs (`restore`) in a process; prints them last.
LISTEN = (
    "import sys, jax\n"
    "traced = []\n"
    "def listen(event, seconds, fun_name=None, **_):\n"
    "    if event == '/jax/core/compile/jaxpr_trace_duration' and fun_name == 'restore': traced.append(seconds)\n"
    "jax.monitoring.register_event_duration_secs_listener(listen)\n"
)
LIBRARY_RUN = LISTEN + (
    "import numpy as np, spgd_jax\n"
    "from spgd_jax import operators\n"
    "from spgd_jax.samplers import sample_sharded\n"
    "from spgd_jax.xla_setup import enable_compilation_cache\n"
    "from test_unet import random_params\n"
    "enable_compilation_cache()\n"
    "config = spgd_jax.models.adm.CONFIGS['tiny16']\n"
    "denoiser = spgd_jax.make_denoiser(config, jax.tree_util.tree_map(jax.numpy.asarray, random_params(config, 0)))\n"
    "op = operators.get('sr4', 16)\n"
    "x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)\n"
    "y = op.measure(jax.random.key(3), x, {})\n"
    "spgd = spgd_jax.SPGDConfig(lr=1.0, steps=3, warmup=2)\n"
    "run = lambda identity: sample_sharded(denoiser, op.forward, y, jax.random.key(4), spgd, x_shape=(16, 16, 3),\n"
    "                                      progress=lambda i: None, forward_identity=identity)\n"
    "stored = run(('SPGDConfig', 'sr4', 16))\n"
    "traces = len(traced)\n"
    "np.savez(sys.argv[1], stored=stored.x, plain=run(None).x)\n"
    "print('traced', traces)\n"
)
CLI_RUN = "from spgd_jax import restore\nassert restore.main(sys.argv[1:]) == 0\nprint('traced', len(traced))\n"


def _run_python(code: str, arguments: list[str], cache: Path, cwd: Path) -> int:
    """Runs code in a fresh process with the store in `cache`; returns how many sampler programs it traced."""
    env = {**os.environ, "SPGD_JAX_CACHE_DIR": str(cache), "PYTHONPATH": str(TESTS)}
    env.pop("SPGD_JAX_NO_CACHE", None)
    done = subprocess.run([sys.executable, "-c", code, *arguments], env=env, capture_output=True, text=True,
                          timeout=600, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split("traced")[-1])


def test_a_second_process_runs_the_stored_sampler_programs_untraced_with_the_same_bits(tmp_path):
    cache = tmp_path / "cache"
    first = _run_python(LIBRARY_RUN, [str(tmp_path / "a.npz")], cache, tmp_path)
    second = _run_python(LIBRARY_RUN, [str(tmp_path / "b.npz")], cache, tmp_path)
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert first == 3 and second == 0, (first, second)  # a run in segments: three programs
    assert len(list((cache / executables.FOLDER).glob("*.bin"))) == 3
    np.testing.assert_array_equal(a["stored"], a["plain"])  # the stored path compiles the same program
    np.testing.assert_array_equal(b["stored"], a["stored"])  # read back: the same bits
    assert np.isfinite(a["stored"]).all() and np.ptp(a["stored"]) > 0.1


def _arguments(config=None, batch=2):
    mesh = sharding.batch_mesh()
    config = spgd_jax.SPGDConfig(lr=1.0, steps=3, warmup=2) if config is None else config
    shared = sharding.replicate((config, jnp.ones((3,))), mesh)
    return (shared, *sharding.shard_batch((np.zeros((batch, 4, 4, 3), np.float32),), mesh))


def test_the_key_changes_with_every_part_of_what_a_program_is_made_from(monkeypatch):
    key = lambda args=None, identity=("f", 1): executables.program_key(_arguments() if args is None else args,
                                                                      identity)[0]
    base = key()
    assert key() == base  # deterministic
    assert key(_arguments(spgd_jax.SPGDConfig(lr=2.0, steps=3, warmup=2))) == base  # lr is an argument's value
    changed = {
        "a config field": key(_arguments(spgd_jax.SPGDConfig(lr=1.0, steps=4, warmup=2))),
        "another config field": key(_arguments(spgd_jax.SPGDConfig(lr=1.0, steps=3, warmup=2, adm="off"))),
        "a shape": key(_arguments(batch=4)),
        "the identity": key(identity=("f", 2)),
    }
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_fast_math=false")
    changed["XLA_FLAGS"] = key()
    monkeypatch.undo()
    with jax.default_matmul_precision("highest"):
        changed["the matmul precision"] = key()
    assert key() == base
    assert all(value != base for value in changed.values()), changed
    assert len(set(changed.values())) == len(changed)
    with pytest.raises(TypeError, match="identity"):
        executables.program_key(_arguments(), (lambda x: x,))  # its repr holds an address


@pytest.fixture()
def store(tmp_path, monkeypatch):
    """The store in a folder of this test's own, and no program of this process remembered."""
    folder = tmp_path / "executables"
    monkeypatch.setattr(executables, "store_dir", lambda: folder)
    monkeypatch.setattr(executables, "_LOADED", {})
    return folder


def _double(x):
    return 2.0 * x + 1.0


@pytest.mark.parametrize("damage", ["truncated", "flipped", "empty", "other program"])
def test_a_damaged_entry_warns_is_compiled_again_and_replaced(store, damage):
    jitted, x = jax.jit(_double), jnp.arange(4.0)
    np.testing.assert_array_equal(executables.load_or_compile(jitted, (x,), ("double",))(x), _double(x))
    (entry,) = store.glob("*.bin")
    data = entry.read_bytes()
    if damage == "other program":  # a valid entry of another program under this key
        executables._LOADED.clear()
        executables.load_or_compile(jitted, (x[:3],), ("double",))
        (other,) = set(store.glob("*.bin")) - {entry}
        data = other.read_bytes()
    entry.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                       "flipped": data[:-100] + bytes(b ^ 0xFF for b in data[-100:])}.get(damage, data))
    executables._LOADED.clear()
    with pytest.warns(executables.ExecutableStoreWarning, match="compiling it again"):
        program = executables.load_or_compile(jitted, (x,), ("double",))
    np.testing.assert_array_equal(program(x), _double(x))
    assert entry.read_bytes() != b"" and entry.read_bytes() != data[: len(data) // 2]
    executables._LOADED.clear()
    executables.load_or_compile(jitted, (x,), ("double",))  # replaced: read back without a warning
    assert not [p for p in store.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_a_store_that_cannot_be_written_runs_the_program_unsaved(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setattr(executables, "store_dir", lambda: blocked / "executables")
    monkeypatch.setattr(executables, "_LOADED", {})
    x = jnp.arange(3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to report: the store is just not used
        program = executables.load_or_compile(jax.jit(_double), (x,), ("double",))
    np.testing.assert_array_equal(program(x), _double(x))


def test_the_store_is_off_with_the_compilation_cache(monkeypatch):
    jitted = jax.jit(_double)
    monkeypatch.setenv("SPGD_JAX_NO_CACHE", "1")
    assert executables.store_dir() is None
    assert executables.load_or_compile(jitted, (jnp.ones(2),), ("double",)) is jitted


@pytest.mark.parametrize("inputs", ["demo face", "folder"])
def test_the_command_lines_second_run_reads_its_sampler_programs_from_the_store(tmp_path, inputs):
    """The demo face (a run of its own) and a folder of images (a dataset run) alike; --quiet: one program."""
    faces = ["--input", str(random_faces(tmp_path))] if inputs == "folder" else []
    weights = checkpoint.save(tmp_path / "w", random_params(CONFIG, 0), CONFIG)
    code = LISTEN + CLI_RUN
    traced = []
    for run in ("a", "b"):
        arguments = ["--task", "sr4", *faces, "--weights", str(weights), "--steps", "3", "--warmup", "2",
                     "--batch-size", "2", "--quiet", "--out", str(tmp_path / run)]
        traced.append(_run_python(code, arguments, tmp_path / "cache", tmp_path))
    assert traced[0] >= 1 and traced[1] == 0, traced
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("a", "b")]
    assert metrics[0] == metrics[1]
    for image in (tmp_path / "a").rglob("*.png"):
        assert image.read_bytes() == (tmp_path / "b" / image.relative_to(tmp_path / "a")).read_bytes(), image


def _layers(x, w):
    for _ in range(3):
        x = jnp.tanh(x @ w + 1.0).reshape(x.shape) * 2
    return x.sum(0) + jnp.exp(x).mean()


def test_a_program_already_in_jaxs_persistent_cache_is_stored_runnable(store):
    """XLA:CPU's copy of an executable read from JAX's persistent cache lacks its kernels: the store compiles
    its programs afresh (tests/conftest.py turns that cache on)."""
    args = (jnp.ones((64, 64)), jnp.full((64, 64), 1 / 64))
    expected = jax.jit(_layers)(*args)  # compiled and written to JAX's persistent cache
    jax.clear_caches()  # the next compilation reads it back from there
    executables.load_or_compile(jax.jit(_layers), args, ("layers",))
    executables._LOADED.clear()
    np.testing.assert_array_equal(executables.load_or_compile(jax.jit(_layers), args, ("layers",))(*args), expected)


def test_writing_an_entry_removes_those_unused_for_a_month_and_reading_one_keeps_it(store):
    x = jnp.arange(4.0)
    executables.load_or_compile(jax.jit(_double), (x,), ("double",))
    (used,) = store.glob("*.bin")
    month = time.time() - (executables.UNUSED_DAYS + 1) * 24 * 3600
    stale, leftover = store / ("0" * 64 + ".bin"), store / ".stale.bin.tmp"
    for path in (stale, leftover, used):
        path.touch(exist_ok=True)
        os.utime(path, (month, month))
    executables._LOADED.clear()
    executables.load_or_compile(jax.jit(_double), (x,), ("double",))  # read back: used now
    executables.load_or_compile(jax.jit(_double), (x[:2],), ("double",))  # a new entry: removes the unused
    assert used.exists() and not stale.exists() and not leftover.exists()
    assert len(list(store.glob("*.bin"))) == 2
