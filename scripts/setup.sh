#!/usr/bin/env bash
# Creates the virtual environment of the checkout and installs edge-gemma with everything the tests need.
# torch 2.13.0 comes first: it is the CPU build that lies on this machine's disk; any other version would
# download a CUDA build of several GB.
set -euo pipefail
venv=${1:-.venv}
python=${2:-python3}
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/pip" install -q --upgrade pip >/dev/null
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q -e '.[dev]'
