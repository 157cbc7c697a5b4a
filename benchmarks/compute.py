"""The benchmarks' computes, by name: the UNet's dtype and jax.default_matmul_precision while it is traced.

float32-bf16conv is the float32 network with its 3x3 convolutions computed from bfloat16 roundings of their
operands, with float32 sums (the command line's --conv-precision bfloat16; spgd_jax/models/adm/_onednn.py).
"""

COMPUTE = {"float32": ("float32", None), "bfloat16": ("bfloat16", None), "float32-bf16conv": ("float32", "bfloat16")}
