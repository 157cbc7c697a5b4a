"""XLA:CPU settings under which the UNet's programs run faster, set when spgd_jax is imported.

jaxlib 0.10 hands convolutions, dots, reductions and element-wise ops of XLA:CPU programs to its
XNNPACK/YNNPACK "library fusions" by default. For the ADM UNet's forward pass and input gradient, XLA's
own emitters with Eigen's convolutions are faster, except for dots: on a 2-core Xeon, one likelihood gradient
of the 64 px UNet (benchmarks/speed.py's CPU64, batch 4) takes about 95 ms per image with the library fusions
off and about 135 with them on, and a whole SPGD run 30% less time (benchmarks/results/speed_cpu-2core-cpu64.md).
YNNPACK's dots alone (each dot its own library fusion, XLA's "individual_dot") are kept: the UNet's 1x1 skip
convolutions and attention projections have 32-128 input channels, where XLA's own dot ran at 60-100 GFLOP/s
and YNNPACK's at 130-165 (default prior, 64 px), which made the default prior's SPGD step 4-7% faster.

`use_fast_cpu_flags()` adds CPU_FLAGS to $XLA_FLAGS; it must run before JAX starts its backends, so
`import spgd_jax` calls it (`use_fast_cpu_flags_on_import`), as do the command lines first thing: library
users and the command lines compile the same programs. It leaves alone any flag the user already set in
$XLA_FLAGS, does nothing when SPGD_JAX_CPU_FLAGS=0, and does nothing on jaxlib versions other than those it
was measured on (an unknown flag makes XLA abort), so it never changes results beyond floating-point
round-off. GPU programs are unaffected: these flags only steer XLA:CPU. When spgd_jax is imported after a
JAX computation has already started the CPU backend, XLA no longer reads $XLA_FLAGS: a warning says so.
"""

from __future__ import annotations

import os
import sys
import warnings

import jaxlib

__all__ = ["CPU_FLAGS", "ENV_OFF", "MEASURED_JAXLIB", "LateFlagsWarning", "flags_at_import", "use_fast_cpu_flags",
           "use_fast_cpu_flags_on_import"]

ENV_OFF = "SPGD_JAX_CPU_FLAGS"
# Library fusions for single dots only (YNNPACK); XLA's own emitters and Eigen's convolutions for the rest.
CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=individual_dot", "--xla_cpu_experimental_xnn_fusion_type=")
MEASURED_JAXLIB = ("0.10.",)  # version prefixes whose XLA knows CPU_FLAGS and was measured faster with them
_AT_IMPORT: list[str] = []  # $XLA_FLAGS once `import spgd_jax` has set its flags


def _name(flag: str) -> str:
    return flag.split("=", 1)[0].lstrip("-")


def use_fast_cpu_flags() -> list[str]:
    """Appends to $XLA_FLAGS each of CPU_FLAGS the user has not set there; returns the flags added ([] when
    turned off by SPGD_JAX_CPU_FLAGS=0, on an unmeasured jaxlib, or once JAX's backends have started, when
    XLA would no longer read them)."""
    if os.environ.get(ENV_OFF, "") == "0" or not jaxlib.__version__.startswith(MEASURED_JAXLIB):
        return []
    if _backends_started():
        return []
    current = os.environ.get("XLA_FLAGS", "").split()
    present = {_name(flag) for flag in current}
    added = [flag for flag in CPU_FLAGS if _name(flag) not in present]
    if added:
        os.environ["XLA_FLAGS"] = " ".join(current + added)
    return added


class LateFlagsWarning(UserWarning):
    """spgd_jax was imported after JAX started its CPU backend, which then runs with XLA's slower defaults."""


def use_fast_cpu_flags_on_import() -> list[str]:
    """use_fast_cpu_flags(), and a LateFlagsWarning when JAX's CPU backend already runs without CPU_FLAGS
    (flags wanted: not turned off, a measured jaxlib, not all of them in $XLA_FLAGS)."""
    added = use_fast_cpu_flags()
    _AT_IMPORT[:] = [os.environ.get("XLA_FLAGS", "")]
    if added or os.environ.get(ENV_OFF, "") == "0" or not jaxlib.__version__.startswith(MEASURED_JAXLIB):
        return added
    present = {_name(flag) for flag in os.environ.get("XLA_FLAGS", "").split()}
    if _backends_started() and not {_name(flag) for flag in CPU_FLAGS} <= present and _cpu_in_use():
        warnings.warn(
            "spgd_jax was imported after JAX had started its CPU backend, so XLA:CPU runs spgd_jax's programs "
            "with its defaults, about 1.4x slower on the 64 px UNet (spgd_jax.xla_setup.cpu_flags). Import "
            "spgd_jax before running any JAX computation; set SPGD_JAX_CPU_FLAGS=0 to keep XLA's defaults "
            "without this warning.", LateFlagsWarning, stacklevel=3)
    return added


def flags_at_import() -> str | None:
    """$XLA_FLAGS as `import spgd_jax` left it (its CPU_FLAGS added): what XLA reads when JAX starts its backends
    after that import, as it normally does. None before the import."""
    return _AT_IMPORT[0] if _AT_IMPORT else None


def _cpu_in_use() -> bool:
    import jax

    return jax.default_backend() == "cpu"


def _backends_started() -> bool:
    if "jax" not in sys.modules:  # not imported yet: nothing started (and importing spgd_jax stays JAX-free)
        return False
    from jax._src import xla_bridge  # no public API says whether the backends exist yet

    return xla_bridge.backends_are_initialized()
