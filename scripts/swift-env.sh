# Sourced by the scripts: finds the Swift toolchain when it is not on PATH.
if ! command -v swift >/dev/null 2>&1 && [ -x /opt/swift/usr/bin/swift ]; then
  export PATH="/opt/swift/usr/bin:$PATH"
fi
command -v swift >/dev/null 2>&1 || { echo "p11fork: no Swift toolchain found: install Swift 6.1 or later (swift.org) and put it on PATH" >&2; exit 1; }
