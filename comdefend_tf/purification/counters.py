"""The purify pipeline's Beam counters: one namespace, fixed names, read back after the run.

Counters (namespace ``METRICS_NAMESPACE``): ``inputs``, ``purified``, ``input_bytes``,
``output_bytes`` and ``refused_<reason>`` for each reason of ``refusals.REASONS``. Every input
ends as exactly one of ``purified`` or ``refused_<reason>``.
"""

from __future__ import annotations

from comdefend_tf import optional
from comdefend_tf.purification import refusals

optional.require("apache_beam", "beam", "dataset purification on Apache Beam")
from apache_beam.metrics import Metrics  # noqa: E402
from apache_beam.metrics.metric import MetricsFilter  # noqa: E402

METRICS_NAMESPACE = "comdefend_purify"
INPUTS = "inputs"
PURIFIED = "purified"
INPUT_BYTES = "input_bytes"
OUTPUT_BYTES = "output_bytes"


def refused_name(reason: str) -> str:
    """The counter of one refusal reason: ``refused_<reason>``."""
    return f"refused_{reason}"


COUNTER_NAMES = (INPUTS, PURIFIED, INPUT_BYTES, OUTPUT_BYTES) + tuple(
    refused_name(reason) for reason in refusals.REASONS)


def counter(name: str):
    """A Beam counter of this pipeline (create it in a DoFn's ``__init__``)."""
    if name not in COUNTER_NAMES:
        raise ValueError(f"unknown counter {name!r}; known: {COUNTER_NAMES}")
    return Metrics.counter(METRICS_NAMESPACE, name)


def read_counters(result) -> dict[str, int]:
    """Every counter of ``COUNTER_NAMES`` of a finished pipeline ``result`` (committed values,
    attempted where the runner commits none), zero when absent."""
    values = dict.fromkeys(COUNTER_NAMES, 0)
    query = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
    for found in query["counters"]:
        name = found.key.metric.name
        if name in values:
            value = found.committed if found.committed is not None else found.attempted
            values[name] += int(value or 0)
    return values
