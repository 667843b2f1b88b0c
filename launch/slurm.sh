#!/usr/bin/env bash
# Multi-node DPO under SLURM: one deepspeed launcher per node, no ssh needed.
#   sbatch --nodes 2 --gpus-per-node 8 launch/slurm.sh --config run.yaml [--key value ...]
# MAX_RESTARTS=N (default 0): restart the job step from its last whole checkpoint after a failure, up to N times
# (launch/retry.py); add `#SBATCH --requeue` for a node SLURM itself takes away.
#SBATCH --job-name=ds_dpo
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
hosts="$PWD/.hostfile.${SLURM_JOB_ID:-local}"  # on the shared filesystem: every node reads it
scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/$/ slots=${SLURM_GPUS_PER_NODE:-8}/" > "$hosts"
master=$(head -n 1 "$hosts" | cut -d' ' -f1)
# Each node's launcher starts its local ranks; every node gets the same arguments (config file + overrides).
# Arguments reach train.py as "$@" of the inner shell, so those launch/retry.py appends on a restart do too.
.venv/bin/python launch/retry.py --max_restarts "${MAX_RESTARTS:-0}" -- \
  srun --ntasks-per-node=1 bash -c '.venv/bin/deepspeed --hostfile "$0" --no_ssh --node_rank "$SLURM_NODEID" \
    --master_addr "$1" --master_port "$2" launch/train.py "${@:3}"' "$hosts" "$master" "${MASTER_PORT:-29500}" "$@"
