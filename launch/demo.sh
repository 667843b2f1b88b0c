#!/usr/bin/env bash
# Set up, then train on the built-in tiny task with 2 ranks, ZeRO-3 and a ZeRO-3 reference engine.
# Extra arguments are passed to launch/train.py (e.g. --max_steps 20 --output_dir /tmp/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec .venv/bin/deepspeed --num_gpus 2 launch/train.py "$@"
