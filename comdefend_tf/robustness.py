"""An adaptive robustness evaluation of ComDefend: threat models, the protocol, the report rows.

Threat models (how the attacker sees the pipeline ``classifier(purifier(x))``):

* ``oblivious`` (the paper's setting): APGD on the classifier alone; the examples are then
  purified and classified.
* ``bpda_eot``: APGD on the whole pipeline with the deployed forward pass (code noise and the
  config's code path, hard bits for the RGB release) and the straight-through gradient of the
  threshold (BPDA), the loss gradient averaged over K noise draws per step (EOT).
* ``soft_path``: APGD on the pipeline with the soft code ``sigmoid(noisy logits)`` in place of
  the threshold (the exact gradient of a smooth surrogate), EOT over K draws; the examples are
  scored on the deployed (hard) pipeline.
* ``fixed_noise``: the attacker knows each example's noise draw and attacks
  ``forward(x, noise=draw)``. Scored twice: with that same draw (an upper bound on the attacker
  that isolates the compression from the randomness, reported apart) and with fresh draws
  (the deployed defense, which counts towards the worst case).
* ``transfer``: examples made by APGD on a second, independently trained classifier, then
  purified and classified (the undefended-classifier source is ``oblivious``).
* ``gradient_free``: the Square attack (L-inf) on the whole pipeline, forward passes only. If
  it beats every gradient attack the gradients were masked, and the report says so.

Baseline defenses (JPEG, bit depth, median; ``comdefend_tf.defenses``) are attacked
``oblivious`` and ``bpda_eot`` (deterministic, so EOT 1); the undefended classifier by APGD and
Square directly (threat model ``white_box``).

Scoring (``comdefend_tf.scoring``): each adversarial set is classified K times (once for a
deterministic defense); rows give the mean accuracy over draws, the majority-vote accuracy and
its 95% Wilson interval. The worst case per defense and eps counts an example robust only if
it survives (by majority vote) every attack of every threat model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from comdefend_tf import defenses as defenses_lib
from comdefend_tf import scoring
from comdefend_tf.attacks import apgd as apgd_lib
from comdefend_tf.attacks import square as square_lib

THREAT_MODELS = ("oblivious", "bpda_eot", "soft_path", "fixed_noise", "transfer",
                 "gradient_free")
BASELINE_DEFENSES = ("jpeg", "bit_depth", "median")
DEFENSES = ("none", "comdefend") + BASELINE_DEFENSES
NORMS = apgd_lib.NORMS
ROW_COLUMNS = ("threat_model", "attack", "norm", "eps", "steps", "eot", "restarts", "defense",
               "n", "clean_acc", "robust_acc_mean", "robust_acc_majority", "ci_low", "ci_high")
WORST_CASE = "worst_case"
FIXED_NOISE_SAME_DRAW = "fixed_noise_same_draw"


def default_eps(image_shape) -> dict:
    """Default radii per norm for an image shape ``(H, W, C)``: 28x28 (and smaller) grayscale
    digits: L-inf 0.1, 0.2, 0.3 (headline 0.3), L2 2.0; RGB: L-inf 2/255, 8/255 (headline),
    16/255, L2 0.5. Returns ``{"linf": [...], "l2": [...], "headline": eps, "sanity": [...]}``
    where ``sanity`` are larger L-inf radii at which accuracy should reach about 0."""
    channels = image_shape[-1]
    if channels == 1:
        return {"linf": [0.1, 0.2, 0.3], "l2": [2.0], "headline": 0.3, "sanity": [0.4, 0.5]}
    return {"linf": [2 / 255, 8 / 255, 16 / 255], "l2": [0.5], "headline": 8 / 255,
            "sanity": [32 / 255, 64 / 255]}


@dataclasses.dataclass
class Protocol:
    """Settings of one robustness evaluation (see ``train/robustness_report.py`` for help).

    ``eps`` maps a norm (``linf``/``l2``) to its radii; ``sanity_eps`` are extra L-inf radii run
    with the reduced protocol (APGD-CE, ``oblivious`` and ``bpda_eot``) for the accuracy-vs-eps
    curve; ``eot_samples`` is K for attacks and scoring of a randomized defense;
    ``ablation_steps`` / ``ablation_eot`` run ComDefend ``bpda_eot`` APGD-CE at
    ``headline_eps`` on the first ``ablation_examples`` examples.
    """

    eps: dict
    headline_eps: float
    sanity_eps: Sequence[float] = ()
    steps: int = 50
    eot_samples: int = 5
    restarts: int = 1
    square_queries: int = 1000
    losses: Sequence[str] = ("ce", "dlr")
    threat_models: Sequence[str] = THREAT_MODELS
    defenses: Sequence[str] = DEFENSES
    ablation_steps: Sequence[int] = (50, 100, 200)
    ablation_eot: Sequence[int] = (1, 5, 20)
    ablation_examples: int = 50
    batch_size: int = 100
    seed: int = 0

    def __post_init__(self):
        for norm, radii in self.eps.items():
            if norm not in NORMS:
                raise ValueError(f"unknown norm {norm!r}; choose from {', '.join(NORMS)}")
            for eps in radii:
                if not eps > 0 or (norm == "linf" and eps > 1):
                    raise ValueError(f"{norm} eps must be in (0, 1] for linf and > 0 for l2, "
                                     f"got {eps}")
        for eps in self.sanity_eps:
            if not 0 < eps <= 1:
                raise ValueError(f"sanity eps must be L-inf radii in (0, 1], got {eps}")
        for name in self.threat_models:
            if name not in THREAT_MODELS:
                raise ValueError(f"unknown threat model {name!r}; choose from "
                                 f"{', '.join(THREAT_MODELS)}")
        for name in self.defenses:
            if name not in DEFENSES:
                raise ValueError(f"unknown defense {name!r}; choose from {', '.join(DEFENSES)}")
        for loss in self.losses:
            if loss not in apgd_lib.LOSSES:
                raise ValueError(f"unknown loss {loss!r}; choose from {apgd_lib.LOSSES}")
        positive = {"steps": self.steps, "eot_samples": self.eot_samples,
                    "restarts": self.restarts, "square_queries": self.square_queries,
                    "batch_size": self.batch_size}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if any(v < 1 for v in tuple(self.ablation_steps) + tuple(self.ablation_eot)):
            raise ValueError("ablation steps and EOT samples must be >= 1")


@dataclasses.dataclass
class Job:
    """One unit of work (an attack run or a scoring pass); ``cost`` is a rough relative time
    (model calls) for progress bars."""

    description: str
    cost: float
    run: Callable[[], None]


@dataclasses.dataclass
class Models:
    """What is evaluated: the classifier, the ComDefend purifier (or None), the second
    classifier for transfer (or None) and the baseline layers by name."""

    classifier: object
    purifier: object = None
    second_classifier: object = None
    baselines: dict = dataclasses.field(default_factory=dict)


def _logits_fn(classifier, defense=None, **forward_options):
    if defense is None:
        return lambda images: classifier(images, training=False)
    if forward_options:
        return lambda images: classifier(defense.forward(images, **forward_options)["purified"],
                                         training=False)
    return lambda images: classifier(defense(images), training=False)


class Evaluation:
    """Runs the protocol and holds its results (rows, worst cases, ablation, sanity).

    Use ``jobs()`` to get the work list (run each ``job.run()``, in order, e.g. under a
    progress bar), then ``results()``.
    """

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
        for name in protocol.defenses:
            if name in BASELINE_DEFENSES and name not in models.baselines:
                raise ValueError(f"baseline defense {name!r} missing from models.baselines")
        self.models = models
        self.images = images
        self.labels = labels
        self.protocol = protocol
        self.randomized = (models.purifier is not None
                           and defenses_lib.is_randomized(models.purifier))
        self.rows: list[dict] = []
        self.survived: dict = {}  # (defense, norm, eps) -> {name: bool [N]}
        self.clean: dict = {}
        self.gradient_checks: list[dict] = []
        self.ablation: list[dict] = []
        self.convergence: dict = {}
        self.cache: dict = {}

    # ----------------------------------------------------------------------- helpers
    def _draws(self, defense_name: str) -> int:
        return self.protocol.eot_samples if (defense_name == "comdefend"
                                             and self.randomized) else 1

    def _defense(self, name):
        if name == "none":
            return None
        if name == "comdefend":
            return self.models.purifier
        return self.models.baselines[name]

    def _predict_fn(self, defense_name):
        return tf.function(_logits_fn(self.models.classifier, self._defense(defense_name)),
                           reduce_retracing=True)

    def _score(self, defense_name, adversarial, images_index=None, same_draw_noise=None):
        labels = self.labels if images_index is None else self.labels[images_index]
        if same_draw_noise is not None:
            predict = _indexed_fixed_noise_fn(self.models.classifier, self.models.purifier,
                                              same_draw_noise)
            logits = predict(tf.constant(adversarial), tf.range(len(adversarial)))
            return (np.asarray(logits).argmax(-1) == labels)[None, :]
        return scoring.correct_per_draw(self._predict_fn(defense_name), adversarial, labels,
                                        self._draws(defense_name), self.protocol.batch_size)

    def _record(self, threat_model, attack, norm, eps, steps, eot, restarts, defense_name,
                correct, in_worst_case=True):
        summary = scoring.summarize(correct)
        row = {"threat_model": threat_model, "attack": attack, "norm": norm,
               "eps": float(eps), "steps": int(steps), "eot": int(eot),
               "restarts": int(restarts), "defense": defense_name, "n": summary["n"],
               "clean_acc": self.clean[defense_name]["mean_acc"],
               "robust_acc_mean": summary["mean_acc"],
               "robust_acc_majority": summary["majority_acc"],
               "ci_low": summary["ci_low"], "ci_high": summary["ci_high"]}
        self.rows.append(row)
        if in_worst_case:
            key = (defense_name, norm, float(eps))
            self.survived.setdefault(key, {})[f"{threat_model}/{attack}"] = \
                scoring.robust_by_majority(correct)
        return row

    def _apgd(self, model, norm, eps, loss, eot, steps=None, images=None, labels=None,
              index_aware=False, label=""):
        protocol = self.protocol
        result = apgd_lib.apgd(
            model, self.images if images is None else images,
            self.labels if labels is None else labels, eps, norm=norm,
            steps=steps or protocol.steps, loss=loss, restarts=protocol.restarts,
            eot_iter=eot, seed=protocol.seed, batch_size=protocol.batch_size,
            index_aware=index_aware)
        check = scoring.gradient_check(result.zero_gradient_fraction, result.nonfinite_gradients)
        check.update(attack=label, norm=norm, eps=float(eps), loss=loss, eot=int(eot),
                     gradient_calls=result.gradient_calls)
        self.gradient_checks.append(check)
        return result

    # -------------------------------------------------------------------------- jobs
    def jobs(self) -> list[Job]:
        protocol = self.protocol
        jobs = [Job("clean accuracy", 1, self._clean_job)]
        runs = [(norm, eps, True) for norm, radii in protocol.eps.items() for eps in radii]
        runs += [("linf", eps, False) for eps in protocol.sanity_eps
                 if eps not in protocol.eps.get("linf", ())]
        for norm, eps, full in runs:
            jobs.extend(self._eps_jobs(norm, float(eps), full))
        if protocol.ablation_steps or protocol.ablation_eot:
            if "comdefend" in protocol.defenses:
                jobs.extend(self._ablation_jobs())
        return jobs

    def _clean_job(self):
        for name in self.protocol.defenses:
            self.clean[name] = scoring.summarize(self._score(name, self.images))

    def _eps_jobs(self, norm, eps, full):
        protocol = self.protocol
        losses = protocol.losses if full else ("ce",)
        threat_models = protocol.threat_models if full else tuple(
            t for t in protocol.threat_models if t in ("oblivious", "bpda_eot"))
        steps, restarts, K = protocol.steps, protocol.restarts, protocol.eot_samples
        n = len(self.images)
        jobs = []
        tag = f"{norm} eps={eps:g}"
        classifier = self.models.classifier

        # Examples made on the classifier alone: the undefended white-box attack and the
        # oblivious attack on every defense.
        for loss in losses:
            def run(loss=loss):
                result = self._apgd(_logits_fn(classifier), norm, eps, loss, 1,
                                    label="classifier")
                self.cache[("classifier", norm, eps, loss)] = result.adversarial
                if "none" in protocol.defenses:
                    self._record("white_box", f"apgd-{loss}", norm, eps, steps, 1, restarts,
                                 "none", self._score("none", result.adversarial))
                if "oblivious" in threat_models:
                    for name in protocol.defenses:
                        if name == "none":
                            continue
                        self._record("oblivious", f"apgd-{loss}", norm, eps, steps, 1,
                                     restarts, name, self._score(name, result.adversarial))
            jobs.append(Job(f"{tag} APGD-{loss.upper()} on the classifier", steps * n / 4, run))
        square_ok = full and norm == "linf" and "gradient_free" in threat_models
        if square_ok and "none" in protocol.defenses:
            def run_square_none():
                adversarial, _ = square_lib.square_linf(_logits_fn(classifier), self.images,
                                                        self.labels, eps,
                                                        protocol.square_queries,
                                                        seed=protocol.seed)
                self._record("white_box", "square", norm, eps, protocol.square_queries, 1, 1,
                             "none", self._score("none", adversarial))
            jobs.append(Job(f"{tag} Square on the classifier", protocol.square_queries * n / 12,
                            run_square_none))

        if "comdefend" in protocol.defenses:
            jobs.extend(self._comdefend_jobs(norm, eps, losses, threat_models, square_ok, tag))
        if "bpda_eot" in threat_models:
            for name in protocol.defenses:
                if name not in BASELINE_DEFENSES:
                    continue
                for loss in losses:
                    def run(name=name, loss=loss):
                        model = _logits_fn(classifier, self._defense(name))
                        result = self._apgd(model, norm, eps, loss, 1, label=f"bpda/{name}")
                        self._record("bpda_eot", f"apgd-{loss}", norm, eps, steps, 1, restarts,
                                     name, self._score(name, result.adversarial))
                    jobs.append(Job(f"{tag} BPDA APGD-{loss.upper()} on {name}",
                                    steps * n / 3, run))
        jobs.append(Job(f"{tag} worst case", 0.1, lambda: None))
        return jobs

    def _comdefend_jobs(self, norm, eps, losses, threat_models, square_ok, tag):
        protocol = self.protocol
        steps, restarts, n = protocol.steps, protocol.restarts, len(self.images)
        K = protocol.eot_samples if self.randomized else 1
        classifier, purifier = self.models.classifier, self.models.purifier
        jobs = []
        if "bpda_eot" in threat_models:
            for loss in losses:
                def run(loss=loss):
                    result = self._apgd(_logits_fn(classifier, purifier), norm, eps, loss, K,
                                        label="bpda_eot/comdefend")
                    if math.isclose(eps, protocol.headline_eps) and loss == "ce":
                        self.convergence[f"{norm} eps={eps:g}"] = {
                            "robust_curve": result.robust_curve.tolist(),
                            "loss_curve": result.loss_curve.tolist(),
                            "step_sizes": result.step_sizes.tolist()}
                    self._record("bpda_eot", f"apgd-{loss}", norm, eps, steps, K, restarts,
                                 "comdefend", self._score("comdefend", result.adversarial))
                jobs.append(Job(f"{tag} BPDA+EOT APGD-{loss.upper()} on ComDefend",
                                steps * K * n, run))
        if "soft_path" in threat_models:
            def run_soft():
                model = _logits_fn(classifier, purifier, mode="soft")
                result = self._apgd(model, norm, eps, "ce", K, label="soft_path/comdefend")
                self._record("soft_path", "apgd-ce", norm, eps, steps, K, restarts, "comdefend",
                             self._score("comdefend", result.adversarial))
            jobs.append(Job(f"{tag} soft-path APGD-CE on ComDefend", steps * K * n, run_soft))
        if "fixed_noise" in threat_models and self.randomized:
            def run_fixed():
                noise = self._fixed_noise()
                model = _indexed_fixed_noise_fn(classifier, purifier, noise, compiled=False)
                result = self._apgd(model, norm, eps, "ce", 1, index_aware=True,
                                    label="fixed_noise/comdefend")
                self._record("fixed_noise", "apgd-ce", norm, eps, steps, 1, restarts,
                             "comdefend", self._score("comdefend", result.adversarial))
                self._record(FIXED_NOISE_SAME_DRAW, "apgd-ce", norm, eps, steps, 1, restarts,
                             "comdefend", self._score("comdefend", result.adversarial,
                                                      same_draw_noise=noise),
                             in_worst_case=False)
            jobs.append(Job(f"{tag} fixed-noise APGD-CE on ComDefend", steps * n, run_fixed))
        if "transfer" in threat_models:
            def run_transfer():
                result = self._apgd(_logits_fn(self.models.second_classifier), norm, eps, "ce",
                                    1, label="second_classifier")
                for name in protocol.defenses:
                    self._record("transfer", "apgd-ce(2nd clf)", norm, eps, steps, 1, restarts,
                                 name, self._score(name, result.adversarial))
            jobs.append(Job(f"{tag} transfer from the second classifier", steps * n / 4,
                            run_transfer))
        if square_ok:
            def run_square():
                adversarial, _ = square_lib.square_linf(
                    _logits_fn(classifier, purifier), self.images, self.labels, eps,
                    protocol.square_queries, seed=protocol.seed)
                self._record("gradient_free", "square", norm, eps, protocol.square_queries, 1,
                             1, "comdefend", self._score("comdefend", adversarial))
            jobs.append(Job(f"{tag} Square on ComDefend", protocol.square_queries * n / 3,
                            run_square))
        return jobs

    def _fixed_noise(self):
        if "fixed_noise" not in self.cache:
            purifier = self.models.purifier
            shape = purifier.encoder.compute_output_shape((None,) + self.images.shape[1:])
            generator = np.random.default_rng(self.protocol.seed + 1)
            self.cache["fixed_noise"] = (purifier.config.inference_noise_std * generator.normal(
                size=(len(self.images),) + tuple(shape[1:]))).astype(np.float32)
        return self.cache["fixed_noise"]

    def _ablation_jobs(self):
        protocol = self.protocol
        count = min(protocol.ablation_examples, len(self.images))
        images, labels = self.images[:count], self.labels[:count]
        classifier, purifier = self.models.classifier, self.models.purifier
        settings = sorted({(s, protocol.eot_samples) for s in protocol.ablation_steps}
                          | {(protocol.steps, k) for k in protocol.ablation_eot})
        if not self.randomized:
            settings = sorted({(s, 1) for s, _ in settings})
        jobs = []
        for steps, eot in settings:
            def run(steps=steps, eot=eot):
                result = self._apgd(_logits_fn(classifier, purifier), "linf",
                                    protocol.headline_eps, "ce", eot, steps=steps, images=images,
                                    labels=labels, label="ablation/comdefend")
                correct = scoring.correct_per_draw(self._predict_fn("comdefend"),
                                                   result.adversarial, labels,
                                                   self._draws("comdefend"),
                                                   protocol.batch_size)
                summary = scoring.summarize(correct)
                self.ablation.append({"steps": steps, "eot": eot, "n": count,
                                      "robust_acc_mean": summary["mean_acc"],
                                      "robust_acc_majority": summary["majority_acc"],
                                      "ci_low": summary["ci_low"], "ci_high": summary["ci_high"],
                                      "robust": scoring.robust_by_majority(correct)})
            jobs.append(Job(f"ablation steps={steps} eot={eot}", steps * eot * count, run))
        return jobs

    # ----------------------------------------------------------------------- results
    def worst_cases(self) -> list[dict]:
        rows = []
        for (defense_name, norm, eps), survived in sorted(self.survived.items(),
                                                          key=lambda item: (item[0][1],
                                                                            item[0][2],
                                                                            item[0][0])):
            worst = scoring.worst_case(survived)
            rows.append({"threat_model": WORST_CASE, "attack": "all", "norm": norm, "eps": eps,
                         "defense": defense_name, "n": worst["n"],
                         "clean_acc": self.clean[defense_name]["mean_acc"],
                         "robust_acc": worst["acc"], "ci_low": worst["ci_low"],
                         "ci_high": worst["ci_high"], "attacks": sorted(survived),
                         "decisive": worst["decisive"]})
        return rows

    def ablation_summary(self) -> list[dict]:
        """Ablation rows, each with ``cumulative_worst_case``: the worst case over the main
        protocol's headline-eps attacks and every ablation run up to this one (in order of
        increasing budget) on the ablation examples."""
        if not self.ablation:
            return []
        base = self.survived.get(("comdefend", "linf", float(self.protocol.headline_eps)), {})
        count = self.ablation[0]["n"]
        robust = np.ones(count, bool)
        for values in base.values():
            robust &= values[:count]
        rows = []
        for entry in sorted(self.ablation, key=lambda e: (e["steps"] * e["eot"], e["steps"])):
            robust &= entry["robust"]
            row = {key: value for key, value in entry.items() if key != "robust"}
            row["cumulative_worst_case"] = float(robust.mean())
            rows.append(row)
        return rows

    def masking_warnings(self) -> list[str]:
        warnings = []
        for norm, eps in {(row["norm"], row["eps"]) for row in self.rows}:
            for defense_name in self.protocol.defenses:
                matching = [r for r in self.rows if r["norm"] == norm and r["eps"] == eps
                            and r["defense"] == defense_name
                            and r["threat_model"] != FIXED_NOISE_SAME_DRAW]
                square = [r for r in matching if r["attack"] == "square"]
                gradient = [r for r in matching if r["attack"].startswith("apgd")
                            and r["threat_model"] in ("bpda_eot", "white_box")]
                if square and gradient:
                    best_gradient = min(r["robust_acc_majority"] for r in gradient)
                    if square[0]["robust_acc_majority"] < best_gradient:
                        warnings.append(
                            f"{defense_name} {norm} eps={eps:g}: Square (gradient-free) "
                            f"{100 * square[0]['robust_acc_majority']:.1f}% beats the best "
                            f"gradient attack {100 * best_gradient:.1f}%: the gradients are "
                            f"masked there")
        return sorted(warnings)

    def results(self) -> dict:
        failed = [c for c in self.gradient_checks if not c["ok"]]
        return {"rows": self.rows, "worst_case": self.worst_cases(),
                "ablation": self.ablation_summary(), "clean": self.clean,
                "gradient_checks": self.gradient_checks,
                "gradient_checks_ok": not failed, "masking_warnings": self.masking_warnings(),
                "convergence": self.convergence, "randomized": self.randomized,
                "n": int(len(self.images))}


def _indexed_fixed_noise_fn(classifier, purifier, noise: np.ndarray, compiled: bool = True):
    """``(images, example_index) -> logits`` of the pipeline with each example's own noise."""
    noise = tf.constant(noise)

    def logits(images, index):
        draw = tf.gather(noise, index)
        return classifier(purifier.forward(images, noise=draw)["purified"], training=False)
    return tf.function(logits, reduce_retracing=True) if compiled else logits


def best_baseline(worst_rows: list[dict], headline_eps: float, norm: str = "linf") -> str | None:
    """The baseline defense with the highest worst-case accuracy at the headline eps; ties
    (for example all at 0) go to the highest mean worst-case accuracy over every ``norm`` eps."""
    rows = [r for r in worst_rows if r["defense"] in BASELINE_DEFENSES and r["norm"] == norm]
    names = sorted({r["defense"] for r in rows})
    if not names:
        return None

    def rank(name):
        own = [r for r in rows if r["defense"] == name]
        headline = [r["robust_acc"] for r in own if math.isclose(r["eps"], headline_eps)]
        return (headline[0] if headline else -1.0, float(np.mean([r["robust_acc"] for r in own])))
    return max(names, key=rank)
