#!/usr/bin/env bash
# One GPU check of layerswarm in under 8 minutes, printed as one table (scripts/gpu_check.py says
# what it runs and the targets). On a CUDA machine, with layerswarm's dependencies and
# transformers installed in $PYTHON (default: .venv/bin/python if there, else python3):
#
#   scripts/gpu_check.sh                   # the check; steps' logs in a temp folder it names
#   scripts/gpu_check.sh --compile-check   # no GPU needed: compile every Triton kernel variant
#                                          # the check launches for sm_80 and sm_90 (ptxas)
#   scripts/gpu_check.sh --dry-run         # the script itself on the CPU, tiny shapes
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
case "${1:-}" in
    --compile-check) exec "$PYTHON" scripts/gpu_check.py --compile-check "${2:-80,90}" ;;
    *) exec "$PYTHON" scripts/gpu_check.py "$@" ;;
esac
