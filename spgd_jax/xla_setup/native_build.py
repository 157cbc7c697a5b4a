"""spgd_jax's C++ XLA FFI handlers, compiled once per machine with the system's compiler and kept.

A handler's source ships in the package (xla_setup/*.cc); the first process that needs it compiles it against
the XLA FFI headers jaxlib ships, with `c++` (or $CXX), into

    $XDG_CACHE_HOME/spgd-jax/<name>-<digest>/lib<...>.so

(else ~/.cache/...; a temporary folder if neither is writable), keyed by a digest of the source, jaxlib's
version and what else the caller names, so later processes load it in milliseconds. The file appears whole or not at all, so processes building side by side do no harm.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build", "library_paths"]

_BUILD_TIMEOUT_S = 300


def library_paths(source: Path, name: str, library: str, digest_parts: Sequence[bytes] = ()) -> list[Path]:
    """The places of `source` compiled as `library`, first choice first: the user's cache, then a temporary
    folder, in a folder `name`-<digest of the source, jaxlib's version and digest_parts>."""
    import jaxlib  # noqa: PLC0415 (importing spgd_jax stays free of JAX)

    digest = hashlib.sha256(b"\0".join([source.read_bytes(), jaxlib.__version__.encode(), *digest_parts]))
    folder = f"{name}-{digest.hexdigest()[:16]}"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spgd-jax"
    roots = (cache, Path(tempfile.gettempdir()) / f"spgd-jax-{os.getuid()}")
    return [root / folder / library for root in roots]


def build(source: Path, targets: Sequence[Path], flags: Sequence[str] = (), link: Sequence[str] = ()) -> Path:
    """The first of `targets` that exists, else `source` compiled (with `flags` besides the XLA FFI headers', and
    linked with `link`) into the first writable one. Raises RuntimeError saying why it could not be had."""
    import jax.ffi  # noqa: PLC0415 (the XLA FFI headers' folder)

    for target in targets:
        if target.exists():
            return target
    for target in targets:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        if compiler is None:
            raise RuntimeError("no C++ compiler was found (install g++, or set $CXX)")
        partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        command = [compiler, "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}", *flags,
                   str(source), *link, "-o", str(partial)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
            if done.returncode != 0:
                raise RuntimeError(f"compiling {source.name} failed: {done.stderr.strip()[-600:]}")
            os.replace(partial, target)  # whole or not at all; a peer process may have put the same file there
        finally:
            partial.unlink(missing_ok=True)
        return target
    raise RuntimeError(f"no writable folder for the compiled library ({', '.join(str(t.parent) for t in targets)})")
