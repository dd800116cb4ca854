#!/usr/bin/env bash
# Install what the benchmarks need into the *current* Python environment:
# the `bench` extra of pyproject.toml, plus NNCodec (a C++ extension built
# from its sdist) without its dependencies: its metadata pins numpy<2,
# torchvision, opencv, pandas, ... which it only uses for dataset helpers
# (benchmarks/nncodec_baseline.py stubs them at import).  torch and numpy are
# never replaced.  Needs a C++17 compiler and the Python headers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

# torch must come from scripts/setup.sh (the CPU wheel): here pip would resolve "torch>=2.1" to a
# multi-GB CUDA build.
if ! $PY -c "import torch" 2>/dev/null; then
    echo "setup_bench_env.sh: torch is not installed for $PY; run 'bash scripts/setup.sh bench' and activate" \
         "its .venv first (or set PYTHON=/path/to/venv/bin/python)" >&2
    exit 1
fi

# Pin the torch/numpy already installed so no resolver step can swap them.
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
$PY - > "$CONSTRAINTS" <<'PYEOF'
import importlib.metadata as md
for dist in ("torch", "numpy"):
    try:
        print(f"{dist}=={md.version(dist)}")
    except md.PackageNotFoundError:
        pass
PYEOF

$PY -m pip install -c "$CONSTRAINTS" -e ".[bench]"
# NNCodec's build backend needs setuptools, wheel and pybind11; pip fetches
# them into an isolated build environment.  Runtime imports: numpy, torch,
# tqdm, scikit-learn (already present via lsc).
$PY -m pip install -c "$CONSTRAINTS" pybind11 tqdm
$PY -m pip install --no-deps "nncodec==2.1.3"
$PY - <<'PYEOF'
import sys
sys.path.insert(0, ".")
from benchmarks.nncodec_baseline import load_nnc
load_nnc()
print("nncodec OK")
PYEOF
