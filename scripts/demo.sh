#!/usr/bin/env bash
# Serve the demo API with poolwatch: PostgreSQL when DATABASE_URL is set, else an embedded SQLite file.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m demo_app "$@"
