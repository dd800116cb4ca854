#!/usr/bin/env bash
# Fresh machine -> compressed model: set up .venv, then fine-tune, compress, save and reload a digits CNN.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
lsc demo "$@"
