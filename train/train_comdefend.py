"""Trains ComDefend (ComCNN + ResCNN) on clean images and saves it to --model_dir.

    python -m train.train_comdefend --dataset=mnist5k --config=paper --epochs=1 \
        --model_dir=runs/comdefend

Prints per-epoch loss terms with Keras progress bars, then the held-out reconstruction PSNR
(dB) and code statistics. A killed run restarted with the same command resumes at its last
checkpoint (every --checkpoint_every_steps steps) with the batches it had not seen; a finished
run only rewrites the model. Flags left unset take the named config's values (one source of
truth: comdefend_tf.config). TensorBoard logs go to MODEL_DIR/logs: the loss terms, and under
logs/images pictures of --summary_images fixed held-out images after every epoch (originals,
purified, code bits; comdefend_tf.training.summaries).

Exits non-zero, without writing or replacing MODEL_DIR/comdefend.keras, when the loss or the
weights become NaN or infinite (the checkpoints stay: resume with a lower --learning_rate) or
when the trained purifier collapsed to a constant output (held-out PSNR within
--collapse_margin_db of predicting the mean image; metrics.json records the verdict).
"""

import os
import sys

from absl import app, flags

from comdefend_tf import config as config_lib
from comdefend_tf.cli import flags as cli_flags
from comdefend_tf.io import datasets as data_lib
from comdefend_tf.training import precision, purifier, run_state, strategies, summaries

cli_flags.define_data_flags()
cli_flags.define_training_run_flags(
    epochs=1, batch_size=20, strategies=strategies.STRATEGIES,
    checkpoint_every_steps=run_state.DEFAULT_CHECKPOINT_EVERY_STEPS)
cli_flags.define_inference_noise_flag()
cli_flags.define_precision_flag()
flags.adopt_module_key_flags(cli_flags)  # --help lists the shared flags too
flags.DEFINE_enum("config", "paper", config_lib.CONFIG_NAMES,
                  "Named architecture; its input channels follow the dataset.")
flags.DEFINE_float("lambda_code", None, "Weight of the code penalty mean(soft_code^2) "
                   "(default: the config's, 1e-4 as in the paper).", lower_bound=0)
flags.DEFINE_float("train_noise_std", None, "Standard deviation of the Gaussian noise on the "
                   "code logits in training; larger pushes the code towards binary but can stall "
                   "training (default: the config's).", lower_bound=0)
flags.DEFINE_integer("noise_warmup_steps", None, "Optimizer steps over which the training noise "
                     "ramps linearly from 0 to --train_noise_std (0: full noise at once, as in the "
                     "paper; default: the config's).", lower_bound=0)
flags.DEFINE_enum("train_mode", None, config_lib.TRAIN_MODES,
                  "soft: decoder sees sigmoid(noisy logits) (the paper); straight_through: "
                  "decoder sees hard bits with a straight-through gradient.")
flags.DEFINE_enum("inference_mode", None, config_lib.INFERENCE_MODES,
                  "hard: decoder sees 0/1 bits (RGB release); soft: sigmoid of the logits.")
flags.DEFINE_float("collapse_margin_db", purifier.DEFAULT_COLLAPSE_MARGIN_DB,
                   "Held-out PSNR (dB) the purifier must gain over predicting the mean image; "
                   "below it the run fails as collapsed (constant output). Negative: no check.")
flags.DEFINE_integer("summary_images", summaries.DEFAULT_NUM_IMAGES,
                     "Held-out images drawn in TensorBoard after every epoch "
                     "(MODEL_DIR/logs/images: the originals, their purified images and code "
                     "bits, the same images every epoch); 0: none. Not written with "
                     "--strategy=multi_worker.", lower_bound=0)
flags.mark_flag_as_required("model_dir")

FLAGS = flags.FLAGS


def config_from_flags(channels: int) -> config_lib.ComDefendConfig:
    overrides = {name: getattr(FLAGS, name) for name in (
        "lambda_code", "train_noise_std", "noise_warmup_steps", "inference_noise_std",
        "train_mode", "inference_mode")
        if getattr(FLAGS, name) is not None}
    return config_lib.get_config(FLAGS.config, input_channels=channels, **overrides)


def collapse_advice(config: config_lib.ComDefendConfig) -> str:
    """What to run instead after a collapse (the README's measurements on digits)."""
    lower = FLAGS.learning_rate / 10
    warmup = max(config.noise_warmup_steps, 100)
    return (f"Fix: rerun with --learning_rate={lower:g} --noise_warmup_steps={warmup} and a new "
            f"--model_dir (the paper widths train on digits with --learning_rate=1e-4 "
            f"--noise_warmup_steps=100; at the paper's 1e-3 they collapse to black output).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # MultiWorkerMirroredStrategy must exist before TensorFlow runs any op (data loading does).
    try:
        strategy = strategies.make_strategy(FLAGS.strategy)
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    try:
        image_data = cli_flags.load_data_from_flags()
    except data_lib.DataError as error:
        sys.exit(f"error: {error}")
    config = config_from_flags(image_data.channels)
    chosen_precision = precision.apply_precision(FLAGS.precision)
    print(f"Training ComDefend config {config.name!r} on {image_data.name} "
          f"({image_data.num_train} training / {image_data.num_test} held-out images, "
          f"{image_data.image_shape}), train noise std {config.train_noise_std}, "
          f"mode {config.train_mode}, strategy {FLAGS.strategy}, precision {chosen_precision}")
    log_dir = os.path.join(FLAGS.model_dir, run_state.LOG_SUBDIR)
    callbacks = []
    if FLAGS.summary_images and FLAGS.strategy != "multi_worker":  # callbacks are fit's
        callbacks.append(summaries.HeldOutImages(
            summaries.held_out_examples(image_data.test, FLAGS.summary_images), log_dir))
    try:
        _, metrics = purifier.train_comdefend(
            config, image_data, FLAGS.model_dir, epochs=FLAGS.epochs,
            batch_size=FLAGS.batch_size, learning_rate=FLAGS.learning_rate, strategy=strategy,
            seed=FLAGS.seed, steps_per_epoch=FLAGS.steps_per_epoch, extra_callbacks=callbacks,
            checkpoint_every_steps=FLAGS.checkpoint_every_steps,
            collapse_margin_db=FLAGS.collapse_margin_db if FLAGS.collapse_margin_db >= 0
            else None)
    except purifier.CollapsedModel as error:
        sys.exit(f"error: {error}.\n{collapse_advice(config)}")
    except run_state.TrainingError as error:
        sys.exit(f"error: {error}")
    report = metrics["held_out"]
    print(f"Held-out reconstruction PSNR (dB): {report['psnr_db']:.2f} on "
          f"{report['num_images']} images")
    print(f"Code: {report['bits_per_pixel']} bits per pixel, "
          f"{100 * report['near_zero_fraction']:.2f} % of logits within 1 of 0, median |logit| "
          f"{report['median_abs_logit']:.2f}, {100 * report['ones_fraction']:.1f} % ones, "
          f"expected flips under inference noise std 1: {100 * report['noise1_flip_rate']:.2f} %")
    print(f"Saved {FLAGS.model_dir}/comdefend.keras (config.json, metrics.json beside it)")
    print(f"TensorBoard (loss curves, held-out pictures): tensorboard --logdir {log_dir}")


def run():
    """Console-script entry point (``comdefend-train``)."""
    app.run(main)


if __name__ == "__main__":
    run()
