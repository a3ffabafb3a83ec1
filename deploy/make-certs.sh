#!/usr/bin/env bash
# A private CA and one certificate per node, for a TLS cluster on this machine or a test bench.
#   deploy/make-certs.sh DIR [NODE_ID ...]        (default: n1 n2 n3)
# Writes DIR/ca.pem (what clients and nodes trust: --tls-ca, RAFTQ_CA), DIR/ca.key, and for each
# node DIR/<id>.pem and DIR/<id>.key (--tls-cert, --tls-key). Node certificates are valid for
# localhost, 127.0.0.1 and ::1, plus the names in RAFTQ_CERT_HOSTS (comma-separated DNS names or
# IP addresses), for both server and client use (peers present them to each other). Keys are
# mode 0600. Existing files are kept, so running it twice is safe. Needs the openssl command.
# The certificates follow RFC 5280 (CA basicConstraints critical, key usages, key identifiers),
# which Python 3.13's stricter default verification requires.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 DIR [NODE_ID ...]" >&2; exit 2; }
command -v openssl > /dev/null || { echo "$0: needs the openssl command" >&2; exit 1; }
DIR="$1"; shift
IDS=("$@"); [ ${#IDS[@]} -gt 0 ] || IDS=(n1 n2 n3)
mkdir -p "$DIR"
cd "$DIR"
umask 077
DAYS=825

if [ ! -f ca.pem ]; then
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 -days "$DAYS" \
        -keyout ca.key -out ca.pem -subj "/CN=raftq private CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" 2> /dev/null
    chmod 644 ca.pem
fi

alt_names="DNS:localhost,IP:127.0.0.1,IP:::1"
IFS=',' read -ra extra <<< "${RAFTQ_CERT_HOSTS:-}"
for host in "${extra[@]}"; do
    host="${host// /}"
    [ -n "$host" ] || continue
    if [[ "$host" =~ ^[0-9.]+$ || "$host" == *:* ]]; then alt_names+=",IP:$host"; else alt_names+=",DNS:$host"; fi
done

for id in "${IDS[@]}"; do
    [ -f "$id.pem" ] && continue
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 \
        -keyout "$id.key" -out "$id.csr" -subj "/CN=raftq node $id" 2> /dev/null
    cat > "$id.ext" <<EXT
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = $alt_names
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EXT
    openssl x509 -req -in "$id.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 -days "$DAYS" \
        -extfile "$id.ext" -out "$id.pem" 2> /dev/null
    rm -f "$id.csr" "$id.ext"
    chmod 644 "$id.pem"
    echo "made $DIR/$id.pem (for $alt_names)"
done
