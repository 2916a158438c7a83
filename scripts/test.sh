#!/usr/bin/env bash
# The whole test suite, on a fresh machine: set up, lint, type-check, SQLAlchemy's suite, the
# documentation site, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
ruff check poolwatch tests demo_app benchmarks sqla_suite
ruff format --check poolwatch tests demo_app benchmarks sqla_suite
mypy  # the package and the tests (pyproject.toml)
# SQLAlchemy's own engine, pool and asyncio tests, plain and with poolwatch on every engine: any
# difference fails (docs/explanation/development.md). Before pytest, whose summary ends the run.
bash scripts/sqla_suite.sh
# The documentation site: any broken link or anchor, missing page or docstring error fails the
# build. Built into a temporary directory, so the checkout is left as it was.
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --site-dir "$site"  # not --quiet: it hides warnings from --strict
echo "mkdocs build --strict: $(find "$site" -name index.html | wc -l) pages, no warning"
# pytest runs every code block of README.md and docs/ too (tests/test_examples.py).
python -m pytest -q -p no:cacheprovider "$@"
