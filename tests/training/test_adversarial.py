"""Adversarial training: the crafted batches lie in the eps ball and [0, 1] and raise the loss,
the optimizer sees the adversarial loss, the eps ramp, resuming, refusing changed settings,
the catastrophic-overfitting stop, training behind a frozen purifier with BPDA, the
metrics.json record and clear errors for bad settings."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from comdefend_tf.attacks.constraints import perturbation_norms
from comdefend_tf.model import load_comdefend
from comdefend_tf.training import adversarial
from comdefend_tf.training import classifier as classifiers
from comdefend_tf.training import provenance, run_state
from tests.fixtures import attack_models as attack_fixtures
from tests.fixtures.purifiers import save_spread_tiny_purifier


class _Killed(Exception):
    pass


class _StepLog(keras.callbacks.Callback):
    """Records the global step after every batch; raises ``_Killed`` after step ``kill_at``."""

    def __init__(self, kill_at=None):
        super().__init__()
        self.kill_at, self.steps = kill_at, []

    def on_train_batch_end(self, batch, logs=None):
        self.steps.append(int(self.model.optimizer.iterations.numpy()))
        if self.steps[-1] == self.kill_at:
            raise _Killed(f"simulated kill after step {self.kill_at}")


def _copy(classifier):
    copy = keras.models.clone_model(classifier)
    copy.set_weights(classifier.get_weights())
    return copy


def _cross_entropy(classifier, images, labels):
    logits = classifier(images, training=False)
    return float(tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)))


@pytest.mark.parametrize("method", ["pgd", "fgsm_rs"])
@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 1.0)])
def test_crafted_batches_lie_in_the_ball_and_raise_the_loss(method, norm, eps):
    classifier, _ = attack_fixtures.tiny_classifier()
    images, labels = attack_fixtures.attack_batch()
    settings = adversarial.make_settings(method, eps=eps, norm=norm, steps=None)
    trainer = adversarial.AdversarialTrainer(classifier, settings, seed=0)
    key = adversarial.attack_seed(0, adversarial.TRAIN_SEED_KEY, 3)
    crafted = np.asarray(trainer.craft(images, labels, settings.eps, settings.step_size,
                                       settings.steps, key))
    assert crafted.shape == images.shape and crafted.min() >= 0.0 and crafted.max() <= 1.0
    assert perturbation_norms(images, crafted, norm).max() <= eps + 1e-5
    assert perturbation_norms(images, crafted, norm).min() > 0.3 * eps
    assert (_cross_entropy(classifier, crafted, labels)
            > _cross_entropy(classifier, images, labels) + 0.5)
    # The random start is a function of the seed: the same key gives the same batch.
    again = trainer.craft(images, labels, settings.eps, settings.step_size, settings.steps, key)
    np.testing.assert_array_equal(np.asarray(again), crafted)


def test_eps_ramps_linearly_per_step_and_defaults_follow_the_papers():
    values = [float(adversarial.eps_at(step, 0.3, 10)) for step in (0, 5, 10, 25)]
    np.testing.assert_allclose(values, [0.0, 0.15, 0.3, 0.3], rtol=1e-6)
    assert float(adversarial.eps_at(0, 0.3, 0)) == pytest.approx(0.3)
    pgd = adversarial.make_settings("pgd", eps=0.3)
    assert pgd.steps == 7 and pgd.step_size == pytest.approx(2.5 * 0.3 / 7)
    fast = adversarial.make_settings("fgsm_rs", eps=0.3)
    assert fast.steps == 1 and fast.step_size == pytest.approx(1.25 * 0.3)
    assert adversarial.make_settings("none") is None
    behind = pgd.for_run(behind_purifier=True)
    assert behind.gradient == "bpda_smooth" and behind.temperature == 10.0
    assert behind.gradient_name() == "bpda_smooth(T=10)" and pgd.for_run(False).gradient is None
    identity = adversarial.make_settings("pgd", eps=0.3, gradient="bpda_identity")
    assert identity.for_run(True).temperature is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="pgd"), "needs adv_eps > 0"),
    (dict(method="pgd", eps=0.0), "needs adv_eps > 0"),
    (dict(method="fgsm", eps=0.1), "adversarial must be one of none, pgd, fgsm_rs"),
    (dict(method="pgd", eps=0.1, norm="l1"), "adv_norm must be one of linf, l2"),
    (dict(method="fgsm_rs", eps=0.1, steps=3), "one step by definition"),
    (dict(method="pgd", eps=0.1, steps=0), "adv_steps must be an integer >= 1"),
    (dict(method="pgd", eps=0.1, step_size=-1.0), "adv_step_size must be > 0"),
    (dict(method="pgd", eps=0.1, eps_warmup_epochs=-1), "adv_eps_warmup_epochs must be >= 0"),
    (dict(method="pgd", eps=0.1, eot=0), "adv_eot must be an integer >= 1"),
    (dict(method="pgd", eps=0.1, gradient="bpda"), "adv_gradient must be one of"),
    (dict(method="pgd", eps=0.1, gradient="bpda_identity", temperature=5.0),
     "bpda_identity has none"),
    (dict(method="pgd", eps=0.1, temperature=0.0), "adv_temperature must be > 0"),
    (dict(method="none", eps=0.1, eot=2), "adv_eps, adv_eot set without adversarial"),
])
def test_bad_settings_are_refused_with_their_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        adversarial.make_settings(**kwargs)


def test_settings_that_need_a_purifier_are_refused_without_one(tmp_path):
    with pytest.raises(ValueError, match="give purifier_dir"):
        adversarial.make_settings("pgd", eps=0.1, gradient="bpda_smooth").for_run(False)
    with pytest.raises(ValueError, match="adv_eot 2 averages"):
        adversarial.make_settings("pgd", eps=0.1, eot=2).for_run(False)
    with pytest.raises(ValueError, match="with purified_input the purifier does not run"):
        classifiers.train_classifier(attack_fixtures.digits(), str(tmp_path / "run"), epochs=1,
                                     verbose=0, purified_input=True,
                                     adversarial=adversarial.make_settings("pgd", eps=0.1))


def test_the_optimizer_sees_the_loss_of_the_crafted_batch_not_the_clean_one():
    classifier, _ = attack_fixtures.tiny_classifier()
    images, labels = attack_fixtures.attack_batch()
    model = _copy(classifier)
    settings = adversarial.make_settings("pgd", eps=0.1, steps=5)
    trainer = adversarial.AdversarialTrainer(model, settings, seed=4)
    trainer.compile(optimizer=keras.optimizers.SGD(0.0),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    history = trainer.fit(images, labels, batch_size=len(images), epochs=1, shuffle=False,
                          verbose=0).history
    # Step 0's batch, crafted again from the same (seed, step) key.
    crafted = trainer.craft(images, labels, settings.eps, settings.step_size, settings.steps,
                            adversarial.attack_seed(4, adversarial.TRAIN_SEED_KEY, 0))
    assert history["loss"][0] == pytest.approx(_cross_entropy(model, crafted, labels), rel=1e-4)
    assert history["loss"][0] > _cross_entropy(model, images, labels) + 0.5
    assert history["clean_accuracy"][0] == 1.0 > history["accuracy"][0]


def test_training_writes_the_record_and_resumes_like_an_uninterrupted_run(tmp_path):
    digits = attack_fixtures.digits()
    settings = dict(epochs=2, batch_size=32, steps_per_epoch=5, checkpoint_every_steps=3,
                    verbose=0, adversarial=adversarial.make_settings(
                        "fgsm_rs", eps=0.1, eps_warmup_epochs=1))
    reference, metrics = classifiers.train_classifier(digits, str(tmp_path / "reference"),
                                                      **settings)
    record = provenance.adversarial_record(str(tmp_path / "reference"))
    assert record == json.loads(json.dumps(metrics[provenance.ADVERSARIAL_KEY]))
    assert {key: record[key] for key in ("method", "norm", "eps", "steps", "eot", "gradient",
                                         "behind_purifier", "purifier_fingerprint")} == {
        "method": "fgsm_rs", "norm": "linf", "eps": 0.1, "steps": 1, "eot": 1,
        "gradient": None, "behind_purifier": False, "purifier_fingerprint": None}
    assert record["step_size"] == pytest.approx(0.125) and record["eps_warmup_epochs"] == 1.0
    assert record["pgd_accuracy_per_epoch"] == metrics["history"]["pgd_accuracy"]
    assert len(record["pgd_accuracy_per_epoch"]) == 2 and record["train_cpu_seconds"] > 0
    assert record["check"]["num_images"] == min(adversarial.CHECK_IMAGES, digits.num_test)
    assert 0.0 <= metrics["held_out_adversarial_accuracy"] <= metrics["held_out_accuracy"]
    assert metrics["history"]["accuracy"][1] < metrics["history"]["clean_accuracy"][1]
    assert os.path.isfile(tmp_path / "reference" / adversarial.GOOD_SUBDIR / "classifier.keras")

    model_dir = str(tmp_path / "run")
    with pytest.raises(_Killed):
        classifiers.train_classifier(digits, model_dir, extra_callbacks=[_StepLog(8)],
                                     **settings)
    resumed = _StepLog()
    classifier, resumed_metrics = classifiers.train_classifier(
        digits, model_dir, extra_callbacks=[resumed], **settings)
    assert resumed.steps == [7, 8, 9, 10]
    # The random starts are keyed by (seed, step): the resumed run crafts the same batches.
    for got, want in zip(classifier.trainable_variables, reference.trainable_variables):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(resumed_metrics["history"]["pgd_accuracy"],
                               metrics["history"]["pgd_accuracy"])
    # Another recipe in the same directory is another run.
    with pytest.raises(run_state.TrainingError, match="adversarial"):
        classifiers.train_classifier(digits, model_dir, **dict(
            settings, epochs=3, adversarial=adversarial.make_settings("fgsm_rs", eps=0.2,
                                                                      eps_warmup_epochs=1)))


class _FakeTrainer:
    """Stands in for an ``AdversarialTrainer``: a scripted PGD accuracy per epoch."""

    def __init__(self, accuracies, classifier):
        self.accuracies, self.classifier = list(accuracies), classifier

    def pgd_accuracy(self, images, labels, key=0):
        return self.accuracies[key]


def test_a_collapse_of_the_pgd_accuracy_stops_the_run_and_keeps_the_last_good_epoch(tmp_path):
    assert adversarial.collapse([0.6]) is None
    assert adversarial.collapse([0.1, 0.02]) is None  # a drop under 0.2: noise, not collapse
    assert adversarial.collapse([0.9, 0.25]) is None  # still above 0.2
    assert adversarial.collapse([0.5, 0.16]) is None  # still above 30 % of the best
    assert "fell from 0.700 (epoch 1) to 0.050" in adversarial.collapse([0.6, 0.7, 0.05])

    classifier = classifiers.build_classifier((8, 8, 1), 10, seed=0)
    classifier.compile(optimizer=keras.optimizers.Adam())
    classifier.optimizer.build(classifier.trainable_variables)
    model_dir = str(tmp_path)
    state = run_state.RunState(model_dir, classifier, classifier.optimizer,
                               {"learning_rate": 1e-3, "epochs": 3})
    check = adversarial.OverfittingCheck(_FakeTrainer([0.6, 0.7, 0.05], classifier), None,
                                         None, state, model_dir)
    check.on_train_begin()
    for epoch in (0, 1):
        check.on_epoch_begin(epoch)
        check.on_epoch_end(epoch, {"loss": 1.0})
    check.on_epoch_begin(2)
    with pytest.warns(RuntimeWarning, match="catastrophic overfitting"):
        with pytest.raises(adversarial.CatastrophicOverfitting,
                           match="catastrophic overfitting at epoch 2: PGD accuracy .* fell "
                                 r"from 0.700 \(epoch 1\) to 0.050.*last good epoch"):
            check.on_epoch_end(2, {"loss": 1.0})
    assert state.history()["pgd_accuracy"] == [0.6, 0.7, 0.05]
    assert len(state.history()["epoch_cpu_seconds"]) == 3
    assert os.path.isfile(os.path.join(model_dir, adversarial.GOOD_SUBDIR, "classifier.keras"))
    # Restarting the collapsed run is refused before any step.
    with pytest.raises(adversarial.CatastrophicOverfitting, match="Start afresh"):
        adversarial.OverfittingCheck(_FakeTrainer([], classifier), None, None, state,
                                     model_dir).on_train_begin()


def test_a_collapsed_run_writes_no_classifier(tmp_path, monkeypatch):
    scripted = iter([0.8, 0.01])
    monkeypatch.setattr(adversarial.AdversarialTrainer, "pgd_accuracy",
                        lambda self, images, labels, key=0: next(scripted))
    model_dir = tmp_path / "run"
    with pytest.raises(adversarial.CatastrophicOverfitting, match="epoch 1"):
        classifiers.train_classifier(attack_fixtures.digits(), str(model_dir), epochs=2,
                                     batch_size=32, steps_per_epoch=2, verbose=0,
                                     adversarial=adversarial.make_settings("fgsm_rs", eps=0.1))
    assert not (model_dir / classifiers.KERAS_FILENAME).exists()
    assert (model_dir / adversarial.GOOD_SUBDIR / classifiers.KERAS_FILENAME).exists()


@pytest.fixture(scope="module")
def spread_purifier(tmp_path_factory):
    return save_spread_tiny_purifier(str(tmp_path_factory.mktemp("spread_purifier")))


@pytest.mark.parametrize("gradient", ["bpda_smooth", "bpda_identity"])
def test_bpda_passes_gradient_to_the_images_and_keeps_the_deployed_forward(spread_purifier,
                                                                          gradient):
    purifier = load_comdefend(spread_purifier)
    images, labels = attack_fixtures.attack_batch()
    purify = adversarial.bpda_purify(purifier, gradient, 10.0)
    # The deployed values forward (bpda_identity: up to the rounding of x + (purified - x)).
    np.testing.assert_allclose(np.asarray(purify(images)), np.asarray(purifier(images)),
                               rtol=0, atol=1e-6)
    classifier, _ = attack_fixtures.tiny_classifier()
    settings = adversarial.make_settings("pgd", eps=0.1, gradient=gradient).for_run(True)
    trainer = adversarial.AdversarialTrainer(classifier, settings,
                                             load_comdefend(spread_purifier,
                                                            inference_noise_std=1.0, seed=0))
    images = tf.constant(images)
    with tf.GradientTape() as tape:
        tape.watch(images)
        loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels, trainer.attacked_logits(images)))
    gradient_values = np.asarray(tape.gradient(loss, images))
    assert np.all(np.isfinite(gradient_values)) and np.abs(gradient_values).max() > 0


def test_training_behind_a_purifier_keeps_its_weights_and_records_it(tmp_path, spread_purifier):
    before = [np.asarray(w) for w in load_comdefend(spread_purifier).weights]
    _, metrics = classifiers.train_classifier(
        attack_fixtures.digits(), str(tmp_path / "behind"), epochs=1, batch_size=32,
        steps_per_epoch=3, verbose=0, purifier_dir=spread_purifier,
        adversarial=adversarial.make_settings("pgd", eps=0.1, steps=2))
    for want, stored in zip(before, load_comdefend(spread_purifier).weights):
        np.testing.assert_array_equal(np.asarray(stored), want)
    record = provenance.adversarial_record(str(tmp_path / "behind" / "classifier.keras"))
    assert record["behind_purifier"] and record["gradient"] == "bpda_smooth(T=10)"
    assert record["purifier_fingerprint"] == metrics[provenance.PURIFIER_KEY]["fingerprint"]
    assert 0.0 <= metrics["held_out_adversarial_accuracy"] <= 1.0


MIRRORED_ADVERSARIAL_SCRIPT = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from comdefend_tf.io import datasets as data
from comdefend_tf.training import adversarial, classifier as classifiers, provenance
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
summary = {}
for name, purifier_dir in (("alone", None), ("behind", sys.argv[1])):
    _, metrics = classifiers.train_classifier(
        data.load_dataset("digits"), sys.argv[2] + name, epochs=1, batch_size=16,
        steps_per_epoch=3, strategy=strategy, verbose=0, purifier_dir=purifier_dir,
        adversarial=adversarial.make_settings("pgd", eps=0.1, steps=2))
    summary[name] = {"replicas": metrics["replicas"], "loss": metrics["history"]["loss"],
                     "pgd": metrics[provenance.ADVERSARIAL_KEY]["pgd_accuracy_per_epoch"]}
print(json.dumps(summary))
"""


def test_mirrored_strategy_trains_adversarially_on_two_logical_devices(tmp_path,
                                                                       spread_purifier):
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT, subprocess_env

    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_ADVERSARIAL_SCRIPT, spread_purifier,
         str(tmp_path / "mirrored_")], cwd=REPO_ROOT, env=subprocess_env(),
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("alone", "behind"):
        assert summary[name]["replicas"] == 2 and np.isfinite(summary[name]["loss"][0])
        assert len(summary[name]["pgd"]) == 1 and 0.0 <= summary[name]["pgd"][0] <= 1.0


def test_binary_refuses_bad_adversarial_flags_and_prints_the_summary_line(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT, subprocess_env

    def run(*flags):
        return subprocess.run([sys.executable, "-m", "train.train_classifier", "--dataset=digits",
                               f"--model_dir={tmp_path / 'run'}", *flags], cwd=REPO_ROOT,
                              env=subprocess_env(), capture_output=True, text=True, timeout=300)

    missing = run("--adversarial=pgd")
    assert missing.returncode == 1 and "needs adv_eps > 0" in missing.stderr
    assert not (tmp_path / "run").exists()
    trained = run("--adversarial=fgsm_rs", "--adv_eps=0.1", "--epochs=1", "--steps_per_epoch=3")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "held-out accuracy under 10-step PGD" in trained.stdout
    assert "CPU seconds of training" in trained.stdout
