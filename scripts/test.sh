#!/usr/bin/env bash
# The whole test suite: `scripts/test.sh` (the README's test command).
# Installs what the tests need when it is missing, then runs every test.
# The tests start their own servers on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian package names: redis-server for the retry queue's Redis backend;
# chromium and chromium-driver for the browser tests of the dashboard
# (tests/dashboard.rs) and of the SSE transport (tests/browser_sse.rs).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ "${#missing[@]}" -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]} for the tests" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "the tests need ${missing[*]}: install them with your package manager and run again" >&2
    exit 1
  fi
fi

cargo build --all-targets --quiet
cargo test --quiet 2>&1
