#!/usr/bin/env bash
# How weights/default64 was made: train the default 64x64 prior on the face folders, then export
# its EMA weights and refresh the numbers in weights/MODEL_CARD.md.
#
#   weights/train_default.sh            # train (resumes from runs/default64 if it holds checkpoints)
#   weights/train_default.sh export     # export the latest checkpoint to weights/default64
#
# Training runs until stopped (SIGINT/SIGTERM save a checkpoint first); run it again to continue.
# Data: ../shared/data/faces (celeba + utkface, not part of this repository; non-commercial terms).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/faces}
RUN=${RUN:-runs/default64}
if [[ "${1:-}" == "export" ]]; then
    exec python -m spgd_jax.train export --run "$RUN" --out weights/default64 --card weights/MODEL_CARD.md --overwrite
fi
mkdir -p "$RUN"
exec nice -n 10 python -m spgd_jax.train --data "$DATA" --run "$RUN" --model default64 >> "$RUN/train.log" 2>&1
