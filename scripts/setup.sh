#!/usr/bin/env bash
# Set up a virtualenv in .venv with lsc installed (editable), on a fresh machine.
# PyTorch is installed first as the CPU build (torch==2.13.0 is a local CPU wheel on
# these machines); if torch is already importable it is left alone, so pip never
# pulls a multi-GB CUDA build. Usage: scripts/setup.sh [extra]   (extra: test, bench)
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing PyTorch (CPU build)"
  python -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
  python -c "import torch" || { echo "[setup] PyTorch install failed" >&2; exit 1; }
fi
echo "[setup] installing lsc${extra:+[$extra]}"
python -m pip install -q -e ".${extra:+[$extra]}" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import lsc" || { echo "[setup] lsc install failed" >&2; exit 1; }
