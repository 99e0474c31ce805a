"""One vocabulary of threat models: every protocol's list, the binaries' flag choices and the
descriptions come from ``threat_models.THREAT_MODELS``."""

import ast
import pathlib
import re
import warnings

import pytest

from comdefend_tf.evaluation import adaptive, paper, threat_models

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_every_name_has_one_description():
    assert list(threat_models.DIFFERENTIATES) == list(threat_models.THREAT_MODELS)
    assert len(set(threat_models.THREAT_MODELS)) == len(threat_models.THREAT_MODELS)


def test_protocol_lists_are_ordered_subsets_of_the_vocabulary():
    vocabulary = list(threat_models.THREAT_MODELS)
    for chosen in (paper.THREAT_MODELS, adaptive.THREAT_MODELS, paper.DEFAULT_THREAT_MODELS,
                   threat_models.PIPELINE_GRADIENT, threat_models.COMDEFEND_ONLY,
                   threat_models.DEFENSE_INDEPENDENT):
        assert set(chosen) <= set(vocabulary), chosen
    for chosen in (paper.THREAT_MODELS, adaptive.THREAT_MODELS):
        assert sorted(chosen, key=vocabulary.index) == list(chosen)


def test_protocol_lists_as_documented():
    # white_box is assigned to the undefended rows, never chosen.
    assert "white_box" not in adaptive.THREAT_MODELS
    assert adaptive.THREAT_MODELS == ("oblivious", "bpda_eot", "bpda_identity", "soft_path",
                                      "fixed_noise", "transfer", "gradient_free")
    # The paper protocol's cleverhans attacks take one callable that works on any defense.
    assert paper.THREAT_MODELS == ("oblivious", "bpda_eot", "bpda_identity")
    assert paper.UNDEFENDED_THREAT_MODEL == "white_box"


def test_resolve_accepts_the_vocabulary_and_the_deprecated_alias_only():
    for name in threat_models.THREAT_MODELS:
        assert threat_models.resolve(name) == name
    with pytest.warns(DeprecationWarning):
        assert threat_models.resolve("adaptive") == "bpda_eot"
    with pytest.raises(ValueError, match="telepathy"):
        threat_models.resolve("telepathy")


def _literal_text(node) -> str:
    """The literal characters of a flag definition's arguments (f-string holes left out)."""
    return " ".join(part.value for part in ast.walk(node)
                    if isinstance(part, ast.Constant) and isinstance(part.value, str))


def test_no_binary_types_the_list_again():
    """The binaries' flag help and choices name the threat models through the library: no
    flag definition spells out more than one of them."""
    names = threat_models.THREAT_MODELS
    for path in sorted((REPO / "train").glob("*.py")) + sorted((REPO / "export").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr.startswith("DEFINE")):
                text = _literal_text(node)
                spelled = [name for name in names if re.search(rf"\b{name}\b", text)]
                assert len(spelled) <= 1, (path.name, spelled)


def test_the_default_protocol_runs_every_threat_model():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(adaptive.Protocol(eps={"linf": [0.1]}, headline_eps=0.1).threat_models) \
            == list(adaptive.THREAT_MODELS)
