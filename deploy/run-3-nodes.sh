#!/usr/bin/env bash
# A local raftq cluster on 127.0.0.1:7001-7003.
#   deploy/run-3-nodes.sh [start] [--tls]   start whichever node is not running; wait for a leader.
#                                   --tls: clients and peers speak TLS only, with certificates from
#                                   deploy/make-certs.sh in $RAFTQ_HOME/tls (made on first use), and
#                                   peers require each other's certificate; stop before switching.
#   deploy/run-3-nodes.sh stop      stop all nodes (SIGTERM, then SIGKILL after 10 s)
#   deploy/run-3-nodes.sh status    show each node's process and role
#   deploy/run-3-nodes.sh join ID   start one more node, empty, on the next port (n4: 7004), and add
#                                   it to the running cluster (`raftq cluster add`); the leader
#                                   promotes it to voter once it has caught up. `stop` and `status`
#                                   include it; remove a node with `raftq cluster remove ID`.
# Data and logs go under $RAFTQ_HOME (default: var/local-cluster in the repository), with the
# cluster secret the nodes present to each other: $RAFTQ_HOME/cluster-secret, made on first start
# (random, mode 0600).
# RAFTQ_BASE_PORT (default 7001) and RAFTQ_NODE_COUNT (3 or 5; 1 for a single node) change the
# layout. (RAFTQ_NODES is the client's list of node URLs; this script never reads it.)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"

HOME_DIR="${RAFTQ_HOME:-$RAFTQ_ROOT/var/local-cluster}"
BASE_PORT="${RAFTQ_BASE_PORT:-7001}"
COUNT="${RAFTQ_NODE_COUNT:-3}"
if ! [[ "$COUNT" =~ ^[135]$ ]]; then
    echo "RAFTQ_NODE_COUNT must be 1, 3 or 5, got '$COUNT'" >&2
    exit 2
fi

JOINED_FILE="$HOME_DIR/joined"  # ids started with `join`, one a line
node_ids() { seq 1 "$COUNT" | sed 's/^/n/'; cat "$JOINED_FILE" 2>/dev/null || true; }
port_of() { echo $((BASE_PORT + ${1#n} - 1)); }
SCHEME_FILE="$HOME_DIR/scheme"   # "https" while the nodes run with --tls, so status knows
TLS_DIR="$HOME_DIR/tls"
scheme() { cat "$SCHEME_FILE" 2>/dev/null || echo http; }
url_of() { echo "$(scheme)://127.0.0.1:$(port_of "$1")"; }

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

join() {
    local id="${1:-}" url pid secret_file="$HOME_DIR/cluster-secret" tls_args=() urls
    if ! [[ "$id" =~ ^n[0-9]+$ ]]; then
        echo "usage: $0 join nN (the node's id; its port is $BASE_PORT + N - 1)" >&2
        exit 2
    fi
    if node_ids | grep -qx "$id" && ! grep -qx "$id" "$JOINED_FILE" 2>/dev/null; then
        echo "$id is one of the first $COUNT nodes; start it with $0 start" >&2
        exit 2
    fi
    raftq_ensure_venv
    if pid="$(running_pid "$id")"; then
        echo "$id already running (pid $pid)"
        return
    fi
    [ -f "$secret_file" ] || { echo "no cluster here yet: run $0 start first" >&2; exit 2; }
    url="$(url_of "$id")"
    urls="$(all_urls)"; urls="${urls% }"
    if [ "$(scheme)" = https ]; then
        "$RAFTQ_ROOT/deploy/make-certs.sh" "$TLS_DIR" "$id"
        export RAFTQ_CA="$TLS_DIR/ca.pem"
        tls_args=(--tls-cert "$TLS_DIR/$id.pem" --tls-key "$TLS_DIR/$id.key" --tls-ca "$TLS_DIR/ca.pem" --tls-peer-certs)
    fi
    nohup "$RAFTQ_PY" -m raftq.cluster --id "$id" --port "$(port_of "$id")" --data-dir "$HOME_DIR/$id" \
        --join "$(url_of n1)" --cluster-secret-file "$secret_file" ${tls_args[@]+"${tls_args[@]}"} \
        >> "$HOME_DIR/$id.log" 2>&1 < /dev/null &
    echo $! > "$HOME_DIR/$id.pid"
    grep -qx "$id" "$JOINED_FILE" 2>/dev/null || echo "$id" >> "$JOINED_FILE"
    echo "$id started (pid $!, log $HOME_DIR/$id.log); adding it to the cluster"
    "$RAFTQ_PY" -m raftq --nodes "${urls// /,}" cluster add "$id" "$url"
    "$RAFTQ_PY" -m raftq --nodes "${urls// /,}" cluster members
}

start() {
    local tls="${1:-}"
    raftq_ensure_venv
    mkdir -p "$HOME_DIR"
    local id secret_file="$HOME_DIR/cluster-secret" tls_args=()
    "$RAFTQ_PY" -c 'import sys; from raftq.cluster.localcluster import ensure_secret_file; ensure_secret_file(sys.argv[1])' \
        "$secret_file"
    if [ "$tls" = "--tls" ]; then
        "$RAFTQ_ROOT/deploy/make-certs.sh" "$TLS_DIR" $(node_ids)
        echo https > "$SCHEME_FILE"
        export RAFTQ_CA="$TLS_DIR/ca.pem"   # for the status check below
    else
        rm -f "$SCHEME_FILE"
    fi
    for id in $(node_ids); do
        if pid="$(running_pid "$id")"; then
            echo "$id already running (pid $pid)"
            continue
        fi
        tls_args=()
        [ "$tls" = "--tls" ] && tls_args=(--tls-cert "$TLS_DIR/$id.pem" --tls-key "$TLS_DIR/$id.key"
                                          --tls-ca "$TLS_DIR/ca.pem" --tls-peer-certs)
        nohup "$RAFTQ_PY" -m raftq.cluster --id "$id" --port "$(port_of "$id")" \
            --data-dir "$HOME_DIR/$id" --peers "$(peers_of "$id")" \
            --cluster-secret-file "$secret_file" ${tls_args[@]+"${tls_args[@]}"} \
            >> "$HOME_DIR/$id.log" 2>&1 < /dev/null &
        echo $! > "$HOME_DIR/$id.pid"
        echo "$id started (pid $!, log $HOME_DIR/$id.log)"
    done
    "$RAFTQ_PY" "$RAFTQ_ROOT/deploy/cluster_status.py" --wait 30 $(all_urls)
    if [ "$tls" = "--tls" ]; then
        local urls; urls="$(all_urls)"; urls="${urls% }"
        echo
        echo "TLS is on. For the raftq command, workers and Client(): "
        echo "  export RAFTQ_NODES=${urls// /,} RAFTQ_CA=$TLS_DIR/ca.pem"
    fi
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
    [ "$(scheme)" = https ] && export RAFTQ_CA="$TLS_DIR/ca.pem"
    "$RAFTQ_PY" "$RAFTQ_ROOT/deploy/cluster_status.py" $(all_urls) || true
}

case "${1:-start}" in
    start) start "${2:-}" ;;
    --tls) start --tls ;;
    stop) stop ;;
    status) status ;;
    join) join "${2:-}" ;;
    *) echo "usage: $0 [start [--tls]|--tls|stop|status|join ID]" >&2; exit 2 ;;
esac
