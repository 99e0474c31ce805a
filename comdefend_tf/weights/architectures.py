"""The architectures the authors released, and which one a pair of weight files holds.

A released network is 9 3x3 convolutions, one kernel ``(3, 3, in, out)`` (HWIO) and one bias
``(out,)`` each, in file order. ``network_shapes(config, network)`` gives those 18 shapes for a
config; ``infer_architecture`` returns the ``KnownArchitecture`` both files fit, or raises
``ReferenceWeightsError`` naming the file, the layer, the shape found and the shape expected
(also for a wrong array count, swapped files and files from two architectures).
``largest_network_float32_bytes()`` bounds what the importer converts before that check.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from comdefend_tf.config import ComDefendConfig, get_config
from comdefend_tf.weights.errors import ReferenceWeightsError

CONVOLUTIONS_PER_NETWORK = 9
ARRAYS_PER_NETWORK = 2 * CONVOLUTIONS_PER_NETWORK


@dataclasses.dataclass(frozen=True)
class KnownArchitecture:
    """One released architecture: a label and the config whose layer shapes it has."""

    label: str
    config: ComDefendConfig


def known_architectures() -> tuple[KnownArchitecture, ...]:
    """The architectures a released file may hold, most specific first."""
    return (
        KnownArchitecture("paper widths, RGB (enc20_0.0001/dec20_0.0001)", get_config("paper")),
        KnownArchitecture("released_gray widths, 1 channel (enc_mnist/dec_mnist)",
                          get_config("released_gray")),
        KnownArchitecture("paper widths, 1 channel", get_config("paper", input_channels=1)),
    )


def _stack_shapes(in_channels: int, widths: Sequence[int], out_channels: int):
    shapes, channels = [], in_channels
    for width in tuple(widths) + (out_channels,):
        shapes += [(3, 3, channels, width), (width,)]
        channels = width
    return shapes


def network_shapes(config: ComDefendConfig, network: str) -> list[tuple[int, ...]]:
    """Kernel/bias shapes, in file order, of ``network`` (``encoder`` or ``decoder``)."""
    if network == "encoder":
        return _stack_shapes(config.input_channels, config.encoder_widths, config.code_channels)
    if network == "decoder":
        return _stack_shapes(config.code_channels, config.decoder_widths, config.input_channels)
    raise ValueError(f"network must be 'encoder' or 'decoder', got {network!r}")


def largest_network_float32_bytes() -> int:
    """The float32 bytes of the largest network (encoder or decoder) a known architecture has:
    the most that a file any architecture fits can hold once converted to float32."""
    return max(4 * sum(int(np.prod(shape)) for shape in network_shapes(arch.config, network))
               for arch in known_architectures() for network in ("encoder", "decoder"))


def _layer_name(network: str, index: int) -> str:
    prefix = "comcnn" if network == "encoder" else "rescnn"
    return f"{prefix}_conv{index // 2 + 1} {'kernel' if index % 2 == 0 else 'bias'}"


def _first_mismatch(shapes, expected) -> int | None:
    for index, (have, want) in enumerate(zip(shapes, expected)):
        if tuple(have) != tuple(want):
            return index
    return None


def _matches(shapes, config, network) -> bool:
    expected = network_shapes(config, network)
    return len(shapes) == len(expected) and _first_mismatch(shapes, expected) is None


def infer_architecture(encoder_arrays: Sequence[np.ndarray], decoder_arrays: Sequence[np.ndarray],
                       encoder_source: str = "encoder file",
                       decoder_source: str = "decoder file") -> KnownArchitecture:
    """The released architecture both files fit.

    Args:
      encoder_arrays, decoder_arrays: arrays as returned by ``read_weight_arrays``.
      encoder_source, decoder_source: names used in error messages (the file paths).

    Raises:
      ReferenceWeightsError: a wrong number of arrays, encoder and decoder swapped, the two
        files from different architectures, or a shape that fits no known architecture (naming
        the file, the layer, the shape found and the shape expected).
    """
    for arrays, source in ((encoder_arrays, encoder_source), (decoder_arrays, decoder_source)):
        if len(arrays) != ARRAYS_PER_NETWORK:
            raise ReferenceWeightsError(
                f"{source}: holds {len(arrays)} arrays, expected {ARRAYS_PER_NETWORK} (a kernel "
                f"and a bias for each of the {CONVOLUTIONS_PER_NETWORK} convolutions)")
    encoder_shapes = [a.shape for a in encoder_arrays]
    decoder_shapes = [a.shape for a in decoder_arrays]
    known = known_architectures()

    encoder_fits = [arch for arch in known if _matches(encoder_shapes, arch.config, "encoder")]
    decoder_fits = [arch for arch in known if _matches(decoder_shapes, arch.config, "decoder")]
    for arch in encoder_fits:
        if arch in decoder_fits:
            return arch

    swapped_encoder = [a for a in known if _matches(decoder_shapes, a.config, "encoder")]
    swapped_decoder = [a for a in known if _matches(encoder_shapes, a.config, "decoder")]
    if swapped_encoder and swapped_decoder:
        raise ReferenceWeightsError(
            f"encoder and decoder swapped: {encoder_source} holds a ResCNN (decoder) and "
            f"{decoder_source} holds a ComCNN (encoder); pass them the other way round")
    if swapped_decoder and not encoder_fits:
        raise ReferenceWeightsError(
            f"{encoder_source}: holds a ResCNN (decoder, {swapped_decoder[0].label}), not a "
            f"ComCNN (encoder); was the decoder file given twice or the files swapped?")
    if swapped_encoder and not decoder_fits:
        raise ReferenceWeightsError(
            f"{decoder_source}: holds a ComCNN (encoder, {swapped_encoder[0].label}), not a "
            f"ResCNN (decoder); was the encoder file given twice or the files swapped?")
    if encoder_fits and decoder_fits:
        raise ReferenceWeightsError(
            f"{encoder_source} ({encoder_fits[0].label}) and {decoder_source} "
            f"({decoder_fits[0].label}) come from different architectures")

    # Report the first layer that fits no architecture, against the closest candidate.
    for shapes, source, network in ((encoder_shapes, encoder_source, "encoder"),
                                    (decoder_shapes, decoder_source, "decoder")):
        if any(_matches(shapes, arch.config, network) for arch in known):
            continue
        closest, closest_index = None, -1
        for arch in known:
            index = _first_mismatch(shapes, network_shapes(arch.config, network))
            if index is not None and index > closest_index:
                closest, closest_index = arch, index
        want = network_shapes(closest.config, network)[closest_index]
        raise ReferenceWeightsError(
            f"{source}: layer {_layer_name(network, closest_index)} has shape "
            f"{tuple(shapes[closest_index])}, but the closest known architecture "
            f"({closest.label}) expects {want}; the file fits no known ComDefend "
            f"{network} ({'; '.join(a.label for a in known)})")
    raise AssertionError("unreachable: every case above raises or returns")
