#!/usr/bin/env bash
# Creates the virtual environment of the checkout and installs edge-gemma with everything the tests need.
# torch 2.13.0 comes first: it is the CPU build that lies on this machine's disk; any other version would
# download a CUDA build of several GB.
set -euo pipefail
venv=${1:-.venv}
python=${2:-python3}

# Debian packages the tests need (scripts/debian-packages.txt): installed only when one is missing.
packages=$(grep -v '^#' "$(dirname "$0")/debian-packages.txt" | tr '\n' ' ')
missing=""
for p in $packages; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
# npm fetches the Kotlin compiler for the Android core's tests (NodeSource's nodejs ships its own npm).
command -v npm >/dev/null 2>&1 || missing="$missing npm"
if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ]; then apt_get="apt-get"; elif command -v sudo >/dev/null; then apt_get="sudo apt-get"; else
        echo "setup: missing Debian packages:$missing (run as root, or install them: apt-get install$missing)" >&2; exit 1
    fi
    echo "setup: installing Debian packages:$missing" >&2
    $apt_get update -q >/dev/null || true
    DEBIAN_FRONTEND=noninteractive $apt_get install -y -q $missing >/dev/null
fi
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/pip" install -q --upgrade pip >/dev/null
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q -e '.[dev]'
# The Kotlin compiler (npm package kotlin-compiler) for android_demo/core's JUnit tests, into .cache/kotlinc.
bash "$(dirname "$0")/../android_demo/tools/install-kotlinc.sh" >/dev/null
