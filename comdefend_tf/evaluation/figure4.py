"""The paper's Figure 4 layout: accuracy per attack for the undefended classifier, ComDefend at
test time and ComDefend at training and test time, as grouped bars.

One panel per threat model (the paper's figure is the ``oblivious`` panel; ``bpda_eot`` and
``bpda_identity`` add the adaptive attacker, who differentiates the whole pipeline with the
classifier of each mode). In each panel a group of bars per attack, plus ``clean`` first; a
bounded attack is shown at one eps (``eps``, default its largest), C&W-L2 as minimum-norm. The
undefended bars come from the ``white_box`` rows, the same in every panel. Bar height: the
strict accuracy (right in every scoring draw, the project's headline) with its 95% Wilson
interval; a dot marks the mean over draws where it differs (randomized purifier).

Input: the rows and clean accuracies of a paper-protocol evaluation holding both modes
(``modes.merge_paper``). Written by ``plot_figure4`` as a PNG; the figure's data by
``figure4_table`` (the same numbers, for the Markdown report and the tests).
"""

from __future__ import annotations

import math

from comdefend_tf.evaluation import paper

FIGURE4_PLOT = "figure4_modes.png"
DEFENSES = (("none", "undefended"),
            ("comdefend", "ComDefend at test time"),
            ("comdefend_train_test", "ComDefend at training and test time"))


def _eps_for(rows, attack, eps):
    values = sorted({row["eps"] for row in rows if row["attack"] == attack
                     and row["eps"] is not None})
    if not values:
        return None
    if eps is None:
        return values[-1]
    for value in values:
        if math.isclose(value, eps):
            return value
    return values[-1]


def figure4_table(rows, clean_accuracy: dict, threat_model: str = "oblivious",
                  eps: float | None = None, defenses=DEFENSES) -> list[dict]:
    """The bars of one panel: ``{"group", "eps", "defense", "label", "accuracy",
    "accuracy_strict", "ci_low", "ci_high"}`` per (group, defense), groups being ``clean`` and
    every attack in row order. Defenses without a row for a group are left out; the clean
    group has no interval (``ci_low``/``ci_high`` None) and its accuracy is the mean over
    draws.
    """
    attacks = list(dict.fromkeys(row["attack"] for row in rows))
    bars = []
    for name, label in defenses:
        if name in clean_accuracy:
            value = clean_accuracy[name]
            bars.append({"group": "clean", "eps": None, "defense": name, "label": label,
                         "accuracy": value, "accuracy_strict": value, "ci_low": None,
                         "ci_high": None})
    for attack in attacks:
        chosen = _eps_for(rows, attack, eps)
        for name, label in defenses:
            wanted = (paper.UNDEFENDED_THREAT_MODEL if name == paper.UNDEFENDED
                      else threat_model)
            match = [row for row in rows if row["attack"] == attack and row["defense"] == name
                     and row["threat_model"] == wanted
                     and (row["eps"] is None if chosen is None
                          else row["eps"] is not None and math.isclose(row["eps"], chosen))]
            if not match:
                continue
            row = match[0]
            bars.append({"group": attack, "eps": chosen, "defense": name, "label": label,
                         "accuracy": row["accuracy_under_attack"],
                         "accuracy_strict": row["accuracy_strict"], "ci_low": row["ci_low"],
                         "ci_high": row["ci_high"]})
    return bars


def plot_figure4(rows, clean_accuracy: dict, path: str, threat_models=None,
                 eps: float | None = None, defenses=DEFENSES, title: str | None = None) -> str:
    """Writes the Figure 4 bars of ``rows`` (paper-protocol rows with both modes) as a PNG at
    ``path``, one panel per threat model (default: every non-``white_box`` threat model in the
    rows, oblivious first). Returns ``path``.

    Raises:
      ValueError: no row of a defended mode in ``rows`` (nothing to compare).
    """
    from comdefend_tf.evaluation import report

    if threat_models is None:
        present = list(dict.fromkeys(row["threat_model"] for row in rows
                                     if row["defense"] != paper.UNDEFENDED))
        threat_models = sorted(present, key=lambda name: name != "oblivious")
    if not threat_models:
        raise ValueError("Figure 4 needs rows of a defended mode (comdefend or "
                         "comdefend_train_test)")
    plt = report._pyplot()
    figure, axes = plt.subplots(len(threat_models), 1,
                                figsize=(8.0, 3.2 * len(threat_models) + 0.7), squeeze=False)
    width = 0.8 / len(defenses)
    for axis, threat_model in zip(axes[:, 0], threat_models):
        bars = figure4_table(rows, clean_accuracy, threat_model, eps, defenses)
        groups = list(dict.fromkeys(bar["group"] for bar in bars))
        for index, (name, label) in enumerate(defenses):
            own = {bar["group"]: bar for bar in bars if bar["defense"] == name}
            positions = [groups.index(group) + (index - (len(defenses) - 1) / 2) * width
                         for group in own]
            heights = [100 * bar["accuracy_strict"] for bar in own.values()]
            errors = [[100 * (bar["accuracy_strict"] - bar["ci_low"]) if bar["ci_low"] is not
                       None else 0 for bar in own.values()],
                      [100 * (bar["ci_high"] - bar["accuracy_strict"]) if bar["ci_high"] is not
                       None else 0 for bar in own.values()]]
            axis.bar(positions, heights, width, yerr=errors, capsize=2, color=f"C{index}",
                     label=label)
            for position, bar in zip(positions, own.values()):
                if abs(bar["accuracy"] - bar["accuracy_strict"]) > 1e-9:
                    axis.plot(position, 100 * bar["accuracy"], "k.", markersize=5)
                axis.text(position, 100 * bar["accuracy_strict"] + 1,
                          f"{100 * bar['accuracy_strict']:.0f}", ha="center", fontsize=6)
        names = []
        for group in groups:
            chosen = next(bar["eps"] for bar in bars if bar["group"] == group)
            names.append(group if group == "clean" or chosen is None
                         else f"{group}\neps {chosen:g}")
        axis.set_xticks(range(len(groups)))
        axis.set_xticklabels(names, fontsize=8)
        axis.set_ylim(0, 108)
        axis.set_ylabel("accuracy (%)")
        axis.set_title(f"{threat_model} attacker (undefended: white box)", fontsize=9)
        axis.grid(axis="y", alpha=0.3)
    # Legend (and title) above the panels, in inches converted to figure fractions.
    height = figure.get_figheight()
    title_room = 0.3 / height if title else 0.0
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper center", ncol=len(defenses), fontsize=8,
                  bbox_to_anchor=(0.5, 1.0 - title_room))
    if title:
        figure.suptitle(title, fontsize=10, y=0.995)
    figure.tight_layout(rect=(0, 0, 1, 1.0 - title_room - 0.4 / height))
    report._save_figure(figure, path)
    plt.close(figure)
    return path
