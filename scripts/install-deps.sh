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
  gcc                       # builds the NetHSM test module's self-test (its known answers, InterfaceTests)
  opencryptoki              # openCryptoki's soft token and pkcsslotd (fork tests)
  # tpm2-pkcs11 on a software TPM (fork tests)
  libtpm2-pkcs11-1 libtpm2-pkcs11-tools python3-tpm2-pkcs11-tools tpm2-tools swtpm swtpm-tools
  libtss2-tcti-swtpm0 tpm2-abrmd libtss2-tcti-tabrmd0 dbus
  libnss3                   # NSS's softoken, a PKCS#11 3.0 module (interface tests)
  gdb                       # gcore: core dumps of a logged-in process (secrets tests)
  nginx apache2 curl        # HTTPS servers with a token key, and their client (server tests, examples/)
  python3
  python3-venv              # the venv .venv with the Python examples' packages (PyKCS11, python-pkcs11, gunicorn)
  gnutls-bin                # p11tool, certtool: GnuTLS through p11-kit's module files (tests)
  openjdk-17-jre-headless   # Java's SunPKCS11 provider (tests, examples/java)
  openssh-client            # ssh-keygen -D, ssh-agent with a PKCS#11 provider (tests, examples/ssh)
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
  # The tests start nginx and Apache themselves, on loopback ports of their own: the packages'
  # services are not started by the install (both would want port 80). A policy-rc.d that
  # forbids starting services is put in place for the install only, unless there is one.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# p11fork: scripts/install-deps.sh is installing packages\nexit 101\n' | "${sudo_cmd[@]}" tee "$policy" >/dev/null
    "${sudo_cmd[@]}" chmod 755 "$policy"
    trap '"${sudo_cmd[@]}" rm -f "$policy"' EXIT
  fi
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q "${missing[@]}"
fi

# The Python examples' packages, pinned, in a venv in the repository (tests use .venv/bin/python).
# Redone only when examples/python/requirements.txt changed since the last install.
cd "$(dirname "$0")/.."
requirements=examples/python/requirements.txt
if ! cmp -s "$requirements" .venv/installed-requirements.txt 2>/dev/null; then
  echo "p11fork: installing the Python packages of $requirements into .venv"
  [ -x .venv/bin/python ] || /usr/bin/python3 -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check --only-binary=:all: -r "$requirements"
  cp "$requirements" .venv/installed-requirements.txt
fi
