# Sourced by the deploy scripts: makes sure .venv exists and matches pyproject.toml.
# Needs only python3 (3.11+) on PATH; everything else comes from the package index.
RAFTQ_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RAFTQ_VENV="${RAFTQ_VENV:-$RAFTQ_ROOT/.venv}"
RAFTQ_PY="$RAFTQ_VENV/bin/python"

raftq_ensure_venv() {
    local stamp="$RAFTQ_VENV/.raftq-installed" want
    want="$(cat "$RAFTQ_ROOT/pyproject.toml" | cksum)"
    if [ -x "$RAFTQ_PY" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        raftq_compile_sources
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
    raftq_compile_sources
}

# The editable install leaves the project's modules uncompiled, and with PYTHONDONTWRITEBYTECODE
# set nothing ever caches their bytecode: every node, worker and test process then compiles about
# seventy modules from source at start (0.1 s of CPU, and 0.6 MiB of a node's RSS for good, the
# compiler's garbage). Compiling here, as pip does for a regular install, costs 0.05 s when
# nothing changed. A failure only costs that time, so it never stops the command.
raftq_compile_sources() {
    (cd "$RAFTQ_ROOT" && "$RAFTQ_PY" -m compileall -q bench chaos client cluster raftq tests > /dev/null 2>&1) || true
}
