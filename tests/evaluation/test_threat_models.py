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
                                      "bpda_smooth", "fixed_noise", "transfer",
                                      "gradient_free")
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


# ------------------------------------------------------- surrogates of ComDefend's binarizer
def _pipeline():
    import numpy as np

    from tests.fixtures import attack_models as attack_fixtures

    classifier, _ = attack_fixtures.tiny_classifier()
    purifier, _ = attack_fixtures.tiny_comdefend()
    images, _ = attack_fixtures.attack_batch()
    return classifier, purifier, np.asarray(images[:8])


def _input_gradient(model, images):
    import tensorflow as tf

    images = tf.constant(images)
    with tf.GradientTape() as tape:
        tape.watch(images)
        loss = tf.reduce_sum(model(images)[:, 0])
    return tape.gradient(loss, images).numpy()


def test_smoothed_binarizer_forward_is_deployed_and_backward_depends_on_temperature():
    import numpy as np

    classifier, purifier, images = _pipeline()
    deployed = classifier(purifier(images), training=False).numpy()
    gradients = {}
    for temperature in (1.0, 10.0):
        attacked = threat_models.build("bpda_smooth", classifier, purifier,
                                       temperature=temperature)
        assert attacked.temperature == temperature and attacked.judge is None
        np.testing.assert_array_equal(attacked.model(images).numpy(), deployed)
        gradients[temperature] = _input_gradient(attacked.model, images)
    assert not np.allclose(gradients[1.0], gradients[10.0])
    with pytest.raises(ValueError, match="temperature"):
        threat_models.build("bpda_smooth", classifier, purifier)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        threat_models.smoothed_binarizer_fn(classifier, purifier, 0.0)
    # Only where the deployed code is bits.
    assert threat_models.applies("bpda_smooth", "comdefend", purifier)
    assert not threat_models.applies("bpda_smooth", "comdefend",
                                     purifier.with_inference(mode="soft"))


def test_soft_path_is_judged_by_the_deployed_pipeline():
    import numpy as np

    classifier, purifier, images = _pipeline()
    attacked = threat_models.build("soft_path", classifier, purifier)
    deployed = classifier(purifier(images), training=False).numpy()
    np.testing.assert_array_equal(attacked.judge(images).numpy(), deployed)
    assert not np.allclose(attacked.model(images).numpy(), deployed)  # the surrogate's own
    for name in ("bpda_eot", "bpda_identity", "fixed_noise"):
        built = threat_models.build(name, classifier, purifier,
                                    fixed_noise=np.zeros((8, 1, 1, 1), np.float32))
        assert built.judge is None  # their forward pass is the deployed one


def test_code_share_grows_with_temperature_and_a_tiny_share_fails_the_check():
    import numpy as np

    from comdefend_tf.evaluation import scoring

    classifier, purifier, images = _pipeline()
    shares = [threat_models.code_share_fn(purifier, t)(images) for t in (0.01, 1.0, 10.0, 1e4)]
    assert shares == sorted(shares) and shares[-1] == 1.0
    noisy = purifier.forward(images)["noisy_logits"].numpy()
    assert shares[1] == pytest.approx(np.mean(np.abs(noisy) <= 5.986), abs=0.01)
    assert threat_models.code_share_fn(purifier, None)(images) == 1.0  # identity estimator
    for name in ("bpda_eot", "soft_path"):
        assert threat_models.build(name, classifier, purifier).code_share(images) is not None
    assert threat_models.build("bpda_identity", classifier, purifier).code_share is None
    check = scoring.gradient_check(0.0, 0, code_share=0.03)
    assert not check["ok"] and "3.0% of the code" in check["reasons"][0]
    assert scoring.gradient_check(0.0, 0, code_share=0.5)["ok"]
    assert not scoring.gradient_check(0.02, 0)["ok"]
    assert scoring.gradient_check(0.0, 0)["code_gradient_share"] is None
