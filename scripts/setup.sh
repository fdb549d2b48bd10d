#!/usr/bin/env bash
# Set up .venv with mixtral and its test dependencies. Safe to run again: it only installs what is missing.
# torch is pinned first: on the project's machines `torch==2.13.0` is the CPU wheel on local disk, while an
# unpinned torch would pull a CUDA build of several GB. Set MIXTRAL_TORCH to choose another torch requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
py=.venv/bin/python
"$py" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$py" -c "import torch" 2>/dev/null; then
    "$py" -m pip install -q "${MIXTRAL_TORCH:-torch==2.13.0}"
fi
"$py" -m pip install -q -e ".[test]"
echo "mixtral is installed in .venv (torch $("$py" -c 'import torch; print(torch.__version__)'))" >&2
