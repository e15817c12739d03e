"""Which timeline an input's stamp is on: the fusion's own, a spike off it, or a new one
that the clock of every input jumped to.

Why a guard before the fusion: a single message stamped far in the future used to become
the newest graph pose, so every later estimate stayed there (a frozen output, stamped in
the future, while every counter said "accepted"); a single odometry or IMU message
stamped far off restarted the whole fusion. But stamps of *all* inputs do jump for real
(a bag restarted or looping, sim time switched on, a robot's clock set by NTP), and then
the fusion must start over rather than drop everything. The difference is whether the
other inputs follow: a stamp off the fusion's clock is held back (the caller drops and
counts it) until every input that was active has moved to the same new timeline; then
the guard reports a clock jump and the caller restarts the fusion cleanly.

"Off the clock" means: more than ``max_future_s`` ahead of the newest stamp of all inputs
(the fusion's clock), or more than ``max_back_s`` behind the newest stamp of the same
input (each input's stamps only go forward; a late input behind the others is normal,
e.g. a camera pose after the inference's latency), or, for an input's first message,
more than :data:`ACTIVE_S` behind the clock. Stamps are message stamps, never the wall
clock, so the node and the replay decide the same.
"""
from __future__ import annotations

from dataclasses import dataclass, field

#: s of stamp time without a message after which an input is no longer waited for to
#: confirm a clock jump (it may have stopped, or be slower than this); also how far
#: behind the clock an input's first message may be (a camera pose's latency is less)
ACTIVE_S = 2.0
#: messages on a new timeline needed for a jump: one message alone is never a jump
CONFIRM_MESSAGES = 2
#: messages in a row on the new timeline, none on the old one in between, that confirm a
#: jump even when an input that was active never arrives on the new timeline
SILENT_OLD_MESSAGES = 30


@dataclass(frozen=True)
class Verdict:
    """What to do with one input: ``pass`` (fuse it), ``hold`` (drop it: off the clock),
    ``jump`` (restart the fusion, then fuse it) or ``rebase`` (the first input was off the
    second: forget what came before, then fuse it); ``offset``: s from the fusion's clock
    (positive: ahead), ``reference``: the stamp it was measured against."""

    action: str
    offset: float = 0.0
    reference: float = 0.0

    def describe(self, what: str) -> str:
        direction = "ahead of the newest stamp of the fusion's inputs" if self.offset > 0 \
            else "behind the previous stamp of the same input"
        return f"{what} stamped {abs(self.offset):.3f} s {direction}"


@dataclass
class _Timeline:
    """A candidate new timeline: its newest stamp and which inputs are on it now."""

    newest: float
    on: dict = field(default_factory=dict)       # input -> newest stamp it sent on this timeline
    counts: dict = field(default_factory=dict)   # input -> messages it sent on this timeline
    messages: int = 0
    in_a_row: int = 0                            # on this timeline, none on the fusion's since

    def holds(self, s: float, max_future_s: float, max_back_s: float) -> bool:
        return self.newest - max_back_s <= s <= self.newest + max_future_s

    def add(self, stream: str, s: float) -> None:
        self.newest = max(self.newest, s)
        self.on[stream] = max(self.on.get(stream, s), s)
        self.counts[stream] = self.counts.get(stream, 0) + 1
        self.messages += 1
        self.in_a_row += 1


class ClockGuard:
    """Classifies each input's stamp against the fusion's clock (see the module docstring)."""

    def __init__(self, max_future_s: float, max_back_s: float):
        self.max_future_s = float(max_future_s)
        self.max_back_s = float(max_back_s)
        self.clock: float | None = None    # newest stamp of any input on the fusion's timeline
        self.newest: dict = {}             # input -> its newest stamp on the fusion's timeline
        self.counts: dict = {}             # input -> messages it sent on the fusion's timeline
        self._candidate: _Timeline | None = None
        self._support = 0                  # inputs that agreed with the clock since it was set

    def check(self, stream: str, s: float) -> Verdict:
        """The verdict for an input ``stream`` (absolute, coarse, odom, imu) stamped ``s``."""
        if self.clock is None or (self._support < CONFIRM_MESSAGES and self._off_clock(stream, s, starting=True)):
            # the first input sets the clock; while no second one agrees with it, an input
            # off it sets it anew (the first may have been the spike: it must not hold the
            # clock for the rest of the run), and what came before it is to be forgotten
            verdict = Verdict("pass") if self.clock is None else Verdict("rebase", s - self.clock, self.clock)
            self.clock, self.newest, self.counts, self._support, self._candidate = s, {}, {}, 0, None
            self._on_clock(stream, s)
            return verdict
        candidate = self._candidate
        if not self._off_clock(stream, s):
            self._on_clock(stream, s)
            if candidate is not None:   # this input is (back) on the fusion's timeline
                candidate.on.pop(stream, None)
                candidate.counts.pop(stream, None)
                candidate.in_a_row = 0
                if not candidate.on:    # no input is on the other timeline any more: a spike
                    self._candidate = None
            return Verdict("pass")
        if candidate is not None and candidate.holds(s, self.max_future_s, self.max_back_s):
            candidate.add(stream, s)
            if self._confirmed(candidate):
                verdict = Verdict("jump", candidate.newest - self.clock, self.clock)
                self._jump_to(candidate)
                return verdict
        else:                           # the first stamp of (maybe) another timeline
            self._candidate = _Timeline(s)
            self._candidate.add(stream, s)
        return self._held(stream, s)

    def off_clock(self, s: float) -> float | None:
        """For an input that is no stream (an initial pose): its offset from the fusion's
        clock if it is off it (ahead by more than ``max_future_s`` or behind by more than
        ``max_back_s``), else None."""
        if self.clock is None:
            return None
        offset = s - self.clock
        return offset if offset > self.max_future_s or offset < -self.max_back_s else None

    # -- helpers ---------------------------------------------------------------------
    def _off_clock(self, stream: str, s: float, starting: bool = False) -> bool:
        """Off the clock: ahead of it, or behind the input's own newest stamp (or, while
        the clock is being set, behind the clock itself; for an input's first message,
        :data:`ACTIVE_S` behind it)."""
        own = self.clock if starting else self.newest.get(stream)
        if s > self.clock + self.max_future_s:
            return True
        return s < own - self.max_back_s if own is not None else s < self.clock - ACTIVE_S

    def _held(self, stream: str, s: float) -> Verdict:
        own = self.newest.get(stream)
        if s > self.clock + self.max_future_s or own is None:
            return Verdict("hold", s - self.clock, self.clock)
        return Verdict("hold", s - own, own)

    def _on_clock(self, stream: str, s: float) -> None:
        self._support += 1
        self.clock = s if self.clock is None else max(self.clock, s)
        self.newest[stream] = max(self.newest.get(stream, s), s)
        self.counts[stream] = self.counts.get(stream, 0) + 1

    def _active(self) -> list:
        """The inputs a jump waits for: recent on the fusion's timeline, and more than a
        single message there (a lone one may be the spike that set the clock)."""
        return [k for k, t in self.newest.items() if t >= self.clock - ACTIVE_S and self.counts.get(k, 0) >= 2]

    def _confirmed(self, candidate: _Timeline) -> bool:
        if candidate.messages < CONFIRM_MESSAGES:
            return False
        return all(k in candidate.on for k in self._active()) or candidate.in_a_row >= SILENT_OLD_MESSAGES

    def _jump_to(self, candidate: _Timeline) -> None:
        self.clock = candidate.newest
        self.newest = dict(candidate.on)
        self.counts = dict(candidate.counts)
        self._support = candidate.messages
        self._candidate = None
