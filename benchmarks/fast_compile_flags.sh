#!/usr/bin/env bash
# Prints the XLA flags that shorten GPU compiles and that this XLA knows (each is probed: XLA aborts
# on a flag it does not know), for: XLA_FLAGS="$XLA_FLAGS $(bash benchmarks/fast_compile_flags.sh)".
# Whole-sampler programs took minutes each to compile on an H200 (2026-11-26). Known causes of slow
# GPU compiles are the autotuners: XLA's fusion autotuner (native vs Triton emitters) and the Triton
# GEMM autotuner (tens of Triton configs compiled per matmul fusion; the UNet's 1x1 convolutions and
# attention become matmuls). Both off: matmuls then go to cuBLAS; convolutions keep cuDNN's autotuning.
# Usage: bash benchmarks/fast_compile_flags.sh [PYTHON]
PY=${1:-python3}
for flag in --xla_gpu_experimental_enable_fusion_autotuner=false --xla_gpu_enable_triton_gemm=false; do
  XLA_FLAGS="${XLA_FLAGS:-} $flag" "$PY" -c "import jax; jax.numpy.ones(1).block_until_ready()" >/dev/null 2>&1 \
    && printf '%s ' "$flag"
done
echo
