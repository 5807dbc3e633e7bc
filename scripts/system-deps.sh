#!/usr/bin/env bash
# Installs the system packages the tests need, if missing: Debian's chromium (UI browser
# tests), npm (the npm mirror of the fetch stage) and postgresql (the team stack's tests).
# Needs root or sudo on a fresh machine.
set -euo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v npm >/dev/null 2>&1 || need+=(npm)
# Debian installs PostgreSQL's server binaries off PATH.
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1 \
  || need+=(postgresql)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "system-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
