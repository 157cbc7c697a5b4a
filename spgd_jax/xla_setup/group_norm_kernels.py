"""GroupNorm32's sums on the CPU: the two FFI handlers of group_norm_sums.cc, built once and registered.

XLA:CPU splits each of GroupNorm's sums over the positions into a chain of reduce-windows over a stored operand,
and these chains were about a fifth of the default prior's SPGD step on a 2-core Xeon (issue 23). The handlers
read the activations once per pass with per-channel vector sums (float32 over 64 positions, float64 across),
on XLA's intra-op threads: the forward moments (mean and 1/std per image and group) and the backward's two
sums per channel. spgd_jax/models/adm/_group_norm.py calls them for float32 GroupNorms traced for the CPU;
results differ from XLA's reductions by float32 round-off only. The default prior's whole SPGD sampler, both
routes alternating in one process on a 2-core Xeon, ran 9 % (float32, batch 1), 7 % (float32, batch 4) and 12 %
(bfloat16 convolutions, batch 8) faster with them (benchmarks/results/group_norm_kernels_cpu-2core-xeon.md).

They are compiled on first use with the system's C++ compiler (spgd_jax.xla_setup.native_build: about 3 s,
once per machine, kept in $XDG_CACHE_HOME/spgd-jax/group-norm-<digest>/). Where they cannot be had (not Linux,
no compiler, a failed build) GroupNorm runs as XLA's reductions, silently: `route()` says why.
SPGD_JAX_GROUP_NORM_KERNELS=0 turns them off.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import subprocess
from pathlib import Path

from spgd_jax.xla_setup import native_build

__all__ = ["ENV_OFF", "MOMENTS_TARGET", "SUMS_TARGET", "fingerprint", "route"]

ENV_OFF = "SPGD_JAX_GROUP_NORM_KERNELS"
MOMENTS_TARGET = "spgd_group_norm_moments"
SUMS_TARGET = "spgd_group_norm_sums"
SOURCE = Path(__file__).with_name("group_norm_sums.cc")
_SYMBOLS = {MOMENTS_TARGET: "SpgdGroupNormMoments", SUMS_TARGET: "SpgdGroupNormSums"}
_LOADED: list[ctypes.CDLL] = []  # the loaded library, kept alive for the process


def _ineligible() -> str | None:
    """Why this process takes no kernels without trying (turned off, another system), else None."""
    if os.environ.get(ENV_OFF, "") == "0":
        return f"turned off ({ENV_OFF}=0)"
    if platform.system() != "Linux":
        return f"built on Linux only, not {platform.system()}"
    return None


def _targets() -> list[Path]:
    return native_build.library_paths(SOURCE, "group-norm", "libspgd_group_norm.so", [platform.machine().encode()])


@functools.lru_cache(maxsize=1)
def route() -> tuple[bool, str]:
    """(True, the library's path) once both handlers are registered with XLA:CPU, or (False, why not). Built,
    loaded and registered on the first call of the process (see the module docstring)."""
    why = _ineligible()
    if why is not None:
        return False, why
    import jax  # noqa: PLC0415 (importing spgd_jax stays free of JAX)

    try:
        path = native_build.build(SOURCE, _targets(), ["-O3", "-fopenmp-simd"])
        handle = ctypes.CDLL(str(path))
        for target, symbol in _SYMBOLS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handle, symbol)), platform="cpu")
    except (RuntimeError, OSError, AttributeError, subprocess.SubprocessError) as error:
        return False, str(error) or type(error).__name__
    _LOADED.append(handle)
    return True, str(path)


def fingerprint() -> str:
    """What decides GroupNorm's route, found without compiling anything (for the keys of stored programs): why
    there is none, or the library's folder name (its digest). A library already built is registered here, so
    that a stored program that calls it can be read back."""
    why = _ineligible()
    if why is not None:
        return why
    targets = _targets()
    if any(target.exists() for target in targets):
        route()
    return targets[0].parent.name
