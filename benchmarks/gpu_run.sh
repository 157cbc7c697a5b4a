#!/usr/bin/env bash
# GPU speed benchmark in ONE call: ffhq256 UNet (random weights), 256x256, T=100, N=5.
# JAX sampler at batch 1, 4, 16 and the largest batch that fits, float32 and bfloat16; the PyTorch
# baseline at batch 1 and 16 (reference and tuned variants); the float32 cross-check.
# See benchmarks/speed.py for the method. Writes 7 files to $OUT (default benchmarks/results):
#   speed_<device>.json / .md / .png / .trace.json.gz (the profiled bfloat16 batch-16 run, for
#   ui.perfetto.dev), gpu_run.log, torch.json, jax.json (the phases' raw rows).
#
#   device tool:  run(command="TORCH_BUDGET_S=90 JAX_BUDGET_S=300 bash benchmarks/gpu_run.sh", timeout_s=540)
#                 (carry: nothing)
#   here, on a CPU, the same code path at toy size:  PRESET=gpu-smoke OUT=/tmp/smoke bash benchmarks/gpu_run.sh
#
# Knobs (environment): PRESET (gpu-ffhq256), TORCH_BUDGET_S (120), JAX_BUDGET_S (270: rows that would
# overrun are skipped and listed), COMPILE_WORKERS (1: >1 compiles the fixed-batch JAX programs in
# parallel threads first; on 2026-11-26 eight threads compiled six ffhq256 programs for over 5 minutes
# and no row was recorded), MEM_FRACTION (0.92, JAX's share of GPU memory), FAST_COMPILE (1),
# XLA_FLAGS_EXTRA, PYTHON.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PRESET=${PRESET:-gpu-ffhq256}
PY=${PYTHON:-python3}
TORCH_BUDGET_S=${TORCH_BUDGET_S:-120}
JAX_BUDGET_S=${JAX_BUDGET_S:-270}
WORK=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# Compile time: FAST_COMPILE=1 (default) turns XLA's GPU autotuners off where this XLA knows the flags
# (benchmarks/fast_compile_flags.sh says why); the results record XLA_FLAGS. The autotuners' own
# timing lines (TF_CPP_VMODULE below) go to gpu_run.log, to say where compile time went.
XLA_FLAGS_EXTRA=${XLA_FLAGS_EXTRA:-}
[ "${FAST_COMPILE:-1}" = 1 ] && XLA_FLAGS_EXTRA="$XLA_FLAGS_EXTRA $(bash benchmarks/fast_compile_flags.sh "$PY")"
XLA_FLAGS_EXTRA=$(echo $XLA_FLAGS_EXTRA)  # spaces squeezed
export TF_CPP_VMODULE=${TF_CPP_VMODULE:-gemm_fusion_autotuner=1,conv_algorithm_picker=1,autotuner_pass=1,gpu_compiler=1}
[ -n "$XLA_FLAGS_EXTRA" ] && export XLA_FLAGS="${XLA_FLAGS:-} $XLA_FLAGS_EXTRA"
speed() { "$PY" -m benchmarks.speed --preset "$PRESET" --work "$WORK" --out "$OUT" "$@"; }
export -f speed
export PY PRESET WORK OUT

{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
  # The benchmarks import the installed package (the PyTorch ADM is spgd_jax.convert.torch_adm, from convert/):
  # where it is not installed yet (a bare device machine), install this checkout editable, offline, without
  # dependencies (jax, flax, torch are there; the speed benchmark needs none of the others).
  "$PY" -c "import spgd_jax.convert.torch_adm" 2>/dev/null \
    || "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . \
    || echo "INSTALL FAILED: pip install --no-deps --no-build-isolation -e . (see above); continuing"
  "$PY" -c "import jax, flax, torch, spgd_jax; print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__, '| torch', torch.__version__, torch.cuda.is_available())" \
    || echo "IMPORT CHECK FAILED (see above); continuing"
  # PyTorch first, in its own process (JAX kept off the GPU there), so it has the GPU's memory.
  JAX_PLATFORMS=cpu timeout $((TORCH_BUDGET_S + 60)) bash -c 'speed --phase torch --budget-s "$0"' "$TORCH_BUDGET_S" \
    || echo "torch phase exited with $?"
  XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.92} timeout $((JAX_BUDGET_S + 60)) \
    bash -c 'speed --phase jax --budget-s "$0" --compile-workers "$1"' "$JAX_BUDGET_S" "${COMPILE_WORKERS:-1}" \
    || echo "jax phase exited with $?"
  speed --phase report || echo "report phase exited with $?"
  cp "$WORK"/torch.json "$WORK"/jax.json "$OUT"/ 2>/dev/null
  date -u
} 2>&1 | tee "$OUT/gpu_run.log"
