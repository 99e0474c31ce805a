"""Attacks a trained classifier with and without ComDefend and the baseline defenses.

    python -m train.evaluate --dataset=mnist5k --classifier_dir=runs/classifier \
        --comdefend_dir=runs/comdefend --attacks=fgsm,pgd,cw_l2,deepfool --eps=0.1,0.3 \
        --output_dir=runs/evaluation

Every row is scored on the same held-out images (the first --num_examples of the dataset's
fixed held-out split). Threat models (comdefend_tf/evaluation/threat_models.py): oblivious
(the paper's: attack the classifier, then defend), bpda_eot (attack classifier(defense(x))
through the defense's straight-through gradient; `adaptive` is its deprecated name) and
bpda_identity (the whole defense is the identity backward), with EOT over --eot_samples noise
draws when the purifier is randomized. Writes results.json, results.md (the table printed at
the end, with CPU-seconds), accuracy_vs_eps.png and purification_grid.png (the paper's Figure
3 layout) into --output_dir. The protocol lives in comdefend_tf/evaluation/paper.py.

With --purified_classifier_dir (a classifier trained behind --comdefend_dir:
train_classifier --purifier_dir) both of the paper's defense modes are reported side by side:
comdefend (test time: the purifier before --classifier_dir) and comdefend_train_test (training
and test time: the purifier before the retrained classifier), in every threat model (the
attacker differentiates the whole pipeline with the retrained classifier), plus
figure4_modes.png (the paper's Figure 4 layout; comdefend_tf/evaluation/modes.py, figure4.py).
--adv_classifier_dir (adv_training: an adversarially trained classifier alone) and
--adv_purified_classifier_dir (comdefend_adv_training: ComDefend before a classifier
adversarially trained behind it) add those defenses under the same protocol, with their
adversarial-training records in results.json/results.md. A classifier composed with another
purifier than the one it was trained behind, or trained behind one and used without it, or
passed as adversarially trained without a record of it, is warned about (stderr, results.md).
--litert_purifier adds comdefend_litert: a .tflite purifier scored on its LiteRT forward pass,
attacked through --comdefend_dir's float gradients (BPDA).
"""

import os
import sys
import time
import warnings

from absl import app, flags

from comdefend_tf import attacks as attacks_lib
from comdefend_tf.cli import flags as cli_flags
from comdefend_tf.evaluation import (
    adaptive,
    baselines,
    cpu_time,
    figure4,
    modes,
    paper,
    report,
    threat_models,
)
from comdefend_tf.io import datasets as data_lib
from comdefend_tf.model import load_comdefend
from comdefend_tf.training import classifier as classifiers
from comdefend_tf.training import precision

cli_flags.define_data_flags()
cli_flags.define_model_dir_flags("classifier_dir", "comdefend_dir", "purified_classifier_dir")
for _name, _help in modes.FLAG_HELP.items():
    flags.DEFINE_string(_name, None, _help)
flags.DEFINE_string("litert_purifier", None, adaptive.LITERT_FLAG_HELP)
cli_flags.define_inference_noise_flag()
cli_flags.define_precision_flag()
cli_flags.define_baseline_flags()
flags.DEFINE_list("attacks", ["fgsm", "bim", "pgd", "mim", "cw_l2", "deepfool"],
                  f"Comma list from: {', '.join(attacks_lib.ATTACK_NAMES)}.")
flags.DEFINE_list("eps", ["0.1", "0.3"], "Comma list of L-inf budgets in [0, 1] (pixel scale "
                  "[0, 1]; 0.3 is the usual MNIST budget, 8/255 = 0.031 CIFAR's). cw_l2 is "
                  "minimum-norm and runs once.")
flags.DEFINE_list("threat_models", list(paper.DEFAULT_THREAT_MODELS),
                  f"Comma list from {', '.join(paper.THREAT_MODELS)}. " + "; ".join(
                      f"{name}: the attack differentiates {threat_models.DIFFERENTIATES[name]}"
                      for name in paper.THREAT_MODELS) + ". " + "; ".join(
                      f"{alias}: deprecated name of {name}"
                      for alias, name in threat_models.DEPRECATED_ALIASES.items()) + ".")
flags.DEFINE_list("defenses", list(baselines.DEFENSE_NAMES),
                  f"Comma list from: {', '.join(baselines.DEFENSE_NAMES)} (none is always "
                  "included as the undefended reference).")
flags.DEFINE_integer("num_examples", 100, "Held-out images attacked (the same in every row).",
                     lower_bound=1)
flags.DEFINE_integer("batch_size", 128, "Images per attack batch.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seeds attack random starts and the purifier's noise.")
flags.DEFINE_string("output_dir", None, "Where results.json, results.md and the PNGs go.")
for _name in ("bim", "pgd", "mim", "cw", "spsa", "deepfool"):
    _registry_name = "cw_l2" if _name == "cw" else _name
    flags.DEFINE_integer(f"{_name}_steps", None,
                         f"Iterations of {_registry_name} (default "
                         f"{attacks_lib.get_attack(_registry_name).default_steps}; more is "
                         "stronger and slower).", lower_bound=1)
flags.DEFINE_integer("cw_binary_search_steps", 3, "C&W binary-search steps over its constant.",
                     lower_bound=1)
flags.DEFINE_integer("spsa_samples", 64, "SPSA probes per step (even; more is a better "
                     "gradient estimate and slower).", lower_bound=2)
flags.DEFINE_integer("eot_samples", 8, "Noise draws averaged per gradient by adaptive attacks "
                     "on a randomized purifier (ignored when the purifier is deterministic).",
                     lower_bound=1)
flags.DEFINE_integer("grid_examples", 4, "Examples in purification_grid.png.", lower_bound=1)
flags.mark_flags_as_required(["classifier_dir", "output_dir"])

FLAGS = flags.FLAGS


def _check_subset(values, allowed, flag):
    unknown = [value for value in values if value not in allowed]
    if unknown or not values:
        raise flags.ValidationError(f"--{flag} must list names from {', '.join(allowed)}; "
                                    f"got {', '.join(unknown) or 'nothing'}")
    return True


flags.register_validator("attacks", lambda v: _check_subset(v, attacks_lib.ATTACK_NAMES,
                                                            "attacks"))
flags.register_validator("threat_models", lambda v: _check_subset(
    v, paper.THREAT_MODELS + tuple(threat_models.DEPRECATED_ALIASES), "threat_models"))
flags.register_validator("defenses", lambda v: _check_subset(v, baselines.DEFENSE_NAMES,
                                                             "defenses"))


@flags.validator("eps")
def _check_eps(values):
    try:
        numbers = [float(value) for value in values]
    except ValueError as error:
        raise flags.ValidationError(f"--eps must be numbers, got {values}") from error
    if not numbers or any(not 0.0 <= number <= 1.0 for number in numbers):
        raise flags.ValidationError(f"--eps values must be in [0, 1] (pixel scale), got {values}")
    return True




@flags.multi_flags_validator(["defenses", "purified_classifier_dir",
                              "adv_purified_classifier_dir"])
def _check_purified_classifier(values):
    for flag in ("purified_classifier_dir", "adv_purified_classifier_dir"):
        if values[flag] and "comdefend" not in values["defenses"]:
            raise flags.ValidationError(f"--{flag} is evaluated behind ComDefend: keep "
                                        "comdefend in --defenses")
    return True


def _check_classifier_file(flag, how):
    """Registers a validator: --flag names a classifier directory or .keras file."""
    def check(path):
        if path is None:
            return True
        keras_path = (os.path.join(path, classifiers.KERAS_FILENAME) if os.path.isdir(path)
                      else path)
        if not os.path.isfile(keras_path):
            raise flags.ValidationError(f"--{flag}: no classifier at {keras_path} (train one "
                                        f"with python -m train.train_classifier{how})")
        return True
    flags.register_validator(flag, check)


_check_classifier_file("classifier_dir", "")
for _name in modes.FLAG_HELP:
    _check_classifier_file(_name, " --adversarial=pgd")


@flags.multi_flags_validator(["litert_purifier", "comdefend_dir", "defenses"])
def _check_litert(values):
    path = values["litert_purifier"]
    if path is None:
        return True
    if not values["comdefend_dir"] or "comdefend" not in values["defenses"]:
        raise flags.ValidationError("--litert_purifier needs --comdefend_dir and comdefend in "
                                    "--defenses: the float model whose gradients the attacks "
                                    "use (BPDA)")
    if not os.path.isfile(path):
        raise flags.ValidationError(f"--litert_purifier: no .tflite file at {path}")
    return True


@flags.multi_flags_validator(["defenses", "comdefend_dir"])
def _check_comdefend(values):
    if "comdefend" in values["defenses"] and not values["comdefend_dir"]:
        raise flags.ValidationError("--defenses includes comdefend but --comdefend_dir is not "
                                    "set (train one with python -m train.train_comdefend, or "
                                    "drop comdefend from --defenses)")
    return True


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    started = time.perf_counter()
    threat_model_names = []
    for name in FLAGS.threat_models:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            threat_model_names.append(threat_models.resolve(name))
        for warning in caught:
            print(f"warning: --threat_models: {warning.message}", file=sys.stderr)
    try:
        image_data = cli_flags.load_data_from_flags()
    except data_lib.DataError as error:
        sys.exit(f"error: {error}")
    if not image_data.num_classes:
        raise app.UsageError(f"--dataset={FLAGS.dataset} has no labels; attacks need labels")
    try:
        classifier = classifiers.load_classifier(FLAGS.classifier_dir)
        purifier = None
        if "comdefend" in FLAGS.defenses:
            purifier = load_comdefend(FLAGS.comdefend_dir,
                                      inference_noise_std=FLAGS.inference_noise_std,
                                      seed=FLAGS.seed)
        variants, mismatches = modes.load_variants(
            FLAGS.classifier_dir, purifier, FLAGS.comdefend_dir,
            purified_classifier_dir=FLAGS.purified_classifier_dir,
            adv_classifier_dir=FLAGS.adv_classifier_dir,
            adv_purified_classifier_dir=FLAGS.adv_purified_classifier_dir)
        litert = None
        if FLAGS.litert_purifier:
            from comdefend_tf.litert.defense import LiteRTPurifierDefense

            litert = LiteRTPurifierDefense(FLAGS.litert_purifier, purifier)
    except (FileNotFoundError, ValueError, ImportError) as error:
        sys.exit(f"error: {error}")
    expected = tuple(classifier.input_shape[1:])
    if None not in expected and tuple(image_data.image_shape) != expected:
        sys.exit(f"error: the classifier takes images of shape {expected} but --dataset "
                 f"{FLAGS.dataset} gives {tuple(image_data.image_shape)}; pass --image_size/"
                 "--color_mode or the matching classifier")
    if classifier.output_shape[-1] != image_data.num_classes:
        sys.exit(f"error: the classifier has {classifier.output_shape[-1]} outputs but the "
                 f"dataset has {image_data.num_classes} classes")
    if purifier is not None and purifier.config.input_channels != image_data.channels:
        sys.exit(f"error: the ComDefend model takes {purifier.config.input_channels}-channel "
                 f"images but the dataset has {image_data.channels}")
    import keras

    keras.utils.set_random_seed(FLAGS.seed)
    images, labels = data_lib.take_arrays(image_data.test, FLAGS.num_examples)
    if purifier is not None:
        choice = precision.select_for_inference(purifier, FLAGS.precision, images[:64])
        purifier = choice.model
        print(f"Purifier precision: {choice.precision} ({choice.reason})")
    defenses = {name: baselines.make_defense(
        name, purifier=purifier, jpeg_quality=FLAGS.jpeg_quality, bit_depth=FLAGS.bit_depth,
        median_size=FLAGS.median_size) for name in dict.fromkeys(["none"] + FLAGS.defenses)}
    if litert is not None:
        defenses[adaptive.LITERT] = litert
    steps = {"bim": FLAGS.bim_steps, "pgd": FLAGS.pgd_steps, "mim": FLAGS.mim_steps,
             "cw_l2": FLAGS.cw_steps, "spsa": FLAGS.spsa_steps,
             "deepfool": FLAGS.deepfool_steps}
    options = {"cw_l2": {"binary_search_steps": FLAGS.cw_binary_search_steps},
               "spsa": {"spsa_samples": FLAGS.spsa_samples}}
    options = {name: value for name, value in options.items() if name in FLAGS.attacks}
    noise = purifier.config.inference_noise_std if purifier is not None else None
    print(f"Evaluating on {len(images)} held-out images of {image_data.name} "
          f"{image_data.image_shape}: attacks {', '.join(FLAGS.attacks)}; eps "
          f"{', '.join(FLAGS.eps)}; threat models {', '.join(threat_model_names)}; defenses "
          f"{', '.join(defenses)}" + (f"; purifier inference noise std {noise}"
                                      if purifier is not None else ""))
    settings = dict(threat_models=threat_model_names, steps=steps,
                    eot_samples=FLAGS.eot_samples, batch_size=FLAGS.batch_size,
                    attack_options=options)
    eps_values = [float(e) for e in FLAGS.eps]
    try:
        result = modes.evaluate_paper_variants(classifier, variants, defenses, images, labels,
                                               FLAGS.attacks, eps_values, **settings)
    except ValueError as error:
        sys.exit(f"error: {error}")
    seconds = time.perf_counter() - started
    metadata = {"dataset": image_data.name, "classifier": FLAGS.classifier_dir,
                "comdefend": FLAGS.comdefend_dir, "seed": FLAGS.seed,
                "purified_classifier": FLAGS.purified_classifier_dir,
                "adv_classifier": FLAGS.adv_classifier_dir,
                "adv_purified_classifier": FLAGS.adv_purified_classifier_dir,
                "adversarial_training": {variant.label: variant.record for variant in variants
                                         if variant.label != modes.TRAIN_TEST},
                "litert_purifier": None if litert is None else litert.describe(),
                "purifier_inference_noise_std": noise, "wall_seconds": round(seconds, 1),
                "cpu_seconds": round(cpu_time.process_cpu_seconds(), 1)}
    if mismatches:
        metadata["provenance_warnings"] = mismatches
    paths = report.write_results(result, FLAGS.output_dir, metadata)
    plot_path = report.plot_accuracy_vs_eps(
        result, os.path.join(FLAGS.output_dir, report.ACCURACY_PLOT))
    grid_path = os.path.join(FLAGS.output_dir, report.GRID_PLOT)
    if result.examples is not None:
        adversarial, title = result.examples["adversarial"], (
            f"{result.examples['attack']} eps {result.examples['eps']:g}")
    else:
        adversarial, title = images, "clean (no bounded attack)"
    other = next((defenses[name] for name in defenses if name != "none"), None)
    report.plot_purification_grid(grid_path, images, adversarial, classifier,
                                      purifier=purifier, defense=other, title=title,
                                      count=FLAGS.grid_examples)
    print()
    print(report.format_table(result.rows))
    print()
    print("Clean accuracy: " + ", ".join(f"{name} {100 * value:.1f} %"
                                         for name, value in result.clean_accuracy.items()))
    print(report.cpu_line(metadata, len(images)))
    written = [paths["markdown"], paths["json"], plot_path, grid_path]
    if FLAGS.purified_classifier_dir:
        written.append(figure4.plot_figure4(
            result.rows, result.clean_accuracy,
            os.path.join(FLAGS.output_dir, figure4.FIGURE4_PLOT),
            title=f"{image_data.name}, N = {len(images)}: undefended, ComDefend at test time "
                  "and at training and test time"))
    for warning in mismatches:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"Wrote {', '.join(written)} ({seconds:.0f} s)")


def run():
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
