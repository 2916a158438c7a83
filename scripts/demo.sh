#!/usr/bin/env bash
# Serve the demo API with poolwatch: PostgreSQL when DATABASE_URL is set, else an embedded SQLite file.
# Port: --port N, else $PORT, else 8000. The first start installs the demo's extra into .venv; later
# starts install nothing (see scripts/setup.sh). No system package is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
exec .venv/bin/python -m demo_app "$@"
