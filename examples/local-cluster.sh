#!/usr/bin/env bash
# One command for a newcomer: build everything, then run a server, N storage peers and a
# mounted drive on loopback. Ctrl-C unmounts and stops it all.
#
#   examples/local-cluster.sh [--peers N] [--mount DIR] [--state DIR]
#
# Installs fuse3 (needs root or sudo) when fusermount3 is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v fusermount3 >/dev/null 2>&1; then
  echo "local-cluster: installing fuse3 (FUSE mount helper)…"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq fuse3
fi

cargo build --release --workspace --quiet
exec target/release/peerstash local-cluster "$@"
