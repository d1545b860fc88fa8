#!/usr/bin/env bash
# replfs quickstart: install what replfs needs, build it, and mount a demo
# volume whose every change is logged to its write-ahead log.
#
#   ~/replfs-demo/data   the backing directory (your data)
#   ~/replfs-demo/mnt    the replfs mount: work here
#   ~/replfs-demo/state  WAL segments and catalog
#
# Stop it with:  fusermount3 -u ~/replfs-demo/mnt
set -euo pipefail
cd "$(dirname "$0")"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! command -v fusermount3 >/dev/null; then
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 build-essential
fi
if ! command -v cargo >/dev/null; then
    echo "replfs needs a Rust toolchain (1.85 or newer): see https://rustup.rs" >&2
    exit 2
fi
cargo build --release --locked
BIN="$PWD/target/release/replfs"
DEMO="${REPLFS_DEMO:-$HOME/replfs-demo}"
mkdir -p "$DEMO/data" "$DEMO/mnt" "$DEMO/state"
if mountpoint -q "$DEMO/mnt"; then
    echo "$DEMO/mnt is already mounted"
else
    "$BIN" mount "$DEMO/data" "$DEMO/mnt" --state "$DEMO/state"
fi
echo "hello from replfs at $(date -Is)" > "$DEMO/mnt/hello.txt"
mkdir -p "$DEMO/mnt/docs" && cp README.md "$DEMO/mnt/docs/"
sync "$DEMO/mnt/hello.txt"
echo
echo "== the last records of the write-ahead log =="
"$BIN" log dump --state "$DEMO/state" | tail -n 8
echo
echo "Work in $DEMO/mnt; every change lands in $DEMO/data and in the WAL."
echo "Rebuild the tree from the log:  $BIN log replay --state $DEMO/state --into /tmp/replayed"
echo "Unmount:                        fusermount3 -u $DEMO/mnt"
