"""ComCNN, ResCNN and the ComDefend model that owns and trains both.

ComDefend (Jia, Wei, Cao, Foroosh, CVPR 2019, arXiv 1811.12673) purifies an image by
compressing it to a binary code and reconstructing it:

    code_logits = ComCNN(images)                       # [B, H, W, code_channels]
    noisy       = code_logits - N(0, std**2)           # CodeNoise
    code        = sigmoid(noisy)  or  bits(noisy)      # soft path / hard bits
    purified    = ResCNN(code)                         # [B, H, W, channels] in (0, 1)

Training (clean images only) minimises ``mean((purified - images)**2) +
lambda_code * mean(soft_code**2)`` with ``soft_code = sigmoid(noisy)``. All convolutions are
3x3, stride 1, "same", so both networks are fully convolutional: any height and width.

Everything here uses ``keras.ops``: the model runs on every Keras 3 backend. Training with
``fit`` works on any backend; the distributed custom loop lives in
``comdefend_tf.training.purifier``.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import keras
from keras import ops

from comdefend_tf.config import ComDefendConfig
from comdefend_tf.io.atomic import atomic_path, write_json_atomic
from comdefend_tf.layers import CodeNoise, StraightThroughBinarize

KERAS_FILENAME = "comdefend.keras"


def _conv(filters: int, fan_in_channels: int, activation, name: str,
          dtype=None) -> keras.layers.Conv2D:
    # The release initialises kernels with a truncated normal of stddev sqrt(2 / fan_in).
    stddev = math.sqrt(2.0 / (9 * fan_in_channels))
    return keras.layers.Conv2D(
        filters, 3, padding="same", activation=activation, name=name,
        kernel_initializer=keras.initializers.TruncatedNormal(stddev=stddev),
        bias_initializer="zeros", dtype=dtype)


def _conv_stack(inputs, in_channels: int, widths: Sequence[int], out_channels: int,
                out_activation, prefix: str):
    features, channels = inputs, in_channels
    for index, width in enumerate(widths, start=1):
        features = _conv(width, channels, "elu", f"{prefix}_conv{index}")(features)
        channels = width
    # The output convolution stays float32 under a mixed policy (comdefend_tf.training.precision): the
    # code bits are thresholded, and the purified images returned, in float32.
    return _conv(out_channels, channels, out_activation,
                 f"{prefix}_conv{len(widths) + 1}", dtype="float32")(features)


def build_comcnn(config: ComDefendConfig) -> keras.Model:
    """ComCNN, the encoder: images in [0, 1] -> code logits.

    Input: float ``[batch, height, width, config.input_channels]`` in [0, 1] (shifted by -0.5
    inside the model, as in the release). Output: float ``[batch, height, width,
    config.code_channels]``, unbounded logits (bit = logit > 0).
    """
    images = keras.Input((None, None, config.input_channels), name="images")
    centred = keras.layers.Rescaling(1.0, offset=-0.5, name="centre")(images)
    code_logits = _conv_stack(centred, config.input_channels, config.encoder_widths,
                              config.code_channels, None, "comcnn")
    return keras.Model(images, code_logits, name="comcnn")


def build_rescnn(config: ComDefendConfig) -> keras.Model:
    """ResCNN, the decoder: a code (bits or soft values in [0, 1]) -> images in (0, 1).

    Input: float ``[batch, height, width, config.code_channels]``. Output: float ``[batch,
    height, width, config.input_channels]`` through a final sigmoid.
    """
    code = keras.Input((None, None, config.code_channels), name="code")
    purified = _conv_stack(code, config.code_channels, config.decoder_widths,
                           config.input_channels, "sigmoid", "rescnn")
    return keras.Model(code, purified, name="rescnn")


@keras.saving.register_keras_serializable(package="comdefend_tf")
class ComDefend(keras.Model):
    """The purifier: ComCNN + code noise + binarization + ResCNN, trained jointly.

    Call: ``purified = model(images, training=False)`` with images float32 ``[batch, height,
    width, channels]`` in [0, 1]; purified has the same shape, values in (0, 1). With
    ``training=True`` the training noise and ``config.train_mode`` apply, otherwise the
    inference noise and ``config.inference_mode``. The model is an ordinary Keras layer: it
    composes with classifiers (``keras.Sequential([purifier, classifier])``).

    ``fit`` needs no targets (``model.fit(images)``) and logs the named loss terms ``mse`` and
    ``code_penalty``, ``psnr`` (dB, on [0, 1] images) and ``near_zero`` (the fraction of code
    logits within 1 of 0: how far the code is from binary).
    """

    def __init__(self, config: ComDefendConfig | dict | None = None, seed: int | None = None,
                 encoder: keras.Model | None = None, decoder: keras.Model | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        if config is None:
            config = ComDefendConfig()
        elif isinstance(config, dict):
            config = ComDefendConfig.from_dict(config)
        self.config = config
        self.seed = seed
        # Given sub-models are shared, not copied (``with_inference``); they are not part of
        # ``get_config``: a saved model rebuilds its own and loads the weights into them.
        self.encoder = encoder if encoder is not None else build_comcnn(config)
        self.decoder = decoder if decoder is not None else build_rescnn(config)
        self.code_noise = CodeNoise(config.train_noise_std,
                                    config.inference_noise_std, seed=seed, name="code_noise")
        self.binarize = StraightThroughBinarize("identity", name="binarize")
        self.mse_tracker = keras.metrics.Mean(name="mse")
        self.code_penalty_tracker = keras.metrics.Mean(name="code_penalty")
        self.psnr_tracker = keras.metrics.Mean(name="psnr")
        self.near_zero_tracker = keras.metrics.Mean(name="near_zero")
        self._last_forward = None
        # Both sub-models are functional and already built; nothing depends on input shape.
        self.built = True

    # ----------------------------------------------------------------------------- forward
    def forward(self, images, training=False, noise=None, mode: str | None = None,
                noise_scale=None) -> dict:
        """All intermediate tensors of one purification.

        Args:
          images: float ``[batch, height, width, channels]`` in [0, 1].
          training: selects training noise and ``train_mode`` (True) or inference settings.
          noise: optional noise draw to subtract instead of a fresh one (``CodeNoise``).
          mode: overrides the code path: ``soft`` (sigmoid of noisy logits), ``hard`` (0/1
            bits, straight-through gradient) or None for the config's choice.
          noise_scale: scalar in [0, 1] multiplying the training noise std (warm-up); None
            derives it from ``config.noise_warmup_steps`` and the compiled optimizer's step.

        Returns:
          dict with ``code_logits`` and ``noisy_logits`` (``[B, H, W, code_channels]``),
          ``soft_code`` (sigmoid of the noisy logits, in (0, 1)), ``code`` (what the decoder
          saw) and ``purified`` (``[B, H, W, channels]`` in (0, 1)).
        """
        images = ops.convert_to_tensor(images)
        code_logits = self.encoder(images, training=training)
        if training and noise_scale is None:
            noise_scale = self.noise_warmup_scale()
        noisy_logits = self.code_noise(code_logits, training=training, noise=noise,
                                       std_scale=noise_scale)
        soft_code = ops.sigmoid(noisy_logits)
        if mode is None:
            if training:
                mode = "soft" if self.config.train_mode == "soft" else "hard"
            else:
                mode = self.config.inference_mode
        code = soft_code if mode == "soft" else self.binarize(noisy_logits)
        purified = self.decoder(code, training=training)
        return {"code_logits": code_logits, "noisy_logits": noisy_logits,
                "soft_code": soft_code, "code": code, "purified": purified}

    def noise_warmup_scale(self, step=None):
        """``min(1, step / config.noise_warmup_steps)`` (a float32 scalar), with ``step`` the
        compiled optimizer's iteration count by default; None when there is no warm-up.

        Reading the step from the optimizer (not a model variable) keeps the schedule right
        after ``BackupAndRestore`` resumes a run and adds nothing to the saved weights.
        """
        warmup = self.config.noise_warmup_steps
        if not warmup:
            return None
        if step is None:
            optimizer = getattr(self, "optimizer", None)
            if optimizer is None:
                return None
            step = optimizer.iterations
        return ops.minimum(1.0, ops.cast(step, "float32") / float(warmup))

    def call(self, images, training=None):
        # A frozen purifier (trainable=False) runs its inference settings even inside a
        # classifier's fit, as Keras' BatchNormalization does: training noise would otherwise
        # corrupt what the classifier is fine-tuned on.
        outputs = self.forward(images, training=bool(training) and self.trainable)
        # compute_loss runs in the same trace right after call and reads these tensors, so the
        # loss terms need no second forward pass.
        self._last_forward = outputs
        return outputs["purified"]

    def code_bits(self, images, training=False):
        """0/1 code bits ``[batch, height, width, code_channels]`` (float) of ``images``,
        with the inference noise (or training noise when ``training``)."""
        outputs = self.forward(images, training=training, mode="hard")
        return outputs["code"]

    def compute_output_shape(self, input_shape):
        return input_shape

    # ------------------------------------------------------------------------------- loss
    def loss_terms(self, images, outputs: dict) -> dict:
        """Per-example loss terms, each float ``[batch]``.

        ``mse``: mean squared error of ``purified`` against ``images`` over height, width and
        channels; ``code_penalty``: ``lambda_code * mean(soft_code ** 2)``; ``loss``: their sum.
        Their batch mean is the paper's loss (plain means over all elements).
        """
        images = ops.cast(images, outputs["purified"].dtype)
        mse = ops.mean(ops.square(outputs["purified"] - images), axis=(1, 2, 3))
        penalty = self.config.lambda_code * ops.mean(
            ops.square(ops.cast(outputs["soft_code"], mse.dtype)), axis=(1, 2, 3))
        return {"mse": mse, "code_penalty": penalty, "loss": mse + penalty}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        outputs = self._last_forward
        if outputs is None or outputs["purified"] is not y_pred:
            outputs = self.forward(x, training=training)
        terms = self.loss_terms(x, outputs)
        self.mse_tracker.update_state(terms["mse"])
        self.code_penalty_tracker.update_state(terms["code_penalty"])
        self.psnr_tracker.update_state(psnr(x, outputs["purified"]))
        self.near_zero_tracker.update_state(
            ops.mean(ops.cast(ops.abs(outputs["code_logits"]) < 1.0, "float32")))
        return ops.mean(terms["loss"])

    # ---------------------------------------------------------------------- serialisation
    def get_config(self):
        # The seed is deliberately not saved: a loaded model's inference noise is seeded from
        # OS entropy in every process (``CodeNoise``), so the file cannot determine the draws
        # an attacker would face. Reproducible noise is asked for at load time
        # (``load_comdefend(..., seed=N)``), never inherited from the training run's seed.
        return {"config": self.config.to_dict(), "seed": None, "name": self.name,
                "trainable": self.trainable}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["seed"] = None  # an older file's training seed must not fix the served noise
        return cls(config.pop("config"), **config)

    def with_inference(self, noise_std: float | None = None, mode: str | None = None,
                       seed: int | None = None) -> "ComDefend":
        """A new model sharing this one's weights with other inference settings.

        ``noise_std`` and ``mode`` default to the current ones. The weights are the same
        variables (no copy): training one trains both.
        """
        changes = {}
        if noise_std is not None:
            changes["inference_noise_std"] = noise_std
        if mode is not None:
            changes["inference_mode"] = mode
        return ComDefend(self.config.replace(**changes), seed=self.seed if seed is None else seed,
                         encoder=self.encoder, decoder=self.decoder, name=self.name)


def psnr(images, reconstructions, max_value: float = 1.0):
    """Per-example PSNR in dB of ``reconstructions`` against ``images`` (both ``[B, H, W, C]``
    in [0, max_value]); float32 ``[batch]``. A perfect reconstruction gives +inf."""
    images = ops.cast(images, "float32")
    reconstructions = ops.cast(reconstructions, "float32")
    mse = ops.mean(ops.square(images - reconstructions), axis=(1, 2, 3))
    return 10.0 * ops.log10(max_value ** 2 / mse)


def load_comdefend(path: str, inference_noise_std: float | None = None,
                   inference_mode: str | None = None, seed: int | None = None) -> ComDefend:
    """Loads a ``.keras`` file (or a model directory holding ``comdefend.keras``).

    Raises:
      FileNotFoundError: naming the path, when neither exists.
      ValueError: when the file is not a ComDefend model.
    """
    if os.path.isdir(path):
        path = os.path.join(path, KERAS_FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no ComDefend model at {path!r} (expected a .keras file or a "
                                f"directory holding {KERAS_FILENAME})")
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # keras raises many types for a corrupt zip
        raise ValueError(f"cannot load a Keras model from {path!r}: {error}") from error
    if not isinstance(model, ComDefend):
        raise ValueError(f"{path!r} holds a {type(model).__name__}, not a ComDefend model")
    if inference_noise_std is not None or inference_mode is not None or seed is not None:
        model = model.with_inference(inference_noise_std, inference_mode, seed)
    return model


CONFIG_FILENAME = "config.json"
METRICS_FILENAME = "metrics.json"


def save_comdefend(model: ComDefend, model_dir: str, metrics: dict | None = None) -> str:
    """Writes ``MODEL_DIR/comdefend.keras``, ``config.json`` and ``metrics.json``.

    Each file is written under a temporary name and renamed into place, so an interrupted
    save never leaves a truncated model where a previous good one stood. ``metrics`` must be
    JSON-serialisable (numbers, strings, lists, dicts). Returns the ``.keras`` path.
    """
    os.makedirs(model_dir, exist_ok=True)
    keras_path = os.path.join(model_dir, KERAS_FILENAME)
    with atomic_path(keras_path) as partial:
        model.save(partial)
    write_json_atomic(os.path.join(model_dir, CONFIG_FILENAME), model.config.to_dict())
    write_json_atomic(os.path.join(model_dir, METRICS_FILENAME), metrics or {})
    return keras_path
