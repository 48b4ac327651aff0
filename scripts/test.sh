#!/usr/bin/env bash
# The whole test suite: `scripts/test.sh` (the README's test command).
# Installs what the tests need when it is missing (redis-server, for the
# retry queue's Redis backend; chromium and chromium-driver, for the
# dashboard's browser test; the tests start their own on free loopback
# ports), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "installing redis-server for the tests" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
  else
    echo "the tests need redis-server: install it (e.g. your package manager's redis-server) and run again" >&2
    exit 1
  fi
fi

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium and chromium-driver for the dashboard test" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "the dashboard test needs chromium and chromedriver: install them (e.g. your package manager's chromium and chromium-driver) and run again" >&2
    exit 1
  fi
fi

cargo build --all-targets --quiet
cargo test --quiet 2>&1
