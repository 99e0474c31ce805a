"""The one error of the weights package: a weight file that cannot be read, is refused as
unsafe, or fits no released architecture (a ``ValueError``; the message names the file)."""

from __future__ import annotations


class ReferenceWeightsError(ValueError):
    """A weight file that cannot be read, is refused as unsafe, or fits no released
    architecture. The message names the file and the problem."""
