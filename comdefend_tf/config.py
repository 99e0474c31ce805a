"""The ComDefend configuration object and the named configurations.

One frozen dataclass holds every architectural and training setting; the binaries read their
defaults from here rather than re-declaring them. Named configs:

* ``paper``: the widths of the authors' released RGB model (``enc20_0.0001``/``dec20_0.0001``,
  783,372 + 783,363 parameters for RGB). With ``input_channels=1`` it serves 1-channel data
  with 4 code channels.
* ``released_gray``: the widths of the authors' released 1-channel (Fashion-MNIST) model
  (``enc_mnist``/``dec_mnist``, 813,220 + 813,217 parameters).
* ``small`` and ``tiny``: narrow stacks for fast runs and unit tests.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

TRAIN_MODES = ("soft", "straight_through")
INFERENCE_MODES = ("hard", "soft")
BITS_PER_INPUT_CHANNEL = 4


@dataclasses.dataclass(frozen=True)
class ComDefendConfig:
    """Everything needed to build and train a ComDefend model.

    Attributes:
      name: a label for logs and saved metadata.
      input_channels: image channels (1 grayscale, 3 RGB).
      code_channels: code bits per pixel (the release: 4 per input channel).
      encoder_widths: output channels of ComCNN's hidden convolutions, first layer first; a final
        linear convolution to ``code_channels`` follows.
      decoder_widths: output channels of ResCNN's hidden convolutions; a final convolution to
        ``input_channels`` with a sigmoid follows.
      lambda_code: weight of the code penalty ``mean(soft_code ** 2)`` in the loss (paper 1e-4).
      train_noise_std: standard deviation of the Gaussian noise subtracted from the code logits
        during training (the release: 20.0).
      inference_noise_std: the same at inference (the release: 1.0; 0 is deterministic).
      train_mode: ``soft`` (the paper: the decoder sees sigmoid(noisy logits)) or
        ``straight_through`` (the decoder sees hard bits, gradients pass straight through).
      inference_mode: ``hard`` (decoder fed 0/1 bits; the RGB release) or ``soft`` (decoder fed
        sigmoid(noisy logits); the Fashion-MNIST release).
      noise_warmup_steps: optimizer steps over which the training noise std ramps linearly from
        0 to ``train_noise_std`` (0: full noise from the first step, as in the paper). Without
        it, noise of std 20 drowns the untrained code, the decoder learns to ignore it and its
        sigmoid saturates (the "black reconstructions" users of the release reported).
    """

    name: str = "paper"
    input_channels: int = 3
    code_channels: int = 12
    encoder_widths: tuple[int, ...] = (16, 32, 64, 128, 256, 128, 64, 32)
    decoder_widths: tuple[int, ...] = (32, 64, 128, 256, 128, 64, 32, 16)
    lambda_code: float = 1e-4
    train_noise_std: float = 20.0
    inference_noise_std: float = 0.0
    train_mode: str = "soft"
    inference_mode: str = "hard"
    noise_warmup_steps: int = 0

    def __post_init__(self):
        # Lists from JSON become tuples so configs stay hashable and comparable.
        object.__setattr__(self, "encoder_widths", tuple(int(w) for w in self.encoder_widths))
        object.__setattr__(self, "decoder_widths", tuple(int(w) for w in self.decoder_widths))
        if self.input_channels < 1:
            raise ValueError(f"input_channels must be >= 1, got {self.input_channels}")
        if self.code_channels < 1:
            raise ValueError(f"code_channels must be >= 1, got {self.code_channels}")
        if not self.encoder_widths or not self.decoder_widths:
            raise ValueError("encoder_widths and decoder_widths must each list at least one width")
        if any(w < 1 for w in self.encoder_widths + self.decoder_widths):
            raise ValueError(f"layer widths must be positive: {self.encoder_widths}, "
                             f"{self.decoder_widths}")
        if self.train_mode not in TRAIN_MODES:
            raise ValueError(f"train_mode must be one of {TRAIN_MODES}, got {self.train_mode!r}")
        if self.inference_mode not in INFERENCE_MODES:
            raise ValueError(
                f"inference_mode must be one of {INFERENCE_MODES}, got {self.inference_mode!r}")
        for field in ("train_noise_std", "inference_noise_std", "lambda_code",
                      "noise_warmup_steps"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)}")

    def replace(self, **changes: Any) -> "ComDefendConfig":
        """Returns a copy with ``changes`` applied (validated like a new config)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists)."""
        values = dataclasses.asdict(self)
        values["encoder_widths"] = list(self.encoder_widths)
        values["decoder_widths"] = list(self.decoder_widths)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ComDefendConfig":
        """Inverse of ``to_dict``; unknown keys are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown ComDefendConfig fields: {sorted(unknown)}")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


_NAMED = {
    "paper": ComDefendConfig(name="paper"),
    "released_gray": ComDefendConfig(
        name="released_gray", input_channels=1, code_channels=4,
        encoder_widths=(32, 64, 128, 256, 128, 64, 64, 32),
        decoder_widths=(32, 64, 128, 256, 128, 64, 64, 32),
        inference_mode="soft"),
    "small": ComDefendConfig(name="small", encoder_widths=(16, 32, 32, 16),
                             decoder_widths=(16, 32, 32, 16)),
    "tiny": ComDefendConfig(name="tiny", encoder_widths=(8, 8), decoder_widths=(8, 8)),
}
CONFIG_NAMES = tuple(_NAMED)


def get_config(name: str, input_channels: int | None = None, **overrides: Any) -> ComDefendConfig:
    """Returns the named config, optionally for another channel count and with overrides.

    Args:
      name: one of ``CONFIG_NAMES``.
      input_channels: when given, the config is adapted to this many image channels and
        ``code_channels`` becomes 4 per channel (the release's ratio) unless overridden.
      **overrides: any other ``ComDefendConfig`` field.

    Raises:
      ValueError: unknown name or invalid field values.
    """
    if name not in _NAMED:
        raise ValueError(f"unknown config {name!r}; choose one of {', '.join(CONFIG_NAMES)}")
    config = _NAMED[name]
    if input_channels is not None and input_channels != config.input_channels:
        config = config.replace(input_channels=input_channels,
                                code_channels=BITS_PER_INPUT_CHANNEL * input_channels)
    return config.replace(**overrides) if overrides else config
