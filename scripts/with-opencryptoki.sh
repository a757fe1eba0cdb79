#!/bin/sh
# For the tests. Runs a command next to a private openCryptoki: in a mount namespace of its own
# (unshare -m), temporary folders are mounted over openCryptoki's state (/var/lib/opencryptoki,
# /var/log/opencryptoki, its shared memory in /dev/shm) and over /run (pkcsslotd's socket and pid
# file, /var/lock), pkcsslotd
# is started, and on first use the soft token (slot 3) is initialised with the PINs given and
# given an RSA key; then the command runs, and pkcsslotd is stopped. Nothing outside the
# namespace is touched, and WORKDIR keeps the token for the next run.
#   with-opencryptoki.sh WORKDIR TOKEN_LABEL SO_PIN USER_PIN KEY_LABEL -- COMMAND...
set -eu
if [ "${P11FORK_OCK_INSIDE:-}" != 1 ]; then
  export P11FORK_OCK_INSIDE=1
  exec unshare -m "$0" "$@"
fi
work=$1 label=$2 so_pin=$3 pin=$4 key=$5
shift 6
module=/usr/lib/x86_64-linux-gnu/opencryptoki/libopencryptoki.so.0
mkdir -p "$work/ock-lib" "$work/ock-log" "$work/ock-run"
mount --bind "$work/ock-run" /run
mount --bind "$work/ock-lib" /var/lib/opencryptoki
mkdir -p /var/log/opencryptoki
mount --bind "$work/ock-log" /var/log/opencryptoki
# The tokens' shared memory (/dev/shm/var.lib.opencryptoki.*): private too, or runs beside each
# other (other tests, other checkouts) overwrite each other's token state (seen: a wrong PIN).
mount -t tmpfs p11fork-ock /dev/shm
mkdir -p /var/lib/opencryptoki/swtok/TOK_OBJ /run/lock/opencryptoki/swtok
chgrp -R pkcs11 /var/lib/opencryptoki /run/lock/opencryptoki /var/log/opencryptoki
chmod -R 0770 /var/lib/opencryptoki /run/lock/opencryptoki /var/log/opencryptoki
rm -f /run/pkcsslotd.pid
setsid pkcsslotd >"$work/pkcsslotd.log" 2>&1 &
# Only this run's slot daemon, by the pid in its (private) pid file: a run beside this one, of
# another test or checkout, has its own.
trap 'kill "$(cat /run/pkcsslotd.pid 2>/dev/null)" 2>/dev/null || true' EXIT
for i in $(seq 200); do [ -S /run/pkcsslotd.socket ] && break; sleep 0.05; done
# The slot daemon may take a moment to serve once its socket exists: the first step is retried.
step() { "$@" >>"$work/setup.log" 2>&1 || { echo "with-opencryptoki.sh: '$1' failed (see $work/setup.log)" >&2; exit 1; }; }
if [ ! -f "$work/initialised" ]; then
  for try in $(seq 10); do
    printf '%s\n' "$label" | pkcsconf -I -c 3 -S 87654321 >>"$work/setup.log" 2>&1 && break
    [ "$try" = 10 ] && { echo "with-opencryptoki.sh: pkcsconf -I failed (see $work/setup.log)" >&2; exit 1; }
    sleep 0.3
  done
  step pkcsconf -P -c 3 -S 87654321 -n "$so_pin"
  step pkcsconf -u -c 3 -S "$so_pin" -n "$pin"
  step pkcs11-tool --module "$module" --slot 3 --login --pin "$pin" --keypairgen --key-type rsa:2048 --label "$key" --id 01
  touch "$work/initialised"
fi
"$@"
