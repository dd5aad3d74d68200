#!/usr/bin/env bash
# One command for the main job on a fresh clone: the set-up it needs (first run only), then
#   python cli.py fit --config configs/autodeco/smollm2.yaml
# Arguments are passed to the CLI instead, so the same command runs any recipe:
#   ./run.sh test --config configs/tnot/smollm2.yaml
command -v python3 >/dev/null || { echo "run.sh needs python3 (3.10 or newer) on PATH" >&2; exit 1; }
exec python3 "$(dirname "$0")/scripts/setup_env.py" job "$@"
