"""JAX's persistent compilation cache, on by default for the command lines and benchmarks.

A compiled program is written to the cache directory and read back by the next process with the same
program (same shapes, device and jax version), which then skips XLA compilation:

    $SPGD_JAX_CACHE_DIR, else $XDG_CACHE_HOME/spgd-jax/xla, else ~/.cache/spgd-jax/xla

Known limit (jax 0.10): a program with a host callback, as `spgd_jax.sample` makes when given
`progress`, is keyed by the callback's address, which differs in every process, so it never hits
across processes. The command lines' programs have none: `sharding.sample_sharded` runs a sampler with
progress in segments (spgd_jax.samplers.segments), and without progress in one call. Runs within one
process reuse the compiled sampler regardless (its weights and step size are arguments).

The command lines also keep their samplers' compiled programs themselves in its `executables` folder, read
back without tracing (spgd_jax.xla_setup.executables); that store is on exactly when this cache is.

Set SPGD_JAX_NO_CACHE=1 (or pass --no-cache to the command lines) to turn both off. Library users who
want it call `enable_compilation_cache()` before their first compilation.
"""

from __future__ import annotations

import os
from pathlib import Path


__all__ = ["ENV_DIR", "ENV_OFF", "default_cache_dir", "enable_compilation_cache"]

ENV_DIR = "SPGD_JAX_CACHE_DIR"
ENV_OFF = "SPGD_JAX_NO_CACHE"
MIN_COMPILE_S = 0.0  # every program: a run compiles some 80 small ones besides the sampler (3 s in all on a CPU)


def default_cache_dir() -> Path:
    """$SPGD_JAX_CACHE_DIR, else $XDG_CACHE_HOME/spgd-jax/xla, else ~/.cache/spgd-jax/xla."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "spgd-jax" / "xla"


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> Path | None:
    """Turns on JAX's persistent compilation cache in `directory` (default: default_cache_dir()) for every
    program that takes MIN_COMPILE_S or more to compile; returns the directory, or None when SPGD_JAX_NO_CACHE
    is set or the directory cannot be created (then nothing is cached and nothing fails)."""
    if os.environ.get(ENV_OFF, "") not in ("", "0"):
        return None
    path = Path(directory) if directory is not None else default_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    import jax  # here, not at the top: `import spgd_jax` (which imports this package) stays free of JAX

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
