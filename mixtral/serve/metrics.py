"""What `GET /metrics` reports, in the Prometheus text exposition format (version 0.0.4).

Written out by hand: the format is a few lines per metric (`# HELP`, `# TYPE`, `name{label="v"} value`), and the
server needs counters, gauges, one histogram and a tokens-per-second rate, nothing a client library would add.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Iterable, Sequence

Sample = tuple[dict[str, str], float]  # labels, value


class Histogram:
    """Counts of observations at or below each bucket's upper bound, their sum and count (Prometheus' histogram)."""

    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(bounds)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def samples(self) -> list[tuple[str, dict[str, str], float]]:
        """(name suffix, labels, value) rows: cumulative `_bucket`s up to le="+Inf", then `_sum` and `_count`."""
        rows = [("_bucket", {"le": _number(b)}, float(c)) for b, c in zip(self.bounds, self.counts)]
        rows.append(("_bucket", {"le": "+Inf"}, float(self.count)))
        return rows + [("_sum", {}, self.sum), ("_count", {}, float(self.count))]


class Rate:
    """Events per second over the last `window` seconds (the tokens/s gauge), safe to add to from any thread."""

    def __init__(self, window: float = 10.0):
        self.window = window
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, n: int, now: float | None = None) -> None:
        with self._lock:
            self._events.append((time.monotonic() if now is None else now, n))

    def per_second(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._events and self._events[0][0] < now - self.window:
                self._events.popleft()
            return sum(n for _, n in self._events) / self.window


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if float(value).is_integer() else repr(float(value))


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    escaped = (str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for v in labels.values())
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(labels, escaped)) + "}"


def render(metrics: Iterable[tuple[str, str, str, Iterable[Sample] | Histogram]]) -> str:
    """The exposition text of (name, type, help, samples) entries; a histogram entry gives a `Histogram`."""
    lines = []
    for name, kind, help_text, samples in metrics:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        if isinstance(samples, Histogram):
            for suffix, labels, value in samples.samples():
                lines.append(f"{name}{suffix}{_labels(labels)} {_number(value)}")
        else:
            for labels, value in samples:
                lines.append(f"{name}{_labels(labels)} {_number(value)}")
    return "\n".join(lines) + "\n"


def parse(text: str) -> dict[str, float]:
    """{'name{label="v"}': value} of an exposition text (comments skipped): for tests and the benchmark."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values
