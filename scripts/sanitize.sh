#!/usr/bin/env bash
# Runs p11fork's unit tests (P11ForkCoreTests: handle tables, configuration, trace lines, kept
# secrets, replay copies) under AddressSanitizer and ThreadSanitizer, each in a build directory of
# its own. The tests through real modules load libp11fork.so into C programs and other
# processes, which the sanitizers' runtimes do not reach: they are not part of this run.
#   scripts/sanitize.sh [address|thread]...     (default: both; about 3 minutes each)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/swift-env.sh
# XCTest's own objects, alive at exit, are all LeakSanitizer reports here.
suppressions=$(mktemp)
trap 'rm -f "$suppressions"' EXIT
echo "leak:libXCTest.so" > "$suppressions"
export LSAN_OPTIONS="suppressions=$suppressions" P11FORK_SANITIZE=1
for sanitizer in "${@:-address thread}"; do
  for s in $sanitizer; do
    echo "== $s sanitizer"
    swift test --scratch-path ".build-$s" --sanitize="$s" --filter P11ForkCoreTests
  done
done
