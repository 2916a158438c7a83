#!/usr/bin/env bash
# Make this checkout ready: a virtualenv (.venv) with poolwatch installed in editable mode.
#
#   bash scripts/setup.sh demo   # the demo's extra only; installs no system package
#   bash scripts/setup.sh test   # the dev extra (the whole tool chain), plus the Debian packages the
#                                # tests use (prometheus, pgbouncer, chromium), and says so before
#                                # installing each
#
# Safe to run again, and cheap: pip runs only when pyproject.toml changed since the last install of
# that extra (a stamp in .venv keyed on the file's hash). It never stops a service or a process.
set -euo pipefail
cd "$(dirname "$0")/.."

purpose="${1:-test}"
case "$purpose" in
  demo) extra=demo ;;
  test) extra=dev ;;
  *) echo "usage: bash scripts/setup.sh [demo|test]" >&2; exit 2 ;;
esac

# -- system packages: for the tests only ---------------------------------------------------------
if [ "$purpose" = test ]; then
  # Debian's `prometheus` package brings `promtool` (rule and config checks, rule unit tests) and the
  # `prometheus` server that tests/test_operator_e2e.py starts on a free port of its own. Debian may
  # start its own prometheus service on :9090 when installing it; the tests leave that one alone.
  if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "setup: installing the Debian package the tests need: prometheus (for promtool and prometheus)"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    else
      echo "setup: the tests need Debian's prometheus package (promtool, prometheus) and it is missing;" \
        "install it with: apt-get install --no-install-recommends prometheus" >&2
    fi
  fi
  # Debian's `pgbouncer`: tests/test_capacity.py starts one on a free port of its own, as the
  # unprivileged `postgres` user, in front of the test server, to check that poolwatch claims no
  # server limit through a pooler. Debian may enable a pgbouncer service when installing it; the
  # tests never start, stop or use that one.
  if ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "setup: installing the Debian package the tests need: pgbouncer (pooler detection tests)"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends pgbouncer >/dev/null
    else
      echo "setup: the pooler tests need Debian's pgbouncer package and it is missing;" \
        "install it with: apt-get install --no-install-recommends pgbouncer" >&2
    fi
  fi
  # Debian's `chromium` and `chromium-driver` (the matching chromedriver): tests/test_live_page.py
  # drives the live page headless through Selenium. The driver is Debian's, so it always matches the
  # browser; nothing downloads a browser build of its own.
  if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "setup: installing the Debian packages the tests need: chromium, chromium-driver (live page tests)"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
    else
      echo "setup: the live page tests need Debian's chromium and chromium-driver and they are missing;" \
        "install them with: apt-get install --no-install-recommends chromium chromium-driver" >&2
    fi
  fi
fi

# -- the virtualenv ------------------------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
  if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "setup: poolwatch needs Python 3.11 or newer as python3" >&2
    exit 1
  fi
  echo "setup: creating .venv"
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi

# The dev extra includes the demo's, so a dev install also serves the demo.
hash="$(sha256sum pyproject.toml | cut -d' ' -f1)"
installed() { [ "$(cat ".venv/.poolwatch-setup-$1" 2>/dev/null)" = "$hash" ]; }
if installed "$extra" || { [ "$extra" = demo ] && installed dev; }; then
  exit 0
fi
echo "setup: installing poolwatch with its '$extra' extra into .venv (pip, from the package index)"
.venv/bin/python -m pip install -q -e ".[$extra]"
echo "$hash" >".venv/.poolwatch-setup-$extra"
