#!/usr/bin/env bash
# netns.sh: K emulated hosts in network namespaces, each with its upload shaped by tc tbf.
#
#   netns.sh up K RATE_MBIT [PREFIX]   create hosts PREFIXh0..PREFIXh{K-1} and switch PREFIXsw
#   netns.sh down K [PREFIX]           remove them (idempotent; also sweeps PREFIXh<N> beyond K)
#   netns.sh exec I CMD [ARGS...]      run CMD in host I (prefix from $MT_NETNS_PREFIX, default mt)
#   netns.sh check                     exit 0 if namespaces can be made here, else say why, exit 77
#
# Layout (nothing is added to the root namespace):
#
#   PREFIXh0 [eth0 10.77.0.1/24, tbf] <--veth--> [h0] \
#   PREFIXh1 [eth0 10.77.0.2/24, tbf] <--veth--> [h1]  +-- br0 in namespace PREFIXsw
#   ...                                               /
#
# Shaping: a tbf qdisc (rate RATE_MBIT mbit, burst 32kbit, latency 50ms) sits on the EGRESS of
# each host's eth0, i.e. it limits what host I SENDS: every host's upload is capped at RATE.
# Downloads are not shaped on their own: a host receiving from one sender gets at most RATE
# (that sender's upload), but from two senders at once it can receive up to 2 x RATE. There is
# no added latency: this kernel has no netem, so use meshtrain-wan-relay for delay.
#
# Addresses: host I is 10.77.0.(I+1)/24, so K is at most 254.
set -euo pipefail

die() { echo "netns.sh: $*" >&2; exit 1; }
usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

valid_prefix() {
  [[ "$1" =~ ^[A-Za-z0-9_-]{1,24}$ ]] || die "prefix '$1' must be 1-24 characters of [A-Za-z0-9_-]"
}
valid_count() {
  if ! [[ "$1" =~ ^[0-9]{1,3}$ ]] || (( 10#$1 < 1 || 10#$1 > 254 )); then
    die "K must be an integer in 1..254, not '$1'"
  fi
}

ns_exists() { ip netns list 2>/dev/null | awk '{print $1}' | grep -qx -- "$1"; }

# check: exit 0 if this process can create namespaces, veths, a bridge and a tbf qdisc.
cmd_check() {
  local why=""
  if [[ "$(id -u)" != 0 ]]; then
    why="not root (uid $(id -u)); network namespaces need CAP_SYS_ADMIN and CAP_NET_ADMIN"
  elif ! command -v ip >/dev/null 2>&1; then
    why="'ip' (iproute2) is not installed"
  elif ! command -v tc >/dev/null 2>&1; then
    why="'tc' (iproute2) is not installed"
  fi
  if [[ -z "$why" ]]; then
    local a="mtchk$$a" b="mtchk$$b" err
    if ! err=$(ip netns add "$a" 2>&1); then
      why="cannot create a network namespace: $err"
    elif ! err=$(ip netns add "$b" 2>&1); then
      why="cannot create a second network namespace: $err"
    elif ! err=$(ip -n "$a" link set lo up 2>&1); then
      why="cannot configure a link inside a namespace: $err"
    elif ! err=$(ip link add eth0 netns "$a" type veth peer name p0 netns "$b" 2>&1); then
      why="cannot create a veth pair between namespaces (veth module?): $err"
    elif ! err=$(ip -n "$b" link add br0 type bridge 2>&1); then
      why="cannot create a bridge (bridge module?): $err"
    elif ! err=$(tc -n "$a" qdisc add dev eth0 root tbf rate 100mbit burst 32kbit latency 50ms 2>&1); then
      why="cannot add a tbf qdisc (sch_tbf module?): $err"
    fi
    ip netns del "$a" 2>/dev/null || true
    ip netns del "$b" 2>/dev/null || true
  fi
  if [[ -n "$why" ]]; then
    echo "netns.sh check: network namespaces unavailable: $why" >&2
    exit 77
  fi
  echo "netns.sh check: ok (namespaces, veth, bridge and tbf work; netem is not needed)"
}

cmd_down() {
  local k="$1" p="$2" i ns
  valid_count "$k"
  valid_prefix "$p"
  k=$(( 10#$k ))
  for (( i = 0; i < k; i++ )); do
    ns="${p}h${i}"
    if ns_exists "$ns"; then ip netns del "$ns" || echo "netns.sh: could not delete $ns" >&2; fi
  done
  # Sweep leftovers from an earlier 'up' with a larger K.
  while read -r ns _; do
    if [[ "$ns" =~ ^${p}h[0-9]+$ ]]; then
      ip netns del "$ns" || echo "netns.sh: could not delete $ns" >&2
    fi
  done < <(ip netns list 2>/dev/null || true)
  if ns_exists "${p}sw"; then ip netns del "${p}sw" || echo "netns.sh: could not delete ${p}sw" >&2; fi
  return 0
}

cmd_up() {
  local k="$1" rate="$2" p="$3" i ns sw="${3}sw"
  valid_count "$k"
  valid_prefix "$p"
  k=$(( 10#$k ))
  if ! [[ "$rate" =~ ^[0-9]+([.][0-9]+)?$ ]] || ! [[ "$rate" =~ [1-9] ]]; then
    die "RATE_MBIT must be a positive number, not '$rate'"
  fi
  if ns_exists "$sw" || ns_exists "${p}h0"; then
    die "namespaces with prefix '$p' already exist; run 'netns.sh down $k $p' first"
  fi
  # On any failure, undo what was made so far.
  trap 'echo "netns.sh: up failed; tearing down prefix $p" >&2; cmd_down "$k" "$p"' ERR

  ip netns add "$sw"
  ip -n "$sw" link set lo up
  ip -n "$sw" link add br0 type bridge
  ip -n "$sw" link set br0 up
  for (( i = 0; i < k; i++ )); do
    ns="${p}h${i}"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    # Created directly in the two namespaces, so no name is ever taken in the root namespace.
    ip link add eth0 netns "$ns" type veth peer name "h${i}" netns "$sw"
    ip -n "$sw" link set "h${i}" master br0
    ip -n "$sw" link set "h${i}" up
    ip -n "$ns" addr add "10.77.0.$(( i + 1 ))/24" dev eth0
    ip -n "$ns" link set eth0 up
    # Egress of the host's own interface: caps this host's upload at RATE.
    tc -n "$ns" qdisc add dev eth0 root tbf rate "${rate}mbit" burst 32kbit latency 50ms
  done
  trap - ERR
  echo "netns.sh: up: $k hosts ${p}h0..${p}h$(( k - 1 )) (10.77.0.1..10.77.0.$k) on bridge br0 in ${sw}, upload ${rate} mbit each"
}

cmd_exec() {
  local i="$1" p="${MT_NETNS_PREFIX:-mt}"
  shift
  [[ "$i" =~ ^[0-9]+$ ]] || die "host index must be a non-negative integer, not '$i'"
  valid_prefix "$p"
  (( $# >= 1 )) || die "exec needs a command"
  ns_exists "${p}h${i}" || die "host ${p}h${i} does not exist (netns.sh up first, or set MT_NETNS_PREFIX)"
  exec ip netns exec "${p}h${i}" "$@"
}

(( $# >= 1 )) || usage
sub="$1"
shift
case "$sub" in
  check) (( $# == 0 )) || usage; cmd_check ;;
  up)    (( $# == 2 || $# == 3 )) || usage; cmd_up "$1" "$2" "${3:-mt}" ;;
  down)  (( $# == 1 || $# == 2 )) || usage; cmd_down "$1" "${2:-mt}" ;;
  exec)  (( $# >= 2 )) || usage; cmd_exec "$@" ;;
  -h|--help|help) usage ;;
  *) echo "netns.sh: unknown command '$sub'" >&2; usage ;;
esac
