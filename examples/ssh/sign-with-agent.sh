#!/usr/bin/env bash
# Loads the keys of a PKCS#11 module into a private ssh-agent (ssh-add -s), signs a file with
# the agent's key (ssh-keygen -Y sign) and checks the signature (ssh-keygen -Y check-novalidate
# and -Y verify).
#   PIN=... examples/ssh/sign-with-agent.sh MODULE FILE
# MODULE is libp11fork.so (with P11FORK_MODULE, or another source of p11fork's settings, set)
# or the real module. ssh-agent only loads providers from paths its -P list allows: this
# script allows exactly MODULE.
set -euo pipefail
module=$(readlink -f "$1") file=$2
: "${PIN:?set PIN to the user PIN of the token}"
work=$(mktemp -d)
agent=
cleanup() { [ -z "$agent" ] || kill "$agent" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

export SSH_AUTH_SOCK=$work/agent.sock
ssh-agent -D -a "$SSH_AUTH_SOCK" -P "$module" >/dev/null &
agent=$!
for _ in $(seq 100); do [ -S "$SSH_AUTH_SOCK" ] && break; sleep 0.1; done

# ssh-add asks for the PIN through SSH_ASKPASS (no terminal here); the PIN stays in the environment.
printf '#!/bin/sh\nprintf "%%s\\n" "$PIN"\n' > "$work/askpass"
chmod 700 "$work/askpass"
SSH_ASKPASS=$work/askpass SSH_ASKPASS_REQUIRE=force ssh-add -s "$module" </dev/null
ssh-add -L > "$work/keys.pub"
head -n 1 "$work/keys.pub" > "$work/key.pub"
echo "agent key: $(cut -d' ' -f1,2 "$work/key.pub" | cut -c1-60)..."

ssh-keygen -Y sign -f "$work/key.pub" -n file "$file" >/dev/null 2>&1 \
  || { echo "ssh-keygen -Y sign failed" >&2; ssh-keygen -Y sign -f "$work/key.pub" -n file "$file"; exit 1; }
ssh-keygen -Y check-novalidate -n file -f "$work/key.pub" -s "$file.sig" < "$file"
echo "p11fork-signer $(cut -d' ' -f1,2 "$work/key.pub")" > "$work/allowed_signers"
ssh-keygen -Y verify -f "$work/allowed_signers" -I p11fork-signer -n file -s "$file.sig" < "$file"
rm -f "$file.sig"
