#!/usr/bin/env bash
# Trains ComDefend with several training-noise settings and prints the held-out PSNR and code
# statistics of each (the evidence behind the default train_noise_std): the rows of README's
# "Training noise and learning rate" table at lr 1e-3 (the binary's default, no warm-up).
# Usage: tools/noise_sweep.sh OUT_DIR [CONFIG] [EPOCHS]
set -euo pipefail
out=${1:?usage: tools/noise_sweep.sh OUT_DIR [CONFIG] [EPOCHS]}
config=${2:-small}
epochs=${3:-1}
py=${PY:-.venv/bin/python}
export TF_CPP_MIN_LOG_LEVEL=2
for setting in "soft 20" "soft 5" "soft 1" "soft 0" "straight_through 1" "straight_through 0"; do
  set -- $setting
  dir="$out/${config}_$1_sigma$2"
  "$py" -m train.train_comdefend --dataset=mnist5k --config="$config" --epochs="$epochs" \
    --train_mode="$1" --train_noise_std="$2" --model_dir="$dir" --seed=0 >"$dir.log" 2>&1 || true
  echo "$1 sigma=$2: $(grep -E 'PSNR|Code:' "$dir.log" | tr '\n' ' ')"
done
