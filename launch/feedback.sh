#!/usr/bin/env bash
# Error feedback at 1 and 2 bits: 8 workers on Fashion-MNIST,
# fp32, TNQSGD, TUQSGD (1 bit) and QSGD with 512-element buckets (2 bits: QSGD needs a sign and a
# magnitude), each without error feedback, with it, and with half the residual kept (0.5), 3 seeds;
# then the report.
#   bash launch/feedback.sh          # 39 runs of 300 steps; 68 minutes of training on 2 cores
# Environment overrides: SEEDS, STEPS, LR, OUT (records), REPORT (page folder), NP.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash launch/setup.sh
# The codec runs eagerly: compiling it in 8 processes on 2 cores costs more than it saves for this
# small model, and both paths produce the same bits (tests/test_kernels.py).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1 HOROVOD_TRUNCQ_COMPILE=0
NP=${NP:-8} SEEDS=${SEEDS:-0,1,2} STEPS=${STEPS:-300} LR=${LR:-0.05}
OUT=${OUT:-runs/feedback} REPORT=${REPORT:-docs/feedback}
rm -rf "$OUT"
start=$SECONDS
train() {
  .venv/bin/horovodrun -np "$NP" -H "localhost:$NP" --gloo .venv/bin/python examples/train_mnist.py \
    --seed "$SEEDS" --lr "$LR" --steps "$STEPS" --eval-every 25 --bucket-size 512 --out-dir "$OUT" "$@" \
    2>&1 | grep --line-buffered -v "Warning" | tee -a "$OUT.log"
}
train --compressor none,tnqsgd,qsgd --bits 1,2 --error-feedback off,on,0.5
train --compressor tuqsgd --bits 1 --error-feedback off,on,0.5
echo "==> [feedback] training took $((SECONDS - start)) s"
.venv/bin/python examples/feedback_report.py "$OUT" --out "$REPORT" --command "bash launch/feedback.sh"
