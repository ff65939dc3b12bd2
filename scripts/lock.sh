#!/usr/bin/env bash
# Refresh requirements.lock (hashed pins of every package scripts/setup.sh installs) deliberately:
#   bash scripts/lock.sh            re-resolve within pyproject's ranges, keeping current pins where possible
#   bash scripts/lock.sh --upgrade  move every package to its newest allowed release
# Then run the test command, and commit requirements.lock with a message saying what moved.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-.venv/bin/uv}
"$UV" pip compile pyproject.toml scripts/requirements.in --extra dev \
  --override scripts/lock-overrides.txt --generate-hashes \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --no-header -o requirements.lock "$@"
echo "lock: requirements.lock refreshed; review 'git diff requirements.lock'" >&2
