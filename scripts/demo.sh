#!/usr/bin/env bash
# The main job: set up if needed, fetch the default model if missing, start a local swarm of
# 3 peers on loopback, show a chat reply generated through them, and stop them.
#   scripts/demo.sh [swarm-demo arguments, e.g. --prompt "..." --peers 2]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m layerswarm.cli.demo "$@"
