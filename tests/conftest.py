"""The tests share one persistent compilation cache per run, in a temporary folder (never the user's):
a program that several tests, test workers or command-line subprocesses compile (the tiny UNet's
samplers above all) is compiled once. tests/test_compilation.py counts compilations with it off and
tests the cache in folders of its own. SPGD_JAX_NO_CACHE=1 in the environment turns it off."""

import os
import shutil
import tempfile
import time
from pathlib import Path

PREFIX = "spgd-jax-test-cache-"
STALE_S = 24 * 3600  # an earlier run's folder older than this is removed


def _run_cache() -> Path:
    """One folder per test run: the xdist workers of a run share its id; a run without xdist has its own."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
    root = Path(tempfile.gettempdir())
    for old in root.glob(PREFIX + "*"):
        try:
            if time.time() - old.stat().st_mtime > STALE_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    return root / (PREFIX + run)


if os.environ.get("SPGD_JAX_NO_CACHE", "") in ("", "0"):
    os.environ["SPGD_JAX_CACHE_DIR"] = str(_run_cache())  # inherited by the command lines' subprocesses
    from spgd_jax.xla_setup.compile_cache import enable_compilation_cache

    enable_compilation_cache()  # in this process too

