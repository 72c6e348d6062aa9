#!/usr/bin/env bash
# The drive beside what a user would otherwise pick, in one run on this machine (release
# build). Columns: a plain local directory, gocryptfs (encrypting FUSE on local disk),
# rclone crypt mounted over `rclone serve sftp` on loopback (--vfs-cache-mode writes), and
# peerstash (`local-cluster`: a server and 3 storage peers on loopback, 2 replicas).
# Rows:
#   1. a SIZE_MIB file of random data written with cp: until cp returns, until durable
#      (plain, gocryptfs: sync; rclone: its upload queue empty, after its default 5 s
#      write-back delay; peerstash: status --wait)
#   2. that file read back cold (remounted, page cache dropped)
#   3. FILES files of 4 KiB (10 directories) copied with cp -a: until it returns, until durable
#   4. getting everything back into an empty local directory, cold: `peerstash restore`
#      for peerstash, a cp -a out of the remounted mount for the others
#   5. the mount process's peak RSS (VmHWM) over the whole run
#   6. (plain and peerstash) rsync of the big file after changing 1% of it
#   7. CPU time (user + system) of the target's own processes (the FUSE process, and for
#      peerstash its peers and server too) per MiB, writing until durable and reading
#      cold: what the machine spends, whatever else shares its cores
# Usage: examples/bench-drive.sh [SIZE_MIB (default 1024)] [FILES (default 5000)]
# BENCH_ERASURE=2+1 stores the drive erasure-coded instead of as 2 replicas.
# BENCH_ONLY="plain peerstash" limits the columns. Needs root (drop_caches) and fuse3;
# installs gocryptfs and rclone from Debian when missing. Cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-1024}
FILES=${2:-5000}
TARGETS=${BENCH_ONLY:-plain gocryptfs rclone peerstash}
cargo build --release --workspace --quiet
BIN=$PWD/target/release/peerstash
W=$(mktemp -d /tmp/peerstash-bench.XXXXXX)
SRC=$W/src
mkdir -p "$SRC"
PIDS=()

if [[ " $TARGETS " == *" gocryptfs "* || " $TARGETS " == *" rclone "* ]] &&
  ! { command -v gocryptfs && command -v rclone; } >/dev/null; then
  echo "installing gocryptfs and rclone (Debian packages)…"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gocryptfs rclone >/dev/null
fi

cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  for m in "$W"/*/mnt; do fusermount3 -uz "$m" 2>/dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT

now() { date +%s.%N; }
secs() { echo "$2 - $1" | bc -l | xargs printf '%.2f'; }
mbps() { echo "$1 / 1000000 / ($3 - $2)" | bc -l | xargs printf '%.0f'; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || echo "(cannot drop caches: not root)" >&2; }
mounted() { grep -q " $1 fuse" /proc/mounts; }
wait_mounted() {
  for _ in $(seq 600); do mounted "$1" && return 0; sleep 0.1; done
  echo "$2 did not mount"; exit 1
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Peak RSS of a process in kB, kept as the largest seen for a target.
declare -A RSS
note_rss() {
  local kb
  kb=$(awk '/VmHWM/ {print $2}' "/proc/$2/status" 2>/dev/null || echo 0)
  ((kb > ${RSS[$1]:-0})) && RSS[$1]=$kb || true
}

# ---- per target: up (mount), down (unmount), durable (wait), pid (the mount process) ----
plain_up() { mkdir -p "$W/plain/mnt"; MNT=$W/plain/mnt; }
plain_down() { :; }
plain_durable() { sync; }
plain_pid() { echo 0; }

gocryptfs_up() {
  local d=$W/gocryptfs
  mkdir -p "$d/cipher" "$d/mnt"
  [ -f "$d/cipher/gocryptfs.conf" ] || gocryptfs -init -q -extpass "echo bench-password" "$d/cipher" >/dev/null
  gocryptfs -q -nosyslog -extpass "echo bench-password" "$d/cipher" "$d/mnt"
  wait_mounted "$d/mnt" gocryptfs
  MNT=$d/mnt
}
gocryptfs_down() { fusermount3 -u "$W/gocryptfs/mnt"; }
gocryptfs_durable() { sync; }
gocryptfs_pid() { pgrep -f "gocryptfs.*$W/gocryptfs/mnt" | head -1; }

rclone_up() {
  local d=$W/rclone
  mkdir -p "$d/remote" "$d/mnt" "$d/cache"
  if [ -z "${RC_SFTP_PORT:-}" ]; then
    RC_SFTP_PORT=$(free_port)
    rclone serve sftp "$d/remote" --addr "127.0.0.1:$RC_SFTP_PORT" --user bench --pass bench-pass \
      >"$d/serve.log" 2>&1 &
    PIDS+=($!)
    export RCLONE_CONFIG_BS_TYPE=sftp RCLONE_CONFIG_BS_HOST=127.0.0.1 \
      RCLONE_CONFIG_BS_PORT=$RC_SFTP_PORT RCLONE_CONFIG_BS_USER=bench \
      RCLONE_CONFIG_BS_PASS=$(rclone obscure bench-pass) \
      RCLONE_CONFIG_BC_TYPE=crypt RCLONE_CONFIG_BC_REMOTE=bs:data \
      RCLONE_CONFIG_BC_PASSWORD=$(rclone obscure bench-password)
    sleep 1
  fi
  RC_RC_PORT=$(free_port)
  rclone mount bc: "$d/mnt" --vfs-cache-mode writes --cache-dir "$d/cache" \
    --rc --rc-addr "127.0.0.1:$RC_RC_PORT" --rc-no-auth >"$d/mount.log" 2>&1 &
  RC_MOUNT_PID=$!
  PIDS+=($RC_MOUNT_PID)
  wait_mounted "$d/mnt" rclone
  MNT=$d/mnt
}
rclone_down() {
  fusermount3 -u "$W/rclone/mnt" || true
  wait "$RC_MOUNT_PID" 2>/dev/null || true
  rm -rf "$W/rclone/cache"
}
rclone_durable() {
  # Its write-back queue is empty: nothing in progress, nothing queued.
  local stats
  for _ in $(seq 36000); do
    stats=$(rclone rc vfs/stats --url "http://127.0.0.1:$RC_RC_PORT/" 2>/dev/null || true)
    if echo "$stats" | python3 -c 'import json,sys; d=json.load(sys.stdin)["diskCache"]; sys.exit(0 if d["uploadsInProgress"]==0 and d["uploadsQueued"]==0 else 1)' 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  echo "rclone never emptied its upload queue"; exit 1
}
rclone_pid() { echo "$RC_MOUNT_PID"; }

peerstash_up() {
  local d=$W/peerstash
  mkdir -p "$d/mnt"
  "$BIN" local-cluster --peers 3 --lend 16G --state "$d/state" --mount "$d/mnt" \
    ${BENCH_ERASURE:+--erasure "$BENCH_ERASURE"} >>"$d/cluster.log" 2>&1 &
  PS_CLUSTER_PID=$!
  PIDS+=($PS_CLUSTER_PID)
  for _ in $(seq 600); do mounted "$d/mnt" && break; sleep 0.1; done
  mounted "$d/mnt" || { echo "cluster did not come up:"; cat "$d/cluster.log"; exit 1; }
  MNT=$d/mnt
}
peerstash_down() { kill -INT "$PS_CLUSTER_PID"; wait "$PS_CLUSTER_PID" || true; }
peerstash_durable() { "$BIN" --home "$W/peerstash/state/user" status --wait >/dev/null; }
peerstash_pid() { pgrep -f "peerstash.* mount $W/peerstash/mnt" | head -1; }

echo "preparing sources ($SIZE_MIB MiB random file, $FILES files of 4 KiB)…"
head -c $((SIZE_MIB << 20)) /dev/urandom > "$SRC/big.bin"
mkdir -p "$SRC/small"
python3 - "$SRC/small" "$FILES" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
per_dir = max(1, -(-n // 10))
for i in range(n):
    d = os.path.join(root, f"d{i // per_dir:03d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:05d}"), "wb") as f:
        f.write(os.urandom(4096))
PY
BYTES=$((SIZE_MIB << 20))
# A freshly booted virtual machine pays its hypervisor for the first use of each page of
# memory (measured here: writing to tmpfs ran at a quarter of its later speed), which would
# charge whichever target runs first. Touch most of the free memory once before measuring.
python3 - <<'PY'
avail = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemAvailable")) << 10
n = max(0, min(avail - (4 << 30), 16 << 30))
if n:
    b = bytearray(n)
    b[::4096] = b"\x01" * len(range(0, n, 4096))
PY

# CPU ticks (user + system) so far of every process whose command line names this
# target's directory: its FUSE process and, for peerstash, the peers and server as well.
stack_ticks() {
  local sum=0 p
  for p in $(pgrep -f "$W/$1/"); do
    [ -r "/proc/$p/stat" ] && sum=$((sum + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo "$sum"
}
cpu_per_mib() { # ticks before, ticks after → ms of CPU per MiB
  echo "($2 - $1) * 1000 / $(getconf CLK_TCK) / $SIZE_MIB" | bc -l | xargs printf '%.1f'
}

declare -A R
for t in $TARGETS; do
  echo "measuring $t…"
  drop_caches
  "${t}_up"
  # 1. big write
  c0=$(stack_ticks "$t")
  t0=$(now); cp "$SRC/big.bin" "$MNT/"; t1=$(now); "${t}_durable"; t2=$(now)
  c1=$(stack_ticks "$t")
  note_rss "$t" "$("${t}_pid")"
  R[$t,write]=$(mbps $BYTES "$t0" "$t1"); R[$t,write_durable]=$(mbps $BYTES "$t0" "$t2")
  [ "$t" = plain ] || R[$t,write_cpu]=$(cpu_per_mib "$c0" "$c1")
  # 3. small files (before the remount, so the cold read below is cold for both)
  # rclone refuses chmod (cp -a says "preserving permissions … Input/output error"):
  # the contents are copied and checked below all the same.
  t0=$(now); cp -a "$SRC/small" "$MNT/" 2>/dev/null || [ "$t" = rclone ]; t1=$(now)
  "${t}_durable"; t2=$(now)
  note_rss "$t" "$("${t}_pid")"
  R[$t,small]=$(secs "$t0" "$t1"); R[$t,small_durable]=$(secs "$t0" "$t2")
  # 2. cold read
  "${t}_down"; drop_caches; "${t}_up"
  c0=$(stack_ticks "$t")
  t0=$(now); cat "$MNT/big.bin" > /dev/null; t1=$(now)
  c1=$(stack_ticks "$t")
  note_rss "$t" "$("${t}_pid")"
  R[$t,read]=$(mbps $BYTES "$t0" "$t1")
  [ "$t" = plain ] || R[$t,read_cpu]=$(cpu_per_mib "$c0" "$c1")
  cmp "$SRC/big.bin" "$MNT/big.bin"
  # 4. everything back into an empty directory, cold
  "${t}_down"; drop_caches; "${t}_up"
  out=$W/$t/restored
  t0=$(now)
  if [ "$t" = peerstash ]; then
    "$BIN" --home "$W/peerstash/state/user" restore --snapshot latest --to "$out" >/dev/null 2>&1
  else
    mkdir -p "$out"; cp -r "$MNT/big.bin" "$MNT/small" "$out/"
  fi
  t1=$(now)
  note_rss "$t" "$("${t}_pid")"
  R[$t,restore]=$(secs "$t0" "$t1")
  cmp "$SRC/big.bin" "$out/big.bin"
  diff -r "$SRC/small" "$out/small"
  rm -rf "$out"
  # 6. rsync after changing 1% (plain and peerstash)
  if [ "$t" = plain ] || [ "$t" = peerstash ]; then
    cp "$SRC/big.bin" "$W/changed.bin"
    python3 - "$W/changed.bin" <<'PY'
import os, sys
p = sys.argv[1]; size = os.path.getsize(p); step = size // 10; n = size // 1000
with open(p, "r+b") as f:
    for i in range(10):
        f.seek(i * step); f.write(os.urandom(n))
PY
    t0=$(now); rsync -a -I "$W/changed.bin" "$MNT/big.bin"; "${t}_durable"; t1=$(now)
    R[$t,rsync]=$(secs "$t0" "$t1")
    cmp "$W/changed.bin" "$MNT/big.bin"
    rm -f "$W/changed.bin"
  fi
  "${t}_down"
done

row() { # label unit key
  printf '%-46s' "$1"
  for t in $TARGETS; do printf ' %12s' "${R[$t,$3]:--}${R[$t,$3]:+ $2}"; done
  echo
}
echo
printf '%-46s' "operation"; for t in $TARGETS; do printf ' %12s' "$t"; done; echo
row "write ${SIZE_MIB} MiB, until cp returns" "MB/s" write
row "write ${SIZE_MIB} MiB, until durable" "MB/s" write_durable
row "read ${SIZE_MIB} MiB cold" "MB/s" read
row "cp -a $FILES × 4 KiB, until it returns" "s" small
row "cp -a $FILES × 4 KiB, until durable" "s" small_durable
row "everything back, cold (peerstash: restore)" "s" restore
row "rsync after a 1% change, until durable" "s" rsync
row "CPU per MiB written, until durable" "ms" write_cpu
row "CPU per MiB read cold" "ms" read_cpu
printf '%-46s' "mount process peak RSS"
for t in $TARGETS; do
  if [ "$t" = plain ]; then printf ' %12s' "-"; else printf ' %12s' "$((${RSS[$t]:-0} / 1024)) MiB"; fi
done
echo
echo "(MB = 10^6 bytes; $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r); single runs on a shared machine)"
