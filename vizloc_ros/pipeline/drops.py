"""Why an input produced no output, as data: a :class:`Drop` with a typed :class:`DropReason`.

Why typed: the cores return their drops with their results, and the counters (in
``/diagnostics`` and the replay's ``metrics.json``) and the nodes' log lines are both
derived from the reason, so no caller parses counter names back into reasons.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import Enum


class DropReason(Enum):
    """A reason an input was dropped; ``counter`` is the name it is counted under and
    ``label`` how a log line says it (after the input's name: "image dropped (...)")."""

    # the regressor: an image message that gave no pose
    INVALID_IMAGE = ("dropped_invalid_image", "dropped (invalid image)")
    IMAGE_TOO_LARGE = ("dropped_image_too_large", "dropped (image too large)")
    ESTIMATOR = ("dropped_estimator", "dropped (estimator)")
    NON_FINITE = ("dropped_non_finite", "dropped (non finite)")
    # either node: the input raised (one line per kind of exception, not per message)
    ERROR = ("dropped_error", "dropped")
    # the fusion: a message it could not read
    ABSOLUTE_INVALID = ("dropped_absolute_invalid", "dropped (absolute invalid)")
    COARSE_INVALID = ("dropped_coarse_invalid", "dropped (coarse invalid)")
    ODOM_INVALID = ("dropped_odom_invalid", "dropped (odom invalid)")
    IMU_INVALID = ("dropped_imu_invalid", "dropped (imu invalid)")
    INITIALPOSE_INVALID = ("dropped_initialpose_invalid", "dropped (initialpose invalid)")
    NON_FINITE_ESTIMATE = ("dropped_non_finite_estimate", "dropped (non finite estimate)")
    # the fusion: a message it read and refused (its gate, its order, its state)
    ABSOLUTE_REJECTED = ("absolute_rejected", "rejected")
    ABSOLUTE_DROPPED = ("absolute_dropped", "dropped")
    COARSE_REJECTED = ("coarse_rejected", "rejected")
    COARSE_DROPPED = ("coarse_dropped", "dropped")
    ODOM_REJECTED = ("odom_rejected", "rejected")
    ODOM_DROPPED = ("odom_dropped", "dropped")
    IMU_REJECTED = ("imu_rejected", "rejected")
    IMU_DROPPED = ("imu_dropped", "dropped")
    INITIALPOSE_REJECTED = ("initialpose_rejected", "rejected")
    INITIALPOSE_DROPPED = ("initialpose_dropped", "dropped")
    # the fusion: a stamp far off its clock (a spike, or the first inputs of a clock jump
    # that the other inputs have not confirmed yet), see pipeline/clock_guard.py
    ABSOLUTE_OFF_CLOCK = ("absolute_off_clock", "dropped (stamp off the fusion's clock)")
    COARSE_OFF_CLOCK = ("coarse_off_clock", "dropped (stamp off the fusion's clock)")
    ODOM_OFF_CLOCK = ("odom_off_clock", "dropped (stamp off the fusion's clock)")
    IMU_OFF_CLOCK = ("imu_off_clock", "dropped (stamp off the fusion's clock)")

    def __init__(self, counter: str, label: str):
        self.counter = counter
        self.label = label

    @classmethod
    def refused(cls, source: str, status: str) -> "DropReason":
        """The reason for a fusion result ``status`` (rejected | dropped) of an input
        counted as ``source`` (absolute, coarse, odom, imu, initialpose)."""
        return cls[f"{source}_{status}".upper()]

    @classmethod
    def off_clock(cls, source: str) -> "DropReason":
        """The reason for an input of ``source`` (absolute, coarse, odom, imu) stamped far
        off the fusion's clock."""
        return cls[f"{source}_off_clock".upper()]


@dataclass(frozen=True)
class Drop:
    """One dropped input: why (typed) and the details in words, for the log."""

    reason: DropReason
    detail: str


class DropCounting:
    """What a core does with its drops: each is counted under its reason's name in the
    core's ``counters`` (so the counters are derived from the drops), the last is kept."""

    counters: Counter
    last_drop: Drop | None = None

    def record_drop(self, drop: Drop) -> None:
        """Count a drop; also one the caller saw (a node: an input whose handling raised)."""
        self.counters[drop.reason.counter] += 1
        self.last_drop = drop

    def _drop(self, reason: DropReason, detail: str) -> Drop:
        drop = Drop(reason, detail)
        self.record_drop(drop)
        return drop
