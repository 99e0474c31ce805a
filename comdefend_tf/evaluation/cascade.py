"""The adaptive protocol's attacks (``adaptive.Evaluation`` runs and scores them): per defense,
norm and eps, the ordered list of ``CascadeAttack``s, each with its attacked callable
(``threat_models.build``), its seed (``seeds.attack_seed``) and its EOT draws.

Order (cheap and strong first): the defense-independent images (``white_box`` on ``none``,
``oblivious``, ``transfer``: made once on every example, only scored per defense), then every
other applicable threat model's APGD with each loss (CE, APGD-T, DLR; ``bpda_smooth`` once
per temperature of ``protocol.temperatures``; APGD-T only under
``protocol.targeted_threat_models``), then Square (``gradient_free``). The attacks query
``search_defense`` (a bfloat16 copy of a float32 ComDefend when the protocol asks for it);
every verdict is the deployed defense's. ``full=False``
(the sanity radii) runs APGD-CE ``oblivious``/``bpda_eot`` only. ``run(indices)`` of an
attack returns a list of candidate sets, each float32 ``[len(indices), H, W, C]`` in [0, 1]:
the attack's final points and the points a searched draw misclassified (``search_defense``)
(``attack_points``); the evaluation verifies every one. Every APGD run's gradient check
(including the share of the code its surrogate passes gradient through) is recorded in
``gradient_checks``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from comdefend_tf.attacks import apgd as apgd_lib
from comdefend_tf.attacks import square as square_lib
from comdefend_tf.evaluation import baselines, scoring, seeds
from comdefend_tf.evaluation import threat_models as threat_models_lib
from comdefend_tf.training import precision

ATTACK_NAMES = {"ce": "apgd-ce", "t": "apgd-t", "dlr": "apgd-dlr"}


@dataclasses.dataclass
class CascadeAttack:
    """One entry of a defense's cascade: ``run(indices)`` returns the adversarial images
    (float32 ``[len(indices), H, W, C]``) for those examples."""

    threat_model: str
    attack: str
    steps: int
    eot: int
    restarts: int
    run: Callable[[np.ndarray], list]
    same_draw_noise: np.ndarray | None = None  # fixed_noise: also scored with the attacker's draw
    temperature: float | None = None  # bpda_smooth's T

    @property
    def label(self) -> str:
        """``threat_model/attack``, the temperature included (``bpda_smooth(T=10)/apgd-ce``)."""
        return (f"{threat_models_lib.variant_label(self.threat_model, self.temperature)}/"
                f"{self.attack}")


def adversarial_images(result) -> np.ndarray:
    """The adversarial images of an ``APGDResult`` or a ``SquareResult``."""
    return np.asarray(result.adversarial, np.float32)


def attack_points(result) -> list:
    """Every point set of an ``APGDResult`` or ``SquareResult`` to verify: the final points,
    then the candidates (points a searched draw misclassified) where there are any."""
    points = [adversarial_images(result)]
    failures = getattr(result, "candidate_failures", None)
    if failures is not None and np.any(failures > 0):
        points.append(np.asarray(result.candidates, np.float32))
    return points


class AttackPlan:
    """The attacks of one adaptive evaluation: ``models`` (``adaptive.Models``) on ``images``
    float32 ``[N, H, W, C]`` in [0, 1] with ``labels`` int64 ``[N]``, under ``protocol``
    (``adaptive.Protocol``); inputs are checked by ``adaptive.Evaluation``."""

    def __init__(self, models, images: np.ndarray, labels: np.ndarray, protocol):
        self.models = models
        self.images = images
        self.labels = labels
        self.protocol = protocol
        self.randomized = (models.purifier is not None
                           and baselines.is_randomized(models.purifier))
        self.gradient_checks: list[dict] = []
        self.convergence: dict = {}
        self._shared: dict = {}
        self._attacked_models: dict = {}
        self._fixed_noise = None
        self._search_purifier = None

    def defense(self, name):
        if name == "none":
            return None
        if name == "comdefend":
            return self.models.purifier
        if name in self.models.baselines:
            return self.models.baselines[name]
        return self.models.extra[name]

    def search_defense(self, name):
        """The defense the attacks query and differentiate: ``defense(name)``, except that a
        float32 ComDefend becomes a bfloat16 copy when ``protocol.search_precision`` is
        ``bfloat16`` (made once). Verdicts (``Evaluation.score``) stay the deployed defense's."""
        defense = self.defense(name)
        if (name != "comdefend" or self.protocol.search_precision != "bfloat16"
                or precision.model_precision(defense) != "float32"):
            return defense
        if self._search_purifier is None:
            # Its own noise seed: the search never replays the deployed purifier's draws.
            self._search_purifier = precision.convert_model(
                defense, "bfloat16", noise_seed=seeds.attack_seed(
                    self.protocol.seed, "search", None, "bfloat16", "-", 0.0, "comdefend"))
        return self._search_purifier

    def randomized_defense(self, defense_name: str) -> bool:
        """Whether the defense draws fresh noise per call (``baselines.is_randomized``: a
        property of the layer, not of its name)."""
        defense = self.defense(defense_name)
        return defense is not None and baselines.is_randomized(defense)

    def draws(self, defense_name: str) -> int:
        """Verification draws per point: ``protocol.verify_draws`` on a randomized defense
        (ComDefend with noise, a LiteRT purifier that draws noise), 1 on a deterministic one."""
        return self.protocol.verify_draws if self.randomized_defense(defense_name) else 1

    def attack_draws(self, defense_name: str) -> int:
        """EOT draws of the attacks: ``protocol.eot_samples`` on a randomized defense."""
        return self.protocol.eot_samples if self.randomized_defense(defense_name) else 1

    def fixed_noise(self):
        """Per-example noise draws of the ``fixed_noise`` attacker, float32 ``[N, h, w,
        code_channels]`` (seeded by the protocol's seed)."""
        if self._fixed_noise is None:
            purifier = self.models.purifier
            shape = purifier.encoder.compute_output_shape((None,) + self.images.shape[1:])
            generator = np.random.default_rng(seeds.attack_seed(
                self.protocol.seed, "noise", None, "fixed_noise", "-", 0.0, "comdefend"))
            self._fixed_noise = (purifier.config.inference_noise_std * generator.normal(
                size=(len(self.images),) + tuple(shape[1:]))).astype(np.float32)
        return self._fixed_noise

    def _apgd(self, attacked, indices, norm, eps, loss, eot, seed, steps=None, label="",
              restarts=None):
        protocol = self.protocol
        images, labels = self.images[indices], self.labels[indices]
        model = attacked.model
        if attacked.index_aware:
            noise = self.fixed_noise()[indices]
            model = threat_models_lib.fixed_noise_fn(self.models.classifier,
                                                     self.search_defense("comdefend"), noise)
        common = dict(eps=eps, norm=norm, steps=steps or protocol.steps, eot_iter=eot,
                      seed=seed, batch_size=protocol.batch_size, judge=attacked.judge,
                      draws_per_call=protocol.draws_per_call)
        if attacked.index_aware:
            common["index_aware"] = True
        if loss == "t":
            result = apgd_lib.apgd_targeted(model, images, labels,
                                            n_target_classes=protocol.target_classes, **common)
        else:
            result = apgd_lib.apgd(model, images, labels, loss=loss,
                                   restarts=restarts or protocol.restarts, **common)
        share = None if attacked.code_share is None else attacked.code_share(images)
        check = scoring.gradient_check(result.zero_gradient_fraction, result.nonfinite_gradients,
                                       code_share=share)
        check.update(attack=label, norm=norm, eps=float(eps), loss=loss, eot=int(eot),
                     gradient_calls=int(result.gradient_calls), examples=int(len(indices)))
        self.gradient_checks.append(check)
        return result

    def _square(self, model, indices, norm, eps, eot, seed, confirm_draws=0):
        result = square_lib.square(model, self.images[indices], self.labels[indices], eps,
                                   norm=norm, queries=self.protocol.square_queries,
                                   eot_draws=eot, seed=seed,
                                   batch_size=self.protocol.batch_size,
                                   confirm_draws=confirm_draws)
        return attack_points(result)

    def _attacked(self, threat_model, defense_name, temperature=None):
        """One attacked callable per (threat model, defense, temperature), reused at every
        eps (the attacks cache their compiled steps per model)."""
        key = (threat_model, defense_name, temperature)
        if key not in self._attacked_models:
            self._attacked_models[key] = threat_models_lib.build(
                threat_model, self.models.classifier, self.search_defense(defense_name),
                second_classifier=self.models.second_classifier,
                fixed_noise=self.fixed_noise() if threat_model == "fixed_noise" else None,
                temperature=temperature)
        return self._attacked_models[key]

    def _shared_run(self, threat_model, loss, norm, eps, steps=None):
        """Adversarial images of a defense-independent attack on every example (made once)."""
        key = (threat_model, loss, norm, float(eps), steps)
        if key not in self._shared:
            source = "second_classifier" if threat_model == "transfer" else "classifier"
            attacked = self._attacked(threat_model, "none")
            seed = seeds.attack_seed(self.protocol.seed, ATTACK_NAMES[loss], loss, threat_model,
                                     norm, eps, source)
            result = self._apgd(attacked, np.arange(len(self.images)), norm, eps, loss, 1, seed,
                                steps=steps, label=f"{threat_model}/{source}")
            self._shared[key] = attack_points(result)
        return self._shared[key]

    def cascade(self, defense_name: str, norm: str, eps: float, full: bool) -> list:
        """The ordered attacks on one defense at one radius (see the module docstring)."""
        protocol = self.protocol
        defense = self.defense(defense_name)
        losses = protocol.losses if full else ["ce"]
        chosen = protocol.threat_models if full else [
            t for t in protocol.threat_models if t in ("oblivious", "bpda_eot")]
        undefended = defense_name == "none"
        candidates = (["white_box"] if undefended else []) + [
            t for t in chosen if t != "gradient_free"]
        applicable = [t for t in candidates if threat_models_lib.applies(t, defense_name,
                                                                         defense)]
        K = self.attack_draws(defense_name)
        attacks = []
        # Defense-independent images first: made once for every defense, only scored here.
        for loss in losses:
            for threat_model in applicable:
                if loss == "t" and not protocol.targeted(threat_model):
                    continue
                if threat_model in ("white_box", "oblivious", "transfer"):
                    source = "oblivious" if threat_model == "white_box" else threat_model
                    attacks.append(CascadeAttack(
                        threat_model, ATTACK_NAMES[loss], protocol.steps, 1, protocol.restarts,
                        lambda indices, source=source, loss=loss: [
                            points[indices] for points in self._shared_run(
                                source, loss, norm, eps)]))
        variants = []
        for threat_model in applicable:
            if threat_model in ("white_box", "oblivious", "transfer"):
                continue
            temperatures = (protocol.temperatures if threat_model
                            in threat_models_lib.TEMPERATURE_DEPENDENT else [None])
            variants += [(threat_model, temperature) for temperature in temperatures]
        for loss in losses:
            for threat_model, temperature in variants:
                fixed = threat_model == "fixed_noise"
                attacked = self._attacked(threat_model, defense_name, temperature)
                eot = 1 if fixed else K
                name = threat_models_lib.variant_label(threat_model, temperature)
                if loss == "t" and not protocol.targeted(name):
                    continue
                seed = seeds.attack_seed(protocol.seed, ATTACK_NAMES[loss], loss, name, norm,
                                         eps, defense_name)

                def run(indices, attacked=attacked, loss=loss, eot=eot, seed=seed,
                        threat_model=threat_model, name=name):
                    result = self._apgd(attacked, indices, norm, eps, loss, eot, seed,
                                        label=f"{name}/{defense_name}")
                    if (defense_name == "comdefend" and threat_model == "bpda_eot"
                            and loss == "ce" and math.isclose(eps, protocol.headline_eps)):
                        self.convergence[f"{norm} eps={eps:g}"] = {
                            "examples": int(len(indices)),
                            "robust_curve": np.asarray(result.robust_curve).tolist(),
                            "loss_curve": np.asarray(result.loss_curve).tolist(),
                            "step_sizes": np.asarray(result.step_sizes).tolist()}
                    return attack_points(result)
                attacks.append(CascadeAttack(threat_model, ATTACK_NAMES[loss], protocol.steps,
                                             eot, protocol.restarts, run,
                                             self.fixed_noise() if fixed else None,
                                             temperature))
        if full and "gradient_free" in protocol.threat_models:
            attacked = self._attacked("white_box" if undefended else "gradient_free",
                                      defense_name)
            square_eot = protocol.square_eot if K > 1 else 1
            seed = seeds.attack_seed(protocol.seed, "square", None, "gradient_free", norm, eps,
                                     defense_name)
            confirm = self.draws(defense_name) if K > 1 else 0
            attacks.append(CascadeAttack(
                "gradient_free", "square", protocol.square_queries, square_eot, 1,
                lambda indices, model=attacked.model, square_eot=square_eot, seed=seed:
                self._square(model, indices, norm, eps, square_eot, seed, confirm)))
        return attacks
