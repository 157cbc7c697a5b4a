#!/usr/bin/env bash
# One lent-GPU call (a lease): train the default prior for TRAIN_MIN minutes, export its EMA weights with
# the model card (data, recipe, updates, epochs, images/s, losses, loss-curve plot), and hand back the
# resumable run, so that the next lease continues exactly where this one stopped (step, weights, Adam
# state, EMA, data order, noise). QUALITY=1 also runs the quality benchmark (benchmarks/quality.py
# generate) with the new weights beside the training.
#
# A lease resumes the run in .carry/run.tgz.* (the parts an earlier lease returned) or .carry/run/ when
# there is one; otherwise it starts a new run from weights/default64 (INIT=none: from scratch).
#
#   here, once:   python benchmarks/quality.py images --out .carry/val64.npz      # ground truth (82 faces)
#                 python -c "from spgd_jax.train._data import save_resized_copies as s; s('../shared/data/faces', '/tmp/f/faces64', 64)"
#                 tar czf .carry/faces64.tar.gz -C /tmp/f faces64     # 64x64 WebP q88, 25 MB (see Sizes)
#                 (nothing else in .carry: an unpacked faces64/ there would travel too)
#   lease 1:      run(command="TRAIN_MIN=6.5 QUALITY=0 bash weights/train_gpu.sh", carry=[".carry"], timeout_s=600)
#                 (about 2.5 min more: start, decoding, compilation, the last validation, export, packing)
#   back here:    mkdir -p runs/lease1 && cat $FILES/gpu_train.tgz.* | tar xz -C runs/lease1   # $FILES: files_at
#                 rm -f .carry/run.tgz.* && cp $FILES/run.tgz.* .carry/                      # the run, to resume
#   lease 2, ...: the same run(...) call: it finds .carry/run.tgz.* and resumes (same knobs each time: a
#                 resumed run refuses another recipe); then the same two steps back here (runs/lease2, ...)
#   the weights:  python -m spgd_jax.train export --run R --out weights/default64 --card weights/MODEL_CARD.md
#                 --overwrite, R the run unpacked from the last lease's run.tgz.* (or use its default64/)
#   on a CPU, the same code path at toy size (TRAIN_MIN 0.1; QUALITY=0: no quality benchmark):
#                 SMOKE=1 QUALITY=0 DATA=some/images CARRY=/tmp/c OUT=/tmp/smoke1 bash weights/train_gpu.sh
#                 cp /tmp/smoke1/run.tgz.* /tmp/c/ && SMOKE=1 QUALITY=0 DATA=some/images CARRY=/tmp/c \
#                   OUT=/tmp/smoke2 bash weights/train_gpu.sh      # resumes the first call's run
#
# Sizes: what travels (tracked files, 9.1 MB, plus .carry) must stay under 64 MiB (67.1 MB). The run's
# state is four float32 copies of the weights (weights, EMA, Adam's two moments): 31.4 MB for default64,
# about 29 MB as tar.gz. Beside the faces as 64x64 JPEGs at quality 92 (44 MB) it does not fit; as 64x64
# WebP at quality 88 (25.4 MB as tar.gz, as close to the source as those JPEGs: RMS error 3.3 vs 3.2 of
# 255; load_image reads .webp, and the split is the same: it depends only on the sorted order) it does:
# 9.1 + 1.0 (val64.npz) + 25.4 + 29 = 64.5 MB. A network with more than about 2.1 M parameters cannot be
# handed from lease to lease so. Back come at most 8 files, 64 MiB together: train_gpu.log, train.log,
# run.tgz.* and gpu_train.tgz.* (15 MiB parts).
#
# Knobs (environment): TRAIN_MIN (3.0; 0: no training, the quality benchmark of weights/default64),
# BATCH (256), LR (3e-4), WARMUP (100), STEPS_PER_CALL (50 updates per compiled call), VAL_EVERY (500),
# SAMPLE_EVERY (5000), LOG_EVERY (50), TRAIN_SET (more training --set pairs, the recipe, e.g.
# "lr_schedule=cosine num_steps=60000 min_lr_ratio=0.1 ema_decay=0.9995 loss_weighting=min-snr-5"; with a
# cosine decay, fix num_steps or decay_steps for the whole run), INIT (weights/default64, or none),
# CARRY (.carry: the data, val64.npz, a run to resume), DATA ($CARRY/faces64, unpacked from
# $CARRY/faces64.tar[.gz]), RESUME_RUN (a run folder on the device to resume instead of $CARRY's),
# QUALITY (1; 0: no quality benchmark), QUALITY_BUDGET_S (390, from the start), QUALITY_TABLES
# (1,bf16,2,3), QUALITY_EXTRA (more generate arguments, e.g. "--tune 0 --lr-factors 1 --zeta-factors 1
# --jobs t1_dps_inpaint,t1_spgd_mean4": the presets without sweeps, only these jobs), QUALITY_WORKERS (6
# compile threads), SMOKE (toy sizes for a CPU test: the tiny16 UNet from scratch at batch 8, 2 updates
# a call).
# Seen on an H200 (2026-11-26, jax 0.11.2, one update per call with the batch sent from the host):
# 4,200-7,000 training images/s; compiling the 20 quality programs took 380 s with 6 threads beside the
# training; one Table-1 sweep job then ran in 17 s.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/train_gpu_out}
W=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
CARRY=${CARRY:-.carry}
TRAIN_MIN=${TRAIN_MIN:-$([ -n "${SMOKE:-}" ] && echo 0.1 || echo 3.0)}
QUALITY=${QUALITY:-1}
QUALITY_BUDGET_S=${QUALITY_BUDGET_S:-390}
BATCH=${BATCH:-256}
LR=${LR:-3e-4}
WARMUP=${WARMUP:-100}
STEPS_PER_CALL=${STEPS_PER_CALL:-50}
INIT=${INIT:-weights/default64}
DATA=${DATA:-$CARRY/faces64}
if [ ! -d "$DATA" ]; then  # carried as one tar: the device counts disk blocks
  for t in "$DATA.tar.gz" "$DATA.tar"; do [ -f "$t" ] && tar xf "$t" -C "$(dirname "$DATA")" && break; done
fi
IMAGES=$CARRY/val64.npz
QUALITY_ARGS=(--tables "${QUALITY_TABLES:-1,bf16,2,3}")
read -r -a EXTRA <<< "${QUALITY_EXTRA:-}"
QUALITY_ARGS+=(${EXTRA[@]+"${EXTRA[@]}"})
MODEL_ARGS=(--model default64)
if [ -n "${SMOKE:-}" ]; then
  BATCH=8; STEPS_PER_CALL=2; INIT=none
  MODEL_ARGS=(--model tiny16 --set num_samples=4 --set sample_steps=2)
  QUALITY_ARGS+=(--test 2 --tune 2 --steps 2 --warmup 2 --tasks inpaint,sr4)
fi
SETS=(--set batch_size="$BATCH" --set lr="$LR" --set warmup_steps="$WARMUP" --set time_limit_minutes="$TRAIN_MIN"
      --set steps_per_call="$STEPS_PER_CALL" --set log_every="${LOG_EVERY:-50}" --set val_every="${VAL_EVERY:-500}"
      --set sample_every="${SAMPLE_EVERY:-5000}" --set checkpoint_minutes=1000)
read -r -a RECIPE <<< "${TRAIN_SET:-}"
for kv in ${RECIPE[@]+"${RECIPE[@]}"}; do SETS+=(--set "$kv"); done

# The run: resumed from .carry (parts or folder) or RESUME_RUN, else new.
RUN=$W/run
INIT_ARGS=()
if [ -n "${RESUME_RUN:-}" ]; then
  RUN=$RESUME_RUN
elif compgen -G "$CARRY/run.tgz.*" > /dev/null; then
  cat "$CARRY"/run.tgz.* | tar xz -C "$W"
elif [ -d "$CARRY/run/checkpoints" ]; then
  cp -r "$CARRY/run" "$RUN"
elif [ "$INIT" != none ]; then
  INIT_ARGS=(--init "$INIT")
fi
cp weights/MODEL_CARD.md "$W/MODEL_CARD.md"
# The quality programs are compiled without XLA's GPU autotuners (benchmarks/fast_compile_flags.sh).
QUALITY_XLA_FLAGS="${XLA_FLAGS:-} $(bash benchmarks/fast_compile_flags.sh python3)"
QUALITY_WEIGHTS=$W/default64
{ [ "$TRAIN_MIN" = 0 ] || [ -n "${SMOKE:-}" ]; } && QUALITY_WEIGHTS=weights/default64  # SMOKE trains another architecture

# The resumable state: the latest checkpoint (weights, EMA, Adam state, metadata), metrics.jsonl, the
# validation split and the latest sample grid, as $OUT/run.tgz.* in 15 MiB parts.
pack_run() {
  local latest
  latest=$(ls "$RUN/checkpoints" 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -n 1)
  [ -n "$latest" ] || { echo "no checkpoint to pack in $RUN"; return 1; }
  rm -rf "$W/pack"; mkdir -p "$W/pack/run/checkpoints" "$W/pack/run/samples"
  cp -r "$RUN/checkpoints/$latest" "$W/pack/run/checkpoints/"
  cp "$RUN/metrics.jsonl" "$RUN/validation_split.txt" "$W/pack/run/"
  ls "$RUN"/samples/*.png > /dev/null 2>&1 && cp "$(ls "$RUN"/samples/*.png | tail -n 1)" "$W/pack/run/samples/"
  tar cz -C "$W/pack" run | split -b 15m - "$OUT/run.tgz."
  echo "packed step $latest of $RUN: $(du -cb "$OUT"/run.tgz.* | tail -n 1 | cut -f1) bytes in $(ls "$OUT"/run.tgz.* | wc -l) part(s)"
}

{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__)"
  echo "run: $RUN ($([ ${#INIT_ARGS[@]} -gt 0 ] && echo "new, --init $INIT" || { [ -d "$RUN/checkpoints" ] && echo resumed || echo "new, from scratch"; }))"
  [ "$TRAIN_MIN" = 0 ] || (
    python3 -m spgd_jax.train --data "$DATA" --run "$RUN" "${MODEL_ARGS[@]}" ${INIT_ARGS[@]+"${INIT_ARGS[@]}"} \
      --cache-dir "$W/cache" "${SETS[@]}" > "$W/train.log" 2>&1 || echo "training exited with $?"
    pack_run || echo "packing the run failed"
    python3 -m spgd_jax.train export --run "$RUN" --out "$W/default64" --card "$W/MODEL_CARD.md" \
      >> "$W/train.log" 2>&1 || echo "export exited with $?"
    # The EMA weights also as a plain npz (flax paths), readable whatever the orbax version here.
    python3 -c "import sys, numpy as np; from flax.traverse_util import flatten_dict; from spgd_jax.io import checkpoint
p, _ = checkpoint.load(sys.argv[1]); np.savez(sys.argv[2], **{'/'.join(k): np.asarray(v) for k, v in flatten_dict(p).items()})" \
      "$W/default64" "$W/ema_params.npz" || echo "npz dump failed"
  ) &
  if [ "$QUALITY" = 1 ]; then
    echo "quality XLA_FLAGS: $QUALITY_XLA_FLAGS"
    XLA_FLAGS="$QUALITY_XLA_FLAGS" python3 benchmarks/quality.py generate --images "$IMAGES" --weights "$QUALITY_WEIGHTS" \
      --config weights/default64/config.json --out "$W/quality" --budget-s "$QUALITY_BUDGET_S" \
      --compile-workers "${QUALITY_WORKERS:-6}" "${QUALITY_ARGS[@]}" > "$W/quality.log" 2>&1 \
      || echo "quality generate exited with $?"
  fi
  wait
  tail -n 25 "$W/train.log" 2>/dev/null; [ -f "$W/quality.log" ] && grep -v Warning "$W/quality.log"
  rm -rf "$W/cache" "$W/pack"
  date -u
} 2>&1 | tee "$OUT/train_gpu.log"
cp "$W/train.log" "$OUT/" 2>/dev/null
# Everything but the run (returned above as run.tgz.*): weights, card, loss plot, npz, samples, logs, quality.
(cd "$W" && ls -d default64 default64_loss.png MODEL_CARD.md ema_params.npz train.log quality.log quality \
   "${RUN#"$W"/}"/samples "${RUN#"$W"/}"/metrics.jsonl 2>/dev/null | tar cz -T - | split -b 15m - "$OUT/gpu_train.tgz.")
ls -la "$OUT"
