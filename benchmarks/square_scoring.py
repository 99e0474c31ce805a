"""Square on a randomized ComDefend: does scoring each candidate on one draw (the published
attack, the protocol's default) in a bfloat16 search copy find what five float32 draws find,
and at what cost? The robustness protocol's Square setting is decided here, not guessed.

    PYTHONPATH=. .venv/bin/python -m benchmarks.square_scoring --classifier_dir=runs/classifier \
        --comdefend_dir=runs/comdefend --output=benchmarks/results/square_scoring.json

Each setting runs Square on the same N held-out digits with the same seed; its final points
and candidates are judged like the robustness report judges them: by the deployed float32
purifier over ``--verify_draws`` fresh draws, an example broken when any draw is wrong. The
settings run interleaved in one process; CPU-seconds are this process's user + system time.
"""

from __future__ import annotations

import json

import numpy as np
from absl import app, flags

flags.DEFINE_string("classifier_dir", None, "A trained classifier (train.train_classifier).")
flags.DEFINE_string("comdefend_dir", None, "A trained ComDefend (train.train_comdefend).")
flags.DEFINE_integer("num_examples", 50, "Held-out mnist5k examples attacked.")
flags.DEFINE_integer("queries", 1000, "Square queries per example.")
flags.DEFINE_float("inference_noise_std", 1.0, "The purifier's inference noise.")
flags.DEFINE_integer("verify_draws", 20, "Fresh float32 draws each point is judged over.")
flags.DEFINE_list("radii", ["linf:0.2", "l2:2.0"], "NORM:EPS pairs.")
flags.DEFINE_list("settings", ["float32:5", "float32:1", "bfloat16:1"],
                  "PRECISION:DRAWS of the search (draws scored per candidate).")
flags.DEFINE_string("output", None, "Write the measurements as JSON here too.")
flags.mark_flags_as_required(["classifier_dir", "comdefend_dir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from comdefend_tf.attacks import square as square_lib
    from comdefend_tf.evaluation import cascade, cpu_time, scoring, threat_models
    from comdefend_tf.io import datasets
    from comdefend_tf.model import load_comdefend
    from comdefend_tf.training import classifier as classifiers
    from comdefend_tf.training import precision

    classifier = classifiers.load_classifier(FLAGS.classifier_dir)
    deployed = load_comdefend(FLAGS.comdefend_dir, inference_noise_std=FLAGS.inference_noise_std,
                              seed=0)
    images, labels = datasets.take_arrays(datasets.load_dataset("mnist5k").test,
                                          FLAGS.num_examples)
    judge = threat_models.pipeline_fn(classifier, deployed)
    clean = scoring.correct_per_draw(judge, images, labels, FLAGS.verify_draws, 500).all(axis=0)
    searched = {"float32": load_comdefend(FLAGS.comdefend_dir, seed=1,
                                          inference_noise_std=FLAGS.inference_noise_std)}
    searched["bfloat16"] = precision.convert_model(searched["float32"], "bfloat16", noise_seed=2)
    pipelines = {name: threat_models.pipeline_fn(classifier, model)
                 for name, model in searched.items()}
    rows = []
    for radius in FLAGS.radii:
        norm, eps = radius.split(":")
        for setting in FLAGS.settings:
            name, draws = setting.split(":")
            cpu = cpu_time.process_cpu_seconds()
            result = square_lib.square(pipelines[name], images[clean], labels[clean], float(eps),
                                       norm=norm, queries=FLAGS.queries, eot_draws=int(draws),
                                       seed=0, confirm_draws=FLAGS.verify_draws)
            seconds = cpu_time.process_cpu_seconds() - cpu
            broken = np.zeros(int(clean.sum()), bool)
            for points in cascade.attack_points(result):
                correct = scoring.correct_per_draw(judge, points, labels[clean],
                                                   FLAGS.verify_draws, 500)
                broken |= ~correct.all(axis=0)
            rows.append({"norm": norm, "eps": float(eps), "precision": name,
                         "draws": int(draws), "n": int(clean.sum()),
                         "broken": int(broken.sum()), "cpu_seconds": round(seconds, 1),
                         "queries": FLAGS.queries})
            print(json.dumps(rows[-1]), flush=True)
    print("| norm | eps | search | draws per candidate | n | broken (20 float32 draws) | "
          "CPU-s |\n|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['norm']} | {row['eps']:g} | {row['precision']} | {row['draws']} | "
              f"{row['n']} | {row['broken']} | {row['cpu_seconds']} |")
    if FLAGS.output:
        with open(FLAGS.output, "w") as handle:
            json.dump({"rows": rows, "num_examples": FLAGS.num_examples}, handle, indent=1)


if __name__ == "__main__":
    app.run(main)
