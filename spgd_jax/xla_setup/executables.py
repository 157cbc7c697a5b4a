"""Compiled programs kept on disk, so that a later process runs them without tracing, lowering or compiling.

JAX's persistent compilation cache (compile_cache.py) saves XLA's compile, but a process still traces its
programs in Python and lowers them to find the cache entry: for the default prior's sampler, some 5 s of
a warm start on 2 cores. This store keeps the compiled executable itself (jax.experimental.
serialize_executable), under a key computed without tracing, in the `executables` folder of JAX's cache
directory:

    program = load_or_compile(jax.jit(f), args, identity=("my-f", 3))
    out = program(*args)

`identity` must name, as strings and numbers, everything static that the arguments do not show: the
function and its settings. The key adds the arguments' tree structure (static fields included), shapes,
dtypes and shardings, the devices, the jax, jaxlib, flax and numpy versions, the jax config, $XLA_FLAGS
(when spgd_jax was imported and now), the CPU's convolution and GroupNorm routes (xla_setup.onednn,
xla_setup.direct_conv, xla_setup.group_norm_kernels, xla_setup.attention_kernels) and a digest of spgd_jax's own source, so that an edit of the library, an
upgrade or another flag never reads an old program. A callable that cannot be named stably across processes
must not use the store.

The store is on only while JAX's persistent cache is (enable_compilation_cache; off with SPGD_JAX_NO_CACHE=1).
An entry is written whole or not at all (a temporary file, then os.replace); an unreadable, truncated or
corrupt one is reported in one line, compiled again and replaced; a directory that cannot be written is
used for nothing (the program runs, unsaved). Every entry read is touched; writing one removes those not
used for UNUSED_DAYS (an edit of spgd_jax leaves its old programs behind).
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import tempfile
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import serialize_executable

from spgd_jax.xla_setup.compile_cache import ENV_OFF
from spgd_jax.xla_setup import attention_kernels, direct_conv, group_norm_kernels, onednn
from spgd_jax.xla_setup.cpu_flags import flags_at_import

__all__ = ["FOLDER", "UNUSED_DAYS", "ExecutableStoreWarning", "load_or_compile", "program_key", "store_dir"]

FOLDER = "executables"  # inside JAX's compilation cache directory
_MAGIC = b"spgd-jax executable 1\n"
_SKIPPED_CONFIG = ("cache", "log", "dump", "pprint", "traceback")  # jax config that does not change a program
UNUSED_DAYS = 30
_LOADED: dict[str, Any] = {}  # key -> the process's Compiled (a run calls each program several times)


class ExecutableStoreWarning(UserWarning):
    """A stored program could not be read back (it is compiled again and its entry replaced)."""


def store_dir() -> Path | None:
    """The folder of stored programs: FOLDER in JAX's compilation cache directory; None when that cache is
    off (SPGD_JAX_NO_CACHE=1, or jax_compilation_cache_dir unset)."""
    if os.environ.get(ENV_OFF, "") not in ("", "0") or not jax.config.jax_compilation_cache_dir:
        return None
    return Path(jax.config.jax_compilation_cache_dir) / FOLDER


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    """sha256 of every .py file of the spgd_jax package (paths and contents), once per process."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _versions() -> tuple:
    found = []
    for name in ("jax", "jaxlib", "flax", "numpy", "ml_dtypes"):
        try:
            found.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            found.append((name, None))
    return tuple(found)


@functools.lru_cache(maxsize=1)
def _process() -> tuple:
    """What a process compiles for, besides its flags and config: versions, source, devices."""
    devices = [(d.id, d.platform, d.device_kind, d.process_index) for d in jax.devices()]
    # The CPU's bfloat16 convolution route (oneDNN's handler, registered here when built, so that a stored
    # program that calls it can be read back; nothing is compiled for a process that never needs it).
    convolutions = onednn.fingerprint() if devices[0][1] == "cpu" else None
    group_norms = group_norm_kernels.fingerprint() if devices[0][1] == "cpu" else None  # likewise, GroupNorm's
    float32_convolutions = direct_conv.fingerprint() if devices[0][1] == "cpu" else None  # and float32 convolutions'
    attentions = attention_kernels.fingerprint() if devices[0][1] == "cpu" else None  # and attention's
    return (_versions(), _source_digest(), jax.devices()[0].client.platform_version, jax.process_count(),
            tuple(devices), convolutions, group_norms, float32_convolutions, attentions)


def _leaf(leaf: Any) -> tuple:
    sharding = getattr(leaf, "sharding", None)
    devices = None if sharding is None else tuple(sorted(d.id for d in sharding.device_set))
    return (np.shape(leaf), str(getattr(leaf, "dtype", type(leaf).__name__)), getattr(leaf, "weak_type", None),
            repr(sharding), devices)


def program_key(args: tuple, identity: tuple) -> tuple[str, str]:
    """(hex key, the text it digests) of a program called with `args` and named by `identity`; computed
    without tracing. Raises TypeError when identity holds anything but strings, numbers, bools, None
    and tuples of them (their repr must not change between processes)."""
    _check_identity(identity)
    leaves, treedef = jax.tree_util.tree_flatten(args)
    config = sorted((name, repr(value)) for name, value in jax.config.values.items()
                    if not any(word in name for word in _SKIPPED_CONFIG))
    flags = (flags_at_import(), os.environ.get("XLA_FLAGS", ""))
    text = repr((identity, repr(treedef), [_leaf(leaf) for leaf in leaves], flags, config, _process()))
    return hashlib.sha256(text.encode()).hexdigest(), text


def _check_identity(identity: Any) -> None:
    if isinstance(identity, tuple):
        for part in identity:
            _check_identity(part)
    elif identity is not None and not isinstance(identity, (str, int, float, bool)):
        raise TypeError(f"a program's identity holds strings, numbers and tuples of them; got {identity!r} "
                        f"({type(identity).__name__}), whose repr may differ between processes")


def load_or_compile(jitted: Callable, args: tuple, identity: tuple) -> Callable:
    """The compiled program of `jitted` (a jax.jit function) for `args`: read from the store when there,
    else lowered and compiled and then stored. `jitted` itself when the store is off, and in a run of several
    processes (jax.distributed: not measured). Call the result with arguments of the same structure, shapes,
    dtypes and shardings as `args`."""
    directory = store_dir()
    if directory is None or jax.process_count() > 1:
        return jitted
    key, text = program_key(args, identity)
    if key in _LOADED:
        return _LOADED[key]
    path = directory / f"{key}.bin"
    compiled = _read(path, text)
    if compiled is None:
        compiled = _compile_afresh(jitted, args)
        _write(path, text, compiled)
    _LOADED[key] = compiled
    return compiled


def _compile_afresh(jitted: Callable, args: tuple) -> Any:
    """jitted compiled by XLA, not read from JAX's persistent cache: jaxlib 0.10's XLA:CPU serializes an
    executable read from that cache without its kernels (the copy fails when run: 'Function ... not found').
    An option set to its default gives the program a cache key of its own, and it is never written there."""
    from jax._src import config  # no public API sets this for one compilation (thread-local)

    with config.persistent_cache_min_compile_time_secs(float("inf")):
        return jitted.lower(*args).compile(compiler_options={"xla_embed_ir_in_executable": False})


def _read(path: Path, text: str) -> Any:
    """The stored program at path, or None (absent; unreadable or corrupt: with a warning)."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:
        return _unreadable(path, f"cannot be read ({error})")
    header, _, payload = data.partition(b"\n\n")
    if not header.startswith(_MAGIC) or header[len(_MAGIC):] != hashlib.sha256(payload).hexdigest().encode():
        return _unreadable(path, "is truncated or corrupt")
    try:
        stored_text, serialized, in_tree, out_tree = pickle.loads(payload)
        if stored_text != text:
            return _unreadable(path, "belongs to another program")
        compiled = serialize_executable.deserialize_and_load(serialized, in_tree, out_tree)
    except Exception as error:  # XLA and pickle raise many kinds; each means: compile it again
        return _unreadable(path, f"cannot be loaded ({type(error).__name__}: {str(error).splitlines()[0][:200]})")
    try:
        os.utime(path)  # used now: kept by _remove_unused
    except OSError:
        pass
    return compiled


def _unreadable(path: Path, problem: str) -> None:
    warnings.warn(f"stored compiled program {path} {problem}; compiling it again and replacing it",
                  ExecutableStoreWarning, stacklevel=4)
    return None


def _write(path: Path, text: str, compiled: Any) -> None:
    """Stores `compiled` at path whole (temporary file, then os.replace); nothing when it cannot."""
    try:
        payload = pickle.dumps((text, *serialize_executable.serialize(compiled)))
    except Exception:  # a program XLA cannot serialize (e.g. with host callbacks): it just runs unsaved
        return
    data = _MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n\n" + payload
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as stream:
            temporary = stream.name
            stream.write(data)
        os.replace(temporary, path)
    except OSError:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        return
    _remove_unused(path.parent)


def _remove_unused(directory: Path) -> None:
    """Removes the entries (and temporary files a killed process left) not used for UNUSED_DAYS."""
    oldest = time.time() - UNUSED_DAYS * 24 * 3600
    for entry in directory.glob("*.bin*"):
        try:
            if entry.stat().st_mtime < oldest:
                entry.unlink()
        except OSError:
            pass
