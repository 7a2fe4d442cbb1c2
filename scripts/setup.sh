#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install layerswarm into it.
#
# torch goes in first, pinned: on a machine without a GPU any other torch version, or an
# unpinned one pulled in by another package, downloads several GB of CUDA wheels.
# With a GPU, install the CUDA build of torch you need first (see README), then run this:
# it keeps a torch that is already installed.
#
#   scripts/setup.sh          # runtime dependencies
#   scripts/setup.sh dev      # plus test tools (pytest, ruff, mypy, hypothesis, transformers,
#                             # triton, playwright), Debian's chromium for the browser test and
#                             # miniupnpd for the UPnP tests
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${LAYERSWARM_TORCH_VERSION:-2.13.0}"
PY="${PYTHON:-python3}"
extra="${1:-}"

if [[ ! -x .venv/bin/python ]]; then
    echo "setup: creating .venv" >&2
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=".venv/.layerswarm-setup-${extra:-runtime}"
if [[ -f $stamp && $stamp -nt pyproject.toml ]]; then
    exit 0  # already set up for this pyproject.toml
fi
if ! "$VPY" -c "import torch" 2>/dev/null; then
    echo "setup: installing torch==$TORCH_VERSION" >&2
    "$VPY" -m pip install --disable-pip-version-check -q "torch==$TORCH_VERSION"
fi
target="."
[[ $extra == dev ]] && target=".[dev]"
echo "setup: installing layerswarm${extra:+ with [$extra]}" >&2
"$VPY" -m pip install --disable-pip-version-check -q -e "$target"
if [[ $extra == dev ]] && ! command -v miniupnpd >/dev/null && [[ $(id -u) == 0 ]] &&
    command -v apt-get >/dev/null; then
    # The --upnp tests run Debian's miniupnpd as the home router (tests/swarm/nat_world.py).
    # Not fatal: without it those tests skip, and say why.
    echo "setup: installing miniupnpd (apt)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq miniupnpd >/dev/null; } ||
        echo "setup: could not install miniupnpd; the UPnP tests will skip" >&2
fi
if [[ $extra == dev ]] && ! command -v chromium >/dev/null; then
    # The dashboard's browser test drives Debian's chromium with Playwright (no browser download).
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        echo "setup: installing chromium (apt)" >&2
        # Not fatal: without it the browser test skips, and says why.
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
            echo "setup: could not install chromium; the dashboard's browser test will skip" >&2
    else
        echo "setup: no chromium; install it (apt-get install chromium) for the dashboard's test" >&2
    fi
fi
touch "$stamp"
