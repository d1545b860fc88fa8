#!/usr/bin/env bash
# replfs quickstart: install what replfs needs, build it, start a local DR
# mirror and mount a replicated demo volume that ships to it.
#
#   ~/replfs-demo/data          the backing directory (your data)
#   ~/replfs-demo/mnt           the replfs mount: work here
#   ~/replfs-demo/state         WAL segments and catalog of the source
#   ~/replfs-demo/mirror        the DR copy, kept by `replfs mirror`
#   ~/replfs-demo/mirror-state  the mirror's catalog
#
# Stop it with:  fusermount3 -u ~/replfs-demo/mnt; kill "$(cat ~/replfs-demo/mirror.pid)"
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
PORT="${REPLFS_DEMO_PORT:-7450}"
mkdir -p "$DEMO"/{data,mnt,state,mirror,mirror-state}
if [ ! -s "$DEMO/key" ]; then
    (umask 077; head -c 32 /dev/urandom > "$DEMO/key")
fi
if [ -s "$DEMO/mirror.pid" ] && kill -0 "$(cat "$DEMO/mirror.pid")" 2>/dev/null; then
    echo "mirror already running (pid $(cat "$DEMO/mirror.pid"))"
else
    setsid "$BIN" mirror --listen "127.0.0.1:$PORT" --dir "$DEMO/mirror" \
        --state "$DEMO/mirror-state" --key-file "$DEMO/key" \
        >>"$DEMO/mirror.log" 2>&1 < /dev/null &
    echo $! > "$DEMO/mirror.pid"
    echo "mirror started (pid $!, log $DEMO/mirror.log)"
fi
if mountpoint -q "$DEMO/mnt"; then
    echo "$DEMO/mnt is already mounted"
else
    "$BIN" mount "$DEMO/data" "$DEMO/mnt" --state "$DEMO/state" \
        --mirror "127.0.0.1:$PORT" --key-file "$DEMO/key"
fi
echo "hello from replfs at $(date -Is)" > "$DEMO/mnt/hello.txt"
mkdir -p "$DEMO/mnt/docs" && cp README.md "$DEMO/mnt/docs/"
for _ in $(seq 50); do
    cmp -s "$DEMO/mnt/hello.txt" "$DEMO/mirror/hello.txt" && break
    sleep 0.1
done
echo
echo "== the last records of the write-ahead log =="
"$BIN" log dump --state "$DEMO/state" | tail -n 6
echo
echo "== the DR copy =="
ls -l "$DEMO/mirror" && cat "$DEMO/mirror/hello.txt"
echo
echo "Work in $DEMO/mnt: every change lands in $DEMO/data, in the WAL, and on the mirror."
echo "Rebuild the tree from the log:  $BIN log replay --state $DEMO/state --into /tmp/replayed"
echo "Stop:  fusermount3 -u $DEMO/mnt; kill \$(cat $DEMO/mirror.pid)"
