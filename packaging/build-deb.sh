#!/bin/sh
# Build the Debian package: target/debian/replfs_VERSION_ARCH.deb
# Needs cargo-deb (`cargo install cargo-deb`). Man pages and shell
# completions are generated from the CLI definition into target/packaging/.
set -eu
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
case "$target" in
    target) ;;
    *) echo "build-deb.sh: CARGO_TARGET_DIR must be ./target (Cargo.toml's deb assets name it)" >&2; exit 1 ;;
esac
cargo deb --version >/dev/null 2>&1 || {
    echo "build-deb.sh: cargo-deb is not installed: cargo install cargo-deb" >&2
    exit 1
}
cargo build --release --locked
bin=target/release/replfs
out=target/packaging
rm -rf "$out"
mkdir -p "$out/man" "$out/completions"
"$bin" gen-man "$out/man"
gzip -9n "$out"/man/*.1
for shell in bash zsh fish; do
    "$bin" gen-completions "$shell" "$out/completions" >/dev/null
done
cargo deb --no-build "$@"
