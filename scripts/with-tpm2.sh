#!/bin/sh
# For the tests. Runs a command next to a private software TPM with a tpm2-pkcs11 token: swtpm
# (TPM simulator on loopback ports), a private D-Bus session bus and tpm2-abrmd, a token store
# in WORKDIR with a key (TPM2_KEY_ALGORITHM: tpm2_ptool's name for it, rsa2048 unless set, e.g.
# ecc256 for P-256); the TPM's dictionary-attack lockout is relaxed so failures never
# lock it. Everything started here is stopped at the end; nothing outside WORKDIR is written.
#   with-tpm2.sh WORKDIR TOKEN_LABEL SO_PIN USER_PIN KEY_LABEL -- COMMAND...
# The command gets TPM2_PKCS11_TCTI, TPM2_PKCS11_STORE and DBUS_SESSION_BUS_ADDRESS.
set -eu
work=$1 label=$2 so_pin=$3 pin=$4 key=$5
shift 6
mkdir -p "$work/tpm" "$work/store"
pids=""
cleanup() { for p in $pids; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# swtpm on two loopback ports below the kernel's ephemeral range (32768 and up), where client
# connections cannot hold them; another pair is tried if these are taken.
started=no
for attempt in $(seq 10); do
  port=$(( 20000 + $(od -An -N2 -tu2 /dev/urandom | tr -d ' ') % 12000 ))
  swtpm socket --tpm2 --server type=tcp,port=$port,bindaddr=127.0.0.1 \
    --ctrl type=tcp,port=$((port + 1)),bindaddr=127.0.0.1 --flags not-need-init,startup-clear \
    --tpmstate dir="$work/tpm" >>"$work/swtpm.log" 2>&1 &
  swtpm=$!
  for i in $(seq 100); do
    if swtpm_ioctl --tcp "127.0.0.1:$((port + 1))" -g >/dev/null 2>&1; then started=yes; break; fi
    kill -0 "$swtpm" 2>/dev/null || break
    sleep 0.05
  done
  [ "$started" = yes ] && break
  kill "$swtpm" 2>/dev/null || true
done
pids="$pids $swtpm"
export DBUS_SESSION_BUS_ADDRESS="unix:path=$work/bus"
dbus-daemon --session --address="$DBUS_SESSION_BUS_ADDRESS" --nofork --nopidfile >"$work/dbus.log" 2>&1 &
pids="$pids $!"
for i in $(seq 100); do [ -S "$work/bus" ] && break; sleep 0.05; done
sleep 0.2
export TPM2TOOLS_TCTI="tabrmd:bus_type=session" TPM2_PKCS11_TCTI="tabrmd:bus_type=session" TPM2_PKCS11_STORE="$work/store"
# tpm2-abrmd gives up if swtpm is not listening yet: start it again until the TPM answers.
ready=no
for attempt in $(seq 30); do
  tpm2-abrmd --session --allow-root --flush-all --tcti="swtpm:host=127.0.0.1,port=$port" >>"$work/abrmd.log" 2>&1 &
  abrmd=$!
  for i in $(seq 40); do
    if tpm2_getrandom 4 >/dev/null 2>&1; then ready=yes; break; fi
    kill -0 "$abrmd" 2>/dev/null || break
    sleep 0.1
  done
  [ "$ready" = yes ] && break
  kill "$abrmd" 2>/dev/null || true
  sleep 0.2
done
pids="$pids $abrmd"
if [ "$ready" != yes ]; then
  echo "with-tpm2.sh: the software TPM did not come up; its logs:" >&2
  tail -n 5 "$work/swtpm.log" "$work/dbus.log" "$work/abrmd.log" >&2 || true
  exit 1
fi
tpm2_dictionarylockout --setup-parameters --max-tries=4294967295 --clear-lockout >/dev/null 2>&1 || true
if [ ! -f "$work/initialised" ]; then
  tpm2_ptool init --path="$work/store" >/dev/null
  tpm2_ptool addtoken --pid=1 --sopin="$so_pin" --userpin="$pin" --label="$label" --path="$work/store" >/dev/null
  tpm2_ptool addkey --algorithm="${TPM2_KEY_ALGORITHM:-rsa2048}" --label="$label" --userpin="$pin" --key-label="$key" --path="$work/store" >/dev/null
  touch "$work/initialised"
fi
"$@"
