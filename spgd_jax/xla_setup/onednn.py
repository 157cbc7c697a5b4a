"""oneDNN's convolutions of bfloat16 operands for XLA:CPU: the FFI handler of onednn_conv.cc, built once and
registered.

XLA:CPU runs a bfloat16 convolution through Eigen in float32: it never uses the AVX512-BF16 or AMX units of
the CPUs that have them. oneDNN (the library behind PyTorch's CPU convolutions) has direct bfloat16
convolutions that do. On a 2-core Intel Xeon with AMX, batch 4, a 64 px 32->32 convolution took 1.2 ms
through XLA (float32; 1.6 in bfloat16) and 0.13 ms through oneDNN (benchmarks/results/conv_shapes_cpu-2core-
xeon.md), and the default prior's SPGD step in bfloat16 (forward and input
gradient) was 1.4x faster at batch 4 and 1.6x at batch 1 than with spgd-jax's Winograd route before it
(interleaved processes, load 1.6-1.9). oneDNN's float32 convolutions made the float32 step no faster there, so
only bfloat16 operands take this route: those of bfloat16 networks, and those of float32 convolutions at bfloat16
precision (jax.default_matmul_precision("bfloat16"), whose float32 sums the handler writes unrounded;
benchmarks/results/speed_cpu-2core-xeon-default64.md). Where oneDNN has only its reference code for these
convolutions (CPUs without AVX-512), far slower than XLA's, there is no route.

The handler is compiled on first use (spgd_jax.xla_setup.native_build) against the oneDNN wheels
`onednn-cpu-gomp` (the library) and `onednn-devel-cpu-gomp` (its headers), dependencies of spgd-jax on Linux
x86-64. That takes some 5 s, once: the library is kept in $XDG_CACHE_HOME/spgd-jax/onednn-<digest>/, keyed
by a digest of the source and the jaxlib and oneDNN versions, and later processes load it in milliseconds.
Where it cannot be had (another OS or CPU, the wheels or a compiler missing, a failed build) the bfloat16
convolutions run as before, with one OnednnUnavailableWarning on Linux x86-64 saying why (none elsewhere, where
oneDNN is not expected). SPGD_JAX_ONEDNN=0 turns the route off: XLA's convolutions (or spgd-jax's
Winograd route, spgd_jax/models/adm/_winograd.py) for bfloat16 as before.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import subprocess
import warnings
from importlib import metadata
from pathlib import Path

from spgd_jax.xla_setup import native_build

__all__ = ["ENV_OFF", "TARGET", "OnednnUnavailableWarning", "conv_target", "fingerprint", "route", "uses_amx"]

ENV_OFF = "SPGD_JAX_ONEDNN"
TARGET = "spgd_onednn_conv2d"
SOURCE = Path(__file__).with_name("onednn_conv.cc")
_LIBRARY_WHEEL, _HEADER_WHEEL = "onednn-cpu-gomp", "onednn-devel-cpu-gomp"
_SYMBOL = "SpgdOnednnConv2d"
_LOADED: list[ctypes.CDLL] = []  # the loaded library, kept alive for the process


class OnednnUnavailableWarning(UserWarning):
    """oneDNN's bfloat16 convolutions could not be set up on a CPU where they were expected (they run as before)."""


def _wheel_file(wheel: str, suffix: str) -> Path:
    """The installed file of `wheel` whose path ends with `suffix`."""
    try:
        distribution = metadata.distribution(wheel)
    except metadata.PackageNotFoundError:
        raise RuntimeError(f"the {wheel} wheel is not installed (pip install {wheel})") from None
    for file in distribution.files or ():
        if str(file).endswith(suffix):
            return Path(distribution.locate_file(file)).resolve()
    raise RuntimeError(f"the {wheel} wheel has no {suffix}; reinstall it (pip install --force-reinstall {wheel})")


def _ineligible() -> str | None:
    """Why this process takes no oneDNN route without trying (turned off, another platform), else None."""
    if os.environ.get(ENV_OFF, "") == "0":
        return f"turned off ({ENV_OFF}=0)"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"oneDNN's wheels are for Linux x86-64, not {platform.system()} {platform.machine()}"
    return None


def _locations() -> tuple[Path, Path, list[Path]]:
    """oneDNN's library, its include folder, and the places of the compiled handler (native_build's, named by
    a digest of the source, jaxlib's version and oneDNN's library)."""
    library = _wheel_file(_LIBRARY_WHEEL, "libdnnl.so.3")
    include = _wheel_file(_HEADER_WHEEL, "oneapi/dnnl/dnnl.hpp").parents[2]
    targets = native_build.library_paths(SOURCE, "onednn", "libspgd_onednn_conv.so",
                                         [metadata.version(_LIBRARY_WHEEL).encode(), str(library).encode()])
    return library, include, targets


def _build(library: Path, include: Path, targets: list[Path]) -> Path:
    """The handler compiled against oneDNN (native_build.build)."""
    return native_build.build(SOURCE, targets, ["-O2", f"-I{include}"],
                              [f"-L{library.parent}", f"-l:{library.name}", f"-Wl,-rpath,{library.parent}"])


def _implementations(handle: ctypes.CDLL) -> list[str]:
    """The names of the implementations oneDNN picks for a small bfloat16 convolution with a bfloat16 and a float32
    out ("" where it has none), e.g. 'brg_conv_fwd:avx512_core_amx'."""
    implementation = handle.SpgdOnednnConvImplementation
    implementation.argtypes, implementation.restype = [ctypes.c_int], ctypes.c_char_p
    return [implementation(f32_out).decode() for f32_out in (0, 1)]


def _slow_implementation(handle: ctypes.CDLL) -> str | None:
    """Why oneDNN's convolutions would not pay on this CPU (it has only its reference code for them, as on CPUs
    without AVX-512), else None."""
    names = _implementations(handle)
    if all(name and "ref" not in name for name in names):
        return None
    offered = " and ".join(name or "none" for name in names)
    return f"oneDNN has no fast bfloat16 convolution for this CPU (it offers {offered}); XLA's convolutions run instead"


@functools.lru_cache(maxsize=1)
def route() -> tuple[str | None, str]:
    """(TARGET, the library's path) once the handler is registered with XLA:CPU, or (None, why not). Built,
    loaded and registered on the first call of the process (see the module docstring)."""
    why = _ineligible()
    if why is not None:
        return None, why
    import jax  # noqa: PLC0415 (importing spgd_jax stays free of JAX)

    try:
        path = _build(*_locations())
        handle = ctypes.CDLL(str(path))
        slow = _slow_implementation(handle)
        if slow is not None:
            return None, slow
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(getattr(handle, _SYMBOL)), platform="cpu")
    except (RuntimeError, OSError, AttributeError, subprocess.SubprocessError) as error:
        why = str(error) or type(error).__name__
        warnings.warn(f"spgd_jax could not set up oneDNN's bfloat16 convolutions ({why}), so they run as before: "
                      f"bfloat16 UNets about 1.5x slower on a Xeon with AMX (float32 is unaffected). Set "
                      f"{ENV_OFF}=0 to skip oneDNN without this warning.", OnednnUnavailableWarning, stacklevel=3)
        return None, why
    _LOADED.append(handle)
    return TARGET, str(path)


def fingerprint() -> str:
    """What decides the bfloat16 convolution route, found without compiling anything (for the keys of stored
    programs): why there is none, or the handler's folder name (its digest). A handler already built is
    registered here, so that a stored program that calls it can be read back."""
    why = _ineligible()
    if why is not None:
        return why
    try:
        _, _, targets = _locations()
    except RuntimeError as error:
        return str(error)
    if any(target.exists() for target in targets):
        route()
    return targets[0].parent.name


def uses_amx() -> bool:
    """Whether oneDNN's bfloat16 convolutions run on this CPU's AMX units (False where there is no route)."""
    return route()[0] is not None and any("amx" in name for name in _implementations(_LOADED[0]))


def conv_target() -> str | None:
    """The registered FFI target of oneDNN's bfloat16 'same' convolution, or None when unavailable or off."""
    return route()[0]
