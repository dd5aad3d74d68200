#!/usr/bin/env bash
# One command for the tests on a fresh clone: the set-up they need (first run only), then
#   python -m pytest -q [ARGS...]
command -v python3 >/dev/null || { echo "test.sh needs python3 (3.10 or newer) on PATH" >&2; exit 1; }
exec python3 "$(dirname "$0")/scripts/setup_env.py" test "$@"
