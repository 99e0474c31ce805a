"""CPU cost of one APGD step on the defended pipeline: graph vs XLA (``jit_compile``), float32
vs bfloat16 purifier. The robustness protocol's cost knobs are decided here, not guessed.

    PYTHONPATH=. .venv/bin/python -m benchmarks.attack_cost --classifier_dir=runs/classifier \
        --comdefend_dir=runs/comdefend --output=benchmarks/results/attack_cost.json

Each setting runs ``bpda_eot`` APGD-CE (L-inf 0.1, EOT K = 5 stacked in one call) on the same
N held-out digits for ``--steps`` steps, from a fresh trace; the settings are interleaved and
repeated, and the table gives the median CPU-seconds (user + system of this process) per step
and per example-step, and each setting's ratio to graph float32 measured in the same round.
The first call of each setting (its trace or XLA compilation) is counted, because every cascade
attack pays it once per batch shape.
"""

from __future__ import annotations

import json
import statistics
import time

from absl import app, flags

flags.DEFINE_string("classifier_dir", None, "A trained classifier (train.train_classifier).")
flags.DEFINE_string("comdefend_dir", None, "A trained ComDefend (train.train_comdefend).")
flags.DEFINE_integer("num_examples", 200, "Held-out mnist5k examples attacked.")
flags.DEFINE_integer("steps", 20, "APGD steps per measurement.")
flags.DEFINE_integer("repeats", 2, "Interleaved rounds; the table gives medians.")
flags.DEFINE_list("settings", ["graph_float32", "xla_float32", "graph_bfloat16"],
                  "Which settings to measure (graph|xla)_(float32|bfloat16).")
flags.DEFINE_string("output", None, "Write the measurements as JSON here too.")
flags.mark_flags_as_required(["classifier_dir", "comdefend_dir"])
FLAGS = flags.FLAGS


def _measure(apgd_lib, attacked, images, labels, jit, steps):
    from comdefend_tf.evaluation import cpu_time

    apgd_lib.JIT_COMPILE = True if jit else None
    apgd_lib._FUNCTION_CACHE.clear()
    cpu, wall = cpu_time.process_cpu_seconds(), time.perf_counter()
    apgd_lib.apgd(attacked.model, images, labels, eps=0.1, norm="linf", steps=steps,
                  eot_iter=5, seed=0, judge=attacked.judge, draws_per_call=5)
    return cpu_time.process_cpu_seconds() - cpu, time.perf_counter() - wall


def main(argv):
    del argv
    from comdefend_tf.attacks import apgd as apgd_lib
    from comdefend_tf.evaluation import threat_models
    from comdefend_tf.io import datasets
    from comdefend_tf.model import load_comdefend
    from comdefend_tf.training import classifier as classifiers
    from comdefend_tf.training import precision

    classifier = classifiers.load_classifier(FLAGS.classifier_dir)
    purifier = load_comdefend(FLAGS.comdefend_dir, inference_noise_std=1.0)
    images, labels = datasets.take_arrays(datasets.load_dataset("mnist5k").test,
                                          FLAGS.num_examples)
    attacked = {}
    for setting in FLAGS.settings:
        kind = setting.split("_")[1]
        model = (purifier if kind == "float32"
                 else precision.select_for_inference(purifier, kind, images[:64]).model)
        attacked[setting] = threat_models.build("bpda_eot", classifier, model)
    cpu = {setting: [] for setting in FLAGS.settings}
    ratios = {setting: [] for setting in FLAGS.settings}
    for round_index in range(FLAGS.repeats):
        measured = {}
        for setting in FLAGS.settings:
            seconds, wall = _measure(apgd_lib, attacked[setting], images, labels,
                                     setting.startswith("xla"), FLAGS.steps)
            measured[setting] = seconds
            cpu[setting].append(seconds)
            print(f"round {round_index}: {setting}: {seconds:.1f} CPU-s, {wall:.1f} s wall",
                  flush=True)
        for setting in FLAGS.settings:
            ratios[setting].append(measured[setting] / measured[FLAGS.settings[0]])
    rows = {setting: {"cpu_seconds_median": statistics.median(cpu[setting]),
                      "cpu_seconds_per_step": statistics.median(cpu[setting]) / FLAGS.steps,
                      "cpu_ms_per_example_step": 1000 * statistics.median(cpu[setting])
                      / FLAGS.steps / len(images),
                      f"ratio_to_{FLAGS.settings[0]}": statistics.median(ratios[setting])}
            for setting in FLAGS.settings}
    print(f"| setting | CPU-s per step ({len(images)} examples, EOT 5) | CPU-ms per example-step "
          f"| ratio to {FLAGS.settings[0]} |\n|---|---|---|---|")
    for setting, row in rows.items():
        print(f"| {setting} | {row['cpu_seconds_per_step']:.2f} | "
              f"{row['cpu_ms_per_example_step']:.2f} | "
              f"{row[f'ratio_to_{FLAGS.settings[0]}']:.2f} |")
    if FLAGS.output:
        from comdefend_tf.io import atomic

        atomic.write_json_atomic(FLAGS.output, {
            "settings": {"num_examples": len(images), "steps": FLAGS.steps,
                         "repeats": FLAGS.repeats, "eot": 5, "eps": 0.1},
            "rows": rows, "cpu_seconds": cpu})


if __name__ == "__main__":
    app.run(main)
