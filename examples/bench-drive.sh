#!/usr/bin/env bash
# Drive benchmark on the local cluster (release build), each figure beside the same
# operation on a plain local directory measured in the same run:
#   1. a 1 GiB file of random data written: until cp returns, and until confirmed on peers
#   2. that file read back cold (page cache dropped, drive remounted)
#   3. 10,000 files of 4 KiB copied in: until cp returns, and until durable
#   4. rsync of the 1 GiB file after changing 1% of it: time and bytes uploaded
# Usage: examples/bench-drive.sh [SIZE_MIB (default 1024)] [FILES (default 10000)]
# BENCH_ERASURE=2+1 stores the drive erasure-coded instead of as 2 replicas.
# Needs root (drop_caches) and fuse3. Cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-1024}
FILES=${2:-10000}
cargo build --release --workspace --quiet
BIN=$PWD/target/release/peerstash
W=$(mktemp -d /tmp/peerstash-bench.XXXXXX)
MNT=$W/mnt PLAIN=$W/plain SRC=$W/src
mkdir -p "$MNT" "$PLAIN" "$SRC"
CLUSTER_PID=""
cleanup() {
  [ -n "$CLUSTER_PID" ] && kill -INT "$CLUSTER_PID" 2>/dev/null && wait "$CLUSTER_PID" 2>/dev/null || true
  fusermount3 -uz "$MNT" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT

now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc -l | xargs printf '%.2f'; }
mbps() { echo "$1 / 1048576 / ($3 - $2)" | bc -l | xargs printf '%.0f'; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || echo "(cannot drop caches: not root)" >&2; }
mounted() { grep -q " $MNT fuse" /proc/mounts; }
start_cluster() {
  "$BIN" local-cluster --peers 3 --lend 16G --state "$W/state" --mount "$MNT" \
    ${BENCH_ERASURE:+--erasure "$BENCH_ERASURE"} >"$W/cluster.log" 2>&1 &
  CLUSTER_PID=$!
  for _ in $(seq 600); do mounted && return 0; sleep 0.1; done
  echo "cluster did not come up:"; cat "$W/cluster.log"; exit 1
}
stop_cluster() { kill -INT "$CLUSTER_PID"; wait "$CLUSTER_PID" || true; CLUSTER_PID=""; }
wait_durable() { "$BIN" --home "$W/state/user" status --wait >/dev/null; }
# Chunk files on the peers, "size path" per line: new lines after an operation = uploaded.
chunk_files() { find "$W"/state/peer-*/storage -type f -printf '%s %p\n' | sort; }

echo "preparing sources ($SIZE_MIB MiB random file, $FILES small files)…"
head -c $((SIZE_MIB << 20)) /dev/urandom > "$SRC/big.bin"
mkdir -p "$SRC/small"
python3 - "$SRC/small" "$FILES" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, f"d{i // 500:03d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:05d}"), "wb") as f:
        f.write(os.urandom(4096))
PY
BYTES=$((SIZE_MIB << 20))
start_cluster

printf '\n%-44s %14s %14s\n' "operation" "plain dir" "peerstash"
# 1. big write
drop_caches
t0=$(now); cp "$SRC/big.bin" "$PLAIN/"; t1=$(now); sync "$PLAIN/big.bin"; t2=$(now)
d0=$(now); cp "$SRC/big.bin" "$MNT/"; d1=$(now); wait_durable; d2=$(now)
printf '%-44s %11s MB/s %11s MB/s\n' "write ${SIZE_MIB} MiB (until cp returns)" "$(mbps $BYTES $t0 $t1)" "$(mbps $BYTES $d0 $d1)"
printf '%-44s %11s MB/s %11s MB/s\n' "write ${SIZE_MIB} MiB (until durable)" "$(mbps $BYTES $t0 $t2)" "$(mbps $BYTES $d0 $d2)"
lent=$(chunk_files | awk '{s+=$1} END {print s+0}')
printf '%-44s %9s MiB %10s MiB\n' "  bytes on peers (${BENCH_ERASURE:-2 replicas})" "$SIZE_MIB" "$(echo "$lent / 1048576" | bc -l | xargs printf '%.0f')"

# 2. cold read: remount so the drive's own cache is empty too
stop_cluster; drop_caches; start_cluster
t0=$(now); cat "$PLAIN/big.bin" > /dev/null; t1=$(now)
d0=$(now); cat "$MNT/big.bin" > /dev/null; d1=$(now)
printf '%-44s %11s MB/s %11s MB/s\n' "read ${SIZE_MIB} MiB cold" "$(mbps $BYTES $t0 $t1)" "$(mbps $BYTES $d0 $d1)"
cmp "$SRC/big.bin" "$MNT/big.bin"

# 3. many small files
t0=$(now); cp -a "$SRC/small" "$PLAIN/"; t1=$(now); sync; t2=$(now)
d0=$(now); cp -a "$SRC/small" "$MNT/"; d1=$(now); wait_durable; d2=$(now)
printf '%-44s %12s s %12s s\n' "cp -a $FILES × 4 KiB (until cp returns)" "$(secs $t0 $t1)" "$(secs $d0 $d1)"
printf '%-44s %12s s %12s s\n' "cp -a $FILES × 4 KiB (until durable)" "$(secs $t0 $t2)" "$(secs $d0 $d2)"

# 4. rsync after changing 1% (spread over 10 places)
python3 - "$SRC/big.bin" <<'PY'
import os, sys
p = sys.argv[1]; size = os.path.getsize(p); step = size // 10; n = size // 1000
with open(p, "r+b") as f:
    for i in range(10):
        f.seek(i * step); f.write(os.urandom(n))
PY
chunk_files > "$W/chunks.before"
t0=$(now); rsync -a "$SRC/big.bin" "$PLAIN/big.bin"; t1=$(now)
d0=$(now); rsync -a "$SRC/big.bin" "$MNT/big.bin"; wait_durable; d1=$(now)
chunk_files > "$W/chunks.after"
uploaded=$(comm -13 "$W/chunks.before" "$W/chunks.after" | awk '{s+=$1} END {print s+0}')
printf '%-44s %12s s %12s s\n' "rsync ${SIZE_MIB} MiB after a 1% change (until durable)" "$(secs $t0 $t1)" "$(secs $d0 $d1)"
printf '%-44s %14s %10s MiB\n' "  bytes uploaded (all replicas)" "-" "$(echo "$uploaded / 1048576" | bc -l | xargs printf '%.1f')"
cmp "$SRC/big.bin" "$MNT/big.bin"
echo "(machine: $(nproc) cores; figures are single runs on a shared machine)"
