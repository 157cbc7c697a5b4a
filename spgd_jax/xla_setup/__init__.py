"""How XLA is set up for spgd_jax's programs: XLA:CPU flags (applied on `import spgd_jax`) and JAX's persistent
compilation cache (turned on by the command lines and benchmarks; library users call enable_compilation_cache),
and beside it a store of compiled programs read back without tracing (executables.py; the command lines' samplers);
and spgd_jax's native CPU kernels, built once per machine (native_build.py): GroupNorm's sums
(group_norm_kernels.py), float32 3x3 convolutions (direct_conv.py), float32 attention (attention_kernels.py) and
oneDNN's bfloat16 convolutions (onednn.py).

No function here changes results beyond floating-point round-off; see each module for what it sets and the
environment variables that turn it off (SPGD_JAX_CPU_FLAGS=0, SPGD_JAX_NO_CACHE=1, SPGD_JAX_GROUP_NORM_KERNELS=0,
SPGD_JAX_DIRECT_CONV=0, SPGD_JAX_ATTENTION_KERNELS=0, SPGD_JAX_ONEDNN=0).
"""

from spgd_jax.xla_setup.compile_cache import default_cache_dir, enable_compilation_cache
from spgd_jax.xla_setup.cpu_flags import LateFlagsWarning, use_fast_cpu_flags

__all__ = ["LateFlagsWarning", "default_cache_dir", "enable_compilation_cache", "use_fast_cpu_flags"]
