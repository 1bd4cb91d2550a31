#!/usr/bin/env bash
# Create (or reuse) .venv/ in the repo root and install wbc-trust with everything it and its tests need.
#   bash scripts/setup.sh                  what the demo needs (Python 3.10+ with its venv module, pip from PyPI)
#   bash scripts/setup.sh --with-browser   also Debian's Chromium for the browser tests (scripts/test.sh passes it)
# PYTHON=/path/to/python3.11 picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WITH_BROWSER=0
for arg in "$@"; do
    case "$arg" in
        --with-browser) WITH_BROWSER=1 ;;
        *) echo "error: unknown option $arg (setup.sh takes only --with-browser)" >&2; exit 2 ;;
    esac
done

as_root_with_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }

if [ ! -x .venv/bin/python ]; then
    if ! command -v "$PYTHON" >/dev/null; then
        echo "error: $PYTHON not found: install Python 3.10 or newer, or point PYTHON= at one" >&2
        exit 1
    fi
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
        echo "error: $PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())'); wbc-trust" \
             "needs 3.10 or newer: install one and point PYTHON= at it" >&2
        exit 1
    fi
    # Debian and Ubuntu ship the venv module's pip bootstrap (ensurepip) apart from python3, in python3-venv (or
    # python3.X-venv): without it `python3 -m venv` stops with a hint that is easy to miss.
    has_venv() { "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; }
    if ! has_venv; then
        package="python$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')-venv"
        if as_root_with_apt && [[ "$(readlink -f "$(command -v "$PYTHON")")" == /usr/bin/python3* ]]; then
            echo "$PYTHON has no venv module: installing $package (apt-get)" >&2
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null; } \
                || true
        fi
        if ! has_venv; then
            echo "error: $PYTHON has no venv module (Debian/Ubuntu keep it apart): run" \
                 "'sudo apt-get install $package' (or python3-venv), or point PYTHON= at a Python 3.10+ that has it" >&2
            exit 1
        fi
    fi
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt

# The browser tests drive Debian's Chromium through Playwright (no browser download): only for the tests.
if [ "$WITH_BROWSER" = 1 ] && [ ! -x /usr/bin/chromium ]; then
    if as_root_with_apt; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
            || echo "warning: could not install chromium; the browser tests will be skipped" >&2
    else
        echo "warning: /usr/bin/chromium is missing (as root: apt-get install chromium); browser tests will be skipped" >&2
    fi
fi
