# Sourced by launch/cluster.sh and launch/tta.sh: two emulated nodes on one machine.
#
# netns_up builds two network namespaces (hn1 at 10.77.0.1, hn2 at 10.77.0.2) joined by a bridge and
# tears them down on exit, error or interrupt; netns_shape RATE shapes both directions of both nodes'
# links with tc ("none" removes the shaping); netns_mpirun PER_NODE NP CMD... starts NP ranks,
# PER_NODE on each node, with BENCH_MASTER set to the first node's address.
# Needs root, iproute2 (ip, tc) and Open MPI; prints why and exits 2 otherwise.

netns_fail() { echo "!! [netns] $*" >&2; exit 2; }

netns_up() {
  [ "$(id -u)" = 0 ] || netns_fail "needs root (network namespaces and tc)"
  local tool
  for tool in ip tc mpirun; do command -v "$tool" >/dev/null || netns_fail "needs '$tool' (iproute2, Open MPI)"; done
  ip netns list 2>/dev/null | grep -qw hn1 && netns_fail "namespace hn1 exists already: another cluster run?"
  NETNS_WORK=$(mktemp -d "${TMPDIR:-/tmp}/truncq-netns.XXXXXX")
  trap netns_down EXIT
  trap 'exit 130' INT TERM
  echo "==> [netns] two namespaces on bridge hvbr0 (10.77.0.0/24)"
  ip link add hvbr0 type bridge
  ip link set hvbr0 up
  ip addr add 10.77.0.254/24 dev hvbr0  # mpirun runs in the root namespace
  local i
  for i in 1 2; do
    ip netns add "hn$i"
    ip link add "veth$i" type veth peer name eth0 netns "hn$i"
    ip link set "veth$i" master hvbr0 up
    ip netns exec "hn$i" ip addr add "10.77.0.$i/24" dev eth0
    ip netns exec "hn$i" ip link set eth0 up
    ip netns exec "hn$i" ip link set lo up
    echo "10.77.0.$i hn$i # horovod-truncq netns.sh" >> /etc/hosts
  done
  cat > "$NETNS_WORK/agent" <<'AGENT'
#!/bin/sh
host=$1; shift
exec ip netns exec "$host" sh -c "$*"
AGENT
  chmod +x "$NETNS_WORK/agent"
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
}

netns_down() {
  local i
  for i in 1 2; do ip netns del "hn$i" 2>/dev/null || true; ip link del "veth$i" 2>/dev/null || true; done
  ip link del hvbr0 2>/dev/null || true
  sed -i "/# horovod-truncq netns.sh/d" /etc/hosts 2>/dev/null || true
  rm -rf "$NETNS_WORK"
}

netns_shape() {
  local i
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

# netns_mpirun PER_NODE NP [-x VAR]... -- CMD...: environment variables named with -x go to every rank.
netns_mpirun() {
  local per_node=$1 np=$2; shift 2
  local exports=()
  while [ "$1" != -- ]; do exports+=("$1"); shift; done
  shift
  # rtc_hwloc_vmhole none: Open MPI 4.1's daemon otherwise maps a shared hwloc topology at an
  # address that is sometimes taken, and dies with a segfault before any rank starts.
  timeout "${NETNS_TIMEOUT:-1200}" mpirun --allow-run-as-root --oversubscribe -bind-to none --mca rtc_hwloc_vmhole none \
    --mca plm_rsh_agent "$NETNS_WORK/agent" --mca routed direct --mca pml ob1 --mca btl tcp,self \
    --mca btl_tcp_if_include 10.77.0.0/24 --mca oob_tcp_if_include 10.77.0.0/24 \
    -H "hn1:$per_node,hn2:$per_node" -np "$np" -x PYTHONUNBUFFERED -x BENCH_MASTER=10.77.0.1 "${exports[@]}" "$@"
}
