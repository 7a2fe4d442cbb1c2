#!/usr/bin/env bash
# Set up the environment if needed, then run the whole test suite on the CPU.
#   scripts/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
exec .venv/bin/python -m pytest "$@"
