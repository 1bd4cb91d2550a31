#!/usr/bin/env bash
# Create (or reuse) .venv/ in the repo root and install wbc-trust with everything it and its tests need.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
# The browser tests drive Debian's Chromium through Playwright (no browser download): install it once, as root.
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
            || echo "warning: could not install chromium; the browser tests will be skipped" >&2
    else
        echo "warning: /usr/bin/chromium is missing (as root: apt-get install chromium); browser tests will be skipped" >&2
    fi
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt
