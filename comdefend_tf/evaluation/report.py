"""The one report writer: Markdown, JSON and PNG figures of both protocols.

Paper protocol (``paper.evaluate``): ``results.md`` / ``results.json`` (``write_results``),
``accuracy_vs_eps.png`` (``plot_accuracy_vs_eps``) and ``purification_grid.png`` (the paper's
Figure 3 layout, ``plot_purification_grid``).

Adaptive protocol (``adaptive.Evaluation``): ``robustness_report.md`` /
``robustness_report.json`` and ``worst_case_vs_eps.png`` (``write_robustness_report``).

Both report CPU-seconds when the caller passes them in ``metadata`` (``cpu_seconds``: user +
system time of the process and its children, ``cpu_time.process_cpu_seconds``), in total and
per example. Every file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os

import numpy as np

from comdefend_tf import attacks as attacks_lib
from comdefend_tf import optional
from comdefend_tf.evaluation import adaptive, convergence, modes, paper
from comdefend_tf.io.atomic import atomic_path, write_json_atomic, write_text_atomic

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
ACCURACY_PLOT = "accuracy_vs_eps.png"
GRID_PLOT = "purification_grid.png"
REPORT_MD = "robustness_report.md"
REPORT_JSON = "robustness_report.json"
WORST_CASE_PLOT = "worst_case_vs_eps.png"
TABLE_COLUMNS = (
    ("attack", "attack"), ("eps", "eps"), ("steps", "steps"),
    ("threat_model", "threat model"), ("defense", "defense"),
    ("clean_accuracy", "clean accuracy"), ("accuracy_under_attack", "accuracy under attack"),
    ("accuracy_strict", "strict accuracy (every draw)"), ("ci", "95% CI (strict)"),
    ("undefended_success_rate", "undefended attack success rate"),
    ("mean_l2", "mean L2"), ("mean_linf", "mean Linf"),
)
# The worst-case figure's series (the best baseline is chosen by ``adaptive.best_baseline``).
WORST_CASE_SERIES = (("none", "undefended"), ("comdefend", "ComDefend"), (None, "best baseline"),
                     (modes.TRAIN_TEST, "ComDefend, training and test time"),
                     (modes.ADV_TRAINING, "adversarial training"),
                     (modes.ADV_PURIFIED, "ComDefend + adversarial training"),
                     (adaptive.LITERT, "ComDefend, LiteRT"))


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.bool_, np.integer)):
        return value.item()
    if isinstance(value, np.floating):
        return float(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _jsonable(payload):
    return json.loads(json.dumps(payload, default=_json_default))


def _pct(value):
    return "-" if value is None else f"{100 * value:.1f}"


def cpu_line(metadata: dict, num_examples: int) -> str:
    """``"CPU time: T CPU-s in total, T/N per example (...)"``, or "" without a measurement."""
    seconds = metadata.get("cpu_seconds")
    if seconds is None:
        return ""
    return (f"CPU time: {seconds:.0f} CPU-seconds in total, {seconds / num_examples:.1f} per "
            "example (user + system time of the process and its children, "
            "resource.getrusage, from process start)"
            + (f"; wall {metadata['wall_seconds']:.0f} s" if "wall_seconds" in metadata else "")
            + ".")


# ------------------------------------------------------------------------ paper protocol
def _format_cell(key, row):
    value = row.get(key)
    if key == "defense":
        return row.get("defense_label", row["defense"])
    if key == "ci":
        return f"[{_pct(row['ci_low'])}, {_pct(row['ci_high'])}] %"
    if value is None:
        return "min-norm" if key == "eps" else "-"
    if key in ("clean_accuracy", "accuracy_under_attack", "accuracy_strict",
               "undefended_success_rate"):
        return f"{100 * value:.1f} %"
    if key in ("mean_l2", "mean_linf"):
        return f"{value:.3f}"
    if key == "eps":
        return f"{value:g}"
    return str(value)


def format_table(rows) -> str:
    """A Markdown table of paper-protocol ``rows`` with the columns of ``TABLE_COLUMNS``."""
    header = "| " + " | ".join(title for _, title in TABLE_COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"
    lines = [header, rule]
    for row in rows:
        lines.append("| " + " | ".join(_format_cell(key, row) for key, _ in TABLE_COLUMNS)
                     + " |")
    return "\n".join(lines)


_MODES_NOTE = (
    "- comdefend: ComDefend at test time (the purifier before the classifier trained on clean "
    "images); comdefend_train_test: at training and test time (the purifier before a "
    "classifier trained on purified images; column classifier = purified in results.json). "
    "Its rows attack that pipeline: oblivious = the retrained classifier alone, bpda_* = the "
    "whole pipeline with it; its undefended attack success rate is measured on the retrained "
    "classifier without the purifier (clean accuracy there: {alone} %). figure4_modes.png: "
    "the paper's Figure 4 layout.")


def write_results(evaluation: paper.Evaluation, output_dir: str,
                  metadata: dict | None = None) -> dict:
    """Writes ``results.json`` (rows, clean accuracies, settings, ``metadata``) and
    ``results.md`` (the table and the settings). Returns ``{"json": path, "markdown": path}``."""
    os.makedirs(output_dir, exist_ok=True)
    metadata = metadata or {}
    payload = {"rows": evaluation.rows, "clean_accuracy": evaluation.clean_accuracy,
               "settings": evaluation.settings, "metadata": metadata}
    if metadata.get("cpu_seconds") is not None:
        payload["cpu_seconds"] = metadata["cpu_seconds"]
        payload["cpu_seconds_per_example"] = (metadata["cpu_seconds"]
                                              / evaluation.settings["num_examples"])
    json_path = os.path.join(output_dir, RESULTS_JSON)
    write_json_atomic(json_path, _jsonable(payload))
    settings = evaluation.settings
    clean = ", ".join(f"{name} {100 * value:.1f} %"
                      for name, value in evaluation.clean_accuracy.items())
    notes = [
        "# Robustness table",
        "",
        f"{settings['num_examples']} held-out images, the same images in every row. "
        f"Clean accuracy: {clean}.",
        "",
        format_table(evaluation.rows),
        "",
        "- oblivious: adversarial images made against the classifier alone, then defended "
        "(the paper's setting). bpda_eot: the attack differentiates classifier(defense(x)) "
        "through the defense's straight-through gradient; bpda_identity: the whole defense is "
        "the identity backward. Randomized defenses add EOT "
        f"({settings['eot_form']}; K = {settings['eot_samples']}), and gradient rows keep per "
        "example the oblivious image where only that one fools the defense (results.json: "
        "gradient_only_accuracy, oblivious_kept). white_box: the undefended classifier.",
        "- accuracy under attack: mean over the scoring draws (K on a randomized defense, "
        "else 1); strict: right in every draw, with its 95% Wilson interval.",
        "- undefended attack success rate: share of the images the undefended classifier gets "
        "right when clean that it gets wrong on the row's adversarial images.",
        "- eps: L-inf budget on [0, 1] pixels; min-norm: C&W-L2, unbounded, reported by its "
        f"mean L2. Step sizes: {settings['step_size_rule']}.",
    ]
    if "modes" in settings:
        notes.append(_MODES_NOTE.format(
            alone=_pct(settings["modes"]["purified_classifier_without_purifier"])))
    line = cpu_line(metadata, settings["num_examples"])
    if line:
        notes.append(f"- {line}")
    notes.append("")
    for key, value in metadata.items():
        if key not in ("cpu_seconds", "wall_seconds"):
            notes.append(f"- {key}: {value}")
    markdown_path = write_text_atomic(os.path.join(output_dir, RESULTS_MD),
                                      "\n".join(notes) + "\n")
    return {"json": json_path, "markdown": markdown_path}


def _pyplot():
    matplotlib = optional.require("matplotlib", "eval", "the evaluation's figures")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(figure, path):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with atomic_path(path) as partial:
        figure.savefig(partial, dpi=110, format="png")


def plot_accuracy_vs_eps(evaluation: paper.Evaluation, path: str) -> str:
    """One panel per bounded attack: accuracy under attack (%) against eps, one line per
    (defense, threat model), eps 0 being the clean accuracy. Writes a PNG at ``path``."""
    plt = _pyplot()
    bounded = [name for name in evaluation.settings["attacks"]
               if attacks_lib.get_attack(name).bounded]
    panels = bounded or evaluation.settings["attacks"][:1]
    figure, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.2 * max(len(panels), 1), 3.6),
                                squeeze=False)
    defense_order = list(evaluation.clean_accuracy)
    for axis, attack in zip(axes[0], panels):
        series = {}
        for row in evaluation.rows:
            if row["attack"] == attack and row["eps"] is not None:
                key = (row.get("defense_label", row["defense"]), row["threat_model"],
                       row["defense"])
                series.setdefault(key, []).append((row["eps"], row["accuracy_under_attack"]))
        for (label, threat_model, defense), points in series.items():
            points = [(0.0, evaluation.clean_accuracy[defense])] + sorted(points)
            eps, accuracy = zip(*points)
            # One colour per defense; solid oblivious / white box, dashed gradient attacks.
            gradient = threat_model not in ("oblivious", paper.UNDEFENDED_THREAT_MODEL)
            style = (":" if threat_model == "bpda_identity" else "--") if gradient else "-"
            name = (label if threat_model == paper.UNDEFENDED_THREAT_MODEL
                    else f"{label}, {threat_model}")
            axis.plot(eps, [100 * value for value in accuracy], style,
                      color=f"C{defense_order.index(defense) % 10}",
                      marker="s" if gradient else "o", label=name)
        axis.set_title(attack)
        axis.set_xlabel("eps (L-inf, pixels in [0, 1])")
        axis.set_ylabel("accuracy (%)")
        axis.set_ylim(-2, 102)
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    figure.tight_layout()
    _save_figure(figure, path)
    plt.close(figure)
    return path


def plot_purification_grid(path: str, images: np.ndarray, adversarial: np.ndarray,
                           classifier, purifier=None, defense=None, title: str = "",
                           count: int = 4) -> str:
    """The paper's Figure 3 layout for ``count`` examples: clean | adversarial | code bits
    (mean over code channels, when ``purifier`` is a ComDefend) | purified.

    ``images``/``adversarial``: float32 ``[n, H, W, C]`` in [0, 1]. Without a purifier the last
    column shows ``defense(adversarial)`` (or nothing more when None). Each panel is titled
    with the classifier's prediction. Writes a PNG at ``path``.
    """
    plt = _pyplot()
    count = min(count, len(images))
    clean, attacked = images[:count], adversarial[:count]
    columns = [("clean", clean), (title or "adversarial", attacked)]
    if purifier is not None:
        code_bits = np.asarray(purifier.code_bits(attacked))
        columns.append(("code bits (mean)", np.mean(code_bits, axis=-1, keepdims=True)))
        columns.append(("purified", np.asarray(purifier(attacked))))
    elif defense is not None:
        columns.append(("defended", np.asarray(defense(attacked))))
    figure, axes = plt.subplots(count, len(columns), figsize=(2.1 * len(columns), 2.1 * count),
                                squeeze=False)
    for column, (name, panel_images) in enumerate(columns):
        predictions = None
        if panel_images.shape[-1] == images.shape[-1] and name != "code bits (mean)":
            predictions = np.argmax(np.asarray(classifier(panel_images, training=False)), -1)
        for row in range(count):
            axis = axes[row][column]
            image = np.clip(panel_images[row], 0.0, 1.0)
            if image.shape[-1] == 1:
                axis.imshow(image[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
            else:
                axis.imshow(image)
            label = name if row == 0 else ""
            if predictions is not None:
                label = f"{label}\npred {predictions[row]}" if label else f"pred {predictions[row]}"
            axis.set_title(label, fontsize=8)
            axis.axis("off")
    figure.tight_layout()
    _save_figure(figure, path)
    plt.close(figure)
    return path


# --------------------------------------------------------------------- adaptive protocol
def format_robustness_markdown(results: dict, metadata: dict) -> str:
    """The robustness report as Markdown (``results`` from ``adaptive.Evaluation.results``)."""
    settings = results["settings"]
    n = results["n"]
    lines = ["# ComDefend robustness report", ""]
    lines.append(
        f"Dataset `{metadata.get('dataset')}`, N = {n} held-out examples (the same in every "
        f"row), ComDefend randomized: {results['randomized']} (inference noise std "
        f"{metadata.get('inference_noise_std')}); verification draws per point: "
        f"{settings['verify_draws'] if results['randomized'] else 1}. Accuracies in %. EOT: "
        "the APGD loss gradient is averaged over K noise draws per step (AutoAttack's form); "
        f"Square scores each candidate over {settings.get('square_eot', 1)} draw(s). APGD-T "
        f"runs under {', '.join(settings.get('targeted_threat_models') or ['all'])}. The "
        f"attacks search on a {settings.get('search_precision', 'float32')} ComDefend; every "
        "verdict is the deployed purifier's. No success is thrown away: every point a draw of "
        "the searched pipeline misclassified during an attack is a candidate, verified with "
        "the final points on fresh draws of the deployed one; per example the point wrong in "
        "the most draws counts, and the example is broken when its failure rate is "
        "significantly above 0 "
        "(one-sided 95% Wilson lower bound > 0, i.e. any wrong draw).")
    lines += modes.markdown_lines(settings)
    if adaptive.LITERT in results["clean"]:
        lines += ["", f"`{adaptive.LITERT}`: the LiteRT purifier {metadata.get('litert_purifier')}"
                  " scored on its LiteRT forward pass; gradient attacks go through the float "
                  "purifier's gradients (BPDA), Square queries the LiteRT pipeline; ComDefend's "
                  "own forward options (soft_path, bpda_smooth, fixed_noise) do not apply."]
    lines.append("")
    line = cpu_line(metadata, n)
    if line:
        lines += [f"**{line}**", ""]
    mode = ("cascade: each attack ran only on the examples every earlier attack left standing "
            "(majority sense, a superset of the strict one; `n` = examples it ran on, its "
            "accuracies are over those)" if results["cascade"] else
            "every attack on every example (`--per_attack_rows`)")
    lines.append(f"Mode: {mode}. Seeds: one per (attack, loss, threat model, norm, eps, "
                 f"defense), a SHA-256 hash of that tuple and the base seed {settings['seed']}.")
    lines.append("")
    lines.append("## Clean accuracy")
    lines.append("")
    lines.append("| defense | n | mean over draws | majority | strict (every draw) | 95% CI "
                 "(strict) |")
    lines.append("|---|---|---|---|---|---|")
    for name, summary in results["clean"].items():
        lines.append(f"| {name} | {summary['n']} | {_pct(summary['mean_acc'])} | "
                     f"{_pct(summary['majority_acc'])} | {_pct(summary['strict_acc'])} | "
                     f"[{_pct(summary['ci_low'])}, {_pct(summary['ci_high'])}] |")
    lines.append("")
    lines.append("## Worst case per example")
    lines.append("")
    lines.append("**Strict** (the headline): robust only if correct on the clean image and in "
                 "every draw of every attack, since the deployed pipeline makes one draw per "
                 "request and an attacker can resubmit. **Majority**: right in a majority of "
                 "the draws of the clean image and of each attack. 95% Wilson intervals.")
    lines.append("")
    lines.append("| norm | eps | defense | n | clean acc | **strict worst case** | 95% CI | "
                 "majority worst case | 95% CI | attacks | broken first by |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in sorted(results["worst_case"], key=lambda r: (r["norm"], r["eps"],
                                                            r["defense"])):
        broken = ", ".join(f"{k}: {v}" for k, v in row["broken_first"].items() if v)
        lines.append(
            f"| {row['norm']} | {row['eps']:g} | {row['defense']} | {row['n']} | "
            f"{_pct(row['clean_acc'])} | **{_pct(row['robust_acc_strict'])}** | "
            f"[{_pct(row['ci_low'])}, {_pct(row['ci_high'])}] | "
            f"{_pct(row['robust_acc_majority'])} | [{_pct(row['majority_ci'][0])}, "
            f"{_pct(row['majority_ci'][1])}] | {len(row['attacks'])} | {broken or '-'} |")
    lines.append("")
    lines += failure_rate_lines(results["worst_case"])
    lines.append("## Every attack")
    lines.append("")
    lines.append(f"`{adaptive.FIXED_NOISE_SAME_DRAW}`: the fixed-noise examples scored with "
                 "the attacker's own noise draw (an upper bound on the attacker; not in the "
                 "worst case, which scores with fresh draws as deployed). `undefended_success`: "
                 "share of the examples the undefended classifier gets right when clean that "
                 "it gets wrong on the row's images. `standing_*`: fraction of all N still "
                 "robust after this attack (cumulative, in cascade order). `cpu_seconds`: "
                 "CPU time of the attack and its scoring.")
    lines.append("")
    header = list(adaptive.ROW_COLUMNS)
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    percent = {"clean_acc", "undefended_success", "robust_acc_mean", "robust_acc_majority",
               "robust_acc_strict", "ci_low", "ci_high", "standing_strict",
               "standing_majority"}
    for row in results["rows"]:
        cells = []
        for key in header:
            value = row.get(key)
            if key in percent:
                cells.append(_pct(value))
            elif key == "eps":
                cells.append(f"{value:g}")
            elif key == "cpu_seconds":
                cells.append("-" if value is None else f"{value:.1f}")
            elif value is None:
                cells.append("-")
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("## Sanity evidence")
    lines.append("")
    if results["masking_warnings"]:
        lines.append("**Gradient masking:** " + "; ".join(results["masking_warnings"]))
    else:
        checked = ", ".join(f"{m['defense']} {m['norm']} {m['eps']:g} (Square ran on "
                            f"{m['square_ran_on']})" for m in results["masking"])
        lines.append("Per example, Square (gradient-free) broke no example that every gradient "
                     "attack on the same deployed pipeline missed: no sign of gradient masking"
                     + (f" (checked: {checked})." if checked else "."))
    lines.append("")
    checks = results["gradient_checks"]
    failed = [c for c in checks if not c["ok"]]
    verdict = ("all gradients finite, non-zero (at most 1% zero) and, through ComDefend's "
               "code, on at least a tenth of it" if not failed else f"{len(failed)} runs FAILED")
    lines.append(f"Gradient check: {len(checks)} APGD runs, {verdict}; worst zero-gradient "
                 f"fraction {max([c['zero_gradient_fraction'] for c in checks] or [0]):.4f}, "
                 f"non-finite gradients {sum(c['nonfinite_gradients'] for c in checks)}.")
    shares = {}
    for check in checks:
        if check.get("code_gradient_share") is not None:
            name = check["attack"].split("/")[0]
            shares[name] = min(shares.get(name, 1.0), check["code_gradient_share"])
    if shares:
        lines.append("Share of the code the surrogate's backward pass carries gradient through "
                     "(derivative >= 1% of its peak; lowest over runs): " + ", ".join(
                         f"{name} {_pct(share)} %" for name, share in shares.items()) + ".")
    for check in failed:
        lines.append(f"- FAILED {check['attack']} {check['norm']} eps={check['eps']:g} "
                     f"{check['loss']}: {'; '.join(check.get('reasons', []))}")
    lines.append("")
    if results["ablation"]:
        eps = results["ablation"][0].get("eps", settings["headline_eps"])
        lines.append(f"### Convergence at L-inf eps = {eps:g} (ComDefend, "
                     f"bpda_eot, APGD-CE, first {results['ablation'][0]['n']} examples)")
        lines.append("")
        if settings.get("ablation_eps") is None:
            lines += [f"The radius: the largest L-inf eps at which at least "
                      f"{adaptive.ABLATION_MIN_ROBUST:.0%} of the examples withstood ComDefend's "
                      "whole cascade (else the headline eps); `--ablation_eps` sets it.", ""]
        lines += convergence.markdown_lines(results.get("convergence_verdict"))
        lines.append("| steps | eot | restarts | n | mean | majority | strict | 95% CI (strict) | "
                     "cumulative strict worst case |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for row in results["ablation"]:
            lines.append(f"| {row['steps']} | {row['eot']} | {row.get('restarts', 1)} | "
                         f"{row['n']} | "
                         f"{_pct(row['robust_acc_mean'])} | {_pct(row['robust_acc_majority'])} "
                         f"| {_pct(row['robust_acc_strict'])} | [{_pct(row['ci_low'])}, "
                         f"{_pct(row['ci_high'])}] | {_pct(row['cumulative_worst_case'])} |")
        lines.append("")
    for key, curve in results["convergence"].items():
        robust = curve["robust_curve"][0]
        marks = sorted({0, len(robust) // 4, len(robust) // 2, 3 * len(robust) // 4,
                        len(robust) - 1})
        lines.append(f"Convergence (ComDefend bpda_eot APGD-CE, {key}, on the "
                     f"{curve['examples']} examples it ran on): unbroken fraction after step "
                     + ", ".join(f"{m}: {_pct(robust[m])}" for m in marks) + ".")
    lines.append("")
    lines.append(f"Settings: {json.dumps(_jsonable(settings))}")
    lines.append("")
    lines.append(f"Run: {json.dumps(_jsonable({k: v for k, v in metadata.items()}))}")
    return "\n".join(lines) + "\n"


def failure_rate_lines(worst_rows: list[dict]) -> list[str]:
    """Per worst-case row, the broken examples by verified failure rate."""
    lines = []
    for row in sorted(worst_rows, key=lambda r: (r["norm"], r["eps"], r["defense"])):
        rates = np.asarray(row.get("failure_rates") or [], float)
        broken = rates[rates > 0]
        if row.get("verify_draws", 1) <= 1 or not broken.size:
            continue
        lines.append(f"- {row['norm']} eps={row['eps']:g} {row['defense']}: {broken.size} "
                     f"example(s) broken, verified over {row['verify_draws']} draws; failure "
                     f"rate < 10%: {int(np.sum(broken < 0.1))}, 10-50%: "
                     f"{int(np.sum((broken >= 0.1) & (broken < 0.5)))}, >= 50%: "
                     f"{int(np.sum(broken >= 0.5))} (per example in the JSON: failure_rates)")
    return lines + [""] if lines else []


def plot_worst_case(results: dict, path: str) -> str:
    """Strict worst-case accuracy (solid, 95% band) and majority (dashed) against L-inf eps
    for each defense of ``WORST_CASE_SERIES`` in the results. Writes a PNG."""
    plt = _pyplot()
    headline = results["settings"]["headline_eps"]
    rows = [r for r in results["worst_case"] if r["norm"] == "linf"]
    baseline = adaptive.best_baseline(results["worst_case"], headline)
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for index, (defense_name, label) in enumerate(WORST_CASE_SERIES):
        if defense_name is None:
            defense_name, label = baseline, f"{label} ({baseline})"
        own = sorted((r for r in rows if r["defense"] == defense_name), key=lambda r: r["eps"])
        clean = results["clean"].get(defense_name)
        if defense_name is None or not own or clean is None:
            continue
        eps = [0.0] + [r["eps"] for r in own]
        strict = [clean["strict_acc"]] + [r["robust_acc_strict"] for r in own]
        low = [clean["strict_ci"][0]] + [r["ci_low"] for r in own]
        high = [clean["strict_ci"][1]] + [r["ci_high"] for r in own]
        majority = [clean["majority_acc"]] + [r["robust_acc_majority"] for r in own]
        colour = f"C{index}"
        axes.plot(eps, strict, marker="o", color=colour, label=f"{label}, strict")
        axes.fill_between(eps, low, high, alpha=0.15, color=colour)
        axes.plot(eps, majority, "--", marker="x", color=colour, alpha=0.7,
                  label=f"{label}, majority")
    axes.set_xlabel("L-inf eps")
    axes.set_ylabel("worst-case accuracy (strict: 95% CI band)")
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    axes.set_title(f"Worst case over all attacks, N = {results['n']}")
    figure.tight_layout()
    _save_figure(figure, path)
    plt.close(figure)
    return path


def write_robustness_report(results: dict, output_dir: str, metadata: dict) -> dict:
    """Writes ``robustness_report.json`` (results, ``metadata``, CPU-seconds total and per
    example), ``robustness_report.md`` and ``worst_case_vs_eps.png`` into ``output_dir``.
    Returns ``{"json", "markdown", "plot"}`` paths and the Markdown text (``"text"``)."""
    os.makedirs(output_dir, exist_ok=True)
    payload = dict(results, metadata=metadata)
    if metadata.get("cpu_seconds") is not None:
        payload["cpu_seconds"] = metadata["cpu_seconds"]
        payload["cpu_seconds_per_example"] = metadata["cpu_seconds"] / results["n"]
    json_path = os.path.join(output_dir, REPORT_JSON)
    write_json_atomic(json_path, _jsonable(payload))
    text = format_robustness_markdown(results, metadata)
    markdown_path = write_text_atomic(os.path.join(output_dir, REPORT_MD), text)
    plot_path = plot_worst_case(results, os.path.join(output_dir, WORST_CASE_PLOT))
    return {"json": json_path, "markdown": markdown_path, "plot": plot_path, "text": text}
