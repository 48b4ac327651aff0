#!/usr/bin/env bash
# The whole test suite: `scripts/test.sh` (the README's test command).
# Installs what the tests need when it is missing, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
if [ "${#need_apt[@]}" -gt 0 ] && [ -n "${COURIER_TEST_NEEDS_REDIS:-}" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "installing ${need_apt[*]} for the tests" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "tests need: ${need_apt[*]}; install them and run again" >&2
    exit 1
  fi
fi

cargo build --all-targets --quiet
cargo test --quiet 2>&1
