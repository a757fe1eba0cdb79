#!/usr/bin/env bash
# Sign a file with a key on a token, through p11fork, using OpenSC's pkcs11-tool, and verify
# the signature with openssl.
#   P11FORK_MODULE=/usr/lib/softhsm/libsofthsm2.so PIN=... \
#     examples/sign-with-pkcs11-tool.sh LIBP11FORK TOKEN_LABEL KEY_ID FILE
# KEY_ID is the key's CKA_ID in hex (pkcs11-tool selects the signing key by ID, not by label).
set -euo pipefail
module=$1 token=$2 key=$3 file=$4
: "${PIN:?set PIN to the user PIN of the token}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

pkcs11-tool --module "$module" --token-label "$token" --login --pin "$PIN" \
  --sign --mechanism SHA256-RSA-PKCS --id "$key" -i "$file" -o "$work/signature"
pkcs11-tool --module "$module" --token-label "$token" \
  --read-object --type pubkey --id "$key" -o "$work/public.der" >/dev/null
openssl pkey -pubin -inform DER -in "$work/public.der" -out "$work/public.pem"
openssl dgst -sha256 -verify "$work/public.pem" -signature "$work/signature" "$file"
