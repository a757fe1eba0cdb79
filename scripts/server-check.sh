#!/bin/bash
# For the tests. Serves HTTPS with a token's key through OpenSSL's pkcs11 engine, nginx from
# examples/nginx/nginx.conf or Apache from examples/apache/p11fork-ssl.conf (only the port, the
# token, the key and the PIN file changed), on a free loopback port; makes REQUESTS requests
# with curl, each a new process and so a full TLS handshake, which the key must sign; prints
# one line per request with the worker that answered, a result line, and the server's error
# log; stops the server by its pid file (and kills what is left of the processes it started).
#   PIN=... LIBP11FORK=MODULE server-check.sh nginx|apache|apache-tpm2 WORKDIR TOKEN KEY MODE REQUESTS [ENV...]
# apache-tpm2: Apache from examples/apache/p11fork-ssl-tpm2.conf, with no engine configuration:
# mod_ssl loads the engine by the key's scheme, and the engine reads PKCS11_MODULE_PATH.
# LIBP11FORK is the module the engine loads: libp11fork.so, or the real module for the
# comparison. MODE: `daemon` (nginx: master + 2 workers; Apache: parent + prefork children) or
# `single` (nginx: `daemon off; master_process off;`, Apache: -X; no fork). ENV: names of
# variables nginx keeps for its workers (`env` lines; none by default). The certificate for the
# key is made in WORKDIR on first use. The PIN goes to a file (pin-source), never into argv or
# the server's environment. REQUEST_TIMEOUT: seconds a request may take (5). WORKER_USER: the
# user nginx's workers switch to (`user` line; default: the user running the script, as Apache's
# children always run as www-data).
set -euo pipefail
server=$1 work=$2 token=$3 key=$4 mode=$5 requests=$6
shift 6
here=$(cd "$(dirname "$0")/.." && pwd)
: "${PIN:?set PIN to the user PIN of the token}"
: "${LIBP11FORK:?set LIBP11FORK to the module the engine loads}"
export LIBP11FORK
# Only the server reads the engine configuration (OPENSSL_CONF if set, as a unit would set it).
engine_conf=${OPENSSL_CONF:-$here/examples/nginx/pkcs11-engine.cnf}
unset OPENSSL_CONF
mkdir -p "$work"
run=$(mktemp -d "$work/$server-$mode.XXXXXX")
mkdir -p "$run/temp" "$run/htdocs"
echo served >"$run/htdocs/index.html"
(umask 077; printf %s "$PIN" >"$work/pin")
unset PIN
# The certificate: the token's public key (read with pkcs11-tool) certified by a throw-away CA
# that curl trusts; the server proves it holds the key by signing each handshake with it. (Not
# `openssl req -engine`: that makes the engine OpenSSL's default, and tpm2-pkcs11's own use of
# OpenSSL then fails.)
if [ ! -s "$work/cert.pem" ]; then
  {
    pkcs11-tool --module "$LIBP11FORK" --token-label "$token" --read-object --type pubkey --label "$key" -o "$work/public.der" &&
    openssl pkey -pubin -inform DER -in "$work/public.der" -out "$work/public.pem" &&
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$work/ca.key" -subj "/CN=p11fork test CA" -days 2 -out "$work/ca.pem" &&
    openssl req -new -key "$work/ca.key" -subj /CN=localhost -out "$work/request.csr" &&
    openssl x509 -req -in "$work/request.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial -days 2 \
      -force_pubkey "$work/public.pem" -extfile <(echo "subjectAltName=IP:127.0.0.1") -out "$work/cert.pem"
  } >"$work/cert.log" 2>&1 || { echo "result: no certificate for the key:"; cat "$work/cert.log"; exit 1; }
fi
cp "$work/cert.pem" "$run/cert.pem"

# Stops the server: its master (pid file) gently, then whatever is left of the master, its
# workers and the process this script launched, by force.
pids=() pidfile=""
stop() {
  local master
  if master=$(cat "$pidfile" 2>/dev/null) && [ -n "$master" ]; then
    pids+=("$master" $(pgrep -P "$master" || true))
    kill -TERM "$master" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$master" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "${pids[@]}" 2>/dev/null || true
  fi
  kill -KILL $(jobs -p) 2>/dev/null || true
}
trap stop EXIT

# A port below the kernel's ephemeral range (where clients' ports cannot hold it); another is
# tried when the server cannot bind it.
started=no
for attempt in $(seq 5); do
  port=$(( 20000 + $(od -An -N2 -tu2 /dev/urandom | tr -d ' ') % 12000 ))
  rm -f "$run/nginx.pid" "$run/apache2.pid"
  case $server in
    nginx)
      sed -e "s/127.0.0.1:8443/127.0.0.1:$port/" -e "s/token=mytoken;object=mykey/token=$token;object=$key/" \
          -e "s|file:/etc/nginx/token-pin|file:$work/pin|" "$here/examples/nginx/nginx.conf" >"$run/nginx.conf"
      for name in "$@"; do sed -i "1i env $name;" "$run/nginx.conf"; done
      globals="user ${WORKER_USER:-$(id -un)};"
      # Workers of another user must reach the run's files (temporary folders, the pid file).
      [ -n "${WORKER_USER:-}" ] && chown -R "$WORKER_USER" "$run"
      # One process: without the reuseport of the example (one listening socket per worker,
      # the kernel would hand half the connections to a socket nobody accepts on).
      if [ "$mode" = single ]; then
        globals="$globals daemon off; master_process off;"
        sed -i 's/ reuseport;/;/' "$run/nginx.conf"
      fi
      pidfile=$run/nginx.pid errorlog=$run/error.log
      # -e: nginx's own log before it has read the configuration (else /var/log/nginx).
      OPENSSL_CONF=$engine_conf nginx -p "$run/" -c "$run/nginx.conf" -e "$run/error.log" -g "$globals" </dev/null >>"$run/stdout.log" 2>&1 &
      launched=$!
      ;;
    apache|apache-tpm2)
      example=p11fork-ssl.conf server_env=(OPENSSL_CONF="$engine_conf")
      if [ "$server" = apache-tpm2 ]; then example=p11fork-ssl-tpm2.conf server_env=(PKCS11_MODULE_PATH="$LIBP11FORK"); fi
      sed -e "s/127.0.0.1:8443/127.0.0.1:$port/g" -e "s/token=mytoken;object=mykey/token=$token;object=$key/" \
          -e "s|file:/etc/apache2/token-pin|file:$work/pin|" "$here/examples/apache/$example" >"$run/apache.conf"
      # The children run as www-data: they must reach the run's files and the token's.
      chown -R www-data:www-data "$run"
      pidfile=$run/apache2.pid errorlog=$run/error.log
      flags=(-k start)
      [ "$mode" = single ] && flags=(-X)
      env "${server_env[@]}" apache2 -f "$run/apache.conf" -d "$run" "${flags[@]}" </dev/null >>"$run/stdout.log" 2>&1 &
      launched=$!
      ;;
    *) echo "server-check.sh: unknown server $server" >&2; exit 2 ;;
  esac
  exited=""
  for _ in $(seq 100); do
    # Any answer on the port (even a complaint about plain HTTP) means it listens.
    if [ -s "$pidfile" ] && curl -s -o /dev/null -m 1 "http://127.0.0.1:$port/" 2>/dev/null; then started=yes; break; fi
    # Gone with no pid file: failed, unless it exited 0 (apache2 -k start leaves a daemon that
    # writes the pid file once its second reading of the configuration is done).
    if ! kill -0 "$launched" 2>/dev/null && [ ! -s "$pidfile" ]; then
      [ -n "$exited" ] || { wait "$launched" && exited=0 || exited=$?; }
      [ "$exited" -eq 0 ] || break
    fi
    sleep 0.1
  done
  [ "$started" = yes ] && break
  stop
  grep -q -i "address already in use" "$errorlog" "$run/stdout.log" 2>/dev/null || break
done
if [ "$started" != yes ]; then
  echo "result: $server did not start"
  cat "$errorlog" "$run/stdout.log" 2>/dev/null || true
  exit 1
fi

served=0 workers=""
for i in $(seq "$requests"); do
  set +e
  headers=$(curl -s -S --connect-timeout 3 -m "${REQUEST_TIMEOUT:-5}" --cacert "$work/ca.pem" -D - -o "$run/body" \
                 "https://127.0.0.1:$port/index.html" 2>"$run/curl.err")
  rc=$?
  set -e
  worker=$(printf '%s\n' "$headers" | tr -d '\r' | awk -F': ' 'tolower($1) == "x-worker" { print $2 }')
  if [ "$rc" -eq 0 ] && [ "$(cat "$run/body")" = served ]; then
    served=$((served + 1)) workers="$workers $worker"
    echo "request $i: served${worker:+ by worker $worker}"
  else
    reason=$(head -c 200 "$run/curl.err")
    echo "request $i: failed, curl exit $rc: $reason"
  fi
done
# Apache: which child served each request is in the access log ("%P %>s").
if [ "$server" != nginx ]; then workers=$(awk '$2 == 200 { print $1 }' "$run/access.log" 2>/dev/null || true); fi
workers=$(printf '%s\n' $workers | sort -u | tr '\n' ' ')
stop
trap - EXIT
echo "server pids: ${pids[*]}"
echo "--- error log"
cat "$errorlog" 2>/dev/null || true
echo "--- end of error log"
echo "result: $served of $requests served; workers: $(wc -w <<<"$workers") ($workers)"
