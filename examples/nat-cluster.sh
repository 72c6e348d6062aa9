#!/usr/bin/env bash
# Peers behind home routers, on one machine: Linux network namespaces stand for the
# machines, a bridge for the internet, iptables MASQUERADE for the routers. Then a server,
# a public peer, three peers each behind its own NAT (the third a symmetric, port-
# randomizing one), and a user behind a fourth NAT with a mounted drive. Ctrl-C unmounts,
# stops everything and deletes the namespaces.
#
#   sudo examples/nat-cluster.sh [--mount DIR] [--state DIR] [--release]
#
# Needs root, iproute2 and iptables (installed when missing). Addresses come from the
# documentation ranges and exist only inside the namespaces:
#
#   internet 203.0.113.0/24: server .1, public peer .2, routers' outside .11-.14
#   home n (n = 1..4)       : 198.51.100.(64(n-1)+1) router, .(64(n-1)+2) the peer
#
# `peerstash status` (shown at the end) says how each peer is reached.
set -euo pipefail
cd "$(dirname "$0")/.."

mount_dir=/tmp/peerstash-nat
state=""
profile=debug
while [ $# -gt 0 ]; do
  case "$1" in
    --mount) mount_dir="$2"; shift 2 ;;
    --state) state="$2"; shift 2 ;;
    --release) profile=release; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" -ne 0 ]; then
  echo "nat-cluster: network namespaces need root (run it with sudo)" >&2
  exit 1
fi
need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
if [ ${#need[@]} -gt 0 ]; then
  echo "nat-cluster: installing ${need[*]}…"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ "$profile" = release ]; then
  cargo build --release --workspace --quiet
else
  cargo build --workspace --quiet
fi
target="${CARGO_TARGET_DIR:-target}/$profile"
ps_bin="$(realpath "$target/peerstash")"
server_bin="$(realpath "$target/peerstash-server")"

[ -n "$state" ] || state="$(mktemp -d /tmp/peerstash-nat-state.XXXXXX)"
mkdir -p "$state" "$mount_dir"
tag="psn$$"
pids=()

ns() { echo "$tag-$1"; }
in_ns() { local n="$1"; shift; nsenter --net="/run/netns/$(ns "$n")" "$@"; }
# Background processes are started with nsenter itself (it execs the program), so $! is
# the program's PID and cleanup can stop it by PID.
netns_path() { echo "/run/netns/$(ns "$1")"; }

cleanup() {
  set +e
  echo "nat-cluster: stopping"
  if grep -q " $mount_dir fuse" /proc/mounts; then fusermount3 -uz "$mount_dir"; fi
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  sleep 1
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
  # Deleting a namespace deletes its interfaces and its iptables rules with it.
  for n in $(ip netns list | awk '{print $1}' | grep "^$tag-"); do ip netns delete "$n"; done
  echo "nat-cluster: state kept in $state"
}
trap cleanup EXIT
trap 'exit 0' INT TERM

# The internet: a bridge in its own namespace.
ip netns add "$(ns inet)"
ip -n "$(ns inet)" link add br0 type bridge
ip -n "$(ns inet)" link set br0 up

# Attach namespace $1 to the internet with address $2 (interface wan0).
attach() {
  ip netns add "$(ns "$1")" 2>/dev/null || true
  ip link add wan0 netns "$(ns "$1")" type veth peer name "v-$1" netns "$(ns inet)"
  ip -n "$(ns inet)" link set "v-$1" master br0 up
  ip -n "$(ns "$1")" addr add "$2/24" dev wan0
  ip -n "$(ns "$1")" link set wan0 up
  ip -n "$(ns "$1")" link set lo up
}

attach srv 203.0.113.1
attach pub 203.0.113.2

# Home n behind router rn: $2 is "cone" (port-preserving MASQUERADE) or "symmetric".
home() {
  local n="$1" kind="$2" base=$(( 64 * ($1 - 1) ))
  attach "r$n" "203.0.113.$((10 + n))"
  ip netns add "$(ns "h$n")"
  ip link add lan0 netns "$(ns "r$n")" type veth peer name eth0 netns "$(ns "h$n")"
  ip -n "$(ns "r$n")" addr add "198.51.100.$((base + 1))/26" dev lan0
  ip -n "$(ns "r$n")" link set lan0 up
  ip -n "$(ns "h$n")" addr add "198.51.100.$((base + 2))/26" dev eth0
  ip -n "$(ns "h$n")" link set eth0 up
  ip -n "$(ns "h$n")" link set lo up
  ip -n "$(ns "h$n")" route add default via "198.51.100.$((base + 1))"
  in_ns "r$n" sysctl -qw net.ipv4.ip_forward=1
  if [ "$kind" = symmetric ]; then
    in_ns "r$n" iptables -t nat -A POSTROUTING -o wan0 -j MASQUERADE --random-fully
  else
    in_ns "r$n" iptables -t nat -A POSTROUTING -o wan0 -j MASQUERADE
  fi
  # Like a home router: nothing unsolicited from outside reaches the router itself.
  in_ns "r$n" iptables -A INPUT -i wan0 -m conntrack --ctstate NEW -j DROP
}
home 1 cone
home 2 cone
home 3 symmetric
home 4 cone

# The server.
echo "nat-cluster: starting the server at 203.0.113.1:7400"
nsenter --net="$(netns_path srv)" "$server_bin" --data-dir "$state/server" --listen 203.0.113.1:7400 \
  --open-registration --heartbeat-interval 2 --online-timeout 10 \
  >"$state/server.out" 2>"$state/server.log" &
pids+=($!)
for _ in $(seq 100); do grep -q '^listening:' "$state/server.out" 2>/dev/null && break; sleep 0.1; done
fp="$(sed -n 's/^fingerprint: //p' "$state/server.out")"
printf 'correct horse battery staple\n' >"$state/password"

# register NAMESPACE NAME LISTEN LEND
register() {
  if [ ! -f "$state/$2/config.toml" ]; then
    in_ns "$1" "$ps_bin" --home "$state/$2" register --server https://203.0.113.1:7400 \
      --server-fingerprint "$fp" --name "$2" --lend "$4" --password-file "$state/password" \
      --storage-dir "$state/$2/storage" --listen "$3" >/dev/null
  fi
}
serve() {
  nsenter --net="$(netns_path "$1")" "$ps_bin" --home "$state/$2" serve >"$state/$2.log" 2>&1 &
  pids+=($!)
}

register pub public-peer 203.0.113.2:7401 1G && serve pub public-peer
for n in 1 2 3; do
  ip="198.51.100.$((64 * (n - 1) + 2))"
  register "h$n" "home-$n" "$ip:7401" 1G && serve "h$n" "home-$n"
done
register h4 user 198.51.100.194:7401 1G

echo "nat-cluster: waiting for the peers' rendezvous"
for _ in $(seq 150); do
  up=0
  for p in public-peer home-1 home-2 home-3; do
    in_ns pub "$ps_bin" --home "$state/$p" status 2>/dev/null | grep -q '^reach:    [phr]' && up=$((up + 1))
  done
  [ "$up" -eq 4 ] && break
  sleep 0.2
done
for p in public-peer home-1 home-2 home-3; do
  printf '%-12s ' "$p"; in_ns pub "$ps_bin" --home "$state/$p" status | grep '^reach:'
done

echo "nat-cluster: mounting the user's drive (behind NAT 4) at $mount_dir"
nsenter --net="$(netns_path h4)" "$ps_bin" --home "$state/user" mount "$mount_dir" >"$state/mount.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q " $mount_dir fuse" /proc/mounts && break; sleep 0.2; done
cat <<EOF

nat-cluster: running. Copy files into $mount_dir; then
  nsenter --net=/run/netns/$(ns h4) $ps_bin --home $state/user status
Logs and homes are in $state. Ctrl-C stops everything.
EOF
# Waiting on a background sleep lets the INT/TERM trap run at once.
while true; do sleep 3600 & wait $!; done
