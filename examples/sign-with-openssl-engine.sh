#!/usr/bin/env bash
# Sign a SHA-256 digest with a token key through OpenSSL's pkcs11 engine and p11fork
# (`openssl pkeyutl`), then verify it with the public key alone.
#   P11FORK_MODULE=/usr/lib/softhsm/libsofthsm2.so PIN=... \
#     examples/sign-with-openssl-engine.sh LIBP11FORK TOKEN_LABEL KEY_LABEL FILE
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export LIBP11FORK=$1
token=$2 key=$3 file=$4
: "${PIN:?set PIN to the user PIN of the token}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

openssl dgst -sha256 -binary -out "$work/digest" "$file"
uri="pkcs11:token=$token;object=$key"
OPENSSL_CONF="$here/openssl-engine.cnf" openssl pkeyutl -engine pkcs11 -keyform engine \
  -inkey "$uri;type=private?pin-value=$PIN" -sign -in "$work/digest" -out "$work/signature" 2>"$work/log" \
  || { cat "$work/log" >&2; exit 1; }
OPENSSL_CONF="$here/openssl-engine.cnf" openssl pkey -pubin -engine pkcs11 -inform engine \
  -in "$uri;type=public" -pubout -out "$work/public.pem" 2>>"$work/log" \
  || { cat "$work/log" >&2; exit 1; }
openssl pkeyutl -verify -pubin -inkey "$work/public.pem" -in "$work/digest" -sigfile "$work/signature"
