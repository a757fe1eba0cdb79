#!/usr/bin/env bash
# Runs p11fork's tests: the generated code is current, then every XCTest class and every Swift
# Testing suite (`scripts/test.sh --filter ForkStormTests` runs only the Swift Testing ones named).
#
# A watchdog stands beside the run: a test that prints nothing for P11FORK_TEST_STALL seconds
# (default 600; the longest test prints within 3 minutes) is reported with the processes under
# the test runner and how each one waits, and those processes are killed, so that a hang becomes
# that test's failure with its evidence instead of a run that never ends. At the end, the failed
# tests and the watchdog's reports are printed again, last, where a reader of a long log looks.
#
# What the tests use is installed first when missing (scripts/install-deps.sh, as scripts/demo.sh
# does), so that this script alone works on a fresh machine; with everything there that check
# takes well under a second. P11FORK_SKIP_DEPS=1 skips it (a machine without network access
# whose missing tools' tests are to be skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${P11FORK_SKIP_DEPS:-0}" = 1 ] || scripts/install-deps.sh
source scripts/swift-env.sh
python3 codegen/generate.py --check
swift build --build-tests

stall=${P11FORK_TEST_STALL:-600}
log=$(mktemp /tmp/p11fork-test.XXXXXX.log)
reports=$(mktemp /tmp/p11fork-watchdog.XXXXXX.log)
trap 'rm -f "$log" "$reports"' EXIT

# Every process below `$1`, deepest first.
descendants() {
  local child
  for child in $(pgrep -P "$1" || true); do
    descendants "$child"
    echo "$child"
  done
}

watch() {
  local runner=$1 quiet victims
  while kill -0 "$runner" 2>/dev/null; do
    sleep 10
    quiet=$(( $(date +%s) - $(stat -c %Y "$log") ))
    [ "$quiet" -ge "$stall" ] || continue
    case "$(awk '{print $3}' /proc/"$runner"/stat 2>/dev/null)" in ''|Z|X) break ;; esac
    victims=$(descendants "$runner")
    {
      echo "p11fork watchdog: no test output for ${quiet} s; last lines:"
      tail -n 5 "$log" | cut -c1-300 | sed 's/^/  | /'
      echo "p11fork watchdog: the test runner and what it started (pid, state, kernel wait, command):"
      for pid in "$runner" $victims; do
        printf '  %s %s %s %s\n' "$pid" "$(awk '{print $3}' /proc/"$pid"/stat 2>/dev/null)" \
          "$(cat /proc/"$pid"/wchan 2>/dev/null)" \
          "$(tr '\0' ' ' < /proc/"$pid"/cmdline 2>/dev/null | sed 's/--pin [^ ]*/--pin (hidden)/g' | cut -c1-200)"
      done
      # The programs the tests started go, so that the waiting test fails and the others run;
      # with none, the test runner itself hangs, and it goes.
      if [ -n "$victims" ]; then
        echo "p11fork watchdog: killing the programs the test started:" $victims
        kill -9 $victims 2>/dev/null || true
      else
        echo "p11fork watchdog: the test runner itself hangs: ending it"
        kill -9 "$runner" 2>/dev/null || true
      fi
    } | tee -a "$reports" >> "$log"
    touch "$log"
  done
}

# The test binary is run directly, not through `swift test`, which holds its output back: the
# watchdog, and a reader of CI's log, see each line as it is printed. XCTest first, then Swift
# Testing serially: the fork tests start daemons and many processes; on two cores, running them
# side by side only measures the machine's load. Arguments (`--filter X`) go to Swift Testing
# alone, and then the XCTest classes are left out.
tests_binary="$(swift build --show-bin-path)/p11forkPackageTests.xctest"
run_watched() {
  local runner watcher code=0
  "$@" >> "$log" 2>&1 &
  runner=$!
  watch "$runner" &
  watcher=$!
  wait "$runner" || code=$?
  wait "$watcher" 2>/dev/null || true
  return "$code"
}
: > "$log"
tail -n +1 -f "$log" &
follower=$!
status=0
if [ $# -eq 0 ]; then
  run_watched "$tests_binary" --testing-library xctest || status=$?
fi
run_watched "$tests_binary" --testing-library swift-testing --no-parallel "$@" || status=$?
sleep 1
kill "$follower" 2>/dev/null || true

if [ "$status" -ne 0 ] || [ -s "$reports" ]; then
  echo
  echo "p11fork: the tests failed (status $status). Failed tests and their first issue lines:"
  grep -E '^(✘|Test Case .* failed|.*error: )' "$log" | cut -c1-400 | head -n 60 || true
  if [ -s "$reports" ]; then
    echo "p11fork: the watchdog's reports:"
    cat "$reports"
  fi
fi
exit "$status"
