"""GroupNorm32's passes on the CPU: the four FFI handlers of group_norm_sums.cc, built once and registered.

XLA:CPU splits each of GroupNorm's sums over the positions into a chain of reduce-windows over a stored operand,
and these chains were about a fifth of the default prior's SPGD step on a 2-core Xeon (issue 23). The handlers
read the activations once per pass with per-channel vector sums (float32 over 64 positions, float64 across),
on XLA's intra-op threads: the forward moments (mean and 1/std per image and group) and the backward's two
sums per channel; and GroupNorm followed by SiLU, the ResBlocks' normalise-then-activate, as one pass each way
(the normalisation as an affine map per image and channel, then silu; its gradient with the two sums).
spgd_jax/models/adm/_group_norm.py calls them for float32 GroupNorms traced for the CPU; results differ from
XLA's ops by float32 round-off only. The default prior's whole SPGD sampler, both routes alternating in one
process on a 2-core Xeon, ran 9 % (float32, batch 1), 7 % (float32, batch 4) and 12 % (bfloat16 convolutions,
batch 8) faster with the sums (benchmarks/results/group_norm_kernels_cpu-2core-xeon.md); with GroupNorm + SiLU
as kernels and the sums in tasks of whole rows (an image's positions in up to 8 parts; the moments 3x faster at
batch 4 than in tasks of half the channels) 1.06-1.10x more on a 2-core AMD EPYC (session 30, alternating
processes, batches 1, 4 and 8, load 0.7-1.4). The moments and GroupNorm + SiLU take the activations in up to 4
parts side by side along the channels (the UNet's output blocks pass their input's two halves unjoined:
1.01-1.05x, session 31). The moments' sums stay in registers for up to 128 channels at a time: 1.2-1.3x faster
on 4 x 64 x 64 x 96 activations and 1.55-1.6x on them in parts of 64 + 32 channels (session 31, the same bits);
the SiLU gradient's for up to 64 at a time, its arithmetic written for 16 values at once: 1.2x and 1.3-1.45x
(float32 round-off apart from before, as close to float64).

They are compiled on first use with the system's C++ compiler (spgd_jax.xla_setup.native_build: about 3 s,
once per machine, kept in $XDG_CACHE_HOME/spgd-jax/group-norm-<digest>/). Where they cannot be had (not Linux,
no compiler, a failed build) GroupNorm runs as XLA's ops, silently: `route()` says why.
SPGD_JAX_GROUP_NORM_KERNELS=0 turns them off.
"""

from __future__ import annotations

from pathlib import Path

from spgd_jax.xla_setup import native_build

__all__ = ["ENV_OFF", "HANDLERS", "MOMENTS_TARGET", "SILU_GRAD_TARGET", "SILU_TARGET", "SUMS_TARGET", "fingerprint",
           "route"]

ENV_OFF = "SPGD_JAX_GROUP_NORM_KERNELS"
MOMENTS_TARGET = "spgd_group_norm_moments"
SUMS_TARGET = "spgd_group_norm_sums"
SILU_TARGET = "spgd_group_norm_silu"
SILU_GRAD_TARGET = "spgd_group_norm_silu_grad"
_FOLDER = Path(__file__).parent
HANDLERS = native_build.Handlers(
    name="group-norm", source=_FOLDER / "group_norm_sums.cc", library="libspgd_group_norm.so",
    symbols=((MOMENTS_TARGET, "SpgdGroupNormMoments"), (SUMS_TARGET, "SpgdGroupNormSums"),
             (SILU_TARGET, "SpgdGroupNormSilu"), (SILU_GRAD_TARGET, "SpgdGroupNormSiluGrad")), env_off=ENV_OFF,
    flags=("-O3", "-fopenmp-simd"), headers=(_FOLDER / "native_tasks.h",))


def route() -> tuple[bool, str]:
    """(True, the library's path) once both handlers are registered with XLA:CPU, or (False, why not). Built,
    loaded and registered on the first call of the process (see the module docstring)."""
    return HANDLERS.route()


def fingerprint() -> str:
    """What decides GroupNorm's route (native_build.Handlers.fingerprint), for the keys of stored programs."""
    return HANDLERS.fingerprint()
