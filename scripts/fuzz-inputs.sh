#!/usr/bin/env bash
# Fuzzes the parsers of text someone else may have written (docs/RELIABILITY.md, "Untrusted
# text"): a settings file, C_Initialize's pReserved string, and a trace file read by
# `p11fork trace`. libFuzzer, guided by coverage, with AddressSanitizer; any crash, hang
# (a unit slower than 10 s), leak or memory beyond the limits is a finding.
#
#   scripts/fuzz-inputs.sh [SECONDS]              each target for SECONDS (default 20); exit 1 on a finding
#   scripts/fuzz-inputs.sh --repro TARGET FILE    run one input (a finding) again
#
# Environment: P11FUZZ_FLAGS="..." more libFuzzer flags (CI: -seed=1); FUZZ_TARGETS="settings trace"
# to choose targets. Findings are kept in .build-fuzz-inputs/findings.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/swift-env.sh

build() {
  # The fuzz entry is the same program the tests run without libFuzzer (Tests/Tools/InputFuzz),
  # built here with coverage, AddressSanitizer and libFuzzer's driver, in its own build folder;
  # optimised (the trace reader is 2.5 times faster so), with internal names visible to it.
  mkdir -p .build-fuzz-inputs
  swift build -c release -Xswiftc -enable-testing --product p11fork-input-fuzz --scratch-path .build-fuzz-inputs \
    -Xswiftc -sanitize=fuzzer,address -Xswiftc -DINPUT_FUZZ_LIBFUZZER -Xswiftc -use-ld=lld > .build-fuzz-inputs/build.log 2>&1 ||
    { tail -30 .build-fuzz-inputs/build.log >&2; echo "fuzz-inputs: building the fuzzer failed (.build-fuzz-inputs/build.log)" >&2; exit 2; }
}

program=.build-fuzz-inputs/release/p11fork-input-fuzz
seeds=Tests/Tools/InputFuzz/seeds
# Memory: a unit may allocate at most 256 MB at once and the process hold 1 GB (the parsers need
# a few MB for inputs of 64 KB); ASan's quarantine is kept small so that the limit measures them.
export ASAN_OPTIONS=detect_leaks=1:quarantine_size_mb=16:malloc_context_size=30:${ASAN_OPTIONS:-}
limits=(-max_len=65536 -timeout=10 -rss_limit_mb=1024 -malloc_limit_mb=256)

if [ "${1:-}" = "--repro" ]; then
  target=${2:?usage: scripts/fuzz-inputs.sh --repro TARGET FILE}
  file=${3:?usage: scripts/fuzz-inputs.sh --repro TARGET FILE}
  build
  P11FORK_INPUT_FUZZ_TARGET=$target "$program" "${limits[@]}" -runs=1 "$file"
  exit $?
fi
seconds=${1:-20}
[[ "$seconds" =~ ^[0-9]+$ ]] || { echo "usage: scripts/fuzz-inputs.sh [SECONDS] | --repro TARGET FILE" >&2; exit 2; }
build

work=$(mktemp -d /tmp/p11fork-fuzz-inputs.XXXXXX)
trap 'rm -rf "$work"' EXIT
findings=$PWD/.build-fuzz-inputs/findings
mkdir -p "$findings"
status=0
for target in ${FUZZ_TARGETS:-settings reserved trace}; do
  mkdir -p "$work/$target"
  set +e
  # shellcheck disable=SC2086
  P11FORK_INPUT_FUZZ_TARGET=$target "$program" "${limits[@]}" -max_total_time="$seconds" -print_final_stats=1 \
    -artifact_prefix="$findings/$target-" ${P11FUZZ_FLAGS:-} "$work/$target" "$seeds/$target" > "$work/$target.log" 2>&1
  result=$?
  set -e
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$target.log" | tail -1)
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$work/$target.log" | tail -1)
  rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$work/$target.log" | tail -1)
  slowest=$(sed -n 's/^stat::slowest_unit_time_sec: *//p' "$work/$target.log" | tail -1)
  cov=$(grep -E '^#[0-9]+' "$work/$target.log" | tail -1 | sed -n 's/.* cov: \([0-9]*\) ft: \([0-9]*\) corp: \([0-9]*\).*/\1 edges, \2 features, corpus \3/p')
  echo "fuzz-inputs: $target: ${execs:-?} inputs in $seconds s (${speed:-?}/s), ${cov:-coverage ?}, slowest ${slowest:-?} s, peak memory ${rss:-?} MB"
  if [ "$result" -ne 0 ]; then
    status=1
    echo "fuzz-inputs: FINDING in $target (libFuzzer exit status $result):"
    grep -E 'ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|SUMMARY:|Test unit written' "$work/$target.log" | head -5
    grep -m1 -A30 -E 'ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)' "$work/$target.log" | grep -E '^    #' | head -15
    cp "$work/$target.log" ".build-fuzz-inputs/last-$target.log"
    echo "fuzz-inputs: the whole log: .build-fuzz-inputs/last-$target.log; run an input again: scripts/fuzz-inputs.sh --repro $target FILE"
  fi
done
exit $status
