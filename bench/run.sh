#!/usr/bin/env bash
# replfs benchmark harness: native vs replfs mount, side by side (issue 7).
#   bench/run.sh [--quick] [--repeats N] [--keep] [--json FILE]
# The work (and the cleanup: unmount, stop only our PIDs, remove the scratch
# dir) is in bench/run.py, Python standard library only.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 bench/run.py "$@"
