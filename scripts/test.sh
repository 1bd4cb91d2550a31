#!/usr/bin/env bash
# The README's test command: set up .venv/ (created or reused, with Chromium for the browser tests) and run the whole
# test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --with-browser
exec .venv/bin/python -m pytest -q "$@"
