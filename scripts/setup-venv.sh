#!/usr/bin/env bash
# Create .venv (once) with gist-fast and its train + dev extras installed in editable mode.
# torch==2.13.0 goes in first: on these machines it is a local CPU build, whereas an unpinned
# torch pulled in by a dependency would download several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.gist-fast-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "setup: installing torch==2.13.0 (CPU build)" >&2
    pip install -q "torch==2.13.0"
fi
echo "setup: installing gist-fast[train,dev]" >&2
pip install -q -e ".[train,dev]"
touch "$stamp"
