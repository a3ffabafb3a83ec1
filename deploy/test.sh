#!/usr/bin/env bash
# Runs the whole test suite: unit, data-driven, simulation, integration (real node processes)
# and the short chaos run. Builds .venv from pyproject.toml first when needed.
# Extra arguments go to pytest, e.g. `deploy/test.sh -k wal -x`.
#
# Tests run in RAFTQ_TEST_WORKERS parallel processes (default 3; 0 runs them in this process), one
# test file per process at a time, so a file's module-wide cluster is started once. Most of the
# suite waits on real time (elections, leases, fault windows), so three processes fit on 2 cores.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
raftq_ensure_venv
cd "$RAFTQ_ROOT"
workers="${RAFTQ_TEST_WORKERS:-3}"
parallel=()
if [[ "$workers" != 0 && " $* " != *" -n "* ]]; then
  parallel=(-n "$workers" --dist loadfile)
fi
exec "$RAFTQ_PY" -m pytest "${parallel[@]}" "$@"
