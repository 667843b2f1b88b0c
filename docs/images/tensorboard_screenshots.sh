#!/usr/bin/env bash
# Reproduce docs/images/tensorboard_{scalars,custom_scalars,throughput,samples}.png:
# a two-run beta sweep on the built-in tiny task (40 steps each, 1 rank, replies to 3 held-out prompts at each
# evaluation), TensorBoard on it, and screenshots of the Scalars, Custom Scalars and Text dashboards taken by headless
# Chromium (through Playwright, which expands a chart's
# legend). 3 min 22 s measured on a 2-core CPU machine shared with other work.
#
#   bash docs/images/tensorboard_screenshots.sh [WORK_DIR]      # default WORK_DIR: outputs/tensorboard_screenshots
#
# Needs: the project's .venv (launch/setup.sh; or PYTHON=...), Chromium (Debian: apt-get install chromium; or
# CHROMIUM=...), and Playwright's Python package, which is not a project dependency: PLAYWRIGHT_PYTHON names a
# Python that has it, otherwise it is pip-installed once into a throwaway venv WORK_DIR/playwright-venv (no browser
# download: Playwright drives the Chromium above). Runs already finished in WORK_DIR are reused.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
CHROMIUM=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
WORK=${1:-outputs/tensorboard_screenshots}
[ -n "$CHROMIUM" ] || { echo "no chromium found; set CHROMIUM" >&2; exit 1; }
mkdir -p "$WORK"
free_port() { "$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }

for beta in 0.1 0.5; do
  out="$WORK/beta$beta"
  [ -f "$out/config.json" ] && continue  # finished before (the final model is saved last)
  rm -rf "$out" "$WORK/tensorboard/beta$beta"
  "$(dirname "$PYTHON")/deepspeed" --num_gpus 1 --master_port "$(free_port)" launch/train.py \
      --beta "$beta" --run_name "beta$beta" --output_dir "$out" --logging_dir "$WORK/tensorboard" \
      --max_steps 40 --logging_steps 2 --eval_steps 10 --save_steps 0 \
      --generate_during_eval true --generate_num_prompts 3 --generate_max_new_tokens 8
done

if [ -n "${PLAYWRIGHT_PYTHON:-}" ]; then
  shooter=$PLAYWRIGHT_PYTHON
else
  [ -x "$WORK/playwright-venv/bin/python" ] || python3 -m venv "$WORK/playwright-venv"
  "$WORK/playwright-venv/bin/python" -c "import playwright" 2>/dev/null \
      || "$WORK/playwright-venv/bin/pip" install -q playwright
  shooter=$WORK/playwright-venv/bin/python
fi

# TensorBoard shows its --logdir as given: a relative one keeps the machine's paths out of the pictures
port=$(free_port)
tensorboard=$(cd "$(dirname "$PYTHON")" && pwd)/tensorboard
(cd "$WORK" && exec "$tensorboard" --logdir tensorboard --host 127.0.0.1 --port "$port") > "$WORK/tensorboard.log" 2>&1 &
tb_pid=$!
trap 'kill "$tb_pid" 2>/dev/null || true' EXIT
"$shooter" docs/images/tensorboard_screenshots.py --url "http://127.0.0.1:$port" --chromium "$CHROMIUM" \
    --runs beta0.1 beta0.5 --out docs/images
