#!/usr/bin/env bash
# Measures p11fork against SoftHSM2 (reset_on_fork) side by side with the module alone, on a
# throw-away token, and prints a table. Instruction counts come from callgrind (stable on a
# busy machine); times are repeated and compared as ratios of runs made together.
#   scripts/bench.sh            (a few minutes; needs valgrind)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/swift-env.sh
command -v valgrind >/dev/null || { echo "bench.sh: needs valgrind (apt-get install valgrind)" >&2; exit 1; }
swift build -c release --product p11fork 2>&1 | tail -1
swift build -c release --product p11fork-bench 2>&1 | tail -1
bench=$PWD/.build/release/p11fork-bench
module=$PWD/.build/release/libp11fork.so
softhsm=/usr/lib/softhsm/libsofthsm2.so

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/tokens"
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\nlibrary.reset_on_fork = true\n' "$work" > "$work/softhsm2.conf"
export SOFTHSM2_CONF="$work/softhsm2.conf" P11FORK_MODULE="$softhsm"
pin=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')
softhsm2-util --init-token --free --label bench --pin "$pin" --so-pin "$pin$pin" >/dev/null
pkcs11-tool --module "$softhsm" --token-label bench --login --pin "$pin" --keypairgen --key-type rsa:2048 --label rsa --id 01 >/dev/null 2>&1
pkcs11-tool --module "$softhsm" --token-label bench --login --pin "$pin" --keypairgen --key-type EC:prime256v1 --label ec --id 02 >/dev/null 2>&1

# Instructions per C_GetSessionInfo: the difference between two loop lengths, so set-up cancels.
instructions() {  # module, extra environment...
  local m=$1; shift
  local a b
  a=$(env "$@" valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bench" calls --module "$m" --token bench 2000 2>&1 | sed -n 's/.*Collected : //p')
  b=$(env "$@" valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bench" calls --module "$m" --token bench 22000 2>&1 | sed -n 's/.*Collected : //p')
  echo $(( (b - a) / 20000 ))
}
direct=$(instructions "$softhsm")
through=$(instructions "$module")
traced=$(instructions "$module" P11FORK_TRACE="$work/trace.log" P11FORK_TRACE_LEVEL=calls)
printf '\n%-58s %s\n' "measure" "figure"
printf '%-58s %s\n' "C_GetSessionInfo, instructions/call: SoftHSM alone" "$direct"
printf '%-58s %s (+%s)\n' "  through p11fork" "$through" "$((through - direct))"
printf '%-58s %s (+%s)\n' "  through p11fork, tracing calls to a file" "$traced" "$((traced - direct))"

# What keeping operations for a child costs a process that never forks: instructions added per
# signature (C_SignInit + C_Sign) and per multi-part one (init, 2 updates, final), with replay
# on (default) and off (P11FORK_REPLAY_LIMIT=0).
sign_instructions() {  # module, extra bench argument or "", extra environment...
  local m=$1 x=$2; shift 2
  local a b
  a=$(env "$@" valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bench" signs --module "$m" --token bench --pin "$pin" --key ec --mechanism ec $x 100 2>&1 | sed -n 's/.*Collected : //p')
  b=$(env "$@" valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bench" signs --module "$m" --token bench --pin "$pin" --key ec --mechanism ec $x 600 2>&1 | sed -n 's/.*Collected : //p')
  echo $(( (b - a) / 500 ))
}
for x in "" --multipart; do
  alone=$(sign_instructions "$softhsm" "$x")
  kept=$(sign_instructions "$module" "$x")
  off=$(sign_instructions "$module" "$x" P11FORK_REPLAY_LIMIT=0)
  label="EC signature, instructions: alone / through / replay off"
  [ -n "$x" ] && label="SHA-256 digest in 2 updates, instructions: alone / through / off"
  printf '%-58s %s / %s (+%s) / %s (+%s)\n' "$label" "$alone" "$kept" "$((kept - alone))" "$off" "$((off - alone))"
done

# The alternative to replaying an operation: saving its state with C_GetOperationState after
# each update. NSS's softoken implements it (SoftHSM does not): instructions per SHA-256 digest
# (init, one update, final) alone, with the state saved, through p11fork, with replay off.
nss=/usr/lib/x86_64-linux-gnu/libsoftokn3.so
if [ -e "$nss" ]; then
  opstate() {  # module, extra bench argument or "", extra environment...
    local m=$1 x=$2; shift 2
    local a b
    a=$(env "$@" valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bench" opstate --module "$m" --token "NSS Generic Crypto Services" --nss $x 1000 2>&1 | sed -n 's/.*Collected : //p')
    b=$(env "$@" valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bench" opstate --module "$m" --token "NSS Generic Crypto Services" --nss $x 6000 2>&1 | sed -n 's/.*Collected : //p')
    echo $(( (b - a) / 5000 ))
  }
  alone=$(opstate "$nss" "")
  saved=$(opstate "$nss" --save-state)
  kept=$(P11FORK_MODULE="$nss" opstate "$module" "")
  off=$(P11FORK_MODULE="$nss" P11FORK_REPLAY_LIMIT=0 opstate "$module" "")
  printf '%-58s %s / %s (+%s)\n' "NSS digest, instructions: alone / C_GetOperationState saved" "$alone" "$saved" "$((saved - alone))"
  printf '%-58s %s (+%s) / %s (+%s)\n' "  through p11fork: replay on / off" "$kept" "$((kept - alone))" "$off" "$((off - alone))"
fi

ns() { "$bench" calls --module "$1" --token bench 300000 | awk '{print $4}'; }
printf '%-58s %s / %s\n' "C_GetSessionInfo, ns/call: alone / through p11fork" "$(ns "$softhsm")" "$(ns "$module")"

for mech in rsa ec; do
  for t in 1 2; do
    a=$("$bench" sign --module "$softhsm" --token bench --pin "$pin" --key "$mech" --mechanism "$mech" --threads $t --seconds 3 | awk '{print $5}')
    b=$("$bench" sign --module "$module" --token bench --pin "$pin" --key "$mech" --mechanism "$mech" --threads $t --seconds 3 | awk '{print $5}')
    printf '%-58s %s / %s (ratio %.3f)\n' "sign $mech, $t thread(s), signatures/s: alone / through" "$a" "$b" "$(awk "BEGIN{print $b / $a}")"
  done
done

fresh=$("$bench" recovery --module "$softhsm" --token bench --pin "$pin" --key rsa --fresh | awk '{print $3}')
printf '%-58s %s\n' "a new process: initialise, open, log in, find, sign (ms)" "$fresh"
for n in 1 10 100 1000; do
  r=$("$bench" recovery --module "$module" --token bench --pin "$pin" --key rsa --sessions "$n" --objects "$n" | awk '{print $7}')
  printf '%-58s %s (ratio %.2f)\n' "child's first signature, parent had $n sessions + $n objects (ms)" "$r" "$(awk "BEGIN{print $r / $fresh}")"
done
