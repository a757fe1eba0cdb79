#!/bin/bash
# For the tests. Serves HTTPS with a token key loaded through pkcs11-provider (OpenSSL 3, no
# engine): haproxy from examples/haproxy/haproxy.cfg (master-worker) or Apache from
# examples/apache/p11fork-ssl-provider.conf (prefork, children as www-data), only the port, the
# file paths and Apache's log level changed (`ssl:info`: a failed handshake's OpenSSL error). Makes REQUESTS requests with curl, each a new process and so a full TLS
# handshake the key signs; prints one line per request, the processes that served, a result line
# and the server's log; stops the server.
#   LIBP11FORK=MODULE PKCS11_PROVIDER=PROVIDER provider-server-check.sh haproxy|apache WORKDIR TOKEN KEY PIN_FILE REQUESTS
# LIBP11FORK is the provider's PKCS#11 module: libp11fork.so, or the real module for the
# comparison. The certificate and the key's URI file are made in WORKDIR through the provider.
# Neither server takes a `pkcs11:` URI as its key here; both read the provider's URI PEM block.
# Any token the provider reaches: SoftHSM (SOFTHSM2_CONF), tpm2-pkcs11 (run it under
# scripts/with-tpm2.sh); REQUEST_TIMEOUT: seconds a request may take (5).
set -euo pipefail
server=$1 work=$2 token=$3 key=$4 pin_file=$5 requests=$6
here=$(cd "$(dirname "$0")/.." && pwd)
: "${LIBP11FORK:?set LIBP11FORK to the provider's PKCS#11 module}" "${PKCS11_PROVIDER:?set PKCS11_PROVIDER to pkcs11-provider's pkcs11.so}"
export LIBP11FORK PKCS11_PROVIDER
mkdir -p "$work"
run=$(mktemp -d "$work/$server.XXXXXX")
mkdir -p "$run/htdocs"
echo served >"$run/htdocs/index.html"
# The provider's configuration: the example's, the PIN file (a worker logs in again by itself
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
openssl pkey -in "$uri" -out "$run/token-key.pem" >>"$run/make.log" 2>&1 || true
if ! [ -s "$run/cert.pem" ] || ! grep -q "BEGIN PKCS#11 PROVIDER URI" "$run/token-key.pem" 2>/dev/null; then
  echo "result: no certificate or key file:"; cat "$run/make.log"; exit 1
fi
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

case $server in
  haproxy)
    cat "$run/cert.pem" "$run/token-key.pem" >"$run/server.pem"
    sed -e "s|bind 127.0.0.1:8443 ssl crt /etc/haproxy/token-server.pem|bind 127.0.0.1:$port ssl crt $run/server.pem|" \
      "$here/examples/haproxy/haproxy.cfg" >"$run/server.conf"
    grep -q "crt $run/server.pem" "$run/server.conf" || { echo "result: the example's bind line changed"; exit 1; }
    log=$run/server.log
    haproxy -W -db -f "$run/server.conf" >"$log" 2>&1 &
    ;;
  apache)
    sed -e "s/127.0.0.1:8443/127.0.0.1:$port/g" -e "s/^LogLevel warn$/LogLevel warn ssl:info/" "$here/examples/apache/p11fork-ssl-provider.conf" >"$run/server.conf"
    grep -q "SSLCertificateKeyFile token-key.pem" "$run/server.conf" || { echo "result: the example's key line changed"; exit 1; }
    # The children run as www-data: they must reach the run's files.
    chown -R www-data:www-data "$run"
    log=$run/error.log
    apache2 -f "$run/server.conf" -d "$run" -DFOREGROUND </dev/null >"$run/server.log" 2>&1 &
    ;;
  *) echo "provider-server-check.sh: unknown server $server" >&2; exit 2 ;;
esac
master=$!
stop() {
  local pids="$master $(pgrep -P "$master" || true)"
  kill -TERM "$master" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$master" 2>/dev/null || break; sleep 0.1; done
  kill -KILL $pids 2>/dev/null || true
}
trap stop EXIT
for _ in $(seq 100); do
  curl -s -o /dev/null -m 1 "http://127.0.0.1:$port/" 2>/dev/null && break
  kill -0 "$master" 2>/dev/null || break
  sleep 0.1
done
served=0
for i in $(seq "$requests"); do
  if out=$(curl -sk --max-time "${REQUEST_TIMEOUT:-5}" "https://127.0.0.1:$port/index.html" 2>&1) && [ "$out" = served ]; then
    served=$((served + 1)); echo "request $i: served"
  else
    echo "request $i: failed: $out"
  fi
done
case $server in
  haproxy) echo "serving processes: $(pgrep -P "$master" | wc -l) (haproxy 2.6 forks one worker)" ;;
  apache) echo "serving processes: $(awk '$2 == 200 { print $1 }' "$run/access.log" 2>/dev/null | sort -u | wc -l) (Apache children that answered 200)" ;;
esac
echo "result: $served of $requests served"
echo "--- server log"; cat "$log" "$run/server.log" 2>/dev/null | sort -u | head -n 40
