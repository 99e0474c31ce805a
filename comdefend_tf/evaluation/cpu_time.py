"""CPU time of an evaluation, the cost measure of the protocols (wall time depends on what
else the machine runs; CPU-seconds much less so).

``process_cpu_seconds`` is user + system time of this process and of its waited-for children
(``resource.getrusage``), from process start: the number the reports quote, total and per
example.
"""

from __future__ import annotations

import resource


def process_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its terminated, waited-for children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


class CpuClock:
    """Measures CPU seconds from its creation: ``clock.seconds()``."""

    def __init__(self):
        self.start = process_cpu_seconds()

    def seconds(self) -> float:
        return process_cpu_seconds() - self.start
