"""How a purifier is served, fixed at export time: ``ExportSettings`` and the values it resolves.

Invalid settings raise ``ValueError`` when constructed. ``overlap_for``, ``chunk_pixels_for`` and
``effective_noise_std`` resolve the settings left to the purifier (None) against its config,
for the signatures and the export metadata alike.
"""

from __future__ import annotations

import dataclasses

from comdefend_tf.model import ComDefend
from comdefend_tf.patches import receptive_field_radius
from comdefend_tf.serving import tiling

CLASSIFIER_OUTPUTS = ("auto", "logits", "probabilities")
# Keeps the in-graph pixel sums exact in int64 (``request_checks.validate_declared_pixels``).
MAX_PIXELS_CEILING = 2 ** 62


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    """How the purifier is served; fixed at export time.

    Attributes:
      inference_noise_std: standard deviation of the noise subtracted from the code logits in
        the served graph; 0 is deterministic; None keeps the purifier config's value.
      noise_seed: None (the default): the served noise is seeded from the operating system's
        entropy in every process that loads the export, so it cannot be predicted from the
        files. An integer in [0, 2**63): every process replays the same sequence of draws
        (reproducible per process, and predictable by anyone holding the export; for tests and
        audits, not for production). Only used with noise.
      patch_size: side in pixels of the output tiles images are cut into inside the graph.
      patch_overlap: context pixels purified around each tile and discarded; None uses the
        network's receptive field radius, with which tiled output equals whole-image output.
      patch_batch_size: full-size windows (``patch_size + 2 * overlap`` on a side) per network
        call; smaller windows are packed into a call up to the same number of pixels. Bounds
        the graph's peak memory.
      max_pixels: the most pixels one request may carry, summed over its images (batch x
        height x width for the float signatures; the sum of the declared sizes for
        ``purify_bytes``). Bounds the work and memory of one request. Below 2**62.
      max_batch_size: the most images one request may carry (every signature).
      classifier_outputs: what the classifier's last layer emits: ``probabilities``,
        ``logits`` (a softmax is applied) or ``auto`` (probabilities when its last layer is a
        softmax).
    """

    inference_noise_std: float | None = None
    noise_seed: int | None = None
    patch_size: int = 256
    patch_overlap: int | None = None
    patch_batch_size: int = 4
    max_pixels: int = 4096 * 4096
    max_batch_size: int = 1024
    classifier_outputs: str = "auto"

    def __post_init__(self):
        if self.inference_noise_std is not None and self.inference_noise_std < 0:
            raise ValueError(f"inference_noise_std must be >= 0, got {self.inference_noise_std}")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        if self.patch_overlap is not None and self.patch_overlap < 0:
            raise ValueError(f"patch_overlap must be >= 0, got {self.patch_overlap}")
        if self.patch_batch_size < 1:
            raise ValueError(f"patch_batch_size must be >= 1, got {self.patch_batch_size}")
        if not 1 <= self.max_pixels < MAX_PIXELS_CEILING:
            raise ValueError(f"max_pixels must be in [1, 2**62), got {self.max_pixels}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.noise_seed is not None and not 0 <= self.noise_seed < 2 ** 63:
            raise ValueError(f"noise_seed must be in [0, 2**63), got {self.noise_seed}")
        if self.classifier_outputs not in CLASSIFIER_OUTPUTS:
            raise ValueError(f"classifier_outputs must be one of {CLASSIFIER_OUTPUTS}, got "
                             f"{self.classifier_outputs!r}")

    def overlap_for(self, config) -> int:
        """The served tiles' context pixels: ``patch_overlap``, else the receptive field radius
        of ``config`` (tiled output then equals whole-image output)."""
        return receptive_field_radius(config) if self.patch_overlap is None else self.patch_overlap

    def chunk_pixels_for(self, config) -> int:
        """Window pixels per network call in the served graph (``tiling.chunk_pixels_for``)."""
        return tiling.chunk_pixels_for(self.patch_size, self.overlap_for(config),
                                       self.patch_batch_size)


def effective_noise_std(purifier: ComDefend, settings: ExportSettings) -> float:
    """The code noise std of the served graph: the settings' value, else the purifier's."""
    return float(purifier.config.inference_noise_std if settings.inference_noise_std is None
                 else settings.inference_noise_std)
