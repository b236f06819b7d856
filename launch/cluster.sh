#!/usr/bin/env bash
# Emulated two-node cluster on one machine, and the step-time benchmark across it.
#
# Builds two network namespaces joined by a bridge (launch/netns.sh), shapes each node's link with tc,
# runs examples/bench_cluster.py on W ranks (W/2 per node) with mpirun for every configuration, and
# writes one JSON record and the run's full output (.log) per run under $OUT. Tears everything
# down on exit, error or interrupt.
# Needs root, iproute2 (ip, tc) and Open MPI; prints why and exits 2 otherwise.
#
#   bash launch/cluster.sh                     # the full grid (long: see docs/cluster.md)
#   bash launch/cluster.sh --smoke             # 4 ranks at 100 Mbit/s, fp32 and TNQSGD 3 bits
#
# Environment overrides: RATES (e.g. "100mbit 1gbit none"), RANKS ("4 8"), CONFIGS (see below),
# STEPS, WARMUP, REPEAT (runs of each configuration, taking turns), OUT (default runs/cluster), REPORT (a folder
# for the report, default none), RESUME=1 (skip runs whose record is already in OUT),
# THP_MEM_ALLOC_ENABLE=1 (PyTorch's large tensors on huge pages in every rank; default 0),
# COMPARE=DIR (also run every configuration with the code of another checkout DIR, right after this
# code's run, into records named ...-base: an A/B in one invocation; DIR uses this .venv);
# MALLOC_MMAP_MAX_ and MALLOC_TRIM_THRESHOLD_, glibc's allocator settings, go to every rank when set
# (MALLOC_MMAP_MAX_=0 keeps freed memory for reuse: docs/quantizers.md, "Speed").
# A configuration is [ddp/]compressor:bits:exchange[:bucket_bytes], e.g. "none:0:- fp16:0:- tnqsgd:3:two-phase"
# or "tnqsgd:3:two-phase:4194304" (two-phase buckets of 4 MiB instead of the default; with "ddp/", DDP's
# bucket_cap_mb in bytes, refused for PowerSGD, which has one bucket). With "ddp/" the
# run uses torch DDP over Gloo instead of Horovod: "ddp/none:0:-" (DDP's allreduce), "ddp/fp16:0:-",
# "ddp/bf16:0:-", "ddp/powersgd:4:-" (PowerSGD of rank 4), "ddp/tnqsgd:3:node-aware" (this library's hook).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=$ROOT/.venv/bin/python
RATES=${RATES:-"100mbit 1gbit none"}
RANKS=${RANKS:-"4 8"}
CONFIGS=${CONFIGS:-"none:0:- fp16:0:- tnqsgd:2:two-phase tnqsgd:3:two-phase tnqsgd:3:node-aware"}
STEPS=${STEPS:-5}
WARMUP=${WARMUP:-2}
REPEAT=${REPEAT:-1}
OUT=${OUT:-$ROOT/runs/cluster}
REPORT=${REPORT:-}
if [ "${1:-}" = "--smoke" ]; then
  RATES="100mbit"; RANKS="4"; CONFIGS="none:0:- tnqsgd:3:two-phase"; STEPS=2; WARMUP=1
fi

[ -x "$PY" ] || { echo "!! [cluster] no $PY: run launch/setup.sh first" >&2; exit 2; }
. "$ROOT/launch/netns.sh"
netns_up

mkdir -p "$OUT"
export HOROVOD_TRUNCQ_COMPILE=${HOROVOD_TRUNCQ_COMPILE:-1}
export THP_MEM_ALLOC_ENABLE=${THP_MEM_ALLOC_ENABLE:-0}  # docs/quantizers.md, "Speed"
allocator_env=()  # set to an empty string, a glibc variable would still count (as 0): passed only when set
for variable in MALLOC_MMAP_MAX_ MALLOC_TRIM_THRESHOLD_; do
  if [ -n "${!variable+set}" ]; then allocator_env+=(-x "$variable"); fi
done
runs=0
for rate in $RATES; do
  netns_shape "$rate"
  for ranks in $RANKS; do
    per_node=$((ranks / 2))
    for repeat in $(seq 1 "$REPEAT"); do  # the configurations take turns: the machine's drift hits them alike
      for config in $CONFIGS; do
        frontend=horovod
        case "$config" in ddp/*) frontend=ddp; config=${config#ddp/} ;; esac
        IFS=: read -r compressor bits exchange bucket <<< "$config"
        [ "$exchange" = - ] && exchange=two-phase  # ignored by the baselines
        bucket_args=(); [ -n "$bucket" ] && bucket_args=(--bucket-bytes "$bucket")
        [ "$compressor" = powersgd ] && bucket_args+=(--rank "$bits")
        [ "$frontend" = ddp ] && bucket_args+=(--frontend ddp)
        for tree in "$ROOT" ${COMPARE:-}; do
          name="$rate-w$ranks-${frontend/horovod/hvd}-$compressor-b$bits-$exchange${bucket:+-$bucket}-r$repeat"
          [ "$tree" = "$ROOT" ] || name="$name-base"
          if [ "${RESUME:-0}" = 1 ] && [ -s "$OUT/$name.json" ]; then echo "==> [cluster] $name: kept"; continue; fi
          echo "==> [cluster] $name"
          export PYTHONPATH=$tree
          netns_mpirun "$per_node" "$ranks" -x PYTHONPATH -x HOROVOD_TRUNCQ_COMPILE -x THP_MEM_ALLOC_ENABLE "${allocator_env[@]}" -- \
            "$PY" "$tree/examples/bench_cluster.py" --compressor "$compressor" --bits "$bits" \
            --exchange "$exchange" "${bucket_args[@]}" --steps "$STEPS" --warmup "$WARMUP" --label "$rate" \
            --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1 || true
          grep -E "^\[bench\]|rror|Traceback|signal" "$OUT/$name.log" || true
          if [ ! -s "$OUT/$name.json" ]; then
            echo "!! [cluster] $name wrote no record; its output is $OUT/$name.log:" >&2
            tail -n 40 "$OUT/$name.log" >&2
            exit 1
          fi
          runs=$((runs + 1))
        done
      done
    done
  done
done
echo "==> [cluster] $runs runs, records in $OUT"
if [ -n "$REPORT" ]; then
  "$PY" "$ROOT/examples/cluster_report.py" "$OUT" --out "$REPORT"
fi
