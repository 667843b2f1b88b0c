#!/usr/bin/env bash
# Multi-node DPO under SLURM: one deepspeed launcher per node, no ssh needed.
#   sbatch --nodes 2 --gpus-per-node 8 launch/slurm.sh --config run.yaml [--key value ...]
#SBATCH --job-name=ds_dpo
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
hosts="$PWD/.hostfile.${SLURM_JOB_ID:-local}"  # on the shared filesystem: every node reads it
scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/$/ slots=${SLURM_GPUS_PER_NODE:-8}/" > "$hosts"
master=$(head -n 1 "$hosts" | cut -d' ' -f1)
# Each node's launcher starts its local ranks; every node gets the same arguments (config file + overrides).
srun --ntasks-per-node=1 bash -c ".venv/bin/deepspeed --hostfile $hosts --no_ssh --node_rank \$SLURM_NODEID \
  --master_addr $master --master_port ${MASTER_PORT:-29500} launch/train.py $(printf '%q ' "$@")"
