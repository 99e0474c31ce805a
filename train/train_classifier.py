"""Trains the classifier that ComDefend protects and saves it to --model_dir.

    python -m train.train_classifier --dataset=mnist5k --epochs=5 --model_dir=runs/classifier

Writes MODEL_DIR/classifier.keras (images float32 [B, H, W, C] in [0, 1] -> logits) and
metrics.json (held-out accuracy). --architecture=auto picks a small CNN for grayscale digits,
a ResNet-20-style network for 32x32 RGB and ResNet50 for larger images. A killed run restarted
with the same command resumes at its last checkpoint (every --checkpoint_every_steps steps). A
run whose loss or weights become NaN or infinite exits non-zero and writes no model (its
checkpoints and any previous classifier.keras stay).
"""

import sys

from absl import app, flags

from comdefend_tf import classifiers
from comdefend_tf import data as data_lib
from comdefend_tf import training
from train import flags_common

flags_common.define_data_flags()
flags.DEFINE_enum("architecture", "auto", classifiers.ARCHITECTURES,
                  "Classifier network; auto chooses by image size and channels.")
flags.DEFINE_integer("epochs", 5, "Passes over the training images.", lower_bound=1)
flags.DEFINE_integer("batch_size", 64, "Global batch size in images.", lower_bound=1)
flags.DEFINE_integer("steps_per_epoch", None, "Cap on optimizer steps per epoch "
                     "(default: one full pass).", lower_bound=1)
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.", lower_bound=0)
flags.DEFINE_string("weights_path", None, "resnet50 only: a local Keras ResNet50 weights file "
                    "(with or without the ImageNet head); nothing is downloaded.")
flags.DEFINE_string("model_dir", None, "Output directory (resumed if it holds an unfinished run).")
flags.DEFINE_enum("strategy", "default", ("default", "mirrored"),
                  "tf.distribute strategy (Keras 3 fit does not run under multi_worker).")
flags.DEFINE_integer("seed", 0, "Seed for initialisation and the data order.")
flags.DEFINE_integer("checkpoint_every_steps", training.DEFAULT_CHECKPOINT_EVERY_STEPS,
                     "Optimizer steps between checkpoints in MODEL_DIR/backup, which are also "
                     "written at every epoch end; a kill loses at most this many steps.",
                     lower_bound=1)
flags.mark_flag_as_required("model_dir")

FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        image_data = flags_common.load_data_from_flags()
    except data_lib.DataError as error:
        sys.exit(f"error: {error}")
    if not image_data.num_classes:
        raise app.UsageError(f"--dataset={FLAGS.dataset} has no labels; a classifier needs "
                             "labelled images (for example mnist5k or folder:PATH)")
    architecture = classifiers.choose_architecture(image_data.image_shape, FLAGS.architecture)
    print(f"Training classifier {architecture!r} on {image_data.name} "
          f"({image_data.num_train} training / {image_data.num_test} held-out images, "
          f"{image_data.image_shape}, {image_data.num_classes} classes), strategy {FLAGS.strategy}")
    try:
        _, metrics = classifiers.train_classifier(
            image_data, FLAGS.model_dir, architecture=architecture, epochs=FLAGS.epochs,
            batch_size=FLAGS.batch_size, learning_rate=FLAGS.learning_rate,
            strategy=FLAGS.strategy, seed=FLAGS.seed, weights_path=FLAGS.weights_path,
            steps_per_epoch=FLAGS.steps_per_epoch,
            checkpoint_every_steps=FLAGS.checkpoint_every_steps)
    except (ValueError, FileNotFoundError, training.TrainingError) as error:
        sys.exit(f"error: {error}")
    print(f"Held-out accuracy: {100 * metrics['held_out_accuracy']:.2f} % on "
          f"{metrics['num_held_out']} images ({metrics['train_seconds']:.1f} s training)")
    print(f"Saved {FLAGS.model_dir}/{classifiers.KERAS_FILENAME} (metrics.json beside it)")


def run():
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
