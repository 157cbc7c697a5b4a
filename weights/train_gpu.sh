#!/usr/bin/env bash
# One lent-GPU call: train the default prior for TRAIN_MIN minutes (a new run initialised from
# weights/default64, or resuming RESUME_RUN), export its EMA weights, and meanwhile compile, then
# run, the quality benchmark's samplers with the new weights (benchmarks/quality.py generate).
# Everything comes back through $OUT as a tarball split into 15 MiB parts plus the log:
#
#   here, once:   python benchmarks/quality.py images --out .carry/val64.npz      # ground truth (82 faces)
#                 faces as 64x64 JPEGs in .carry/faces64.tar.gz (faces64/<the names in ../shared/data/faces>)
#   device tool:  run(command="bash weights/train_gpu.sh", carry=[".carry"], timeout_s=480)
#   back here:    cat $FILES/gpu_train.tgz.* | tar xz -C runs/gpu      # run/, weights/, quality/, logs
#   on a CPU, the same code path at toy size:  SMOKE=1 OUT=/tmp/smoke bash weights/train_gpu.sh
#
# Knobs (environment): TRAIN_MIN (3.0; 0: no training, the quality benchmark of weights/default64),
# QUALITY_BUDGET_S (390, from the start), QUALITY_TABLES (1,bf16,2,3), QUALITY_EXTRA (more generate
# arguments, e.g. "--tune 0 --lr-factors 1 --zeta-factors 1 --jobs t1_dps_inpaint,t1_spgd_mean4": the
# presets without sweeps, only these jobs), QUALITY_WORKERS (6 compile threads), BATCH (256), LR (3e-4), RESUME_RUN (a run folder to resume instead of --init), SMOKE (toy
# sizes for a CPU test).
# Seen on an H200 (2026-11-26, jax 0.11.2): 4,200-7,000 training images/s; compiling the 20 quality
# programs took 380 s with 6 threads beside the training; one Table-1 sweep job then ran in 17 s.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/train_gpu_out}
W=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
TRAIN_MIN=${TRAIN_MIN:-3.0}
QUALITY_BUDGET_S=${QUALITY_BUDGET_S:-390}
BATCH=${BATCH:-256}
LR=${LR:-3e-4}
DATA=.carry/faces64
[ -d "$DATA" ] || tar xzf .carry/faces64.tar.gz -C .carry   # carried as one tar: the device counts disk blocks
IMAGES=.carry/val64.npz
QUALITY_ARGS=(--tables "${QUALITY_TABLES:-1,bf16,2,3}")
read -r -a EXTRA <<< "${QUALITY_EXTRA:-}"
QUALITY_ARGS+=(${EXTRA[@]+"${EXTRA[@]}"})
if [ -n "${SMOKE:-}" ]; then
  BATCH=8; QUALITY_ARGS+=(--test 2 --tune 2 --steps 2 --warmup 2 --tasks inpaint,sr4)
fi
RUN=${RESUME_RUN:-$W/run}
INIT=(--init weights/default64)
[ -n "${RESUME_RUN:-}" ] && INIT=()
cp weights/MODEL_CARD.md "$W/MODEL_CARD.md"
# The quality programs are compiled without XLA's GPU autotuners (benchmarks/fast_compile_flags.sh).
QUALITY_XLA_FLAGS="${XLA_FLAGS:-} $(bash benchmarks/fast_compile_flags.sh python3)"
QUALITY_WEIGHTS=$W/weights
[ "$TRAIN_MIN" = 0 ] && QUALITY_WEIGHTS=weights/default64

{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__)"
  [ "$TRAIN_MIN" = 0 ] || (
    python3 -m spgd_jax.train --data "$DATA" --run "$RUN" --model default64 "${INIT[@]}" --cache-dir "$W/cache" \
      --set batch_size="$BATCH" --set lr="$LR" --set warmup_steps=100 --set time_limit_minutes="$TRAIN_MIN" \
      --set val_every=1000000 --set sample_every=1000000 --set checkpoint_minutes=1000 --set log_every=50 \
      > "$W/train.log" 2>&1 || echo "training exited with $?"
    python3 -m spgd_jax.train export --run "$RUN" --out "$W/weights" --card "$W/MODEL_CARD.md" \
      >> "$W/train.log" 2>&1 || echo "export exited with $?"
    # The EMA weights also as a plain npz (flax paths), readable whatever the orbax version here.
    python3 -c "import sys, numpy as np; from flax.traverse_util import flatten_dict; from spgd_jax.io import checkpoint
p, _ = checkpoint.load(sys.argv[1]); np.savez(sys.argv[2], **{'/'.join(k): np.asarray(v) for k, v in flatten_dict(p).items()})" \
      "$W/weights" "$W/ema_params.npz" || echo "npz dump failed"
  ) &
  echo "quality XLA_FLAGS: $QUALITY_XLA_FLAGS"
  XLA_FLAGS="$QUALITY_XLA_FLAGS" python3 benchmarks/quality.py generate --images "$IMAGES" --weights "$QUALITY_WEIGHTS" \
    --config weights/default64/config.json --out "$W/quality" --budget-s "$QUALITY_BUDGET_S" \
    --compile-workers "${QUALITY_WORKERS:-6}" "${QUALITY_ARGS[@]}" > "$W/quality.log" 2>&1 \
    || echo "quality generate exited with $?"
  wait
  tail -n 25 "$W/train.log"; cat "$W/quality.log" | grep -v Warning
  rm -rf "$W/cache"
  date -u
} 2>&1 | tee "$OUT/train_gpu.log"
cp "$W/train.log" "$W/quality.log" "$OUT/" 2>/dev/null
tar cz -C "$W" . | split -b 15m - "$OUT/gpu_train.tgz."
ls -la "$OUT"
