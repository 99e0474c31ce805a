"""Trains the classifier that ComDefend protects and saves it to --model_dir.

    python -m train.train_classifier --dataset=mnist5k --epochs=5 --model_dir=runs/classifier

Writes MODEL_DIR/classifier.keras (images float32 [B, H, W, C] in [0, 1] -> logits) and
metrics.json (held-out accuracy). --architecture=auto picks a small CNN for grayscale digits,
a ResNet-20-style network for 32x32 RGB and ResNet50 for larger images. A killed run restarted
with the same command resumes at its last checkpoint (every --checkpoint_every_steps steps). A
run whose loss or weights become NaN or infinite exits non-zero and writes no model (its
checkpoints and any previous classifier.keras stay).

Training behind a purifier (the paper's defense at training and test time):

    python -m train.train_classifier --dataset=mnist5k --purifier_dir=runs/comdefend \
        --init_classifier_dir=runs/classifier --epochs=2 --model_dir=runs/classifier_purified

--purifier_dir runs the frozen purifier (its inference settings; with inference noise a fresh
draw per step) in front of the classifier on every training batch; its weights never change.
--init_classifier_dir fine-tunes a saved classifier instead of a fresh one. Images purified in
advance (export.purify_dataset's tfrecord:GLOB, export.purify_images' folder:PATH) are read as
they are with --purified_input, which records which purifier made them (--purifier_dir,
fingerprinted but not run, and/or --purify_manifest; a tfrecord:GLOB's manifest.json is found
alone). metrics.json records the purifier (path, config, weights fingerprint); evaluation,
export and serving warn when the classifier is composed with another purifier or none.

Adversarial training (Madry et al. 2018 PGD, Wong et al. 2020 fast FGSM with random start),
alone or behind a purifier (--purifier_dir: BPDA through the frozen purifier, EOT over its
noise):

    python -m train.train_classifier --dataset=mnist5k --adversarial=pgd --adv_eps=0.3 \
        --adv_steps=40 --adv_step_size=0.01 --epochs=10 --model_dir=runs/classifier_pgd

Every epoch a 10-step PGD on 256 held-out images is recorded (pgd_accuracy); when it
collapses (catastrophic overfitting) the run exits non-zero and writes no classifier.keras
(docs/adversarial_training.md).
"""

import sys

from absl import app, flags

from comdefend_tf.cli import flags as cli_flags
from comdefend_tf.io import datasets as data_lib
from comdefend_tf.training import adversarial as adversarial_lib
from comdefend_tf.training import classifier as classifiers
from comdefend_tf.training import provenance, run_state

cli_flags.define_data_flags()
# Keras 3 fit does not run under multi_worker.
cli_flags.define_training_run_flags(
    epochs=5, batch_size=64, strategies=("default", "mirrored"),
    checkpoint_every_steps=run_state.DEFAULT_CHECKPOINT_EVERY_STEPS)
flags.adopt_module_key_flags(cli_flags)  # --help lists the shared flags too
flags.DEFINE_enum("architecture", "auto", classifiers.ARCHITECTURES,
                  "Classifier network; auto chooses by image size and channels.")
flags.DEFINE_string("weights_path", None, "resnet50 only: a local Keras ResNet50 weights file "
                    "(with or without the ImageNet head); nothing is downloaded.")
flags.DEFINE_string("purifier_dir", None, "ComDefend model directory (or .keras file): train "
                    "the classifier on its purified images (frozen, run on the fly unless "
                    "--purified_input).")
flags.DEFINE_bool("purified_input", False, "The --dataset images were already purified (by "
                  "export.purify_dataset or export.purify_images): do not run a purifier, only "
                  "record which one made them (--purifier_dir and/or --purify_manifest).")
flags.DEFINE_string("purify_manifest", None, "With --purified_input: the purify_dataset "
                    "manifest.json (or its folder) naming the purifier; default: the "
                    "manifest.json beside a tfrecord:GLOB's records.")
flags.DEFINE_string("init_classifier_dir", None, "Start from this saved classifier "
                    "(fine-tuning; --architecture is then ignored) instead of a fresh one.")
flags.DEFINE_enum("adversarial", "none", adversarial_lib.METHODS, "Adversarial training: none "
                  "(clean images), pgd (Madry et al.: --adv_steps projected steps from a random "
                  "start) or fgsm_rs (Wong et al.: one step of 1.25 eps from a random start).")
flags.DEFINE_float("adv_eps", None, "Attack radius in [0, 1] pixel units (L-inf: per pixel; "
                   "L2: per image); required with --adversarial.")
flags.DEFINE_enum("adv_norm", adversarial_lib.DEFAULT_NORM, adversarial_lib.NORMS,
                  "Norm of the attack ball.")
flags.DEFINE_integer("adv_steps", None, "pgd: attack steps per batch (default "
                     f"{adversarial_lib.DEFAULT_PGD_STEPS}); fgsm_rs is one step.")
flags.DEFINE_float("adv_step_size", None, "Attack step (default: pgd 2.5 eps / steps, "
                   "fgsm_rs 1.25 eps); it follows the eps warm-up.")
flags.DEFINE_float("adv_eps_warmup_epochs", adversarial_lib.DEFAULT_WARMUP_EPOCHS, "Epochs over "
                   "which eps ramps linearly (per step) from 0 to --adv_eps; 0: full eps at once.")
flags.DEFINE_integer("adv_eot", adversarial_lib.DEFAULT_EOT, "Behind a randomized purifier: "
                     "noise draws whose input gradients each attack step averages.")
flags.DEFINE_enum("adv_gradient", None, adversarial_lib.GRADIENTS, "Behind a purifier: the "
                  "BPDA backward pass (docs/adversarial_training.md); default "
                  f"{adversarial_lib.GRADIENTS[0]}.")
flags.DEFINE_float("adv_temperature", None, f"{adversarial_lib.GRADIENTS[0]}'s T (default "
                   f"{adversarial_lib.DEFAULT_TEMPERATURE:g}); higher T passes gradient "
                   "through more code bits.")
flags.mark_flag_as_required("model_dir")

FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:  # the library's messages name the settings as the flags do (adv_eps, ...)
        adversarial = adversarial_lib.make_settings(
            FLAGS.adversarial, FLAGS.adv_eps, FLAGS.adv_norm, FLAGS.adv_steps,
            FLAGS.adv_step_size, FLAGS.adv_eps_warmup_epochs, FLAGS.adv_eot, FLAGS.adv_gradient,
            FLAGS.adv_temperature)
        if adversarial is not None:
            adversarial.for_run(bool(FLAGS.purifier_dir), FLAGS.purified_input)
    except ValueError as error:
        raise app.UsageError(str(error))
    try:
        image_data = cli_flags.load_data_from_flags()
    except data_lib.DataError as error:
        sys.exit(f"error: {error}")
    if not image_data.num_classes:
        raise app.UsageError(f"--dataset={FLAGS.dataset} has no labels; a classifier needs "
                             "labelled images (for example mnist5k or folder:PATH)")
    architecture = classifiers.choose_architecture(image_data.image_shape, FLAGS.architecture)
    described = (f"from {FLAGS.init_classifier_dir}" if FLAGS.init_classifier_dir
                 else repr(architecture))
    behind = ""
    if FLAGS.purified_input:
        behind = " (images purified in advance)"
    elif FLAGS.purifier_dir:
        behind = f" behind the frozen purifier {FLAGS.purifier_dir}"
    print(f"Training classifier {described} on {image_data.name}{behind} "
          f"({image_data.num_train} training / {image_data.num_test} held-out images, "
          f"{image_data.image_shape}, {image_data.num_classes} classes), strategy {FLAGS.strategy}")
    try:
        _, metrics = classifiers.train_classifier(
            image_data, FLAGS.model_dir, architecture=architecture, epochs=FLAGS.epochs,
            batch_size=FLAGS.batch_size, learning_rate=FLAGS.learning_rate,
            strategy=FLAGS.strategy, seed=FLAGS.seed, weights_path=FLAGS.weights_path,
            steps_per_epoch=FLAGS.steps_per_epoch,
            checkpoint_every_steps=FLAGS.checkpoint_every_steps,
            purifier_dir=FLAGS.purifier_dir, purified_input=FLAGS.purified_input,
            purify_manifest=FLAGS.purify_manifest,
            init_classifier_dir=FLAGS.init_classifier_dir, adversarial=adversarial)
    except (ValueError, FileNotFoundError, run_state.TrainingError) as error:
        sys.exit(f"error: {error}")
    print(f"Held-out accuracy: {100 * metrics['held_out_accuracy']:.2f} % on "
          f"{metrics['num_held_out']} images" + (" (purified)" if metrics.get(
              provenance.PURIFIER_KEY) else "") + f" ({metrics['train_seconds']:.1f} s training)")
    if "held_out_accuracy_unpurified" in metrics:
        print(f"Held-out accuracy on the clean images (no purifier): "
              f"{100 * metrics['held_out_accuracy_unpurified']:.2f} %")
    record = metrics.get(provenance.PURIFIER_KEY)
    if record:
        print(f"Trained behind purifier {record['path']} ({record['fingerprint']}, "
              f"{record['purified']}); recorded in metrics.json")
    record = metrics.get(provenance.ADVERSARIAL_KEY)
    if record:
        print(f"Adversarial training {record['method']} ({record['norm']} eps {record['eps']:g}"
              f"{', ' + record['gradient'] if record['gradient'] else ''}): held-out accuracy "
              f"under {record['check']['steps']}-step PGD "
              f"{100 * metrics['held_out_adversarial_accuracy']:.2f} % on "
              f"{record['check']['num_images']} images; {record['train_cpu_seconds']:.1f} CPU "
              f"seconds of training")
    print(f"Saved {FLAGS.model_dir}/{classifiers.KERAS_FILENAME} (metrics.json beside it)")


def run():
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
