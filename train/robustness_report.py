"""Adaptive robustness report: APGD-CE/-T/-DLR (+EOT) and Square under every threat model,
strict and majority worst case per example, run as a cascade, with CPU-seconds.

    python -m train.robustness_report --dataset=mnist5k --classifier_dir=runs/classifier \
        --comdefend_dir=runs/comdefend --second_classifier_dir=runs/classifier2 \
        --output_dir=runs/robustness

Writes OUTPUT_DIR/robustness_report.md, robustness_report.json and worst_case_vs_eps.png.
With --purified_classifier_dir (a classifier trained behind --comdefend_dir) the protocol also
runs on ComDefend at training and test time (defense comdefend_train_test: every threat model
attacks the pipeline with the retrained classifier; comdefend_tf/evaluation/modes.py), beside
comdefend (test time). --adv_classifier_dir adds adv_training (an adversarially trained
classifier alone), --adv_purified_classifier_dir comdefend_adv_training (ComDefend before a
classifier adversarially trained behind it): the same protocol with that classifier, each
classifier's adversarial-training record in the report. --litert_purifier adds
comdefend_litert (the .tflite purifier forward, BPDA through --comdefend_dir's gradients).
Purifier mismatches and missing adversarial records (provenance) are warned about.
This binary parses flags and calls comdefend_tf.evaluation (adaptive: the protocol; report:
the files); the threat models, the scoring and the cascade are documented there.
"""

import os
import platform
import sys
import time

from absl import app, flags

from comdefend_tf.cli import flags as cli_flags
from comdefend_tf.evaluation import adaptive, baselines, checks, cpu_time, modes, report
from comdefend_tf.evaluation import threat_models
from comdefend_tf.io import datasets as data_lib
from comdefend_tf.model import load_comdefend
from comdefend_tf.training import classifier as classifiers
from comdefend_tf.training import precision

FLAGS = flags.FLAGS

cli_flags.define_data_flags()
cli_flags.define_model_dir_flags("classifier_dir", "comdefend_dir", "purified_classifier_dir")
for _name, _help in modes.FLAG_HELP.items():
    flags.DEFINE_string(_name, None, _help)
flags.DEFINE_string("litert_purifier", None, adaptive.LITERT_FLAG_HELP)
flags.DEFINE_string("second_classifier_dir", None, "An independently trained classifier: when "
                    "given, the transfer threat model runs on every defense. The same file, or "
                    "a copy of the same weights, is refused.")
cli_flags.define_inference_noise_flag()
cli_flags.define_precision_flag()
cli_flags.define_baseline_flags()
flags.DEFINE_integer("num_examples", 100, "Held-out examples attacked (the same ones in every "
                     "row). 100 gives 95% intervals about +-10 points near 50%.", lower_bound=1)
flags.DEFINE_list("norm", ["linf", "l2"], "Norms to run: linf and/or l2.")
flags.DEFINE_list("eps", None, "L-inf radii in (0, 1] (default: 0.1,0.2,0.3 for grayscale "
                  "digits, 2/255,8/255,16/255 for RGB).")
flags.DEFINE_list("l2_eps", None, "L2 radii (default: 2.0 for grayscale digits, 0.5 for RGB).")
flags.DEFINE_float("headline_eps", None, "The headline L-inf radius (figures, best baseline, the "
                   "convergence ladders' fallback; default: 0.3 digits, 8/255 RGB).")
flags.DEFINE_list("sanity_eps", None, "Extra, larger L-inf radii run with APGD-CE only, where "
                  "accuracy should reach about 0 (default: 0.4,0.5 digits; 32/255,64/255 RGB). "
                  "Pass an empty string for none.")
flags.DEFINE_integer("steps", None, "APGD iterations per restart (default: the protocol's, "
                     "50).", lower_bound=1)
flags.DEFINE_integer("eot_samples", None, "K: noise draws averaged per APGD gradient, and draws "
                     "per example when scoring a randomized ComDefend (default 5).",
                     lower_bound=1)
flags.DEFINE_integer("restarts", None, "APGD random restarts (later ones only on unbroken "
                     "examples; default 1).", lower_bound=1)
flags.DEFINE_integer("square_queries", None, "Square query budget per example (default 5000, "
                     "AutoAttack's).", lower_bound=1)
flags.DEFINE_integer("square_eot", None, "Draws each Square candidate is scored over on a "
                     "randomized ComDefend (default 1, the published attack: a point wrong on "
                     "its draw must stay wrong on --verify_draws more before its example "
                     "leaves the search).", lower_bound=1)
flags.DEFINE_integer("target_classes", None, "APGD-T target classes, the top wrong ones "
                     "(default 9, AutoAttack's).", lower_bound=1)
flags.DEFINE_list("targeted_threat_models", None, "Threat models APGD-T runs under (default: "
                  f"{', '.join(adaptive.TARGETED_DEFAULT)} and bpda_smooth at the lowest "
                  "temperature, written bpda_smooth(T=5); 'all' for every one). APGD-CE and "
                  "APGD-DLR run under every threat model.")
flags.DEFINE_enum("search_precision", "auto", ["auto", *adaptive.SEARCH_PRECISIONS],
                  "Precision of the ComDefend copy the attacks query and differentiate; every "
                  "verdict is the deployed purifier's (--precision) over --verify_draws draws. "
                  "auto: bfloat16 where the CPU or GPU computes it natively, else float32.")
flags.DEFINE_list("threat_models", None, f"Comma list from "
                  f"{', '.join(threat_models.ADAPTIVE_PROTOCOL)} (default: all; transfer only "
                  "with --second_classifier_dir).")
flags.DEFINE_list("defenses", None, f"Comma list from {', '.join(adaptive.DEFENSES)} "
                  "(default: all).")
flags.DEFINE_list("losses", None, "APGD losses, run in this order: ce, t (APGD-T, targeted "
                  "DLR), dlr (default: all three).")
flags.DEFINE_bool("per_attack_rows", False, "Run every attack on every example (each row is "
                  "that attack's own accuracy on all N) instead of the cascade, where each "
                  "attack runs only on the examples every earlier attack left standing.")
flags.DEFINE_list("ablation_steps", ["50", "100", "200"], "APGD steps compared at the headline "
                  "eps (ComDefend, bpda_eot, APGD-CE); empty for none.")
flags.DEFINE_list("ablation_eot", ["1", "5", "20"], "EOT samples compared at the headline eps; "
                  "empty for none.")
flags.DEFINE_list("ablation_restarts", ["1", "3"], "APGD restarts compared at the headline eps "
                  "(the convergence section's third ladder); empty for none.")
flags.DEFINE_integer("verify_draws", None, "Fresh noise draws every returned point and "
                     "candidate is verified with on a randomized ComDefend (default 20); an "
                     "example is broken when any of them is wrong.", lower_bound=1)
flags.DEFINE_integer("draws_per_call", None, "APGD's EOT draws stacked into one model call "
                     "(EOT as a batch dimension; default 5; 1: one call per draw).",
                     lower_bound=1)
flags.DEFINE_list("temperatures", None, "Temperatures T of the smoothed-binarizer threat model "
                  "(hard bits forward, sigmoid(logits / T) backward), one run each "
                  "(default 5,10,20).")
flags.DEFINE_float("ablation_eps", None, "L-inf radius of the convergence ladders (default: the "
                   f"largest --eps at which at least {adaptive.ABLATION_MIN_ROBUST:.0%} of the "
                   "examples withstood ComDefend's whole cascade, else the headline eps).")
flags.DEFINE_integer("ablation_examples", None, "Examples in the ablation (the first ones; "
                     "default 50).", lower_bound=1)
flags.DEFINE_integer("batch_size", None, "Examples per attack batch (default 500).",
                     lower_bound=1)
flags.DEFINE_string("output_dir", None, "Where the report files go.")
flags.DEFINE_string("main_report", None, "An earlier robustness_report.json of this protocol on "
                    "the same models, dataset and N, without variants: its rows are reused and "
                    "only the variants (--purified_classifier_dir, --adv_classifier_dir, "
                    "--adv_purified_classifier_dir) run.")
flags.DEFINE_integer("seed", 0, "Base seed: every attack run's seed is derived from it and the "
                     "run's identity; also the fixed-noise draws.")
flags.mark_flag_as_required("output_dir")


def _numbers(values, name, kind=float):
    def parse(text):
        text = text.strip()
        if kind is float and "/" in text:
            numerator, denominator = text.split("/", 1)
            return float(numerator) / float(denominator)
        return kind(text)
    try:
        return [parse(v) for v in values if v.strip()]
    except (ValueError, ZeroDivisionError) as error:
        raise app.UsageError(f"--{name} must be {'numbers (fractions like 8/255 allowed)' if kind is float else 'integers'}, got {values}") from error


def _names(values):
    return None if values is None else [v.strip() for v in values if v.strip()]


def build_protocol(image_shape):
    """The ``adaptive.Protocol`` the flags describe (library defaults where a flag is unset);
    raises ``app.UsageError`` on bad flags."""
    defaults = adaptive.default_eps(image_shape)
    norms = _names(FLAGS.norm) or []
    if not norms or any(norm not in adaptive.NORMS for norm in norms):
        raise app.UsageError(f"--norm must list linf and/or l2, got {FLAGS.norm}")
    eps = {}
    if "linf" in norms:
        eps["linf"] = _numbers(FLAGS.eps, "eps") if FLAGS.eps is not None else defaults["linf"]
    if "l2" in norms:
        eps["l2"] = (_numbers(FLAGS.l2_eps, "l2_eps") if FLAGS.l2_eps is not None
                     else defaults["l2"])
    sanity = (_numbers(FLAGS.sanity_eps, "sanity_eps") if FLAGS.sanity_eps is not None
              else defaults["sanity"])
    chosen_threat_models = _names(FLAGS.threat_models) or [
        name for name in adaptive.THREAT_MODELS
        if name != "transfer" or FLAGS.second_classifier_dir]
    defenses = _names(FLAGS.defenses) or list(adaptive.DEFENSES)
    options = {"ablation_eps": FLAGS.ablation_eps, "steps": FLAGS.steps,
               "eot_samples": FLAGS.eot_samples, "restarts": FLAGS.restarts, "square_queries": FLAGS.square_queries,
               "square_eot": FLAGS.square_eot, "target_classes": FLAGS.target_classes,
               "losses": _names(FLAGS.losses), "ablation_examples": FLAGS.ablation_examples,
               "batch_size": FLAGS.batch_size, "verify_draws": FLAGS.verify_draws,
               "draws_per_call": FLAGS.draws_per_call,
               "targeted_threat_models": _names(FLAGS.targeted_threat_models),
               "search_precision": precision.resolve_by_hardware(FLAGS.search_precision),
               "temperatures": (_numbers(FLAGS.temperatures, "temperatures")
                                if FLAGS.temperatures is not None else None)}
    try:
        protocol = adaptive.Protocol(
            eps=eps, headline_eps=(FLAGS.headline_eps if FLAGS.headline_eps is not None
                                   else defaults["headline"]),
            sanity_eps=sanity if "linf" in norms else [], threat_models=chosen_threat_models,
            defenses=defenses, ablation_steps=_numbers(FLAGS.ablation_steps, "ablation_steps",
                                                       int),
            ablation_eot=_numbers(FLAGS.ablation_eot, "ablation_eot", int),
            ablation_restarts=_numbers(FLAGS.ablation_restarts, "ablation_restarts", int),
            seed=FLAGS.seed,
            per_attack_rows=FLAGS.per_attack_rows,
            **{key: value for key, value in options.items() if value is not None})
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    if "transfer" in protocol.threat_models and not FLAGS.second_classifier_dir:
        raise app.UsageError("threat model transfer needs --second_classifier_dir (an "
                             "independently trained classifier); or leave transfer out of "
                             "--threat_models")
    if "comdefend" in protocol.defenses and not FLAGS.comdefend_dir:
        raise app.UsageError("defense comdefend needs --comdefend_dir; or leave it out of "
                             "--defenses")
    for flag in ("purified_classifier_dir", "adv_purified_classifier_dir"):
        if FLAGS[flag].value and "comdefend" not in protocol.defenses:
            raise app.UsageError(f"--{flag} is evaluated behind ComDefend: keep comdefend in "
                                 "--defenses")
    if FLAGS.adv_classifier_dir and "none" not in protocol.defenses:
        raise app.UsageError("--adv_classifier_dir is evaluated without a purifier: keep none "
                             "in --defenses")
    return protocol


def _check_paths():
    """Refuses (``app.UsageError``) a variant classifier or LiteRT file that is not there."""
    for flag in ("adv_classifier_dir", "adv_purified_classifier_dir"):
        path = FLAGS[flag].value
        if path:
            keras_path = (os.path.join(path, classifiers.KERAS_FILENAME) if os.path.isdir(path)
                          else path)
            if not os.path.isfile(keras_path):
                raise app.UsageError(f"--{flag}: no classifier at {keras_path} (train one with "
                                     "python -m train.train_classifier --adversarial=pgd)")
    if FLAGS.litert_purifier is not None:
        if not FLAGS.comdefend_dir:
            raise app.UsageError("--litert_purifier needs --comdefend_dir: the float model "
                                 "whose gradients the attacks use (BPDA)")
        if not os.path.isfile(FLAGS.litert_purifier):
            raise app.UsageError(f"--litert_purifier: no .tflite file at "
                                 f"{FLAGS.litert_purifier}")


def _defenses(image_shape):
    """The protocol, with comdefend_litert added when --litert_purifier is given."""
    protocol = build_protocol(image_shape)
    names = list(protocol.defenses)
    if FLAGS.litert_purifier and adaptive.LITERT not in names:
        names.append(adaptive.LITERT)
    elif adaptive.LITERT in names and not FLAGS.litert_purifier:
        raise app.UsageError(f"defense {adaptive.LITERT} needs --litert_purifier=PATH.tflite")
    if FLAGS.litert_purifier and "comdefend" not in names:
        raise app.UsageError("--litert_purifier is attacked through ComDefend's float model: "
                             "keep comdefend in --defenses")
    protocol.defenses = names
    return protocol


def model_metadata(dataset_name: str, purifier, precision_note: str) -> dict:
    """What this run's numbers were made with (``modes.MAIN_REPORT_MODELS``' keys)."""
    return {"dataset": dataset_name, "classifier_dir": FLAGS.classifier_dir,
            "comdefend_dir": FLAGS.comdefend_dir,
            "second_classifier_dir": FLAGS.second_classifier_dir,
            "inference_noise_std": (purifier.config.inference_noise_std
                                    if purifier is not None else None),
            "purifier_precision": precision_note}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.classifier_dir:
        raise app.UsageError("--classifier_dir is required (train one with "
                             "python -m train.train_classifier)")
    start = time.time()
    from tqdm import tqdm

    try:
        image_data = cli_flags.load_data_from_flags()
    except data_lib.DataError as error:
        sys.exit(f"error: {error}")
    if image_data.num_classes is None:
        sys.exit(f"error: dataset {FLAGS.dataset} has no labels; a robustness report needs "
                 "labelled images")
    _check_paths()
    protocol = _defenses(image_data.image_shape)
    try:
        classifier = classifiers.load_classifier(FLAGS.classifier_dir)
        second = None
        if FLAGS.second_classifier_dir:
            second = classifiers.load_classifier(FLAGS.second_classifier_dir)
            checks.check_second_classifier(classifier, second, FLAGS.classifier_dir,
                                           FLAGS.second_classifier_dir,
                                           classifiers.KERAS_FILENAME)
        purifier = None
        if "comdefend" in protocol.defenses:
            purifier = load_comdefend(FLAGS.comdefend_dir,
                                      inference_noise_std=FLAGS.inference_noise_std,
                                      seed=FLAGS.seed)
        baseline_defenses = {name: baselines.make_defense(
            name, jpeg_quality=FLAGS.jpeg_quality, bit_depth=FLAGS.bit_depth,
            median_size=FLAGS.median_size)
            for name in protocol.defenses if name in adaptive.BASELINE_DEFENSES}
        variants, mismatches = modes.load_variants(
            FLAGS.classifier_dir, purifier, FLAGS.comdefend_dir,
            purified_classifier_dir=FLAGS.purified_classifier_dir,
            adv_classifier_dir=FLAGS.adv_classifier_dir,
            adv_purified_classifier_dir=FLAGS.adv_purified_classifier_dir)
        extra = {}
        if FLAGS.litert_purifier:
            from comdefend_tf.litert.defense import LiteRTPurifierDefense

            extra[adaptive.LITERT] = LiteRTPurifierDefense(FLAGS.litert_purifier, purifier)
    except (FileNotFoundError, ValueError, ImportError) as error:
        sys.exit(f"error: {error}")
    images, labels = data_lib.take_arrays(image_data.test, FLAGS.num_examples)
    if len(images) < FLAGS.num_examples:
        print(f"note: only {len(images)} held-out examples available")
    precision_note = "float32"
    if purifier is not None:
        choice = precision.select_for_inference(purifier, FLAGS.precision, images[:64])
        purifier, precision_note = choice.model, f"{choice.precision} ({choice.reason})"
    print(f"Robustness report on {image_data.name}: N = {len(images)}, eps {protocol.eps}, "
          f"steps {protocol.steps}, EOT {protocol.eot_samples}, verification draws "
          f"{protocol.verify_draws}, losses {protocol.losses}, "
          f"Square {protocol.square_queries} queries, "
          f"{'per-attack rows' if protocol.per_attack_rows else 'cascade'}")
    models = adaptive.Models(classifier=classifier, purifier=purifier,
                             second_classifier=second, baselines=baseline_defenses,
                             extra=extra)
    try:
        evaluation = adaptive.Evaluation(models, images, labels, protocol)
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    main = None
    if FLAGS.main_report:
        if not variants:
            raise app.UsageError("--main_report only adds variants (--purified_classifier_dir, "
                                 "--adv_classifier_dir, --adv_purified_classifier_dir); none "
                                 "was given")
        try:
            main = modes.reusable_main_report(
                FLAGS.main_report, protocol, len(images), model_metadata(
                    image_data.name, purifier, precision_note))
        except ValueError as error:
            sys.exit(f"error: {error}")
        print(f"Reusing the main run of {FLAGS.main_report}; running the variants only")
    with tqdm(unit="step", desc="robustness") as bar:
        def progress(description):
            bar.set_postfix_str(description)
            bar.update(1)
        if not variants:
            results = evaluation.run(progress)
        else:
            results = modes.run_adaptive_variants(models, variants, images, labels, protocol,
                                                  progress, main=main)
    metadata = dict(model_metadata(image_data.name, purifier, precision_note), **{
                "baselines": {name: baselines.describe_defense(name, layer)
                              for name, layer in baseline_defenses.items()},
                "wall_seconds": time.time() - start,
                "cpu_seconds": cpu_time.process_cpu_seconds(),
                "purified_classifier_dir": FLAGS.purified_classifier_dir,
                "adv_classifier_dir": FLAGS.adv_classifier_dir,
                "adv_purified_classifier_dir": FLAGS.adv_purified_classifier_dir,
                "adversarial_training": {variant.label: variant.record for variant in variants
                                         if variant.label != modes.TRAIN_TEST},
                "litert_purifier": (extra[adaptive.LITERT].describe() if extra
                                    else None),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"})
    if FLAGS.main_report:
        # cpu_seconds above are this run's (the variants); the main run's stay in its file.
        metadata["main_report"] = os.path.abspath(FLAGS.main_report)
    if mismatches:
        metadata["provenance_warnings"] = mismatches
    paths = report.write_robustness_report(results, FLAGS.output_dir, metadata)
    print(paths["text"])
    for warning in mismatches:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"Wrote {paths['markdown']}, {paths['json']} and {paths['plot']}")
    for line in modes.worst_case_lines(results):
        print(line)


def run():
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
