#!/usr/bin/env bash
# Installs the official fal clients that tests/clients/*/scenarios.* drive against `pixart serve`:
#   js/node_modules      @fal-ai/client 1.10.1 (npm ci from js/package-lock.json)
#   python/.venv         fal-client 1.0.3, openai 3.63.0 (the OpenAI-compatible routes) and selenium
#                        4.51.0 (the playground, in Debian's chromium), with their pinned
#                        dependencies (python/requirements.txt)
# Idempotent: does nothing when both are installed from the current lock files.
# Needs node/npm (>= 18) and python3 (>= 3.8), and the npm registry and PyPI the first time.
set -euo pipefail
cd "$(dirname "$0")"

stamp() { sha256sum "$1" | cut -d' ' -f1; }

if [[ ! -f js/node_modules/.installed || "$(cat js/node_modules/.installed)" != "$(stamp js/package-lock.json)" ]]; then
    echo "installing @fal-ai/client (npm ci)" >&2
    (cd js && npm ci --no-audit --no-fund --loglevel=error >&2)
    stamp js/package-lock.json > js/node_modules/.installed
fi

if [[ ! -f python/.venv/.installed || "$(cat python/.venv/.installed)" != "$(stamp python/requirements.txt)" ]]; then
    echo "installing fal-client (pip, python/.venv)" >&2
    rm -rf python/.venv
    python3 -m venv python/.venv
    python/.venv/bin/pip install --quiet --disable-pip-version-check -r python/requirements.txt >&2
    stamp python/requirements.txt > python/.venv/.installed
fi
