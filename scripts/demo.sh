#!/usr/bin/env bash
# The main job on a throw-away SoftHSM token: build libp11fork.so, make a token and a key
# through p11fork, sign through p11fork with the trace on screen, verify with openssl.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
source scripts/swift-env.sh

echo "== building libp11fork.so (release)"
swift build -c release --product p11fork 2>&1 | tail -1
swift build -c release --product p11fork-broker 2>&1 | tail -1   # beside the module, where it starts it
module="$PWD/.build/release/libp11fork.so"
softhsm=/usr/lib/softhsm/libsofthsm2.so

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/tokens"
# reset_on_fork: SoftHSM then refuses inherited state in a child, as strict vendor modules do.
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\nlibrary.reset_on_fork = true\n' "$work" > "$work/softhsm2.conf"
export SOFTHSM2_CONF="$work/softhsm2.conf"   # a throw-away token, never the system's
pin=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')
softhsm2-util --init-token --free --label p11fork-demo --pin "$pin" --so-pin "$pin$pin" >/dev/null
echo "== throw-away SoftHSM token 'p11fork-demo' in $work"

export P11FORK_MODULE="$softhsm"
tool() { pkcs11-tool --module "$module" --token-label p11fork-demo "$@"; }

echo "== an RSA-2048 key pair, made through p11fork"
tool --login --pin "$pin" --keypairgen --key-type rsa:2048 --label demo-key --id 01 >/dev/null
tool --read-object --type pubkey --id 01 -o "$work/pub.der" >/dev/null
echo "hello from p11fork" > "$work/data.txt"

echo "== signing through p11fork (trace on: P11FORK_TRACE=stderr)"
P11FORK_TRACE=stderr tool --login --pin "$pin" --sign --mechanism SHA256-RSA-PKCS --id 01 \
  -i "$work/data.txt" -o "$work/sig.bin" 2>&1 | grep -v '^Using'

echo "== verifying the signature with openssl"
openssl rsa -pubin -inform DER -in "$work/pub.der" -out "$work/pub.pem" 2>/dev/null
openssl dgst -sha256 -verify "$work/pub.pem" -signature "$work/sig.bin" "$work/data.txt"
echo
echo "== the main job: a parent logs in once, then forked workers sign with its session and key"
echo "-- directly on SoftHSM:"
PIN=$pin python3 examples/fork_workers.py "$softhsm" p11fork-demo demo-key 2 4 || true
echo "-- through p11fork (recovery steps traced):"
PIN=$pin P11FORK_TRACE=stderr P11FORK_TRACE_LEVEL=fork \
  python3 examples/fork_workers.py "$module" p11fork-demo demo-key 2 4 2>&1 | sed 's/^[^ ]* p11fork/  p11fork/'
echo "== done: libp11fork.so is at $module"
