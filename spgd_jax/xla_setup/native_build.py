"""spgd_jax's C++ XLA FFI handlers, compiled once per machine with the system's compiler and kept.

A handler's source ships in the package (xla_setup/*.cc); the first process that needs it compiles it against
the XLA FFI headers jaxlib ships, with `c++` (or $CXX), into

    $XDG_CACHE_HOME/spgd-jax/<name>-<digest>/lib<...>.so

(else ~/.cache/...; a temporary folder if neither is writable), keyed by a digest of the source, jaxlib's
version and what else the caller names, so later processes load it in milliseconds. The file appears whole or not at all, so processes building side by side do no harm.
`Handlers` describes such a library of FFI handlers (GroupNorm's sums, the direct float32 convolution) and
registers it with XLA:CPU on first use.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["Handlers", "build", "library_paths"]

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


@dataclasses.dataclass(frozen=True)
class Handlers:
    """XLA FFI handlers of one C++ source of spgd_jax/xla_setup, built once per machine (`build`) and registered
    with XLA:CPU on first use. Where they cannot be had (turned off, another system, no compiler, a failed build,
    a CPU without the instructions) the callers take XLA's own ops, and `route()` says why.

    name: the cache folder's prefix. source: the .cc file; headers: the files of that folder it includes (part of
    the digest). library: the built file's name. symbols: (FFI target, exported handler symbol) pairs. env_off:
    the environment variable that turns them off with "0". flags: the compiler's flags besides the XLA FFI
    headers' and this folder. machines: the platform.machine() values they build on (empty: any).
    supported: an exported `int f(void)`, nonzero where this CPU runs the handlers ("" when any CPU does).
    """

    name: str
    source: Path
    library: str
    symbols: tuple[tuple[str, str], ...]
    env_off: str
    flags: tuple[str, ...] = ()
    headers: tuple[Path, ...] = ()
    machines: tuple[str, ...] = ()
    supported: str = ""

    def ineligible(self) -> str | None:
        """Why this process takes no handlers without trying (turned off, another system), else None."""
        if os.environ.get(self.env_off, "") == "0":
            return f"turned off ({self.env_off}=0)"
        if platform.system() != "Linux":
            return f"built on Linux only, not {platform.system()}"
        if self.machines and platform.machine() not in self.machines:
            return f"built for {', '.join(self.machines)} only, not {platform.machine()}"
        return None

    def targets(self) -> list[Path]:
        """The places of the built library (library_paths), first choice first."""
        parts = [platform.machine().encode(), *(header.read_bytes() for header in self.headers)]
        return library_paths(self.source, self.name, self.library, parts)

    def route(self) -> tuple[bool, str]:
        """(True, the library's path) once every handler is registered with XLA:CPU, or (False, why not). Built,
        loaded and registered on the first call of the process; turning them off by the environment takes
        effect at the next call."""
        why = self.ineligible()
        return (False, why) if why is not None else _register(self)

    def fingerprint(self) -> str:
        """What decides the route, found without compiling anything (for the keys of stored programs): why there
        is none, or the library's folder name (its digest). A library already built is registered here, so that
        a stored program that calls it can be read back."""
        why = self.ineligible()
        if why is not None:
            return why
        targets = self.targets()
        if any(target.exists() for target in targets):
            self.route()
        return targets[0].parent.name


_LOADED: list[ctypes.CDLL] = []  # the loaded libraries, kept alive for the process


@functools.lru_cache(maxsize=None)
def _register(handlers: Handlers) -> tuple[bool, str]:
    import jax  # noqa: PLC0415 (importing spgd_jax stays free of JAX)

    try:
        path = build(handlers.source, handlers.targets(), [*handlers.flags, f"-I{handlers.source.parent}"])
        library = ctypes.CDLL(str(path))
        if handlers.supported and not getattr(library, handlers.supported)():
            return False, "this CPU lacks the instructions the handlers use"
        for target, symbol in handlers.symbols:
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (RuntimeError, OSError, AttributeError, subprocess.SubprocessError) as error:
        return False, str(error) or type(error).__name__
    _LOADED.append(library)
    return True, str(path)
