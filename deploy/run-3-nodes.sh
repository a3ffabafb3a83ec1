#!/usr/bin/env bash
# A local raftq cluster on 127.0.0.1:7001-7003.
#   deploy/run-3-nodes.sh [start]   start whichever node is not running; wait for a leader
#   deploy/run-3-nodes.sh stop      stop all nodes (SIGTERM, then SIGKILL after 10 s)
#   deploy/run-3-nodes.sh status    show each node's process and role
# Data and logs go under $RAFTQ_HOME (default: var/local-cluster in the repository), with the
# cluster secret the nodes present to each other: $RAFTQ_HOME/cluster-secret, made on first start
# (random, mode 0600).
# RAFTQ_BASE_PORT (default 7001) and RAFTQ_NODES (3 or 5; 1 for a single node) change the layout.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"

HOME_DIR="${RAFTQ_HOME:-$RAFTQ_ROOT/var/local-cluster}"
BASE_PORT="${RAFTQ_BASE_PORT:-7001}"
COUNT="${RAFTQ_NODES:-3}"

node_ids() { seq 1 "$COUNT" | sed 's/^/n/'; }
port_of() { echo $((BASE_PORT + ${1#n} - 1)); }
url_of() { echo "http://127.0.0.1:$(port_of "$1")"; }

peers_of() {
    local me="$1" out="" id
    for id in $(node_ids); do
        [ "$id" = "$me" ] && continue
        out="${out:+$out,}$id=$(url_of "$id")"
    done
    echo "$out"
}

running_pid() {
    local pidfile="$HOME_DIR/$1.pid" pid
    [ -f "$pidfile" ] || return 1
    pid="$(cat "$pidfile")"
    kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "--id $1 " || return 1
    echo "$pid"
}

all_urls() { local id; for id in $(node_ids); do printf '%s ' "$(url_of "$id")"; done; }

start() {
    raftq_ensure_venv
    mkdir -p "$HOME_DIR"
    local id secret_file="$HOME_DIR/cluster-secret"
    "$RAFTQ_PY" -c 'import sys; from cluster.localcluster import ensure_secret_file; ensure_secret_file(sys.argv[1])' \
        "$secret_file"
    for id in $(node_ids); do
        if pid="$(running_pid "$id")"; then
            echo "$id already running (pid $pid)"
            continue
        fi
        nohup "$RAFTQ_PY" -m cluster --id "$id" --port "$(port_of "$id")" \
            --data-dir "$HOME_DIR/$id" --peers "$(peers_of "$id")" \
            --cluster-secret-file "$secret_file" \
            >> "$HOME_DIR/$id.log" 2>&1 < /dev/null &
        echo $! > "$HOME_DIR/$id.pid"
        echo "$id started (pid $!, log $HOME_DIR/$id.log)"
    done
    "$RAFTQ_PY" "$RAFTQ_ROOT/deploy/cluster_status.py" --wait 30 $(all_urls)
}

stop() {
    local id pid
    for id in $(node_ids); do
        if pid="$(running_pid "$id")"; then
            kill -TERM "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
            echo "$id stopped"
        else
            echo "$id not running"
        fi
        rm -f "$HOME_DIR/$id.pid"
    done
}

status() {
    local id
    for id in $(node_ids); do
        if pid="$(running_pid "$id")"; then echo "$id running (pid $pid)"; else echo "$id not running"; fi
    done
    raftq_ensure_venv
    "$RAFTQ_PY" "$RAFTQ_ROOT/deploy/cluster_status.py" $(all_urls) || true
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
