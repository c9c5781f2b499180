#!/usr/bin/env bash
# Installs the JetBrains Kotlin compiler (npm package kotlin-compiler, the full kotlinc distribution) into
# <checkout>/.cache/kotlinc, once. Idempotent: does nothing when the pinned version is already there.
# Used by tests/test_android_demo.py to compile and unit-test android_demo/core/ without the Android SDK,
# and called from scripts/setup.sh. Prints the path of the kotlinc launcher on success.
#
#   android_demo/tools/install-kotlinc.sh            # -> .cache/kotlinc/node_modules/kotlin-compiler/bin/kotlinc
#   KOTLINC_PREFIX=/elsewhere android_demo/tools/install-kotlinc.sh
set -euo pipefail

VERSION="2.4.20"  # same Kotlin as gradle/libs.versions.toml `kotlin`
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PREFIX="${KOTLINC_PREFIX:-$ROOT/.cache/kotlinc}"
PKG="$PREFIX/node_modules/kotlin-compiler"
KOTLINC="$PKG/bin/kotlinc"

installed_version() {
    [ -f "$PKG/package.json" ] || return 1
    sed -n 's/^ *"version": *"\([^"]*\)".*/\1/p' "$PKG/package.json" | head -n 1
}

if [ -x "$KOTLINC" ] && [ "$(installed_version || true)" = "$VERSION" ]; then
    echo "$KOTLINC"
    exit 0
fi

command -v npm >/dev/null 2>&1 || { echo "install-kotlinc.sh: npm not found (Debian: apt-get install npm)" >&2; exit 1; }
command -v java >/dev/null 2>&1 || { echo "install-kotlinc.sh: java not found (Debian: apt-get install openjdk-17-jdk-headless)" >&2; exit 1; }

mkdir -p "$PREFIX"
# A private prefix with its own package.json, so nothing is installed globally or into the checkout's root.
[ -f "$PREFIX/package.json" ] || echo '{"name": "edge-gemma-kotlinc", "private": true}' > "$PREFIX/package.json"
npm install --prefix "$PREFIX" --no-audit --no-fund --loglevel=error "kotlin-compiler@$VERSION" >&2
chmod +x "$PKG"/bin/* 2>/dev/null || true
if [ ! -x "$KOTLINC" ]; then
    echo "install-kotlinc.sh: npm installed kotlin-compiler@$VERSION but $KOTLINC is missing" >&2
    exit 1
fi
echo "$KOTLINC"
