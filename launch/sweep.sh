#!/usr/bin/env bash
# The papers' experiment: every compressor at 2, 3 and 4 bits (plus none and fp16), 8 workers,
# several seeds, on Fashion-MNIST; then a results page and its plots from the records.
#   bash launch/sweep.sh            # full: 3 seeds x 250 steps (51 runs); trained 4217 s on 2 cores
#   bash launch/sweep.sh --quick    # 3 bits, 1 seed, 60 steps (7 runs); 247 s in all on 2 cores
# Environment overrides: COMPRESSORS, BITS, SEEDS, STEPS, LR, OUT (records), REPORT (page folder), NP.
set -euo pipefail
overrides=""
for var in COMPRESSORS BITS SEEDS STEPS LR OUT REPORT NP; do
  if [ -n "${!var+x}" ]; then overrides+="$var=${!var} "; fi
done
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash launch/setup.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
NP=${NP:-8}
COMPRESSORS=${COMPRESSORS:-all}
LR=${LR:-0.01}
if [ "${1:-}" = "--quick" ]; then
  OUT=${OUT:-runs/sweep-quick} BITS=${BITS:-3} SEEDS=${SEEDS:-0} STEPS=${STEPS:-60} EVAL=20 REPORT=${REPORT:-runs/sweep-quick/report}
else
  OUT=${OUT:-runs/sweep} BITS=${BITS:-2,3,4} SEEDS=${SEEDS:-0,1,2} STEPS=${STEPS:-250} EVAL=50 REPORT=${REPORT:-docs}
fi
rm -rf "$OUT"
start=$SECONDS
.venv/bin/horovodrun -np "$NP" -H "localhost:$NP" --gloo .venv/bin/python examples/train_mnist.py \
  --compressor "$COMPRESSORS" --bits "$BITS" --seed "$SEEDS" --lr "$LR" \
  --steps "$STEPS" --eval-every "$EVAL" --out-dir "$OUT" 2>&1 | grep --line-buffered -v "Warning" | tee "$OUT.log"
echo "==> [sweep] training took $((SECONDS - start)) s"
.venv/bin/python examples/report.py "$OUT" --out "$REPORT" --command "${overrides}bash launch/sweep.sh${*:+ $*}" \
  --notes "$REPORT/results-notes.md"
