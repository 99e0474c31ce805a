"""Adaptive robustness report for ComDefend: APGD (+EOT), Square, five threat models, worst case.

    python -m train.robustness_report --dataset=mnist5k --classifier_dir=runs/classifier \
        --comdefend_dir=runs/comdefend --second_classifier_dir=runs/classifier2 \
        --output_dir=runs/robustness

Writes OUTPUT_DIR/robustness_report.md, robustness_report.json and worst_case_vs_eps.png
(worst-case accuracy against L-inf eps for the undefended classifier, ComDefend and the best
baseline). Every accuracy comes with N and a 95% Wilson interval; a randomized ComDefend is
scored over --eot_samples noise draws (mean and majority vote). See comdefend_tf/robustness.py
for the threat models.
"""

import json
import math
import os
import platform
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS

flags.DEFINE_string("dataset", "mnist5k", "Image source (see comdefend_tf.data); the held-out "
                    "split is evaluated.")
flags.DEFINE_enum("color_mode", None, ["grayscale", "rgb"],
                  "Convert images to this many channels (default: the source's own).")
flags.DEFINE_string("classifier_dir", None, "Directory (or .keras file) of the classifier to "
                    "defend (train/train_classifier.py).")
flags.DEFINE_string("comdefend_dir", None, "Directory (or .keras file) of the trained ComDefend.")
flags.DEFINE_string("second_classifier_dir", None, "An independently trained classifier, the "
                    "source of the transfer threat model (required when transfer is listed).")
flags.DEFINE_float("inference_noise_std", None, "Override ComDefend's inference noise std "
                   "(default: the saved model's; 0 makes it deterministic).", lower_bound=0)
flags.DEFINE_integer("num_examples", 100, "Held-out examples attacked (the same ones in every "
                     "row). 100 gives 95% intervals about +-10 points near 50%.", lower_bound=1)
flags.DEFINE_list("norm", ["linf", "l2"], "Norms to run: linf and/or l2.")
flags.DEFINE_list("eps", None, "L-inf radii in (0, 1] (default: 0.1,0.2,0.3 for grayscale "
                  "digits, 2/255,8/255,16/255 for RGB).")
flags.DEFINE_list("l2_eps", None, "L2 radii (default: 2.0 for grayscale digits, 0.5 for RGB).")
flags.DEFINE_float("headline_eps", None, "The L-inf radius of the ablation and the headline "
                   "(default: 0.3 digits, 8/255 RGB).")
flags.DEFINE_list("sanity_eps", None, "Extra, larger L-inf radii run with APGD-CE only, where "
                  "accuracy should reach about 0 (default: 0.4,0.5 digits; 32/255,64/255 RGB). "
                  "Pass an empty string for none.")
flags.DEFINE_integer("steps", 50, "APGD iterations per restart.", lower_bound=1)
flags.DEFINE_integer("eot_samples", 5, "K: noise draws averaged per APGD gradient, and draws "
                     "per example when scoring a randomized ComDefend.", lower_bound=1)
flags.DEFINE_integer("restarts", 1, "APGD random restarts (later ones only on unbroken "
                     "examples).", lower_bound=1)
flags.DEFINE_integer("square_queries", 1000, "Square attack query budget per example.",
                     lower_bound=1)
flags.DEFINE_list("threat_models", None, "Comma list from oblivious, bpda_eot, soft_path, "
                  "fixed_noise, transfer, gradient_free (default: all).")
flags.DEFINE_list("defenses", None, "Comma list from none, comdefend, jpeg, bit_depth, median "
                  "(default: all).")
flags.DEFINE_list("losses", ["ce", "dlr"], "APGD losses for the main attacks (ce, dlr).")
flags.DEFINE_list("ablation_steps", ["50", "100", "200"], "APGD steps compared at the headline "
                  "eps (ComDefend, bpda_eot, APGD-CE); empty for none.")
flags.DEFINE_list("ablation_eot", ["1", "5", "20"], "EOT samples compared at the headline eps; "
                  "empty for none.")
flags.DEFINE_integer("ablation_examples", 50, "Examples in the ablation (the first ones).",
                     lower_bound=1)
flags.DEFINE_integer("jpeg_quality", 75, "JPEG baseline quality (1..100).")
flags.DEFINE_integer("bit_depth", 4, "Bit-depth baseline: bits kept per channel.")
flags.DEFINE_integer("median_size", 3, "Median-filter baseline window (odd).")
flags.DEFINE_integer("batch_size", 100, "Examples per attack batch.", lower_bound=1)
flags.DEFINE_string("output_dir", None, "Where the report files go.")
flags.DEFINE_integer("seed", 0, "Seed for example choice-independent randomness: random "
                     "starts, Square's search, fixed-noise draws.")
flags.mark_flag_as_required("output_dir")

REPORT_MD = "robustness_report.md"
REPORT_JSON = "robustness_report.json"
PLOT_PNG = "worst_case_vs_eps.png"


def _floats(values, name):
    try:
        return [float(eval_fraction(v)) for v in values if v.strip()]
    except ValueError as error:
        raise app.UsageError(f"--{name} must be numbers (fractions like 8/255 allowed), got "
                             f"{values}") from error


def eval_fraction(text: str) -> float:
    text = text.strip()
    if "/" in text:
        numerator, denominator = text.split("/", 1)
        return float(numerator) / float(denominator)
    return float(text)


def _ints(values, name):
    try:
        return [int(v) for v in values if v.strip()]
    except ValueError as error:
        raise app.UsageError(f"--{name} must be integers, got {values}") from error


def build_protocol(image_shape):
    """The ``Protocol`` the flags describe; raises ``app.UsageError`` on bad flags."""
    from comdefend_tf import robustness

    defaults = robustness.default_eps(image_shape)
    norms = [n.strip().lower() for n in FLAGS.norm if n.strip()]
    for norm in norms:
        if norm not in robustness.NORMS:
            raise app.UsageError(f"--norm: unknown norm {norm!r}; choose linf and/or l2")
    if not norms:
        raise app.UsageError("--norm must name at least one norm")
    eps = {}
    if "linf" in norms:
        eps["linf"] = _floats(FLAGS.eps, "eps") if FLAGS.eps is not None else defaults["linf"]
    if "l2" in norms:
        eps["l2"] = (_floats(FLAGS.l2_eps, "l2_eps") if FLAGS.l2_eps is not None
                     else defaults["l2"])
    headline = FLAGS.headline_eps if FLAGS.headline_eps is not None else defaults["headline"]
    sanity = (_floats(FLAGS.sanity_eps, "sanity_eps") if FLAGS.sanity_eps is not None
              else defaults["sanity"])
    for name, values in (("eps", eps.get("linf", [])), ("sanity_eps", sanity)):
        for value in values:
            if not 0.0 < value <= 1.0:
                raise app.UsageError(f"--{name}: L-inf eps must be in (0, 1], got {value}")
    for value in eps.get("l2", []):
        if not value > 0:
            raise app.UsageError(f"--l2_eps must be > 0, got {value}")
    if not 0.0 < headline <= 1.0:
        raise app.UsageError(f"--headline_eps must be in (0, 1], got {headline}")
    threat_models = [t.strip() for t in FLAGS.threat_models] if FLAGS.threat_models \
        else list(robustness.THREAT_MODELS)
    defenses = [d.strip() for d in FLAGS.defenses] if FLAGS.defenses \
        else list(robustness.DEFENSES)
    for name in threat_models:
        if name not in robustness.THREAT_MODELS:
            raise app.UsageError(f"--threat_models: unknown threat model {name!r}; choose from "
                                 f"{', '.join(robustness.THREAT_MODELS)}")
    for name in defenses:
        if name not in robustness.DEFENSES:
            raise app.UsageError(f"--defenses: unknown defense {name!r}; choose from "
                                 f"{', '.join(robustness.DEFENSES)}")
    losses = [loss.strip() for loss in FLAGS.losses if loss.strip()]
    for loss in losses:
        if loss not in ("ce", "dlr"):
            raise app.UsageError(f"--losses: unknown loss {loss!r}; choose ce and/or dlr")
    ablation_steps = _ints(FLAGS.ablation_steps, "ablation_steps")
    ablation_eot = _ints(FLAGS.ablation_eot, "ablation_eot")
    if any(v < 1 for v in ablation_steps + ablation_eot):
        raise app.UsageError("--ablation_steps and --ablation_eot must be positive")
    if "transfer" in threat_models and not FLAGS.second_classifier_dir:
        raise app.UsageError("threat model transfer needs --second_classifier_dir (an "
                             "independently trained classifier); or leave transfer out of "
                             "--threat_models")
    if "comdefend" in defenses and not FLAGS.comdefend_dir:
        raise app.UsageError("defense comdefend needs --comdefend_dir; or leave it out of "
                             "--defenses")
    return robustness.Protocol(
        eps=eps, headline_eps=headline, sanity_eps=sanity if "linf" in norms else [],
        steps=FLAGS.steps, eot_samples=FLAGS.eot_samples, restarts=FLAGS.restarts,
        square_queries=FLAGS.square_queries, losses=losses, threat_models=threat_models,
        defenses=defenses, ablation_steps=ablation_steps, ablation_eot=ablation_eot,
        ablation_examples=FLAGS.ablation_examples, batch_size=FLAGS.batch_size, seed=FLAGS.seed)


def _pct(value):
    return f"{100 * value:.1f}"


def format_markdown(results: dict, metadata: dict) -> str:
    from comdefend_tf import robustness

    lines = ["# ComDefend robustness report", ""]
    lines.append(f"Dataset `{metadata['dataset']}`, N = {results['n']} held-out examples (the "
                 f"same in every row), ComDefend randomized: {results['randomized']} (inference "
                 f"noise std {metadata.get('inference_noise_std')}); scoring draws per example: "
                 f"{metadata['eot_samples'] if results['randomized'] else 1}. Accuracies in %, "
                 "95% Wilson intervals on the majority-vote accuracy. EOT: the APGD loss "
                 "gradient is averaged over K noise draws per step (AutoAttack's form). Wall "
                 f"time {metadata['wall_time_s'] / 60:.1f} min.")
    lines.append("")
    lines.append("## Clean accuracy")
    lines.append("")
    lines.append("| defense | n | clean acc (mean over draws) | majority | 95% CI |")
    lines.append("|---|---|---|---|---|")
    for name, summary in results["clean"].items():
        lines.append(f"| {name} | {summary['n']} | {_pct(summary['mean_acc'])} | "
                     f"{_pct(summary['majority_acc'])} | [{_pct(summary['ci_low'])}, "
                     f"{_pct(summary['ci_high'])}] |")
    lines.append("")
    lines.append("## Worst case per example (robust only if it survives every attack and "
                 "threat model)")
    lines.append("")
    lines.append("| norm | eps | defense | n | clean acc | worst-case acc | 95% CI | attacks | "
                 "decisive (examples only this attack breaks) |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for row in results["worst_case"]:
        decisive = ", ".join(f"{k}: {v}" for k, v in row["decisive"].items() if v)
        lines.append(f"| {row['norm']} | {row['eps']:g} | {row['defense']} | {row['n']} | "
                     f"{_pct(row['clean_acc'])} | **{_pct(row['robust_acc'])}** | "
                     f"[{_pct(row['ci_low'])}, {_pct(row['ci_high'])}] | "
                     f"{len(row['attacks'])} | {decisive or '-'} |")
    lines.append("")
    lines.append("## Every attack")
    lines.append("")
    lines.append(f"`{robustness.FIXED_NOISE_SAME_DRAW}`: the fixed-noise examples scored with "
                 "the attacker's own noise draw (an upper bound on the attacker; not in the "
                 "worst case, which scores every example with fresh draws as deployed).")
    lines.append("")
    header = list(robustness.ROW_COLUMNS)
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in sorted(results["rows"], key=lambda r: (r["norm"], r["eps"], r["defense"],
                                                       r["threat_model"], r["attack"])):
        cells = []
        for key in header:
            value = row[key]
            if key in ("clean_acc", "robust_acc_mean", "robust_acc_majority", "ci_low",
                       "ci_high"):
                cells.append(_pct(value))
            elif key == "eps":
                cells.append(f"{value:g}")
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("## Sanity evidence")
    lines.append("")
    if results["masking_warnings"]:
        lines.append("**Gradient masking:** " + "; ".join(results["masking_warnings"]))
    else:
        lines.append("Square (gradient-free) never beat the best gradient attack on the same "
                     "defense and eps: no sign of gradient masking.")
    lines.append("")
    failed = [c for c in results["gradient_checks"] if not c["ok"]]
    lines.append(f"Gradient check: {len(results['gradient_checks'])} APGD runs, "
                 f"{'all gradients finite and non-zero (at most 1% zero)' if not failed else f'{len(failed)} runs FAILED'}; "
                 f"worst zero-gradient fraction "
                 f"{max([c['zero_gradient_fraction'] for c in results['gradient_checks']] or [0]):.4f}, "
                 f"non-finite gradients "
                 f"{sum(c['nonfinite_gradients'] for c in results['gradient_checks'])}.")
    lines.append("")
    if results["ablation"]:
        lines.append(f"### Ablation at L-inf eps = {metadata['headline_eps']:g} (ComDefend, "
                     f"bpda_eot, APGD-CE, first {results['ablation'][0]['n']} examples)")
        lines.append("")
        lines.append("| steps | eot | n | robust acc (mean) | majority | 95% CI | cumulative "
                     "worst case |")
        lines.append("|---|---|---|---|---|---|---|")
        for row in results["ablation"]:
            lines.append(f"| {row['steps']} | {row['eot']} | {row['n']} | "
                         f"{_pct(row['robust_acc_mean'])} | {_pct(row['robust_acc_majority'])} | "
                         f"[{_pct(row['ci_low'])}, {_pct(row['ci_high'])}] | "
                         f"{_pct(row['cumulative_worst_case'])} |")
        lines.append("")
    for key, curve in results["convergence"].items():
        robust = curve["robust_curve"][0]
        marks = sorted({0, len(robust) // 4, len(robust) // 2, 3 * len(robust) // 4,
                        len(robust) - 1})
        lines.append(f"Convergence (ComDefend bpda_eot APGD-CE, {key}): unbroken fraction "
                     "after step " + ", ".join(f"{m}: {_pct(robust[m])}" for m in marks) + ".")
    lines.append("")
    lines.append(f"Settings: {json.dumps(metadata['settings'])}")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str, headline_eps: float):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from comdefend_tf import robustness

    rows = [r for r in results["worst_case"] if r["norm"] == "linf"]
    baseline = robustness.best_baseline(results["worst_case"], headline_eps)
    figure, axes = plt.subplots(figsize=(6, 4))
    for defense_name, label in (("none", "undefended"), ("comdefend", "ComDefend"),
                                (baseline, f"best baseline ({baseline})")):
        if defense_name is None:
            continue
        points = sorted((r["eps"], r["robust_acc"], r["ci_low"], r["ci_high"]) for r in rows
                        if r["defense"] == defense_name)
        clean = results["clean"].get(defense_name)
        if clean is not None:
            points = [(0.0, clean["majority_acc"], clean["ci_low"], clean["ci_high"])] + points
        if not points:
            continue
        eps, acc, low, high = (list(v) for v in zip(*points))
        axes.plot(eps, acc, marker="o", label=label)
        axes.fill_between(eps, low, high, alpha=0.15)
    axes.set_xlabel("L-inf eps")
    axes.set_ylabel("worst-case accuracy (95% CI)")
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)
    axes.legend()
    axes.set_title(f"Worst case over all attacks, N = {results['n']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.classifier_dir:
        raise app.UsageError("--classifier_dir is required (train one with "
                             "python -m train.train_classifier)")
    start = time.time()
    import numpy as np
    from tqdm import tqdm

    from comdefend_tf import classifiers
    from comdefend_tf import data as data_lib
    from comdefend_tf import defenses as defenses_lib
    from comdefend_tf import model as model_lib
    from comdefend_tf import robustness

    try:
        image_data = data_lib.load_dataset(FLAGS.dataset, color_mode=FLAGS.color_mode,
                                           split_seed=0)
    except data_lib.DataError as error:
        sys.exit(f"error: {error}")
    if image_data.num_classes is None:
        sys.exit(f"error: dataset {FLAGS.dataset} has no labels; a robustness report needs "
                 "labelled images")
    protocol = build_protocol(image_data.image_shape)
    try:
        classifier = classifiers.load_classifier(FLAGS.classifier_dir)
        second = (classifiers.load_classifier(FLAGS.second_classifier_dir)
                  if "transfer" in protocol.threat_models else None)
        purifier = None
        if "comdefend" in protocol.defenses:
            purifier = model_lib.load_comdefend(FLAGS.comdefend_dir,
                                                inference_noise_std=FLAGS.inference_noise_std,
                                                seed=FLAGS.seed)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    baselines = {}
    options = {"jpeg_quality": FLAGS.jpeg_quality, "bit_depth": FLAGS.bit_depth,
               "median_size": FLAGS.median_size}
    try:
        for name in protocol.defenses:
            if name in robustness.BASELINE_DEFENSES:
                baselines[name] = defenses_lib.make_defense(name, **options)
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    images, labels = data_lib.take_arrays(image_data.test, FLAGS.num_examples)
    if len(images) < FLAGS.num_examples:
        print(f"note: only {len(images)} held-out examples available")
    print(f"Robustness report on {image_data.name}: N = {len(images)}, eps {protocol.eps}, "
          f"steps {protocol.steps}, EOT {protocol.eot_samples}, restarts {protocol.restarts}, "
          f"Square queries {protocol.square_queries}")
    models = robustness.Models(classifier=classifier, purifier=purifier,
                               second_classifier=second, baselines=baselines)
    try:
        evaluation = robustness.Evaluation(models, images, labels, protocol)
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    jobs = evaluation.jobs()
    total = sum(job.cost for job in jobs)
    with tqdm(total=round(total), unit="calls", desc="robustness", smoothing=0.05) as bar:
        for job in jobs:
            bar.set_postfix_str(job.description)
            job.run()
            bar.update(round(job.cost))
    results = evaluation.results()
    wall = time.time() - start
    settings = {"steps": protocol.steps, "eot_samples": protocol.eot_samples,
                "restarts": protocol.restarts, "square_queries": protocol.square_queries,
                "losses": list(protocol.losses), "eps": protocol.eps,
                "headline_eps": protocol.headline_eps, "sanity_eps": list(protocol.sanity_eps),
                "threat_models": list(protocol.threat_models),
                "defenses": {name: defenses_lib.describe_defense(name, layer)
                             for name, layer in baselines.items()} | {
                    n: n for n in protocol.defenses if n not in baselines},
                "ablation_steps": list(protocol.ablation_steps),
                "ablation_eot": list(protocol.ablation_eot),
                "ablation_examples": protocol.ablation_examples, "seed": protocol.seed}
    metadata = {"dataset": image_data.name, "classifier_dir": FLAGS.classifier_dir,
                "comdefend_dir": FLAGS.comdefend_dir,
                "second_classifier_dir": FLAGS.second_classifier_dir,
                "inference_noise_std": (purifier.config.inference_noise_std
                                        if purifier is not None else None),
                "eot_samples": protocol.eot_samples, "headline_eps": protocol.headline_eps,
                "wall_time_s": wall, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                "settings": settings}
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    payload = dict(results, metadata=metadata)
    with open(os.path.join(FLAGS.output_dir, REPORT_JSON), "w") as handle:
        json.dump(payload, handle, indent=1, default=_json_default)
    markdown = format_markdown(results, metadata)
    with open(os.path.join(FLAGS.output_dir, REPORT_MD), "w") as handle:
        handle.write(markdown)
    plot(results, os.path.join(FLAGS.output_dir, PLOT_PNG), protocol.headline_eps)
    print(markdown)
    print(f"Wrote {FLAGS.output_dir}/{REPORT_MD}, {REPORT_JSON} and {PLOT_PNG} in "
          f"{wall / 60:.1f} min")


def _json_default(value):
    import numpy as np
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.bool_, np.integer)):
        return value.item()
    if isinstance(value, np.floating):
        return float(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def run():
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
