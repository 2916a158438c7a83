#!/usr/bin/env bash
# The whole test suite, on a fresh machine: set up, then lint, type-check and run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check poolwatch tests demo_app benchmarks
mypy
python -m pytest -q -p no:cacheprovider "$@"
