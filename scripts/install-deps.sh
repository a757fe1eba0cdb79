#!/usr/bin/env bash
# Installs the Debian packages p11fork's demo and tests use (only what is missing).
set -euo pipefail

packages=(
  softhsm2                  # the real module the demo and tests put behind p11fork
  libp11-kit-dev            # <p11-kit/pkcs11.h>, the PKCS#11 2.40 header p11fork builds with
  p11-kit-modules           # p11-kit's proxy module and RPC client (tests; the out-of-process strategy)
  p11-kit                   # p11-kit server, which runs a module in a helper (out-of-process strategy)
  binutils procps util-linux  # nm, pkill, unshare (tests)
  opensc                    # pkcs11-tool
  openssl
  libengine-pkcs11-openssl  # OpenSSL's pkcs11 engine (tests)
  libssl-dev                # OpenSSL headers, for the test program that forks with the engine
  opencryptoki              # openCryptoki's soft token and pkcsslotd (fork tests)
  # tpm2-pkcs11 on a software TPM (fork tests)
  libtpm2-pkcs11-1 libtpm2-pkcs11-tools python3-tpm2-pkcs11-tools tpm2-tools swtpm swtpm-tools
  libtss2-tcti-swtpm0 tpm2-abrmd libtss2-tcti-tabrmd0 dbus
  libnss3                   # NSS's softoken, a PKCS#11 3.0 module (interface tests)
  gdb                       # gcore: core dumps of a logged-in process (secrets tests)
  nginx apache2 curl        # HTTPS servers with a token key, and their client (server tests, examples/)
  python3
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "p11fork: installing ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q "${missing[@]}"
fi
