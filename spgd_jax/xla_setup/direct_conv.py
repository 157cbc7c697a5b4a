"""Float32 3x3 'same' convolutions on the CPU as an AVX-512 kernel: the FFI handler of direct_conv.cc.

XLA:CPU runs a float32 convolution as Eigen's contraction over image patches, which repacks the input for every
block it multiplies; on a 2-core Xeon (AVX-512) that ran the default prior's 3x3 convolutions at 90-250 GFLOP/s.
The handler holds a block of pixels times output channels in vector registers and sums the taps and input
channels straight from the NHWC input (direct), or (the attribute winograd, the output tile) computes Winograd's
F(2x2, 3x3): 16 channel products per 2x2 output tile in place of 36, or F(4x4, 3x3): 36 per 4x4 tile in place of
144, between transforms of the input and output tiles.
spgd_jax/models/adm/_direct.py calls it for float32 3x3 'same' convolutions traced for the CPU whose output
channels are a multiple of 16, and for their input gradients (the attribute flipped: the convolution of the output
gradient by the kernel flipped in space, its in/out axes swapped). The kernels a convolution needs (flipped, in
Winograd's form, padded to 16 output channels) are made by a call of their own, spgd_prepare_conv3x3_kernel, which
keeps them and returns a token per kernel that the convolution takes: it depends on the weights only, so XLA hoists
it out of a sampler's loops, and the weights are checked and transformed once per call of the program rather than
at every step. Results differ from XLA's by float32 round-off.

Compiled on first use with the system's C++ compiler (spgd_jax.xla_setup.native_build, once per machine, kept in
$XDG_CACHE_HOME/spgd-jax/direct-conv-<digest>/). Where it cannot be had (not Linux on x86-64, a CPU without
AVX-512F, no compiler, a failed build) the convolutions stay XLA's, silently: `route()` says why.
SPGD_JAX_DIRECT_CONV=0 turns it off.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

from spgd_jax.xla_setup import native_build

__all__ = ["ENV_OFF", "HANDLERS", "PREPARE_TARGET", "TARGET", "bf16_products", "fingerprint", "route"]

ENV_OFF = "SPGD_JAX_DIRECT_CONV"
TARGET = "spgd_direct_conv3x3"
PREPARE_TARGET = "spgd_prepare_conv3x3_kernel"
_FOLDER = Path(__file__).parent
HANDLERS = native_build.Handlers(
    name="direct-conv", source=_FOLDER / "direct_conv.cc", library="libspgd_direct_conv.so",
    symbols=((TARGET, "SpgdDirectConv3x3"), (PREPARE_TARGET, "SpgdPrepareConv3x3Kernel")), env_off=ENV_OFF,
    flags=("-O3",), headers=(_FOLDER / "native_tasks.h", _FOLDER / "native_products.h"), machines=("x86_64", "AMD64"),
    supported="SpgdDirectConvSupported")


def route() -> tuple[bool, str]:
    """(True, the library's path) once the handler is registered with XLA:CPU, or (False, why not). Built, loaded
    and registered on the first call of the process (see the module docstring)."""
    return HANDLERS.route()


def bf16_products() -> tuple[bool, str]:
    """(True, the library's path) where the handler also runs Winograd with bfloat16 products (the attribute
    bf16_products; CPUs with AVX512-BF16), or (False, why not)."""
    ok, path = route()
    if ok and not _cpu_has_bf16_products(path):
        return False, "this CPU lacks AVX512-BF16"
    return ok, path


@functools.lru_cache(maxsize=None)
def _cpu_has_bf16_products(path: str) -> bool:
    return bool(ctypes.CDLL(path).SpgdBf16ProductsSupported())


def fingerprint() -> str:
    """What decides the float32 convolutions' route (native_build.Handlers.fingerprint), for the keys of stored
    programs."""
    return HANDLERS.fingerprint()
