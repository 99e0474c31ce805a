"""The adaptive protocol's settings: what the robustness report runs (``Protocol``), its defaults
and vocabulary (defenses, norms, losses, threat models), checked before any attack runs.

``adaptive.Evaluation`` runs a ``Protocol``; ``settings_of`` is its JSON form in every report
(and what ``modes.reusable_main_report`` compares). The binary's flags document each field.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from comdefend_tf.evaluation import threat_models as threat_models_lib

BASELINE_DEFENSES = ("jpeg", "bit_depth", "median")
DEFENSES = ("none", "comdefend") + BASELINE_DEFENSES
# Defenses run only when their layer is given (``Models.extra``), never by default.
LITERT = "comdefend_litert"
EXTRA_DEFENSES = (LITERT,)
LITERT_FLAG_HELP = ("A LiteRT purifier (.tflite, export_litert) of --comdefend_dir's model: adds "
                    f"the defense {LITERT}, scored on the LiteRT forward pass and attacked "
                    "through the float model's gradients (BPDA) and with the "
                    "defense-independent images (in the robustness report also by Square).")
NORMS = ("linf", "l2")
# Cascade order: APGD-CE, APGD-T (targeted DLR), APGD-DLR.
LOSSES = ("ce", "t", "dlr")
THREAT_MODELS = threat_models_lib.ADAPTIVE_PROTOCOL
# APGD-T (9 targets, the costliest attack) runs under these threat models by default, and under
# bpda_smooth at the lowest temperature: where it broke examples at N = 200 (docs/robustness.md,
# "Cost"); CE and DLR run under every threat model.
TARGETED_DEFAULT = ("white_box", "oblivious", "transfer", "bpda_eot")
SEARCH_PRECISIONS = ("float32", "bfloat16")
# A targeted threat model: a name, or bpda_smooth with its temperature, bpda_smooth(T=5).
_TARGETED_LABEL = re.compile(r"(?P<base>\w+)(?:\(T=(?P<temperature>\d+(?:\.\d*)?)\))?")


def default_eps(image_shape) -> dict:
    """Default radii per norm for an image shape ``(H, W, C)``: grayscale digits L-inf 0.1,
    0.2, 0.3 (headline 0.3), L2 2.0; RGB L-inf 2/255, 8/255 (headline), 16/255, L2 0.5.
    Returns ``{"linf": [...], "l2": [...], "headline": eps, "sanity": [...]}``, ``sanity``
    being larger L-inf radii at which accuracy should reach about 0."""
    if image_shape[-1] == 1:
        return {"linf": [0.1, 0.2, 0.3], "l2": [2.0], "headline": 0.3, "sanity": [0.4, 0.5]}
    return {"linf": [2 / 255, 8 / 255, 16 / 255], "l2": [0.5], "headline": 8 / 255,
            "sanity": [32 / 255, 64 / 255]}


@dataclasses.dataclass
class Protocol:
    """Settings of one adaptive evaluation (``train/robustness_report.py`` documents each).

    ``eps`` maps a norm (``linf``/``l2``) to its radii; ``sanity_eps`` are extra L-inf radii
    run with APGD-CE only; ``eot_samples`` is K for attacks and scoring of a randomized
    defense; ``square_eot`` the draws Square scores each candidate over on a randomized
    defense (1: the published attack; a point wrong on its draw must stay wrong on
    ``verify_draws`` more before the example leaves the search); ``target_classes`` APGD-T's
    targets; ``targeted_threat_models`` the threat models APGD-T runs under (None: the
    default ``TARGETED_DEFAULT`` plus ``bpda_smooth`` at the lowest temperature; ``("all",)``:
    every one; a ``bpda_smooth`` entry may name its temperature, ``bpda_smooth(T=5)``);
    ``search_precision`` the precision of the ComDefend copy the attacks query and
    differentiate (``bfloat16``: a bfloat16 copy of a float32 purifier; every verdict is
    still the deployed purifier's, over ``verify_draws`` draws); the ablation runs
    ComDefend ``bpda_eot`` APGD-CE at ``ablation_eps`` (None: ``Evaluation.ablation_radius``
    picks it) on the first ``ablation_examples``.
    ``verify_draws``: fresh draws each returned point and candidate is verified with on a
    randomized ComDefend (and the clean images scored with); ``temperatures``: the
    ``bpda_smooth`` threat model's T, one run each; ``draws_per_call``: APGD's EOT draws
    stacked into one model call (EOT as a batch dimension).
    """

    eps: dict
    headline_eps: float
    sanity_eps: Sequence[float] = ()
    steps: int = 50
    eot_samples: int = 5
    restarts: int = 1
    square_queries: int = 5000
    square_eot: int = 1
    target_classes: int = 9
    targeted_threat_models: Sequence[str] | None = None
    search_precision: str = "float32"
    losses: Sequence[str] = LOSSES
    threat_models: Sequence[str] = THREAT_MODELS
    defenses: Sequence[str] = DEFENSES
    ablation_steps: Sequence[int] = (50, 100, 200)
    ablation_eot: Sequence[int] = (1, 5, 20)
    ablation_restarts: Sequence[int] = (1, 3)
    ablation_examples: int = 50
    ablation_eps: float | None = None
    verify_draws: int = 20
    temperatures: Sequence[float] = (5.0, 10.0, 20.0)
    draws_per_call: int = 5
    batch_size: int = 500
    seed: int = 0
    per_attack_rows: bool = False

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
        self.threat_models = [threat_models_lib.resolve(name) for name in self.threat_models]
        for name in self.threat_models:
            if name not in THREAT_MODELS:
                raise ValueError(f"threat model {name!r} is not one of the adaptive protocol's: "
                                 f"{', '.join(THREAT_MODELS)} (white_box always runs on none)")
        for name in self.defenses:
            if name not in DEFENSES + EXTRA_DEFENSES:
                raise ValueError(f"unknown defense {name!r}; choose from "
                                 f"{', '.join(DEFENSES + EXTRA_DEFENSES)}")
        for loss in self.losses:
            if loss not in LOSSES:
                raise ValueError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)} (t: "
                                 "APGD-T, targeted DLR)")
        self.losses = [loss for loss in LOSSES if loss in self.losses]  # cascade order
        positive = {"steps": self.steps, "eot_samples": self.eot_samples,
                    "restarts": self.restarts, "square_queries": self.square_queries,
                    "batch_size": self.batch_size, "target_classes": self.target_classes,
                    "square_eot": self.square_eot, "verify_draws": self.verify_draws,
                    "draws_per_call": self.draws_per_call}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if any(v < 1 for v in tuple(self.ablation_steps) + tuple(self.ablation_eot)
               + tuple(self.ablation_restarts)):
            raise ValueError("ablation steps, EOT samples and restarts must be >= 1")
        if not self.temperatures or any(not t > 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be > 0 (at least one), got "
                             f"{list(self.temperatures)}")
        self.temperatures = [float(t) for t in self.temperatures]
        if self.ablation_eps is not None and not 0 < self.ablation_eps <= 1:
            raise ValueError(f"ablation eps must be an L-inf radius in (0, 1], got "
                             f"{self.ablation_eps}")
        if self.search_precision not in SEARCH_PRECISIONS:
            raise ValueError(f"search precision must be one of {', '.join(SEARCH_PRECISIONS)}, "
                             f"got {self.search_precision!r}")
        self.targeted_threat_models = self._targeted(self.targeted_threat_models)

    def _targeted(self, names):
        """The checked, normalised APGD-T threat models (see the class docstring)."""
        if names is None:
            return list(TARGETED_DEFAULT) + [threat_models_lib.variant_label(
                "bpda_smooth", min(self.temperatures))]
        names = [str(name).strip() for name in names if str(name).strip()]
        if names == ["all"]:
            return ["all"]
        result = []
        for name in names:
            match = _TARGETED_LABEL.fullmatch(name)
            if not match or match["base"] not in threat_models_lib.THREAT_MODELS:
                raise ValueError(f"targeted threat model {name!r} is not one of "
                                 f"{', '.join(threat_models_lib.THREAT_MODELS)} (or 'all'; a "
                                 "temperature is written bpda_smooth(T=5))")
            if match["temperature"] is not None:
                if match["base"] not in threat_models_lib.TEMPERATURE_DEPENDENT:
                    raise ValueError(f"targeted threat model {name!r}: only bpda_smooth takes "
                                     "a temperature")
                temperature = float(match["temperature"])
                if temperature not in self.temperatures:
                    raise ValueError(f"targeted threat model {name!r}: T={temperature:g} is not "
                                     f"one of the temperatures {self.temperatures}")
                name = threat_models_lib.variant_label(match["base"], temperature)
            result.append(name)
        return result

    def targeted(self, label: str) -> bool:
        """Whether APGD-T runs under the threat model ``label`` (``bpda_smooth(T=5)`` for a
        temperature variant)."""
        chosen = self.targeted_threat_models
        return chosen == ["all"] or label in chosen or label.partition("(")[0] in chosen


def settings_of(protocol: Protocol) -> dict:
    """The protocol as a JSON-serialisable dict."""
    values = dataclasses.asdict(protocol)
    values["eps"] = {norm: [float(e) for e in radii] for norm, radii in protocol.eps.items()}
    return {key: (list(value) if isinstance(value, tuple) else value)
            for key, value in values.items()}
