#!/usr/bin/env bash
# Time to accuracy on the emulated two-node cluster (launch/netns.sh): examples/tta.py for every
# workload, configuration and seed, then examples/tta_report.py.
#
# A run's arithmetic does not depend on the link (every exchange here is deterministic), so each
# configuration trains its full budget once, unshaped, for its quality curve ("curve" runs), and
# once per link rate for STEPS_TIMED steps without evaluation, for its step time on that link
# ("time" runs); the report puts the two together. CHECK=1 adds one full run on a shaped link
# to check that composition against a measured end-to-end run.
#
#   bash launch/tta.sh                    # the grid below, then the report in docs/tta/
#   WORKLOADS=charlm SEEDS="0 1" bash launch/tta.sh
#
# Environment: WORKLOADS ("resnet charlm"), CONFIGS (below), SEEDS ("0"), RANKS ("8"), RATES (link
# rates of the time runs, "100mbit 1gbit"), STEPS (the curve runs' budget; default the workload's),
# STEPS_TIMED (9, of which tta.py's first 3 are warm-up: compilation, PowerSGD's fp32 steps), OUT
# (the JSON records: docs/tta/records, committed with the report they make), LOGS (runs/tta),
# REPORT (docs/tta; empty: no report). Runs whose record exists in OUT are kept, so an interrupted
# grid resumes where it stopped and a new configuration joins the report without rerunning the
# rest. A configuration is frontend/compressor:bits[:bucket_size] with frontend hvd (Horovod) or
# ddp (torch DDP over Gloo): ddp/none:0 (fp32 allreduce), ddp/fp16:0, ddp/bf16:0, ddp/powersgd:4
# (rank 4), ddp/tnqsgd:3 (this library, node-aware), ddp/qsgd:2:512.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=$ROOT/.venv/bin/python
WORKLOADS=${WORKLOADS-"resnet charlm"}
CONFIGS=${CONFIGS-"ddp/none:0 ddp/fp16:0 ddp/powersgd:4 ddp/tnqsgd:3 ddp/tnqsgd:2 ddp/bf16:0 ddp/qsgd:3:512 ddp/qsgd:2:512 hvd/none:0 hvd/fp16:0 hvd/tnqsgd:3 hvd/tnqsgd:2"}
SEEDS=${SEEDS:-0}
RANKS=${RANKS:-8}
RATES=${RATES-"100mbit 1gbit"}
STEPS=${STEPS:-}
STEPS_TIMED=${STEPS_TIMED:-9}
OUT=${OUT:-$ROOT/docs/tta/records}
LOGS=${LOGS:-$ROOT/runs/tta}
REPORT=${REPORT-$ROOT/docs/tta}

[ -x "$PY" ] || { echo "!! [tta] no $PY: run launch/setup.sh first" >&2; exit 2; }
. "$ROOT/launch/netns.sh"
netns_up
mkdir -p "$OUT" "$LOGS"
export PYTHONPATH=$ROOT HOROVOD_TRUNCQ_COMPILE=${HOROVOD_TRUNCQ_COMPILE:-1}

# run NAME RATE RANKS CONFIG SEED ARGS...: one examples/tta.py run, unless its record exists
run() {
  local name=$1 rate=$2 ranks=$3 config=$4 seed=$5; shift 5
  if [ -s "$OUT/$name.json" ]; then echo "==> [tta] $name: kept"; return; fi
  local frontend=${config%%/*} compressor bits bucket
  IFS=: read -r compressor bits bucket <<< "${config#*/}"
  local method=(--frontend "${frontend/hvd/horovod}" --compressor "$compressor")
  if [ "$compressor" = powersgd ]; then method+=(--rank "$bits"); else method+=(--bits "$bits"); fi
  [ -n "$bucket" ] && method+=(--bucket-size "$bucket")
  echo "==> [tta] $name ($(date +%H:%M:%S))"
  netns_shape "$rate"
  local forward=(-x PYTHONPATH -x HOROVOD_TRUNCQ_COMPILE)
  [ -n "${TORCHINDUCTOR_CACHE_DIR:-}" ] && forward+=(-x TORCHINDUCTOR_CACHE_DIR)
  netns_mpirun $((ranks / 2)) "$ranks" "${forward[@]}" -- \
    "$PY" "$ROOT/examples/tta.py" "${method[@]}" --seed "$seed" --label "$rate" --out "$OUT/$name.json" "$@" \
    > "$LOGS/$name.log" 2>&1 || true
  grep -E "^\[tta\].*(s for|quality)|rror|Traceback|signal" "$LOGS/$name.log" | tail -n 3 || true
  [ -s "$OUT/$name.json" ] || { echo "!! [tta] $name wrote no record: $LOGS/$name.log" >&2; tail -n 20 "$LOGS/$name.log" >&2; }
}

for workload in $WORKLOADS; do
  for ranks in $RANKS; do
    for seed in $SEEDS; do
      for config in $CONFIGS; do
        tag="$workload-w$ranks-${config//[\/:]/-}-s$seed"
        run "curve-$tag" none "$ranks" "$config" "$seed" --workload "$workload" ${STEPS:+--steps "$STEPS" --eval-every "$STEPS"}
      done
    done
    for rate in $RATES; do
      for config in $CONFIGS; do
        run "time-$rate-$workload-w$ranks-${config//[\/:]/-}" "$rate" "$ranks" "$config" 0 \
          --workload "$workload" --steps "$STEPS_TIMED" --eval-every 0
      done
    done
  done
done
if [ "${CHECK:-0}" = 1 ]; then
  run "check-100mbit-resnet-w8-ddp-tnqsgd-3-s0" 100mbit 8 ddp/tnqsgd:3 0 --workload resnet
fi
if [ -n "$REPORT" ]; then
  "$PY" "$ROOT/examples/tta_report.py" "$OUT" --out "$REPORT"
fi
