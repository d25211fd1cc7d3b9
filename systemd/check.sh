#!/usr/bin/env bash
# Checks systemd/wxauth.service: `systemd-analyze verify` must be clean and
# `systemd-analyze security` must rate its exposure at MAX_EXPOSURE or lower.
# Usage: systemd/check.sh [path/to/wxauth]   (default: target/debug/wxauth)
set -euo pipefail
cd "$(dirname "$0")/.."
MAX_EXPOSURE=2.0
binary=$(realpath "${1:-target/debug/wxauth}")
[ -x "$binary" ] || { echo "no binary at $binary: build first" >&2; exit 1; }

if ! command -v systemd-analyze >/dev/null; then
    echo "installing systemd (for systemd-analyze)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq systemd >/dev/null
fi

# verify checks that ExecStart's binary exists: point it at the one just built.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sed "s|/usr/local/bin/wxauth|$binary|" systemd/wxauth.service > "$work/wxauth.service"

echo "== systemd-analyze verify"
verify_out=$(systemd-analyze verify "$work/wxauth.service" 2>&1 || true)
if [ -n "$verify_out" ]; then
    echo "$verify_out"
    echo "systemd-analyze verify is not clean" >&2
    exit 1
fi
echo "clean"

echo "== systemd-analyze security --offline=true"
security_out=$(systemd-analyze security --offline=true "$work/wxauth.service" 2>&1)
echo "$security_out" | grep -E '^\s*✗' || true
exposure=$(echo "$security_out" | grep -oE 'Overall exposure level for [^:]*: [0-9.]+' | grep -oE '[0-9.]+$')
echo "exposure: $exposure (maximum $MAX_EXPOSURE)"
awk -v e="$exposure" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e <= m) }' || {
    echo "exposure $exposure is above $MAX_EXPOSURE" >&2
    exit 1
}
