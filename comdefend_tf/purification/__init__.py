"""Purifying files and datasets: plans, refusals, the purify command's loop, the Beam pipeline.

``plan`` (inputs and outputs, decided before any work), ``refusals`` (reason words and lines),
``files`` (the purify command's core); the Beam pipeline (``pipeline``, with ``sources``,
``handler``, ``outputs`` and ``counters``) needs the [beam] extra.
"""
