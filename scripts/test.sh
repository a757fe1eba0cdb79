#!/usr/bin/env bash
# Runs p11fork's tests: the generated code is current, then everything in `swift test`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/swift-env.sh
python3 codegen/generate.py --check
swift build --build-tests
# Serially: the fork tests start daemons and many processes; on two cores, running them side
# by side only measures the machine's load.
swift test --skip-build --no-parallel
