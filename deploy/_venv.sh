# Sourced by the deploy scripts: makes sure .venv exists and matches pyproject.toml.
# Needs only python3 (3.11+) on PATH; everything else comes from the package index.
RAFTQ_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RAFTQ_VENV="${RAFTQ_VENV:-$RAFTQ_ROOT/.venv}"
RAFTQ_PY="$RAFTQ_VENV/bin/python"

raftq_ensure_venv() {
    local stamp="$RAFTQ_VENV/.raftq-installed" want
    want="$(cat "$RAFTQ_ROOT/pyproject.toml" | cksum)"
    if [ -x "$RAFTQ_PY" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    local python="${PYTHON:-python3}"
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "raftq needs Python 3.11 or newer as '$python' (set PYTHON=... to choose another)" >&2
        return 1
    fi
    echo "raftq: preparing the virtual environment in $RAFTQ_VENV ..." >&2
    [ -x "$RAFTQ_PY" ] || "$python" -m venv "$RAFTQ_VENV" || return 1
    local pip_log="$RAFTQ_VENV/pip-install.log"
    if ! { "$RAFTQ_PY" -m pip install --upgrade pip &&
           "$RAFTQ_PY" -m pip install -e "$RAFTQ_ROOT[test]"; } > "$pip_log" 2>&1; then
        tail -n 30 "$pip_log" >&2
        echo "raftq: installing dependencies failed (full log: $pip_log)" >&2
        return 1
    fi
    echo "$want" > "$stamp"
}
