#!/bin/bash
# For the tests. Serves HTTPS with haproxy (examples/haproxy/haproxy.cfg, master-worker) whose key
# is a token key loaded through pkcs11-provider; makes REQUESTS requests with curl, each a new
# process and so a full TLS handshake the key signs; prints one line per request, a result line
# and haproxy's log; stops haproxy.
#   LIBP11FORK=MODULE PKCS11_PROVIDER=PROVIDER haproxy-check.sh WORKDIR TOKEN KEY PIN_FILE REQUESTS
# LIBP11FORK is the provider's PKCS#11 module: libp11fork.so, or the real module for the
# comparison. The certificate and the key's URI file are made in WORKDIR through the provider.
set -euo pipefail
work=$1 token=$2 key=$3 pin_file=$4 requests=$5
here=$(cd "$(dirname "$0")/.." && pwd)
: "${LIBP11FORK:?set LIBP11FORK to the provider's PKCS#11 module}" "${PKCS11_PROVIDER:?set PKCS11_PROVIDER to pkcs11-provider's pkcs11.so}"
export LIBP11FORK PKCS11_PROVIDER
mkdir -p "$work"
run=$(mktemp -d "$work/haproxy.XXXXXX")
# The provider's configuration: the example's, the PIN file (the worker logs in again by itself
# after the fork), and the encoder that writes a key as its URI.
{ cat "$here/examples/openssl-provider/openssl.cnf"
  echo "pkcs11-module-token-pin = file:$pin_file"
  echo "pkcs11-module-encode-provider-uri-to-pem = true"; } >"$run/openssl.cnf"
export OPENSSL_CONF=$run/openssl.cnf
uri="pkcs11:token=$token;object=$key;type=private"
# Directly over SoftHSM these commands may crash at exit after writing their file (docs/FORK.md):
# what counts is the file.
openssl req -new -x509 -key "$uri" -subj /CN=localhost -addext "subjectAltName=IP:127.0.0.1" -days 2 \
  -out "$run/cert.pem" >"$run/make.log" 2>&1 || true
openssl pkey -in "$uri" -out "$run/key.pem" >>"$run/make.log" 2>&1 || true
if ! [ -s "$run/cert.pem" ] || ! grep -q "BEGIN PKCS#11 PROVIDER URI" "$run/key.pem" 2>/dev/null; then
  echo "result: no certificate or key file:"; cat "$run/make.log"; exit 1
fi
cat "$run/cert.pem" "$run/key.pem" >"$run/server.pem"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
sed -e "s|bind 127.0.0.1:8443 ssl crt /etc/haproxy/token-server.pem|bind 127.0.0.1:$port ssl crt $run/server.pem|" \
  "$here/examples/haproxy/haproxy.cfg" >"$run/haproxy.cfg"
grep -q "crt $run/server.pem" "$run/haproxy.cfg" || { echo "result: the example's bind line changed"; exit 1; }

haproxy -W -db -f "$run/haproxy.cfg" >"$run/haproxy.log" 2>&1 &
master=$!
stop() {
  local pids="$master $(pgrep -P "$master" || true)"
  kill -TERM "$master" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$master" 2>/dev/null || break; sleep 0.1; done
  kill -KILL $pids 2>/dev/null || true
}
trap stop EXIT
for _ in $(seq 100); do
  curl -sk --max-time 2 "https://127.0.0.1:$port/" >/dev/null 2>&1 && break
  kill -0 "$master" 2>/dev/null || break
  sleep 0.1
done
served=0
for i in $(seq "$requests"); do
  if out=$(curl -sk --max-time "${REQUEST_TIMEOUT:-5}" "https://127.0.0.1:$port/" 2>&1) && [ "$out" = served ]; then
    served=$((served + 1)); echo "request $i: served"
  else
    echo "request $i: failed: $out"
  fi
done
echo "workers: $(pgrep -P "$master" | wc -l)"
echo "result: $served of $requests served"
echo "haproxy log:"; cat "$run/haproxy.log"
