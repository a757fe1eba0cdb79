#!/usr/bin/env bash
# p11fork's benchmarks: p11fork against SoftHSM2 (reset_on_fork) side by side with the module
# alone, on a throw-away token, with a table of every target of BENCHMARKS.md. Instruction counts
# come from callgrind (stable on a busy machine); times are taken in alternating rounds and
# compared as ratios of medians, never as absolute figures alone.
#   scripts/bench.sh            about 6 minutes; writes benchmarks/results.txt and benchmarks/recovery.png
#   scripts/bench.sh --quick    fewer rounds and signatures (about 2 minutes)
#   scripts/bench.sh --broker   only the broker's figures (section 6, a few minutes; benchmarks/broker.txt)
# Installs valgrind and gnuplot when missing (as root), like scripts/install-deps.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/swift-env.sh
quick=0 broker_only=0
[ "${1:-}" = "--quick" ] && quick=1
[ "${1:-}" = "--broker" ] && broker_only=1
missing=()
command -v valgrind >/dev/null || missing+=(valgrind)
command -v gnuplot >/dev/null || missing+=(gnuplot-nox)
command -v softhsm2-util >/dev/null || missing+=(softhsm2)
command -v pkcs11-tool >/dev/null || missing+=(opensc)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "bench.sh: needs ${missing[*]}: run it as root once, or: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi
swift build -c release --product p11fork 2>&1 | tail -1
swift build -c release --product p11fork-bench 2>&1 | tail -1
swift build -c release --product p11fork-broker 2>&1 | tail -1
bench=$PWD/.build/release/p11fork-bench
module=$PWD/.build/release/libp11fork.so
softhsm=/usr/lib/softhsm/libsofthsm2.so
out=$PWD/benchmarks
mkdir -p "$out"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/tokens"
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\nlibrary.reset_on_fork = true\n' "$work" > "$work/softhsm2.conf"
export SOFTHSM2_CONF="$work/softhsm2.conf" P11FORK_MODULE="$softhsm"
pin=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')
softhsm2-util --init-token --free --label bench --pin "$pin" --so-pin "$pin$pin" >/dev/null
tool() { pkcs11-tool --module "$softhsm" --token-label bench --login --pin "$pin" "$@" >/dev/null 2>&1; }
tool --keypairgen --key-type rsa:2048 --label rsa --id 01
tool --keypairgen --key-type EC:prime256v1 --label ec --id 02
tool --keygen --key-type GENERIC:32 --label hmac --id 03

results=results.txt
[ $broker_only = 1 ] && results=broker.txt
exec > >(tee "$out/$results")
printf '%s\n' "p11fork benchmarks, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)"
printf '%s\n' "SoftHSM $(dpkg-query -W -f='${Version}' softhsm2 2>/dev/null) (library.reset_on_fork = true), release build of p11fork $(git describe --always --dirty 2>/dev/null || echo '')"
printf '\n%-64s %s\n' "measure" "figure"
row() { printf '%-64s %s\n' "$1" "$2"; }
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
# 6. The broker (docs/FORK.md "The broker"): what a call costs a child it serves, next to the module
# alone, a copy of the module in the child, and p11-kit's own client -> server path (p11-kit
# server over SoftHSM, p11-kit-client.so): the same RPC the broker speaks. Rounds alternate.
broker_figures() {
  local sock=$work/p11-kit.sock client=/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so
  p11-kit server -f -n "$sock" --provider "$softhsm" "pkcs11:" >/dev/null 2>&1 &
  local kit=$!
  for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
  local n=20000 rounds=5 seconds=2
  [ $quick = 1 ] && rounds=3
  calls() { "$bench" calls --token bench "$@" $n | awk '{print $4}'; }
  eps() { "$bench" sign --token bench --pin "$pin" --key ec --mechanism ec --threads 1 --seconds $seconds "$@" | awk '{print $5}'; }
  : >"$work/b.calls"; : >"$work/b.eps"
  for _ in $(seq $rounds); do
    printf '%s %s %s %s\n' "$(calls --module "$softhsm")" \
      "$(P11FORK_STRATEGY=fresh-copy calls --module "$module" --in-child)" \
      "$(P11FORK_STRATEGY=broker calls --module "$module" --in-child)" \
      "$(P11_KIT_SERVER_ADDRESS=unix:path=$sock calls --module "$client")" >>"$work/b.calls"
    printf '%s %s %s %s\n' "$(eps --module "$softhsm")" \
      "$(P11FORK_STRATEGY=fresh-copy eps --module "$module" --in-child)" \
      "$(P11FORK_STRATEGY=broker eps --module "$module" --in-child)" \
      "$(P11_KIT_SERVER_ADDRESS=unix:path=$sock eps --module "$client")" >>"$work/b.eps"
  done
  col() { awk -v c="$2" '{print $c}' "$1" | median; }
  row "C_GetSessionInfo, us/call: alone / child copy / child via broker / p11-kit client" \
      "$(for c in 1 2 3 4; do col "$work/b.calls" $c; done | awk '{printf "%s%.2f", (NR > 1 ? " / " : ""), $1 / 1000}')"
  local added=$(awk '{print ($3 - $1) / ($4 - $1)}' "$work/b.calls" | median)
  row "  what the broker adds / what p11-kit adds (goal: at most 0.5)" "$(printf '%.2f' "$added")"
  row "EC P-256 init+sign, us: alone / child copy / child via broker / p11-kit client" \
      "$(for c in 1 2 3 4; do col "$work/b.eps" $c; done | awk '{printf "%s%.0f", (NR > 1 ? " / " : ""), 1e6 / $1}')"
  added=$(awk '{print (1e6 / $3 - 1e6 / $1) / (1e6 / $4 - 1e6 / $1)}' "$work/b.eps" | median)
  row "  what the broker adds / what p11-kit adds (goal: at most 0.5)" "$(printf '%.2f' "$added")"
  # Two workers at once, each a child signing on one thread: through the broker, with copies.
  pair() {
    P11FORK_STRATEGY=$1 eps --module "$module" --in-child >"$work/w1" & local a=$!
    P11FORK_STRATEGY=$1 eps --module "$module" --in-child >"$work/w2" & local b=$!
    wait $a $b
    awk '{ s += $1 } END { printf "%.0f", s }' "$work/w1" "$work/w2"
  }
  row "EC signatures/s of 2 workers: via the broker / with copies in the children" "$(pair broker) / $(pair fresh-copy)"
  # A worker's first signature through the broker against a new process doing the same with the
  # module alone, in alternating rounds: the first worker (the broker logs in for it) and a later
  # one (the goal's case: the broker is initialised and logged in already).
  : >"$work/b.first"
  for _ in $(seq 7); do
    printf '%s %s %s\n' \
      "$(P11FORK_STRATEGY=broker "$bench" recovery --module "$module" --token bench --pin "$pin" --key ec --mechanism ec --sessions 1 --objects 0 | awk '{print $7}')" \
      "$(P11FORK_STRATEGY=broker "$bench" recovery --module "$module" --token bench --pin "$pin" --key ec --mechanism ec --sessions 1 --objects 0 --second | awk '{print $7}')" \
      "$("$bench" recovery --module "$softhsm" --token bench --pin "$pin" --key ec --mechanism ec --sessions 1 --objects 0 --fresh | awk '{print $3}')" >>"$work/b.first"
  done
  local first later fresh
  first=$(col "$work/b.first" 1) later=$(col "$work/b.first" 2) fresh=$(col "$work/b.first" 3)
  row "a later worker's first signature via the broker / a new process (ms, goal: at most 0.5)" "$later / $fresh = $(awk -v a="$later" -v b="$fresh" 'BEGIN { printf "%.2f", a / b }')"
  row "  the first worker's (the broker logs in for it) / a new process (ms)" "$first / $fresh = $(awk -v a="$first" -v b="$fresh" 'BEGIN { printf "%.2f", a / b }')"
  kill $kit 2>/dev/null || true
}
if [ $broker_only = 1 ]; then broker_figures; exit 0; fi

# Instructions per call: the difference between two loop lengths, so that set-up cancels out.
callgrind() {  # loops-short loops-long divisor command...
  local short=$1 long=$2; shift 2
  local a b
  a=$("$@" "$short" 2>&1 | sed -n 's/.*Collected : //p')
  b=$("$@" "$long" 2>&1 | sed -n 's/.*Collected : //p')
  echo $(( (b - a) / (long - short) ))
}
vg="valgrind --tool=callgrind --callgrind-out-file=/dev/null"
# Valgrind 3.19 gives up on the Swift toolchain's DWARF 5 debug information ("Possibly corrupted
# debuginfo file"): it counts instructions in a copy of the module without it (same code).
vgmodule=$work/libp11fork.so
objcopy --strip-debug "$module" "$vgmodule"

# 1. Forwarding overhead on a cheap call, and tracing (targets: +60, +1,500).
direct=$(callgrind 2000 22000 $vg "$bench" calls --module "$softhsm" --token bench)
through=$(callgrind 2000 22000 $vg "$bench" calls --module "$vgmodule" --token bench)
traced=$(callgrind 2000 22000 env P11FORK_TRACE="$work/trace.log" P11FORK_TRACE_LEVEL=calls $vg "$bench" calls --module "$vgmodule" --token bench)
row "C_GetSessionInfo, instructions/call: SoftHSM alone" "$direct"
row "  through p11fork (target: at most +60)" "$through (+$((through - direct)))"
row "  through p11fork, tracing calls to a file (target: at most +1,500)" "$traced (+$((traced - direct)))"
ns() { "$bench" calls --module "$1" --token bench 300000 | awk '{print $4}'; }
row "C_GetSessionInfo, ns/call: alone / through p11fork" "$(ns "$softhsm") / $(ns "$module")"

# 2. What keeping operations for a child costs a process that never forks.
signs() {  # module extra-argument environment...
  local m=$1 x=$2; shift 2
  callgrind 100 600 env "$@" $vg "$bench" signs --module "$m" --token bench --pin "$pin" --key ec --mechanism ec $x
}
for x in "" --multipart; do
  alone=$(signs "$softhsm" "$x")
  kept=$(signs "$vgmodule" "$x")
  off=$(signs "$vgmodule" "$x" P11FORK_REPLAY_LIMIT=0)
  label="EC P-256 signature (init + sign), instructions: alone / through / replay off"
  [ -n "$x" ] && label="SHA-256 digest in 2 updates, instructions: alone / through / replay off"
  row "$label" "$alone / $kept (+$((kept - alone))) / $off (+$((off - alone)))"
done
nss=/usr/lib/x86_64-linux-gnu/libsoftokn3.so
if [ -e "$nss" ]; then
  # The alternative to replay: C_GetOperationState after each update (NSS's softoken has it).
  opstate() {  # module extra-argument environment...
    local m=$1 x=$2; shift 2
    callgrind 1000 6000 env "$@" $vg "$bench" opstate --module "$m" --token "NSS Generic Crypto Services" --nss $x
  }
  alone=$(opstate "$nss" "")
  saved=$(opstate "$nss" --save-state)
  kept=$(opstate "$vgmodule" "" P11FORK_MODULE="$nss")
  off=$(opstate "$vgmodule" "" P11FORK_MODULE="$nss" P11FORK_REPLAY_LIMIT=0)
  row "NSS SHA-256 digest, instructions: alone / with C_GetOperationState" "$alone / $saved (+$((saved - alone)))"
  row "  through p11fork: replay on / off" "$kept (+$((kept - alone))) / $off (+$((off - alone)))"
fi

# 3. Signing throughput, side by side (target: >= 0.99). The machine is shared: each round runs
# the module alone and through p11fork back to back (in alternating order, so that a drift favours
# neither), and the figure is the median of the rounds' ratios.
rounds=9; seconds=1
[ $quick = 1 ] && rounds=3
rate() { "$bench" sign --module "$1" --token bench --pin "$pin" --key "$2" --mechanism "$2" --threads "$3" --seconds $seconds | awk '{print $5}'; }
for mech in rsa ec; do
  for t in 1 2; do
    : > "$work/a"; : > "$work/b"; : > "$work/r"
    for round in $(seq $rounds); do
      if [ $((round % 2)) = 1 ]; then a=$(rate "$softhsm" $mech $t); b=$(rate "$module" $mech $t)
      else b=$(rate "$module" $mech $t); a=$(rate "$softhsm" $mech $t); fi
      echo "$a" >> "$work/a"; echo "$b" >> "$work/b"; awk "BEGIN{print $b / $a}" >> "$work/r"
    done
    row "sign $mech, $t thread(s), signatures/s: alone / through (target >= 0.99)" \
        "$(median < "$work/a") / $(median < "$work/b") (median ratio $(median < "$work/r" | awk '{printf "%.3f", $1}'))"
  done
done

# 4. Recovery in a child against the least the module needs in a new process (target: <= 1.10),
# and its growth with what the parent had (it must follow what the child uses).
repeats=7
[ $quick = 1 ] && repeats=3
fresh=$(for _ in $(seq $repeats); do "$bench" recovery --module "$softhsm" --token bench --pin "$pin" --key rsa --fresh | awk '{print $3}'; done | median)
row "a new process: initialise, open, log in, find, sign (ms, median)" "$fresh"
: > "$work/recovery.dat"
for n in 1 10 100 1000; do
  r=$(for _ in $(seq $repeats); do "$bench" recovery --module "$module" --token bench --pin "$pin" --key rsa --sessions "$n" --objects "$n" | awk '{print $7}'; done | median)
  row "child's first signature, parent had $n sessions + $n objects (ms)" "$r (ratio $(awk "BEGIN{printf \"%.2f\", $r / $fresh}"))"
  echo "$n $r $fresh" >> "$work/recovery.dat"
done
gnuplot <<EOF
set terminal pngcairo size 800,480 font ",11"
set output "$out/recovery.png"
set title "A forked child's first signature through p11fork (SoftHSM2, RSA-2048)"
set xlabel "sessions and session objects the parent had (each)"
set ylabel "milliseconds (median of $repeats)"
set logscale x
set xrange [0.7:1500]
set yrange [0:*]
set key bottom right
set grid
plot "$work/recovery.dat" using 1:2 with linespoints lw 2 pt 7 title "child: module, session, login, key, signature", \
     "$work/recovery.dat" using 1:3 with lines lw 2 dt 2 title "new process, module alone: initialise, open, log in, find, sign"
EOF
row "plot" "benchmarks/recovery.png"

# 5. Memory: heap bytes p11fork keeps per session and per object handle, and a steady state.
mem() { "$bench" memory --module "$1" --token bench --pin "$pin" --sessions 10000 --objects 10000; }
a=$(mem "$softhsm"); b=$(mem "$module")
ps=$(awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " "); printf "%.0f", y[5] - x[5] }')
po=$(awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " "); printf "%.0f", y[9] - x[9] }')
row "heap bytes p11fork keeps per open session / per session object" "$ps / $po"
n=1000000
[ $quick = 1 ] && n=200000
"$bench" steady --module "$module" --token bench --pin "$pin" --key hmac --mechanism hmac $n > "$work/steady"
first=$(sed -n '1p' "$work/steady"); last=$(tail -1 "$work/steady")
row "heap bytes after $(echo "$first" | awk '{print $3}') / $n HMAC signatures (no growth)" "$(echo "$first" | awk '{print $5}') / $(echo "$last" | awk '{print $5}')"
row "resident KiB after $(echo "$first" | awk '{print $3}') / $n HMAC signatures" "$(echo "$first" | awk '{print $7}') / $(echo "$last" | awk '{print $7}')"

broker_figures
