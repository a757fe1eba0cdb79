#!/usr/bin/env bash
# Runs p11fork's unit tests (P11ForkCoreTests: handle tables, configuration, trace lines, kept
# secrets, replay copies) under AddressSanitizer and ThreadSanitizer, each in a build directory of
# its own; then the concurrency scenarios (p11fork-concurrency: threads, fork-churn, fork-busy,
# finalize-race, initialize-race, callbacks-fork) through a libp11fork.so built with the same sanitizer, over a
# SoftHSM token made for the run. The driver is an ordinary C program: the sanitizer's runtime
# (the Swift toolchain's, which the instrumented module needs) is preloaded into it.
#   scripts/sanitize.sh [address|thread]...     (default: both; 1.5 minutes for both here)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/swift-env.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# XCTest's own objects, alive at exit, are all LeakSanitizer reports here; memory SoftHSM and
# OpenSSL lose themselves is not p11fork's (Tests/Tools/Fuzz/lsan.supp says which).
{ echo "leak:libXCTest.so"; cat Tests/Tools/Fuzz/lsan.supp; } > "$work/lsan.supp"
export LSAN_OPTIONS="suppressions=$work/lsan.supp:print_suppressions=0" P11FORK_SANITIZE=1

# A token with a key pair, in the run's own directory.
make_token() {
  mkdir -p "$work/tokens"
  printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$work/tokens" > "$work/softhsm2.conf"
  sed 's/^log.level = ERROR$/&\nlibrary.reset_on_fork = true/' "$work/softhsm2.conf" > "$work/strict.conf"
  pin="PIN-$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  SOFTHSM2_CONF="$work/softhsm2.conf" softhsm2-util --init-token --free --label sanitize --pin "$pin" \
    --so-pin "$pin-so" >/dev/null
  SOFTHSM2_CONF="$work/softhsm2.conf" pkcs11-tool --module "$softhsm" --token-label sanitize --login --pin "$pin" \
    --keypairgen --key-type rsa:2048 --label sanitize-key --id 01 >/dev/null
}

# Each scenario through the sanitized module; any sanitizer report (in the parent or a child) fails.
run_scenarios() {
  local sanitizer=$1 runtime module=".build-$1/debug/libp11fork.so"
  runtime=$(ls "$(dirname "$(command -v swift)")"/../lib/clang/*/lib/linux/libclang_rt.${sanitizer:0:1}san-x86_64.so)
  # The toolchain's runtimes intercept libdispatch too: it must be there when they load.
  local preload="$runtime $(dirname "$(command -v swift)")/../lib/swift/linux/libdispatch.so"
  local -a scenarios=(
    "softhsm2.conf --locking callbacks --seconds 3 threads"
    "softhsm2.conf --locking os --seconds 3 threads"
    "softhsm2.conf --children 50 fork-churn"
    "softhsm2.conf --children 10 --busy random fork-busy"
    "softhsm2.conf --rounds 10 finalize-race"
    "softhsm2.conf --rounds 10 initialize-race"
    "strict.conf --locking callbacks --threads 2 --children 3 callbacks-fork"
  )
  local failed=0
  for scenario in "${scenarios[@]}"; do
    set -- $scenario
    local config=$1; shift
    local log="$work/$sanitizer-$*.log"
    local status=0
    SOFTHSM2_CONF="$work/$config" P11FORK_MODULE="$softhsm" LD_PRELOAD="$preload" \
      TSAN_OPTIONS="halt_on_error=0" ASAN_OPTIONS="detect_leaks=1" \
      timeout 600 .build/debug/p11fork-concurrency --module "$module" --token sanitize --pin "$pin" \
      --key sanitize-key "$@" > "$log" 2>&1 || status=$?
    local reports
    reports=$(grep -c -E "WARNING: ThreadSanitizer|ERROR: (Address|Leak)Sanitizer" "$log" || true)
    echo "$sanitizer: $* ($config): exit $status, $reports sanitizer report(s): $(grep '^result' "$log" || echo 'no result')"
    if [ "$status" != 0 ] || [ "$reports" != 0 ]; then failed=1; sed -n 1,80p "$log"; fi
  done
  return $failed
}

softhsm=${TEST_PKCS11_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
swift build --product p11fork-concurrency
make_token
for sanitizer in "${@:-address thread}"; do
  for s in $sanitizer; do
    echo "== $s sanitizer"
    swift test --scratch-path ".build-$s" --sanitize="$s" --filter P11ForkCoreTests
    swift build --scratch-path ".build-$s" --sanitize="$s" --product p11fork
    run_scenarios "$s"
  done
done
