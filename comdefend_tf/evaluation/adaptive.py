"""The adaptive protocol (the robustness report): APGD-CE/-T/-DLR and Square under every
threat model, scored over noise draws, worst case per example, run as a cascade.

``Evaluation(Models(...), images, labels, Protocol(...)).run(progress)`` returns a dict of
rows, worst cases, masking, ablation, clean accuracy and gradient checks (``results()``);
``comdefend_tf.evaluation.report`` writes it. Images: float32 ``[N, H, W, C]`` in [0, 1];
labels int ``[N]``; bad settings and missing models raise ValueError before any attack runs.

What runs, per norm and eps, on the same N examples, and in which order: ``cascade``. Every
attack returns its final points and its candidates (points a searched draw misclassified
during the search); each set passes ``checks.check_adversarial`` and is verified with
``verify_draws`` fresh draws on a randomized defense (ComDefend with noise, a LiteRT
purifier that draws noise; 1 on a deterministic defense); per
example the point wrong in the most draws counts, and the example is broken when its failure
rate is significantly above 0 (``scoring.significantly_failing``: any wrong draw). Per-example
failure rates go into the worst case (``failure_rates``).

**Cascade** (default, as AutoAttack): each attack runs only on the examples every earlier
attack left standing in the majority sense (right in more than half of the draws), a superset
of the strict sense, so both worst cases are exact; rows say on how many examples each attack
ran (``n``). ``per_attack_rows=True`` runs every attack on every example instead.

Worst case per defense and eps: **strict** (the headline: right on the clean image and in every
draw of every attack) and **majority**, both with Wilson intervals. Masking check: examples
Square breaks although every gradient attack on the deployed pipeline
(``threat_models.PIPELINE_GRADIENT``) ran on them and missed. Convergence (``ablation``):
ComDefend ``bpda_eot`` APGD-CE at ``ablation_radius()`` on the first ``ablation_examples``
examples, one ladder each over ``ablation_steps``, ``ablation_eot`` and ``ablation_restarts``
(the others at the protocol's values), verified like the cascade; a ladder has plateaued
when its last rung changed the verdict of fewer than ``PLATEAU_SHARE`` of the examples.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import tensorflow as tf

from comdefend_tf.evaluation import checks, convergence, cpu_time, scoring, seeds
from comdefend_tf.evaluation import threat_models as threat_models_lib
from comdefend_tf.evaluation.cascade import AttackPlan, attack_points
# The protocol's settings and vocabulary live in protocol.py; re-exported here (adaptive.Protocol).
from comdefend_tf.evaluation.protocol import (  # noqa: F401
    BASELINE_DEFENSES, DEFENSES, EXTRA_DEFENSES, LITERT, LITERT_FLAG_HELP, LOSSES, NORMS,
    SEARCH_PRECISIONS, TARGETED_DEFAULT, THREAT_MODELS, Protocol, default_eps, settings_of)

# Gradient attacks on the deployed pipeline, compared with Square by the masking check.
PIPELINE_GRADIENT_THREAT_MODELS = threat_models_lib.PIPELINE_GRADIENT
ROW_COLUMNS = ("threat_model", "attack", "norm", "eps", "steps", "eot", "restarts",
               "temperature", "defense", "n", "clean_acc", "undefended_success",
               "robust_acc_mean", "robust_acc_majority", "robust_acc_strict", "ci_low",
               "ci_high", "standing_strict", "standing_majority", "broken_by_candidates",
               "cpu_seconds")
WORST_CASE = "worst_case"
# Convergence verdict: the last rung of a ladder changed fewer than this share of the examples.
PLATEAU_SHARE = 0.01
# The convergence ladders run, unless told where, at the largest L-inf radius at which at least
# this share of the examples withstood ComDefend's whole cascade (a ladder where the first rung
# already breaks everything shows nothing), else at the headline radius.
ABLATION_MIN_ROBUST = 0.10
FIXED_NOISE_SAME_DRAW = "fixed_noise_same_draw"


@dataclasses.dataclass
class Models:
    """What is evaluated: the classifier, the ComDefend purifier (or None), the second
    classifier for transfer (or None), the baseline layers by name and the other defense
    layers by name (``extra``: ``comdefend_litert``, a LiteRT purifier whose ``randomized``
    attribute says whether it draws noise)."""

    classifier: object
    purifier: object = None
    second_classifier: object = None
    baselines: dict = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)


class Evaluation(AttackPlan):
    """Runs the protocol: ``run(progress)`` and then ``results()``. The attacks themselves
    (``cascade``, ``fixed_noise``, ``draws``) are ``AttackPlan``'s."""

    def __init__(self, models: Models, images: np.ndarray, labels: np.ndarray,
                 protocol: Protocol):
        if models.classifier is None:
            raise ValueError("a classifier is required")
        images = np.asarray(images, np.float32)
        labels = np.asarray(labels, np.int64)
        if images.ndim != 4 or len(images) != len(labels) or len(images) < 1:
            raise ValueError(f"expected images [N, H, W, C] and labels [N] with N >= 1, got "
                             f"{images.shape} and {labels.shape}")
        if "comdefend" in protocol.defenses and models.purifier is None:
            raise ValueError("defense comdefend needs a ComDefend purifier")
        if "transfer" in protocol.threat_models and models.second_classifier is None:
            raise ValueError("threat model transfer needs a second, independently trained "
                             "classifier")
        if models.second_classifier is not None:
            checks.check_second_classifier(models.classifier, models.second_classifier)
        for name in protocol.defenses:
            if name in BASELINE_DEFENSES and name not in models.baselines:
                raise ValueError(f"baseline defense {name!r} missing from models.baselines")
            if name in EXTRA_DEFENSES and name not in models.extra:
                raise ValueError(f"defense {name!r} needs its layer in models.extra (a LiteRT "
                                 "purifier: --litert_purifier)")
        super().__init__(models, images, labels, protocol)
        self.rows: list[dict] = []
        self.worst: list[dict] = []
        self.masking: list[dict] = []
        self.clean: dict = {}
        self.ablation: list[dict] = []
        self.plateau: dict | None = None
        self._predict: dict = {}

    # ------------------------------------------------------------------------ scoring
    def _predict_fn(self, defense_name):
        if defense_name not in self._predict:
            self._predict[defense_name] = threat_models_lib.pipeline_fn(
                self.models.classifier, self.defense(defense_name)) if defense_name != "none" \
                else threat_models_lib.classifier_fn(self.models.classifier)
        return self._predict[defense_name]

    def score(self, defense_name, images, labels) -> np.ndarray:
        """bool ``[draws, n]``: the defended classifier right on each draw."""
        return scoring.correct_per_draw(self._predict_fn(defense_name), images, labels,
                                        self.draws(defense_name), self.protocol.batch_size)

    # --------------------------------------------------------------------------- run
    def run(self, progress: Callable[[str], None] | None = None) -> dict:
        """Runs everything; ``progress(description)`` is told before each step. Returns
        ``results()``."""
        protocol = self.protocol
        say = progress or (lambda description: None)
        say("clean accuracy")
        clean_correct = {}
        for name in protocol.defenses:
            clean_correct[name] = self.score(name, self.images, self.labels)
            self.clean[name] = scoring.summarize(clean_correct[name])
        undefended_clean = scoring.correct_per_draw(self._predict_fn("none"), self.images,
                                                    self.labels, 1, protocol.batch_size)[0]
        runs = [(norm, float(eps), True) for norm, radii in protocol.eps.items()
                for eps in radii]
        runs += [("linf", float(eps), False) for eps in protocol.sanity_eps
                 if eps not in protocol.eps.get("linf", ())]
        for norm, eps, full in runs:
            for name in protocol.defenses:
                self._run_cascade(name, norm, eps, full, clean_correct[name], undefended_clean,
                                  say)
        if protocol.ablation_steps or protocol.ablation_eot or protocol.ablation_restarts:
            if "comdefend" in protocol.defenses:
                self._run_ablation(say)
        return self.results()

    def _run_cascade(self, defense_name, norm, eps, full, clean_correct, undefended_clean, say):
        count = len(self.images)
        standing_strict = scoring.robust_strictly(clean_correct)
        standing_majority = scoring.robust_by_majority(clean_correct)
        # Per attack: 1 survived, 0 broken, -1 not run (already out).
        outcomes = []
        broken_first = {}
        failure_rates = np.zeros(count)
        failed_under = [None] * count
        classifier = self._predict_fn("none")
        for attack in self.cascade(defense_name, norm, eps, full):
            key = attack.label
            if self.protocol.per_attack_rows:
                indices = np.arange(count)
            else:
                indices = np.flatnonzero(standing_majority)
            say(f"{norm} eps={eps:g} {defense_name}: {key} on {len(indices)} examples")
            strict_outcome = np.full(count, -1, np.int8)
            majority_outcome = np.full(count, -1, np.int8)
            row = {"threat_model": attack.threat_model, "attack": attack.attack, "norm": norm,
                   "eps": eps, "steps": attack.steps, "eot": attack.eot,
                   "restarts": attack.restarts, "temperature": attack.temperature,
                   "defense": defense_name, "n": int(len(indices)),
                   "clean_acc": self.clean[defense_name]["mean_acc"],
                   "scope": "all examples" if self.protocol.per_attack_rows else "cascade"}
            clock = cpu_time.CpuClock()
            if len(indices):
                adversarial, correct, rates, from_candidates = self._verify(
                    defense_name, attack.run(indices), indices, eps, norm)
                labels = self.labels[indices]
                strict, majority = rates == 0, scoring.robust_by_majority(correct)
                for position, rate in zip(indices[rates > failure_rates[indices]],
                                          rates[rates > failure_rates[indices]]):
                    failure_rates[position], failed_under[position] = rate, key
                row["broken_by_candidates"] = int(np.sum(from_candidates & ~strict))
                strict_outcome[indices] = strict
                majority_outcome[indices] = majority
                newly = standing_strict[indices] & ~strict
                broken_first[key] = broken_first.get(key, 0) + int(newly.sum())
                standing_strict[indices] &= strict
                standing_majority[indices] &= majority
                summary = scoring.summarize(correct)
                fooled_on = undefended_clean[indices]
                undefended_wrong = scoring.correct_per_draw(
                    classifier, adversarial, labels, 1, self.protocol.batch_size)[0] == 0
                row.update(robust_acc_mean=summary["mean_acc"],
                           robust_acc_majority=summary["majority_acc"],
                           robust_acc_strict=summary["strict_acc"], ci_low=summary["ci_low"],
                           ci_high=summary["ci_high"], majority_ci=summary["majority_ci"],
                           undefended_success=float(np.sum(fooled_on & undefended_wrong)
                                                    / max(int(fooled_on.sum()), 1)))
            else:
                row.update(robust_acc_mean=None, robust_acc_majority=None,
                           robust_acc_strict=None, ci_low=None, ci_high=None, majority_ci=None,
                           undefended_success=None, broken_by_candidates=None)
            row.update(standing_strict=float(standing_strict.mean()),
                       standing_majority=float(standing_majority.mean()),
                       cpu_seconds=clock.seconds())
            self.rows.append(row)
            if len(indices) and attack.same_draw_noise is not None:
                self._same_draw_row(row, adversarial, indices, attack.same_draw_noise)
            outcomes.append((attack, strict_outcome))
        if not full and not outcomes:
            return
        strict_ci = scoring.wilson_interval(int(standing_strict.sum()), count)
        majority_ci = scoring.wilson_interval(int(standing_majority.sum()), count)
        self.worst.append({
            "threat_model": WORST_CASE, "attack": "all", "norm": norm, "eps": eps,
            "defense": defense_name, "n": count,
            "clean_acc": self.clean[defense_name]["mean_acc"],
            "clean_acc_strict": self.clean[defense_name]["strict_acc"],
            "robust_acc_strict": float(standing_strict.mean()), "ci_low": strict_ci[0],
            "ci_high": strict_ci[1], "robust_acc_majority": float(standing_majority.mean()),
            "majority_ci": list(majority_ci), "attacks": [f"{a.threat_model}/{a.attack}"
                                                          for a, _ in outcomes],
            "broken_first": broken_first, "full": full,
            "robust_examples": np.flatnonzero(standing_strict).tolist(),
            "verify_draws": self.draws(defense_name),
            "failure_rates": [float(r) for r in failure_rates], "failed_under": failed_under})
        self._masking(defense_name, norm, eps, outcomes)

    def _verify(self, defense_name, points, indices, eps, norm):
        """Verifies every point set an attack returned (final points, candidates) on fresh
        draws. Returns the chosen points ``[n, H, W, C]``, their correctness ``[V, n]``, each
        example's failure rate ``[n]`` (0 exactly when not significantly failing) and
        whether the chosen point was a candidate ``[n]``."""
        points = [points] if isinstance(points, np.ndarray) else list(points)
        for candidate_set in points:
            checks.check_adversarial(self.images[indices], candidate_set, eps, norm)
        labels = self.labels[indices]
        choice, correct = scoring.strongest_point(
            [self.score(defense_name, candidate_set, labels) for candidate_set in points])
        chosen = np.stack(points)[choice, np.arange(len(indices))]
        failures = scoring.failure_counts(correct)
        rates = np.where(scoring.significantly_failing(failures, correct.shape[0]),
                         failures / correct.shape[0], 0.0)
        return chosen, correct, rates, choice > 0

    def _same_draw_row(self, row, adversarial, indices, noise):
        model = tf.function(threat_models_lib.fixed_noise_fn(
            self.models.classifier, self.models.purifier, noise[indices]))
        logits = model(tf.constant(adversarial), tf.range(len(indices)))
        correct = (np.asarray(logits).argmax(-1) == self.labels[indices])[None, :]
        summary = scoring.summarize(correct)
        same = dict(row, threat_model=FIXED_NOISE_SAME_DRAW, eot=1,
                    robust_acc_mean=summary["mean_acc"],
                    robust_acc_majority=summary["majority_acc"],
                    robust_acc_strict=summary["strict_acc"], ci_low=summary["ci_low"],
                    ci_high=summary["ci_high"], majority_ci=summary["majority_ci"],
                    undefended_success=None, in_worst_case=False, cpu_seconds=None)
        self.rows.append(same)

    def _masking(self, defense_name, norm, eps, outcomes):
        square = [outcome for attack, outcome in outcomes if attack.attack == "square"]
        gradient = [outcome for attack, outcome in outcomes
                    if attack.threat_model in PIPELINE_GRADIENT_THREAT_MODELS]
        if not square or not gradient:
            return
        missed_by_gradients = np.all(np.stack(gradient) == 1, axis=0)
        masked = (square[0] == 0) & missed_by_gradients
        self.masking.append({"defense": defense_name, "norm": norm, "eps": eps,
                             "count": int(masked.sum()),
                             "examples": np.flatnonzero(masked).tolist(),
                             "square_ran_on": int(np.sum(square[0] >= 0))})

    def ablation_radius(self) -> float:
        """The L-inf radius of the convergence ladders: ``protocol.ablation_eps`` when given,
        else the largest L-inf radius whose ComDefend strict worst case (the cascade, run
        before) is at least ``ABLATION_MIN_ROBUST``, else ``protocol.headline_eps``."""
        protocol = self.protocol
        if protocol.ablation_eps is not None:
            return float(protocol.ablation_eps)
        standing = [worst["eps"] for worst in self.worst
                    if worst["defense"] == "comdefend" and worst["norm"] == "linf"
                    and worst["robust_acc_strict"] >= ABLATION_MIN_ROBUST]
        return float(max(standing)) if standing else float(protocol.headline_eps)

    def _run_ablation(self, say):
        protocol = self.protocol
        eps = self.ablation_radius()
        count = min(protocol.ablation_examples, len(self.images))
        indices = np.arange(count)
        attacked = self._attacked("bpda_eot", "comdefend")
        ladders = convergence.rungs(protocol, self.randomized)
        robust = {}
        for steps, eot, restarts in sorted({s for rungs in ladders.values() for s in rungs},
                                           key=lambda s: (s[0] * s[1] * s[2], s)):
            say(f"convergence steps={steps} eot={eot} restarts={restarts}")
            tag = f"apgd-ce/steps={steps}/eot={eot}" + (f"/restarts={restarts}"
                                                         if restarts != 1 else "")
            seed = seeds.attack_seed(protocol.seed, tag, "ce", "bpda_eot", "linf", eps,
                                     "comdefend")
            result = self._apgd(attacked, indices, "linf", eps, "ce", eot,
                                seed, steps=steps, label="ablation/comdefend",
                                restarts=restarts)
            _, correct, rates, _ = self._verify("comdefend", attack_points(result), indices,
                                                eps, "linf")
            summary = scoring.summarize(correct)
            robust[(steps, eot, restarts)] = rates == 0
            self.ablation.append({"steps": steps, "eot": eot, "restarts": restarts, "n": count,
                                  "eps": eps,
                                  "robust_acc_mean": summary["mean_acc"],
                                  "robust_acc_majority": summary["majority_acc"],
                                  "robust_acc_strict": summary["strict_acc"],
                                  "ci_low": summary["ci_low"], "ci_high": summary["ci_high"],
                                  "robust": rates == 0})
        self.plateau = convergence.verdict(ladders, robust, PLATEAU_SHARE)

    # ------------------------------------------------------------------------ results
    def ablation_summary(self) -> list[dict]:
        """Ablation rows, each with ``cumulative_worst_case``: the strict worst case over the
        main protocol at the ablation's eps and every ablation run up to this one (in order of
        increasing budget) on the ablation examples."""
        if not self.ablation:
            return []
        count = self.ablation[0]["n"]
        robust = np.ones(count, bool)
        for worst in self.worst:
            if (worst["defense"] == "comdefend" and worst["norm"] == "linf"
                    and math.isclose(worst["eps"], self.ablation[0]["eps"])):
                kept = np.zeros(len(self.images), bool)
                kept[worst["robust_examples"]] = True
                robust &= kept[:count]
        rows = []
        for entry in sorted(self.ablation, key=lambda e: (e["steps"] * e["eot"] * e["restarts"],
                                                          e["steps"], e["eot"])):
            robust &= entry["robust"]
            row = {key: value for key, value in entry.items() if key != "robust"}
            row["cumulative_worst_case"] = float(robust.mean())
            rows.append(row)
        return rows

    def masking_warnings(self) -> list[str]:
        return [f"{m['defense']} {m['norm']} eps={m['eps']:g}: Square broke {m['count']} "
                f"example(s) that every gradient attack on the deployed pipeline missed "
                f"(examples {m['examples']}): the gradients are masked there"
                for m in self.masking if m["count"]]

    def results(self) -> dict:
        failed = [c for c in self.gradient_checks if not c["ok"]]
        return {"rows": self.rows, "worst_case": self.worst,
                "ablation": self.ablation_summary(), "clean": self.clean,
                "gradient_checks": self.gradient_checks, "gradient_checks_ok": not failed,
                "masking": self.masking, "masking_warnings": self.masking_warnings(),
                "convergence": self.convergence, "convergence_verdict": self.plateau,
                "randomized": self.randomized,
                "cascade": not self.protocol.per_attack_rows, "n": int(len(self.images)),
                "settings": settings_of(self.protocol)}


def best_baseline(worst_rows: list[dict], headline_eps: float, norm: str = "linf",
                  key: str = "robust_acc_strict") -> str | None:
    """The baseline defense with the highest (strict) worst-case accuracy at the headline eps;
    ties (for example all at 0) go to the highest mean over every ``norm`` eps."""
    rows = [r for r in worst_rows if r["defense"] in BASELINE_DEFENSES and r["norm"] == norm]
    names = sorted({r["defense"] for r in rows})
    if not names:
        return None

    def rank(name):
        own = [r for r in rows if r["defense"] == name]
        headline = [r[key] for r in own if math.isclose(r["eps"], headline_eps)]
        return (headline[0] if headline else -1.0, float(np.mean([r[key] for r in own])))
    return max(names, key=rank)

