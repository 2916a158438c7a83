#!/usr/bin/env bash
# SQLAlchemy's own test suite (engine, pool, reconnect, transaction, asyncio engine files of the
# installed SQLAlchemy's sdist) against PostgreSQL, once plain and once with poolwatch watching every
# engine the suite creates; prints the comparison and exits non-zero on any regression, poolwatch
# internal error, checkout-count mismatch or negative gauge. See `--help` for options.
#
# Needs: scripts/setup.sh (the .venv), PostgreSQL on 127.0.0.1:5432 with user postgres and trust
# auth (or --server HOST:PORT). It creates and uses its own database, sqla_suite. The sdist and the
# results are kept in .cache/sqla/. PYTHON=/path/to/python overrides .venv/bin/python.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
if [ ! -x "$python" ]; then
  echo "sqla_suite: $python not found; run scripts/setup.sh first" >&2
  exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m sqla_suite "$@"
