#!/usr/bin/env bash
# Builds p11fork (release) and installs it under PREFIX (default /usr/local):
#   PREFIX/lib/libp11fork.so    the module: give this path to your application
#   PREFIX/lib/p11fork-broker   the broker, beside the module: the module starts it from the
#                               folder it was loaded from (Sources/P11ForkCore/Loader/Broker.swift)
#   PREFIX/bin/p11fork          the command (`p11fork doctor`, `p11fork trace`; built as p11fork-cli,
#                               since the name p11fork is the module's product), which finds the
#                               module in PREFIX/lib
# Usage: scripts/install.sh [PREFIX]
# DESTDIR, when set, is put before PREFIX (for packaging: the files go to DESTDIR/PREFIX/...).
set -euo pipefail
prefix=${1:-/usr/local}
case "$prefix" in /*) ;; *) prefix="$PWD/$prefix" ;; esac
destination="${DESTDIR:-}$prefix"
cd "$(dirname "$0")/.."
source scripts/swift-env.sh

# A build's last line, or all of its output when it fails.
build() {
  local output
  output=$(swift build -c release "$@" 2>&1) || { echo "$output" >&2; exit 1; }
  echo "$output" | tail -n 1
}
echo "p11fork: building the module, the broker and the command (release)"
build --product p11fork
build --product p11fork-broker
# The command carries the Swift runtime and Foundation inside it, so that it runs where no Swift
# is installed (the module does so by its own linker settings; --static-swift-stdlib is not
# given to the module's build, where it would only make SwiftPM build it again).
build --product p11fork-cli --static-swift-stdlib
built=$(swift build -c release --show-bin-path)

install -d "$destination/lib" "$destination/bin"
install -m 0755 "$built/libp11fork.so" "$destination/lib/libp11fork.so"
install -m 0755 "$built/p11fork-broker" "$destination/lib/p11fork-broker"
install -m 0755 "$built/p11fork-cli" "$destination/bin/p11fork"
echo "p11fork: installed $destination/lib/libp11fork.so, $destination/lib/p11fork-broker, $destination/bin/p11fork"
