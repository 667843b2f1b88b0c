#!/usr/bin/env bash
# Create or reuse .venv and install ds_dpo into it (idempotent).
#   bash launch/setup.sh          # runtime
#   bash launch/setup.sh test     # runtime + test extra (pytest, trl as oracle)
# A torch already in .venv is kept (a CUDA build stays). Otherwise: with an NVIDIA GPU, the default torch from PyPI;
# without one, the CPU build torch==2.13.0+cpu (from a local wheel where pip is configured with one, else from the
# PyTorch CPU index), never a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" "torch>=2.4,<=2.14.1"
  else
    "${PIP[@]}" "torch==2.13.0+cpu" 2>/dev/null \
      || "${PIP[@]}" "torch==2.13.0+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
  fi
fi
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
"${PIP[@]}" -c launch/constraints.txt -e ".${extra}"
.venv/bin/python -c "import torch, deepspeed, transformers; print(f'ds_dpo env: torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}')" 2>&1 | grep "ds_dpo env"
