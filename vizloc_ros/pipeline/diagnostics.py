"""Counters and rates summarised for ``/diagnostics`` and the replay's report."""
from __future__ import annotations

import time
from collections import Counter, deque


def diagnostics_summary(counters: Counter, latency_s=None, rate_hz=None) -> dict:
    """Key/value pairs for diagnostic_updater (strings), from a core's counters."""
    out = {k: str(v) for k, v in sorted(counters.items())}
    if latency_s is not None:
        out["latency_ms"] = f"{1000 * latency_s:.1f}"
    if rate_hz is not None:
        out["input_rate_hz"] = f"{rate_hz:.1f}"
    return out


class RateMeter:
    """Messages per second over a sliding window of wall time (diagnostics only)."""

    def __init__(self, window: float = 5.0):
        self.window = window
        self._times: deque = deque()

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._times.append(now)
        while self._times and now - self._times[0] > self.window:
            self._times.popleft()

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        while self._times and now - self._times[0] > self.window:
            self._times.popleft()
        return len(self._times) / self.window
