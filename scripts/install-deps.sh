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
  libssl-dev                # OpenSSL headers: the test programs that fork with the engine and the provider
  meson ninja-build pkg-config  # to build pkcs11-provider from ../shared/vendor (below)
  gcc                       # builds the NetHSM test module's self-test (its known answers, InterfaceTests)
  opencryptoki              # openCryptoki's soft token and pkcsslotd (fork tests)
  # tpm2-pkcs11 on a software TPM (fork tests)
  libtpm2-pkcs11-1 libtpm2-pkcs11-tools python3-tpm2-pkcs11-tools tpm2-tools swtpm swtpm-tools
  libtss2-tcti-swtpm0 tpm2-abrmd libtss2-tcti-tabrmd0 dbus
  libnss3                   # NSS's softoken, a PKCS#11 3.0 module (interface tests)
  gdb                       # gcore: core dumps of a logged-in process (secrets tests)
  nginx apache2 curl        # HTTPS servers with a token key, and their client (server tests, examples/)
  haproxy                   # haproxy 2.6 with a key through pkcs11-provider (provider tests, examples/haproxy)
  python3
  python3-venv              # the venv .venv with the Python examples' packages (PyKCS11, python-pkcs11, gunicorn)
  gnutls-bin                # p11tool, certtool: GnuTLS through p11-kit's module files (tests)
  openjdk-17-jre-headless   # Java's SunPKCS11 provider (tests, examples/java)
  openssh-client            # ssh-keygen -D, ssh-agent with a PKCS#11 provider (tests, examples/ssh)
)

# One query for every package (a second run, with everything there, costs a fraction of a second).
declare -A installed=()
while read -r name want _ state; do
  [ "$want $state" = "install installed" ] && installed[$name]=1
done < <(dpkg-query -W -f='${Package} ${Status}\n' "${packages[@]}" 2>/dev/null || true)
missing=()
for p in "${packages[@]}"; do
  [ -n "${installed[$p]:-}" ] || missing+=("$p")
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

# pkcs11-provider (OpenSSL 3's PKCS#11 provider; Debian 12 has no package of it), built from the
# upstream release in ../shared/vendor into .deps/pkcs11-provider (ignored by git), never into
# OpenSSL's own module folder. Built again only when it is missing or the tarball changed.
# P11FORK_REQUIRE_PROVIDER=1 (CI) makes a missing tarball an error instead of a notice.
vendor=../shared/vendor
tarball=pkcs11-provider-1.2.0.tar.gz
prefix=.deps/pkcs11-provider
provider=$prefix/lib/ossl-modules/pkcs11.so
if [ ! -f "$vendor/$tarball" ]; then
  echo "p11fork: $vendor/$tarball not found: pkcs11-provider is not built; its tests will be skipped" >&2
  [ "${P11FORK_REQUIRE_PROVIDER:-0}" != 1 ] || exit 1
else
  (cd "$vendor" && sha256sum --quiet -c "$tarball.sha256") \
    || { echo "p11fork: $vendor/$tarball does not match $tarball.sha256: not building it" >&2; exit 1; }
  checksum=$(sha256sum "$vendor/$tarball" | cut -d' ' -f1)
  if [ ! -f "$provider" ] || [ "$(cat "$prefix/source.sha256" 2>/dev/null)" != "$checksum" ]; then
    echo "p11fork: building pkcs11-provider from $vendor/$tarball into $prefix"
    started=$(date +%s)
    rm -rf "$prefix" .deps/build
    mkdir -p .deps/build "$prefix/lib/ossl-modules"
    tar -xzf "$vendor/$tarball" -C .deps/build
    source_dir=.deps/build/${tarball%.tar.gz}
    # Only the module is built (its test programs are not needed). No `meson install`: the
    # project installs into the folder OpenSSL's pkg-config names, the system's.
    meson setup "$source_dir/build" "$source_dir" >.deps/build/setup.log 2>&1 \
      || { tail -n 20 .deps/build/setup.log >&2; exit 1; }
    ninja -C "$source_dir/build" src/pkcs11.so >.deps/build/ninja.log 2>&1 \
      || { tail -n 20 .deps/build/ninja.log >&2; exit 1; }
    install -m 0755 "$source_dir/build/src/pkcs11.so" "$provider"
    echo "$checksum" >"$prefix/source.sha256"
    rm -rf .deps/build
    echo "p11fork: pkcs11-provider built in $(( $(date +%s) - started )) s: $provider"
  fi
fi
