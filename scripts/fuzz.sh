#!/usr/bin/env bash
# Differential fuzzing of libp11fork.so against SoftHSM2 (docs/RELIABILITY.md, "Hostile input
# (fuzzing)"): random call sequences with hostile arguments, each call made through p11fork and on
# a private copy of SoftHSM, compared; any difference, crash, hang or leak is a finding.
#
#   scripts/fuzz.sh [SECONDS]        fuzz for SECONDS (default 60), print the figures, exit 1 on a finding
#   scripts/fuzz.sh --repro FILE     run one input (a finding) again and print its calls
#   scripts/fuzz.sh --v32 [SECONDS]  the PKCS#11 3.2 functions instead: p11fork over the NetHSM test
#                                    module against a second NetHSM (Tests/Tools/Fuzz32)
#
# Environment:
#   P11FUZZ_CORPUS=DIR   keep the corpus in DIR (default: a temporary one, started from the seeds)
#   P11FUZZ_LIB=PATH     fuzz this libp11fork.so as it is (no coverage of p11fork's code), instead
#                        of a copy built with coverage and AddressSanitizer in .build-fuzz
#   P11FUZZ_FINDINGS=DIR where findings are kept (default .build-fuzz/findings)
#   P11FUZZ_FLAGS="..."  more libFuzzer flags (for example -seed=1)
#   P11FUZZ_SKIP_KNOWN=1 do not report the known, unfixed leaks of Tests/Tools/Fuzz/known.supp
#   P11FUZZ_KEEP_GOING=1 report each distinct difference once and go on (a crash or a leak still
#                        ends the run); the exit status is still 1 if there was any
#   P11FORK_TRACE_FORMAT=json  fuzz the JSON trace instead of the text one
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/swift-env.sh

repro=""
v32=0
if [ "${1:-}" = "--v32" ]; then
  v32=1
  shift
fi
if [ "${1:-}" = "--repro" ]; then
  repro=${2:?usage: scripts/fuzz.sh --repro FILE}
  seconds=0
else
  seconds=${1:-60}
  [[ "$seconds" =~ ^[0-9]+$ ]] || { echo "usage: scripts/fuzz.sh [SECONDS] | --repro FILE" >&2; exit 2; }
fi

softhsm=/usr/lib/softhsm/libsofthsm2.so
[ -f "$softhsm" ] || { echo "p11fuzz: SoftHSM2 is missing: run scripts/install-deps.sh (package softhsm2)" >&2; exit 2; }
[ -f /usr/include/p11-kit-1/p11-kit/pkcs11.h ] || { echo "p11fuzz: the PKCS#11 header is missing: run scripts/install-deps.sh (package libp11-kit-dev)" >&2; exit 2; }

# clang with libFuzzer and AddressSanitizer: the Swift toolchain's own clang has both runtimes;
# Debian's clang needs libclang-rt-NN-dev for them.
swift_bin=$(dirname "$(command -v swift)")
if [ -x "$swift_bin/clang" ]; then cc="$swift_bin/clang"; else cc=$(command -v clang || true); fi
[ -n "$cc" ] || { echo "p11fuzz: no clang found (the Swift toolchain's, or Debian's clang with libclang-rt-14-dev)" >&2; exit 2; }
mkdir -p .build-fuzz
probe=.build-fuzz/probe
printf 'int LLVMFuzzerTestOneInput(const char *d, unsigned long n) { (void)d; (void)n; return 0; }\n' > $probe.c
if ! "$cc" -fsanitize=fuzzer,address $probe.c -o $probe 2> $probe.log; then
  echo "p11fuzz: $cc cannot build a libFuzzer program with AddressSanitizer:" >&2
  cat $probe.log >&2
  echo "p11fuzz: use the Swift toolchain's clang, or install Debian's runtimes (apt-get install libclang-rt-14-dev for clang 14)" >&2
  exit 2
fi

# The module under test.
if [ -n "${P11FUZZ_LIB:-}" ]; then
  lib=$(realpath "$P11FUZZ_LIB")
  echo "p11fuzz: fuzzing $lib as it is (coverage of the harness only)"
else
  # A copy of libp11fork.so with coverage for libFuzzer and AddressSanitizer checks in p11fork's
  # own code, in its own build folder. Its sanitizer symbols come from the fuzzer program, so
  # the link may leave them undefined (lld's -z undefs undoes the package's -z defs).
  echo "p11fuzz: building libp11fork.so with coverage and AddressSanitizer (.build-fuzz)"
  swift build --product p11fork --scratch-path .build-fuzz \
    -Xswiftc -sanitize=address,fuzzer -Xswiftc -use-ld=lld -Xlinker -z -Xlinker undefs > .build-fuzz/build.log 2>&1 ||
    { tail -30 .build-fuzz/build.log >&2; echo "p11fuzz: building the instrumented libp11fork.so failed (.build-fuzz/build.log)" >&2; exit 2; }
  lib=$PWD/.build-fuzz/debug/libp11fork.so
fi

# The 3.2 target: its own harness, the NetHSM test module on both sides (swift build makes it).
if [ "$v32" = 1 ]; then
  nethsm=$PWD/.build/debug/libp11fork-test-nethsm.so
  [ -f "$nethsm" ] || { echo "p11fuzz32: $nethsm is missing: run swift build first" >&2; exit 2; }
  "$cc" -g -O1 -Wall -Wextra -fsanitize=fuzzer,address -fuse-ld=lld -I Sources/CPKCS11/include \
    -I Tests/Modules/NetHSM/include -I Sources/p11fork-cli/ToolSupport/include Tests/Tools/Fuzz32/fuzz32.c \
    Sources/p11fork-cli/ToolSupport/tool_support.c -o .build-fuzz/p11fuzz32 -ldl
  work=$(mktemp -d /tmp/p11fuzz32.XXXXXX)
  trap 'rm -rf "$work"' EXIT
  export P11FUZZ_P11FORK=$lib P11FUZZ_NETHSM=$nethsm P11FUZZ_DIR=$work
  export ASAN_OPTIONS=allocator_may_return_null=1:detect_leaks=0:${ASAN_OPTIONS:-}
  mkdir -p "$work/corpus" .build-fuzz/findings
  if [ -n "$repro" ]; then .build-fuzz/p11fuzz32 -runs=1 "$repro"; exit $?; fi
  set +e
  .build-fuzz/p11fuzz32 -max_total_time="$seconds" -max_len=256 -timeout=30 -print_final_stats=1 \
    -artifact_prefix="$PWD/.build-fuzz/findings/v32-" ${P11FUZZ_FLAGS:-} "$work/corpus" > "$work/fuzz.log" 2>&1
  status=$?
  set -e
  cp "$work/fuzz.log" .build-fuzz/last-fuzz32.log
  echo "p11fuzz32: executions $(sed -n 's/^stat::number_of_executed_units: *//p' "$work/fuzz.log" | tail -1)," \
       "$(sed -n 's/^stat::average_exec_per_sec: *//p' "$work/fuzz.log" | tail -1) per second;" \
       "$(grep -E '^#[0-9]+' "$work/fuzz.log" | tail -1 | sed -n 's/.* cov: \([0-9]*\).*/coverage \1 edges/p')"
  if [ "$status" -ne 0 ]; then
    grep -E 'FINDING|ERROR: (AddressSanitizer|libFuzzer)' "$work/fuzz.log" | head -5
    echo "p11fuzz32: FINDING (libFuzzer exit status $status); the whole log: .build-fuzz/last-fuzz32.log"
    exit 1
  fi
  echo "p11fuzz32: no finding"
  exit 0
fi

# The harness.
src=Tests/Tools/Fuzz
"$cc" -g -O1 -Wall -Wextra -Wno-unused-parameter -fsanitize=fuzzer,address -fuse-ld=lld \
  -I Sources/CPKCS11/include -I Sources/p11fork-cli/ToolSupport/include "$src/harness.c" "$src/ops.c" \
  Sources/p11fork-cli/ToolSupport/tool_support.c -o .build-fuzz/p11fuzz -ldl -lpthread \
  -Wl,--export-dynamic-symbol='__sanitizer_cov_*' -Wl,--export-dynamic-symbol='__sancov_*'

work=$(mktemp -d /tmp/p11fuzz.XXXXXX)
trap 'rm -rf "$work"' EXIT
export P11FUZZ_P11FORK=$lib P11FUZZ_SOFTHSM=$softhsm P11FUZZ_DIR=$work/tokens
export P11FUZZ_STATS=$work/figures.txt
# Leaks that are SoftHSM's or OpenSSL's are not reported (lsan.supp); p11fork's known, unfixed
# ones only with P11FUZZ_SKIP_KNOWN=1 (known.supp).
cat "$src/lsan.supp" > "$work/lsan.supp"
[ "${P11FUZZ_SKIP_KNOWN:-0}" = 1 ] && cat "$src/known.supp" >> "$work/lsan.supp"
export ASAN_OPTIONS=allocator_may_return_null=1:detect_leaks=1:quarantine_size_mb=64:malloc_context_size=30:${ASAN_OPTIONS:-}
export LSAN_OPTIONS=suppressions=$work/lsan.supp:print_suppressions=0:${LSAN_OPTIONS:-}

if [ -n "$repro" ]; then
  P11FUZZ_VERBOSE=1 .build-fuzz/p11fuzz -runs=1 "$repro"
  exit $?
fi

corpus=${P11FUZZ_CORPUS:-$work/corpus}
findings=${P11FUZZ_FINDINGS:-$PWD/.build-fuzz/findings}
mkdir -p "$corpus" "$findings"
before=$(ls "$findings" | wc -l)
echo "p11fuzz: fuzzing for $seconds s (corpus $corpus, findings kept in $findings)"
set +e
# shellcheck disable=SC2086
.build-fuzz/p11fuzz -max_total_time="$seconds" -max_len=512 -timeout=30 -rss_limit_mb=4096 \
  -print_final_stats=1 -artifact_prefix="$findings/" ${P11FUZZ_FLAGS:-} "$corpus" "$src/seeds" > "$work/fuzz.log" 2>&1
status=$?
set -e

# The figures: libFuzzer's and the harness's.
execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/fuzz.log" | tail -1)
speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$work/fuzz.log" | tail -1)
rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$work/fuzz.log" | tail -1)
last=$(grep -E '^#[0-9]+' "$work/fuzz.log" | tail -1 || true)
cov=$(sed -n 's/.* cov: \([0-9]*\) ft: \([0-9]*\) corp: \([0-9]*\).*/\1 \2 \3/p' <<< "$last")
read -r edges features units <<< "${cov:-? ? ?}"
echo "p11fuzz: executions ${execs:-?}, ${speed:-?} per second, peak memory ${rss:-?} MB"
echo "p11fuzz: coverage ${edges} edges (p11fork and the harness), ${features} features, corpus ${units} inputs"
harness_findings=0
if [ -f "$work/figures.txt" ]; then
  head -1 "$work/figures.txt"
  cp "$work/figures.txt" .build-fuzz/last-figures.txt
  harness_findings=$(sed -n 's/.*findings \([0-9]*\).*/\1/p' "$work/figures.txt" | head -1)
fi
new=$(( $(ls "$findings" | wc -l) - before ))
if [ "$status" -ne 0 ] || [ "$new" -gt 0 ] || [ "${harness_findings:-0}" -gt 0 ]; then
  echo "p11fuzz: FINDING (libFuzzer exit status $status):"
  grep -E 'p11fuzz: FINDING|ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|SUMMARY:' "$work/fuzz.log" | sort -u | head -10
  grep -m1 -A40 -E 'p11fuzz: FINDING|ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)' "$work/fuzz.log" | grep -E '^  |^    #' | head -30
  if [ "$new" -gt 0 ]; then
    ls -t "$findings" | head -"$new" | sed "s|^|p11fuzz: input kept: $findings/|"
    echo "p11fuzz: run it again with: scripts/fuzz.sh --repro $findings/$(ls -t "$findings" | head -1)"
  fi
  cp "$work/fuzz.log" .build-fuzz/last-fuzz.log
  echo "p11fuzz: the whole log: .build-fuzz/last-fuzz.log"
  exit 1
fi
cp "$work/fuzz.log" .build-fuzz/last-fuzz.log
echo "p11fuzz: no finding (figures per function: .build-fuzz/last-figures.txt)"
