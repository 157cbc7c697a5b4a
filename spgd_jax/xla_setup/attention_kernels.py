"""Softmax attention on the CPU: the two FFI handlers of attention.cc (forward, backward), built once and
registered.

XLA:CPU runs softmax(q k^T) v and its gradient as separate ops over the (B, H, T, S) weights: the logits, their
maximum, exponentials, sums and quotient, the weights' gradient and the logits', each written to memory and read
back, with dots whose contraction has the 16-64 channels of a head. In the `cpu-64` preset's UNet (six heads of 16
channels over 256 positions at 16 px) that was about a fifth of an SPGD step at batch 4 on a 2-core Xeon. The
handlers compute a block of 24 queries' weights against all keys at a time, in the cache, with register-blocked
AVX-512 products: the forward keeps only the output and the log of each softmax denominator (lse), from which the
backward recomputes the weights (the formulation of FlashAttention, Dao et al. 2022). spgd_jax/models/adm/_attention.py
calls them for float32 attention traced for the CPU; results differ from XLA's by float32 round-off.

Compiled on first use with the system's C++ compiler (spgd_jax.xla_setup.native_build, once per machine, kept in
$XDG_CACHE_HOME/spgd-jax/attention-<digest>/). Where they cannot be had (not Linux on x86-64, a CPU without
AVX-512F, no compiler, a failed build) attention stays XLA's ops, silently: `route()` says why.
SPGD_JAX_ATTENTION_KERNELS=0 turns them off.
"""

from __future__ import annotations

from pathlib import Path

from spgd_jax.xla_setup import native_build

__all__ = ["BACKWARD_TARGET", "ENV_OFF", "FORWARD_TARGET", "HANDLERS", "fingerprint", "route"]

ENV_OFF = "SPGD_JAX_ATTENTION_KERNELS"
FORWARD_TARGET = "spgd_attention_forward"
BACKWARD_TARGET = "spgd_attention_backward"
_FOLDER = Path(__file__).parent
HANDLERS = native_build.Handlers(
    name="attention", source=_FOLDER / "attention.cc", library="libspgd_attention.so",
    symbols=((FORWARD_TARGET, "SpgdAttentionForward"), (BACKWARD_TARGET, "SpgdAttentionBackward")), env_off=ENV_OFF,
    flags=("-O3",), headers=(_FOLDER / "native_tasks.h", _FOLDER / "native_products.h"), machines=("x86_64", "AMD64"),
    supported="SpgdAttentionSupported")


def route() -> tuple[bool, str]:
    """(True, the library's path) once both handlers are registered with XLA:CPU, or (False, why not). Built,
    loaded and registered on the first call of the process (see the module docstring)."""
    return HANDLERS.route()


def fingerprint() -> str:
    """What decides attention's route (native_build.Handlers.fingerprint), for the keys of stored programs."""
    return HANDLERS.fingerprint()
