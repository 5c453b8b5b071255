#!/usr/bin/env bash
# Regenerates tests/fixtures/ (tiny PixArt-Σ models + diffusers goldens) with the pinned stack.
#   tests/reference/regenerate.sh            (from the repository root)
# The virtual environment lives outside the repo (PIXART_REF_VENV, default ~/.cache/pixart-ref-venv).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=${PIXART_REF_VENV:-$HOME/.cache/pixart-ref-venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q -r "$here/requirements.txt"
OMP_NUM_THREADS=1 PYTHONHASHSEED=0 "$venv/bin/python" "$here/make_fixtures.py" "$@"
