#!/usr/bin/env bash
# Table 1's rows of the other methods on the CPU (issue 25 item 3): DDRM, DiffPIR and PnP-ADMM (cheap, first),
# then the 1000-NFE ones, RED-Diff, DAPS, DPPS, DPS as published, MCG and Score-SDE, on the four core tasks,
# on 8 test faces (validation split 0-7) with each step size picked by a 0.5x/1x/2x sweep (one compiled call,
# widened past an edge pick) on 4 tuning faces (split 50-53), 4 images per compiled call.
# Resumable: each image's row is kept as its batch ends (OUT/run/rows/JOB/); run the same command again to
# continue. About 20 image-runs of ~1000 NFE per (method, task) pair, ~0.07 s per image-NFE on 2 quiet cores.
# Usage: bash benchmarks/table1_cpu.sh [OUT]   (default .carry/table1); then
#   python -m benchmarks.quality score --images OUT/images.npz --run OUT/run --tag cpu-2core-table1-8img
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.carry/table1}
mkdir -p "$OUT"
if [ ! -f "$OUT/images.npz" ]; then
  python -m benchmarks.quality images --out "$OUT/split58.npz" --count 58
  python - "$OUT" <<'PY'
import sys
import numpy as np
out = sys.argv[1]
with np.load(f"{out}/split58.npz") as data:
    rows = list(range(8)) + list(range(50, 54))  # 8 test faces, then 4 tuning faces
    np.savez(f"{out}/images.npz", images=data["images"][rows], names=data["names"][rows])
PY
fi
exec nice -n 19 python -m benchmarks.quality generate --images "$OUT/images.npz" --out "$OUT/run" --test 8 --tune 4 \
  --methods ddrm,diffpir,pnp_admm,red_diff,daps,dpps,dps,mcg,score_sde --method-factors 0.5,1,2 --tables 1 \
  --jobs tune_,t1_ddrm,t1_diffpir,t1_pnp,t1_red,t1_daps,t1_dpps,t1_dps1000,t1_mcg,t1_score --batch 4 --compile-workers 1
