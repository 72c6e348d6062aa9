#!/bin/sh
# Build the Debian package: release binaries, man pages, then cargo-deb.
#   packaging/build-deb.sh          # prints the path of the .deb
# Needs cargo-deb (cargo install cargo-deb).
set -eu
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || { echo "cargo-deb is missing: cargo install cargo-deb" >&2; exit 1; }
cargo build --release --locked -p peerstash -p peerstash-server >&2
target=${CARGO_TARGET_DIR:-target}
rm -rf "$target/release/man"
"$target/release/peerstash" man "$target/release/man"
"$target/release/peerstash-server" man "$target/release/man"
cp packaging/mount.fuse.peerstash.8 "$target/release/man/"
gzip -9n "$target/release/man/"*.1 "$target/release/man/"*.8
# Stripped, as Debian ships binaries (the release profile keeps line tables for
# backtraces in development builds).
cargo deb -p peerstash --no-build --strip >&2
ls -t "$target/debian/"peerstash_*.deb | head -n1
