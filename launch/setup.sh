#!/usr/bin/env bash
# Create or reuse .venv and install ds_dpo into it (idempotent).
#   bash launch/setup.sh          # runtime
#   bash launch/setup.sh test     # runtime + test extra (pytest, trl as oracle)
#   bash launch/setup.sh test latest   # the same in .venv-latest, with the newest transformers release instead of
#                                      # the pinned one (and what it pulls in, e.g. `kernels`); .venv is left alone
#   bash launch/setup.sh test vision   # the same in .venv-vision, with torch 2.14.1 and torchvision 0.29.1 (a CUDA
#                                      # build, ~5.5 GB, that runs on CPU too): transformers builds the processors of
#                                      # Qwen2-VL, 2.5-VL and 3-VL only with torchvision (their video processor), and
#                                      # torchvision's wheels do not load against the CPU build of torch; .venv is left
#                                      # alone
# A torch already in .venv is kept (a CUDA build stays). Otherwise: with an NVIDIA GPU, the default torch from PyPI;
# without one, the CPU build torch==2.13.0+cpu (from a local wheel where pip is configured with one, else from the
# PyTorch CPU index), never a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
kind=runtime extra="" venv=.venv constraints=launch/constraints.txt
[ "${1:-}" = "test" ] && kind=test extra="[test]"
if [ "${2:-}" = "latest" ]; then
  # Every pin but transformers', whose newest release is taken (what a user installing ds_dpo today gets).
  venv=.venv-latest constraints=$venv/constraints.txt
  mkdir -p "$venv" && grep -v '^transformers==' launch/constraints.txt > "$constraints"
elif [ "${2:-}" = "vision" ]; then
  # torch pinned with torchvision, so that installing ds_dpo and its test extra can never change either
  venv=.venv-vision constraints=$venv/constraints.txt
  mkdir -p "$venv" && { cat launch/constraints.txt; printf 'torch==2.14.1\ntorchvision==0.29.1\n'; } > "$constraints"
fi
[ -x $venv/bin/python ] || "$PY" -m venv $venv
PIP=($venv/bin/python -m pip install --quiet)
if [ "$venv" = .venv-vision ]; then
  $venv/bin/python -c "import torchvision" 2>/dev/null || "${PIP[@]}" -c "$constraints" torch torchvision
elif ! $venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" "torch>=2.4,<=2.14.1"
  else
    "${PIP[@]}" "torch==2.13.0+cpu" 2>/dev/null \
      || "${PIP[@]}" "torch==2.13.0+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
  fi
fi
# pip resolves every requirement even when all are installed (a minute or more on a small machine): skip it when
# pyproject.toml and the constraints are unchanged since the last install of this kind (or of the test kind, which
# includes the runtime). Delete the stamp to force a reinstall.
stamp=$venv/.ds_dpo-installed
want=$(cat pyproject.toml "$constraints" | sha256sum | cut -c1-16)
have="" have_kind=""
[ -f "$stamp" ] && read -r have have_kind < "$stamp"
if [ "$have" != "$want" ] || { [ "$kind" = test ] && [ "$have_kind" != test ]; }; then
  "${PIP[@]}" -c "$constraints" -e ".${extra}"
  echo "$want $kind" > "$stamp"
fi
# Each time, so that `latest` stays the newest release, even one past the range pyproject.toml states (pip then warns
# that ds_dpo asks for less: the point is to see what the new release breaks).
if [ "$venv" = .venv-latest ]; then "${PIP[@]}" --upgrade transformers; fi
# On a CPU machine DeepSpeed JIT-compiles its CPU ops (fused/CPU Adam, shared-memory all-reduce) with gcc on first
# use, about 3 min on 2 cores: build them here, once (cached in torch's extensions directory; ~8 s when cached),
# rather than inside the first training run or test.
$venv/bin/python - <<'PY' 2>&1 | grep -v "real_accelerator" || true
import deepspeed
import torch
import transformers
from deepspeed.accelerator import get_accelerator

from ds_dpo.distributed import clear_stale_build_locks

clear_stale_build_locks()  # a lock left by a killed build would make this (and every run) wait forever
accelerator = get_accelerator()
if accelerator.device_name() == "cpu":
    for name in ("FusedAdamBuilder", "CPUAdamBuilder", "ShareMemCommBuilder"):
        accelerator.create_op_builder(name).load(verbose=False)
print(f"ds_dpo env: torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
      f"transformers {transformers.__version__}")
PY
