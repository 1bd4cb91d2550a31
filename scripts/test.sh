#!/usr/bin/env bash
# The README's test command: set up .venv/ (created or reused) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
