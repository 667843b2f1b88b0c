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
# On a CPU machine DeepSpeed JIT-compiles its CPU ops (fused/CPU Adam, shared-memory all-reduce) with gcc on first
# use, about 3 min on 2 cores: build them here, once (cached in torch's extensions directory; ~8 s when cached),
# rather than inside the first training run or test.
.venv/bin/python - <<'PY' 2>&1 | grep -v "real_accelerator" || true
from deepspeed.accelerator import get_accelerator

accelerator = get_accelerator()
if accelerator.device_name() == "cpu":
    for name in ("FusedAdamBuilder", "CPUAdamBuilder", "ShareMemCommBuilder"):
        accelerator.create_op_builder(name).load(verbose=False)
PY
.venv/bin/python -c "import torch, deepspeed, transformers; print(f'ds_dpo env: torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}')" 2>&1 | grep "ds_dpo env"
