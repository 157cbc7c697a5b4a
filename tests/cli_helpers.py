"""Shared inputs for the restore CLI tests: one tiny random-weight prior per test session; and Python code run in
a fresh process.

The weights live at one path per session, so every test module that uses them gets the same loaded
denoiser from restore's cache, and runs with the same settings reuse one compiled sampler.
"""

import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from spgd_jax.io import checkpoint
from spgd_jax.models.adm import CONFIGS, UNet

FAST = ["--steps", "3", "--warmup", "2", "--batch-size", "2", "--quiet"]  # one compiled call for every such run


def tiny_weights(tmp_path_factory) -> str:
    """A tiny16 checkpoint (random weights, 16 px), written once per session."""
    path = tmp_path_factory.getbasetemp() / "tiny16-weights"
    if not path.exists():
        config = CONFIGS["tiny16"]
        params = UNet(config).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,)))["params"]
        checkpoint.save(path, params, config)
    return str(path)


def random_faces(folder, names=("a", "b", "c"), shape=(20, 24, 3)):
    """Random RGB PNGs (not square, not 16 px: loading crops and resizes them)."""
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


def picture(path) -> np.ndarray:
    """The pixels of an image file, (H, W[, C]), with the file closed again."""
    with Image.open(path) as image:
        return np.asarray(image)


def temporary_files(folder):
    """Leftover temporary files (hidden names) anywhere below folder."""
    return sorted(str(p) for p in folder.rglob(".*"))


def popen_as_from_a_terminal(command, **kwargs) -> subprocess.Popen:
    """subprocess.Popen(command, **kwargs) with the child's SIGINT at its default, as for a command typed at a
    terminal. A test run started in the background by a non-interactive shell (`(pytest &)`) ignores SIGINT,
    and a child inherits an ignored signal: the Ctrl-C tests' children would then run to their end. A handler
    set here (any Python one) is reset to the default in the child when it executes."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(command, **kwargs)
    finally:
        signal.signal(signal.SIGINT, previous)


def fresh_python(code: str, **env) -> subprocess.CompletedProcess:
    """`code` (dedented) run by this Python in a new process on the CPU, with `env` added to the environment."""
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env,
                          timeout=600)
