#!/usr/bin/env bash
# Make a fresh machine ready: system packages the tests use, and a virtualenv with poolwatch in it.
# Safe to run again: every step checks before it installs.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)        # promtool + prometheus, for the operator kit tests
command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)                    # load generator for benchmarks/e2e.py
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "setup: please install ${need_apt[*]} (Debian packages); continuing without them" >&2
  fi
fi
# Debian's prometheus package may start a server of its own; the tests run their own instances.
if command -v service >/dev/null 2>&1; then service prometheus stop >/dev/null 2>&1 || true; fi
pkill -x prometheus-node-exporter >/dev/null 2>&1 || true

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
