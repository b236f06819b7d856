#!/usr/bin/env bash
# Emulated two-node cluster on one machine, and the step-time benchmark across it.
#
# Builds two network namespaces (hn1, hn2) joined by a bridge, shapes each node's link with tc,
# runs examples/bench_cluster.py on W ranks (W/2 per node) with mpirun for every configuration, and
# writes one JSON record and the run's full output (.log) per run under $OUT. Tears everything
# down on exit, error or interrupt.
# Needs root, iproute2 (ip, tc) and Open MPI; prints why and exits 2 otherwise.
#
#   bash launch/cluster.sh                     # the full grid (long: see docs/cluster.md)
#   bash launch/cluster.sh --smoke             # 4 ranks, unshaped and 100 Mbit/s, fp32 and TNQSGD 3 bits
#
# Environment overrides: RATES (e.g. "100mbit 1gbit none"), RANKS ("4 8"), CONFIGS (see below),
# STEPS, WARMUP, REPEAT (runs of each configuration), OUT (default runs/cluster), REPORT (a folder
# for the report, default none), RESUME=1 (skip runs whose record is already in OUT),
# THP_MEM_ALLOC_ENABLE=1 (PyTorch's large tensors on huge pages in every rank; default 0),
# COMPARE=DIR (also run every configuration with the code of another checkout DIR, right after this
# code's run, into records named ...-base: an A/B in one invocation; DIR uses this .venv);
# MALLOC_MMAP_MAX_ and MALLOC_TRIM_THRESHOLD_, glibc's allocator settings, go to every rank when set
# (MALLOC_MMAP_MAX_=0 keeps freed memory for reuse: docs/quantizers.md, "Speed").
# A configuration is [ddp/]compressor:bits:exchange[:bucket_bytes], e.g. "none:0:- fp16:0:- tnqsgd:3:two-phase"
# or "tnqsgd:3:two-phase:4194304" (two-phase buckets of 4 MiB instead of the default). With "ddp/" the
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
  RATES="none 100mbit"; RANKS="4"; CONFIGS="none:0:- tnqsgd:3:two-phase"; STEPS=2; WARMUP=1
fi

fail() { echo "!! [cluster] $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || fail "needs root (network namespaces and tc)"
for tool in ip tc mpirun; do command -v "$tool" >/dev/null || fail "needs '$tool' (iproute2, Open MPI)"; done
[ -x "$PY" ] || fail "no $PY: run launch/setup.sh first"
ip netns list 2>/dev/null | grep -qw hn1 && fail "namespace hn1 exists already: another cluster.sh running?"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/truncq-cluster.XXXXXX")
HOSTS_MARK="# horovod-truncq cluster.sh"
teardown() {
  for i in 1 2; do ip netns del "hn$i" 2>/dev/null || true; ip link del "veth$i" 2>/dev/null || true; done
  ip link del hvbr0 2>/dev/null || true
  sed -i "/$HOSTS_MARK/d" /etc/hosts 2>/dev/null || true
  rm -rf "$WORK"
}
trap teardown EXIT
trap 'exit 130' INT TERM

echo "==> [cluster] two namespaces on bridge hvbr0 (10.77.0.0/24)"
ip link add hvbr0 type bridge
ip link set hvbr0 up
ip addr add 10.77.0.254/24 dev hvbr0  # mpirun runs in the root namespace
for i in 1 2; do
  ip netns add "hn$i"
  ip link add "veth$i" type veth peer name eth0 netns "hn$i"
  ip link set "veth$i" master hvbr0 up
  ip netns exec "hn$i" ip addr add "10.77.0.$i/24" dev eth0
  ip netns exec "hn$i" ip link set eth0 up
  ip netns exec "hn$i" ip link set lo up
  echo "10.77.0.$i hn$i $HOSTS_MARK" >> /etc/hosts
done
cat > "$WORK/agent" <<'AGENT'
#!/bin/sh
host=$1; shift
exec ip netns exec "$host" sh -c "$*"
AGENT
chmod +x "$WORK/agent"

shape() {  # shape RATE: both directions of both nodes' links; "none" removes the shaping
  for i in 1 2; do
    if [ "$1" = none ]; then
      tc qdisc del dev "veth$i" root 2>/dev/null || true
      ip netns exec "hn$i" tc qdisc del dev eth0 root 2>/dev/null || true
    else
      tc qdisc replace dev "veth$i" root tbf rate "$1" burst 256kb latency 50ms
      ip netns exec "hn$i" tc qdisc replace dev eth0 root tbf rate "$1" burst 256kb latency 50ms
    fi
  done
}

mkdir -p "$OUT"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
export HOROVOD_TRUNCQ_COMPILE=${HOROVOD_TRUNCQ_COMPILE:-1}
export THP_MEM_ALLOC_ENABLE=${THP_MEM_ALLOC_ENABLE:-0}  # docs/quantizers.md, "Speed"
allocator_env=()  # set to an empty string, a glibc variable would still count (as 0): passed only when set
for variable in MALLOC_MMAP_MAX_ MALLOC_TRIM_THRESHOLD_; do
  if [ -n "${!variable+set}" ]; then allocator_env+=(-x "$variable"); fi
done
runs=0
for rate in $RATES; do
  shape "$rate"
  for ranks in $RANKS; do
    per_node=$((ranks / 2))
    for config in $CONFIGS; do
      frontend=horovod
      case "$config" in ddp/*) frontend=ddp; config=${config#ddp/} ;; esac
      IFS=: read -r compressor bits exchange bucket <<< "$config"
      [ "$exchange" = - ] && exchange=two-phase  # ignored by the baselines
      bucket_args=(); [ -n "$bucket" ] && bucket_args=(--bucket-bytes "$bucket")
      [ "$compressor" = powersgd ] && bucket_args+=(--rank "$bits")
      [ "$frontend" = ddp ] && bucket_args+=(--frontend ddp)
      for repeat in $(seq 1 "$REPEAT"); do
       for tree in "$ROOT" ${COMPARE:-}; do
        name="$rate-w$ranks-${frontend/horovod/hvd}-$compressor-b$bits-$exchange${bucket:+-$bucket}-r$repeat"
        [ "$tree" = "$ROOT" ] || name="$name-base"
        if [ "${RESUME:-0}" = 1 ] && [ -s "$OUT/$name.json" ]; then echo "==> [cluster] $name: kept"; continue; fi
        echo "==> [cluster] $name"
        export PYTHONPATH=$tree
        # rtc_hwloc_vmhole none: Open MPI 4.1's daemon otherwise maps a shared hwloc topology at an
        # address that is sometimes taken, and dies with a segfault before any rank starts.
        timeout 1200 mpirun --allow-run-as-root --oversubscribe -bind-to none --mca rtc_hwloc_vmhole none \
          --mca plm_rsh_agent "$WORK/agent" --mca routed direct --mca pml ob1 --mca btl tcp,self \
          --mca btl_tcp_if_include 10.77.0.0/24 --mca oob_tcp_if_include 10.77.0.0/24 \
          -H "hn1:$per_node,hn2:$per_node" -np "$ranks" -x PYTHONUNBUFFERED -x PYTHONPATH -x HOROVOD_TRUNCQ_COMPILE -x THP_MEM_ALLOC_ENABLE "${allocator_env[@]}" \
          -x BENCH_MASTER=10.77.0.1 "$PY" "$tree/examples/bench_cluster.py" --compressor "$compressor" --bits "$bits" \
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
