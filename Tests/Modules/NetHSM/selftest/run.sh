#!/bin/sh
# Builds the NetHSM test module and its self-test with gcc, and runs the self-test against a
# fresh server directory.   Usage: run.sh [--valgrind]
# Output: the self-test's lines, then the NETHSM_LOG lines the fork scenarios produced.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
module_dir=$(dirname "$here")
work=$(mktemp -d "${TMPDIR:-/tmp}/nethsm-selftest.XXXXXX")
trap 'rm -rf "$work"' EXIT

gcc -shared -fPIC -O2 -Wall -Wextra -I "$module_dir/include" -I "$module_dir/../../../Sources/CPKCS11/include" -o "$work/libnethsm.so" "$module_dir"/*.c -lcrypto
gcc -O1 -g -Wall -Wextra -I "$module_dir/include" -I "$module_dir/../../../Sources/CPKCS11/include" -DNETHSM_SELFTEST -o "$work/nethsm_selftest" "$here/nethsm_selftest.c" -ldl -pthread

# Exactly the three PKCS#11 entry points are exported.
exports=$(nm -D --defined-only "$work/libnethsm.so" | awk '{print $3}' | sort | tr "\n" " ")
[ "$exports" = "C_GetFunctionList C_GetInterface C_GetInterfaceList " ] || { echo "run.sh: unexpected exports: $exports" >&2; exit 1; }

# The expected HMAC, computed independently by OpenSSL when it is installed.
expected=""
if command -v openssl >/dev/null 2>&1; then
  expected=$(printf hello | openssl dgst -sha256 -hmac 0123456789abcdef0123456789abcdef -r | cut -d' ' -f1)
  echo "openssl: HMAC-SHA256(key, \"hello\") = $expected"
fi

export NETHSM_DIR="$work/server" NETHSM_LOG="$work/nethsm.log"
status=0
if [ "${1:-}" = "--valgrind" ]; then
  valgrind ${VALGRIND_FLAGS:--q} --error-exitcode=99 --leak-check=no --track-origins=yes \
    "$work/nethsm_selftest" "$work/libnethsm.so" $expected || status=$?
else
  "$work/nethsm_selftest" "$work/libnethsm.so" $expected || status=$?
fi
echo "--- NETHSM_LOG:"
cat "$NETHSM_LOG" 2>/dev/null || true
exit $status
