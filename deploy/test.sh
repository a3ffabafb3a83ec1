#!/usr/bin/env bash
# Runs the whole test suite: unit, data-driven, simulation, integration (real node processes)
# and the short chaos run. Builds .venv from pyproject.toml first when needed.
# Extra arguments go to pytest, e.g. `deploy/test.sh -k wal -x`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
raftq_ensure_venv
cd "$RAFTQ_ROOT"
exec "$RAFTQ_PY" -m pytest "$@"
