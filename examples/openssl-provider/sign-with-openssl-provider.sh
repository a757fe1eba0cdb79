#!/usr/bin/env bash
# Signs a file's SHA-256 digest with a token key through pkcs11-provider and p11fork
# (`openssl pkeyutl`), makes a self-signed certificate with the same key (`openssl req -x509`),
# and checks both with the token's public key alone. The PIN comes from a file (pin-source).
#   P11FORK_MODULE=/usr/lib/softhsm/libsofthsm2.so \
#     examples/openssl-provider/sign-with-openssl-provider.sh PKCS11_PROVIDER LIBP11FORK TOKEN KEY PIN_FILE FILE
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export PKCS11_PROVIDER=$1 LIBP11FORK=$2
token=$3 key=$4 pin_file=$5 file=$6
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
uri="pkcs11:token=$token;object=$key"

# Through the provider: the configuration file loads it.
provider() { OPENSSL_CONF="$here/openssl.cnf" openssl "$@" 2>>"$work/log" || { cat "$work/log" >&2; exit 1; }; }
openssl dgst -sha256 -binary -out "$work/digest" "$file"
provider pkeyutl -sign -inkey "$uri;type=private?pin-source=file:$pin_file" -in "$work/digest" -out "$work/signature"
provider pkey -pubin -in "$uri;type=public" -pubout -out "$work/public.pem"
provider req -new -x509 -key "$uri;type=private?pin-source=file:$pin_file" -subj "/CN=$key" -days 1 -out "$work/cert.pem"

# Checked without the provider.
export OPENSSL_CONF=/dev/null
openssl pkeyutl -verify -pubin -inkey "$work/public.pem" -in "$work/digest" -sigfile "$work/signature"
openssl verify -CAfile "$work/cert.pem" "$work/cert.pem"
openssl x509 -in "$work/cert.pem" -noout -pubkey | cmp -s - "$work/public.pem" \
  && echo "certificate key: the token's" || { echo "certificate key: not the token's" >&2; exit 1; }
