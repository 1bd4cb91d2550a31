#!/usr/bin/env bash
# The README's first command: set up .venv/ (no browser: only the tests need one) and run the main job on the shipped
# sample (default model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/wbc demo "$@"
