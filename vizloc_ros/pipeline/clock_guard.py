"""Which timeline an input's stamp is on: the fusion's own, a spike off it, a gap in the
inputs after which they go on, or a new timeline that the clock of every input jumped to.

Why a guard before the fusion: a single message stamped far in the future used to become
the newest graph pose, so every later estimate stayed there (a frozen output, stamped in
the future, while every counter said "accepted"); a single odometry or IMU message
stamped far off restarted the whole fusion. But stamps of *all* inputs do jump for real
(a bag restarted or looping, sim time switched on, a robot's clock set by NTP), and then
the fusion must start over rather than drop everything; and inputs do fall silent for a
while (a stalled executor, a sensor dropout, a regressor skipping frames under load) and
then go on where the time went on: that is a gap, not a jump, and the fusion simply
continues (as AMCL and robot_localization do).

A message is *ahead* of the fusion's clock only when it is past the next stamp that any
input still sending could plausibly bring: more than ``max_future_s`` ahead of the newest
stamp of all inputs (the fusion's clock) AND more than ``allowance`` ahead of its own
input's newest stamp AND more than ``allowance`` ahead of every other input that is not
overdue, where an input's ``allowance`` is ``max(max_future_s, CADENCE_FACTOR x its typical
period)`` (the median of its recent intervals). So a slow input alone (absolute poses at
1 Hz, no odometry) moves the clock at its own cadence, while a camera pose 2 s ahead of
50 Hz odometry is still a spike. *Behind* means more than ``max_back_s`` behind the
newest stamp of the same input (a late input behind the others is normal, e.g. a camera
pose after the inference's latency), or, for an input's first message, more than
:data:`ACTIVE_S` behind the clock.

A message off the clock is held back (the caller drops and counts it) on a candidate
timeline, which accepts later messages at their input's own cadence. The next messages
decide: back on the fusion's timeline, it was a spike (the candidate is forgotten); on
from it, it was real. A real move forward of at most ``max_gap_s`` is a *gap*: confirmed
by :data:`CONFIRM_MESSAGES` messages on the candidate with none on the old timeline in
between, the clock moves on, nothing restarts (the held messages stay dropped: the
fusion has meanwhile taken later ones of the same inputs, and takes each input in
order). A move further forward, or back, is a *clock jump*: confirmed once every input
that was active has moved there (or after :data:`SILENT_OLD_MESSAGES` on it in a row),
and the caller restarts the fusion cleanly. Stamps are message stamps, never the wall
clock, so the node and the replay decide the same.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from statistics import median

#: s of stamp time without a message after which an input is no longer waited for to
#: confirm a clock jump (it may have stopped, or be slower than this); also how far
#: behind the clock an input's first message may be (a camera pose's latency is less)
ACTIVE_S = 2.0
#: messages on a new timeline needed for a gap or a jump: one message alone is neither
CONFIRM_MESSAGES = 2
#: messages in a row on the new timeline, none on the old one in between, that confirm a
#: jump even when an input that was active never arrives on the new timeline
SILENT_OLD_MESSAGES = 30
#: an input's next message may come this many typical periods after its previous one
#: before it is suspect: a regressor under load skips a frame or two
CADENCE_FACTOR = 3.0
#: intervals of an input whose median is its typical period
PERIOD_HISTORY = 9


@dataclass(frozen=True)
class Verdict:
    """What to do with one input: ``pass`` (fuse it), ``hold`` (drop it: off the clock),
    ``gap`` (the inputs went on after a silence: fuse it, no restart), ``jump`` (restart
    the fusion, then fuse it) or ``rebase`` (the first input was off the second: forget
    what came before, then fuse it); ``offset``: s from the fusion's clock (positive:
    ahead), ``reference``: the stamp it was measured against."""

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
    on: dict = field(default_factory=dict)         # input -> newest stamp it sent on this timeline
    counts: dict = field(default_factory=dict)     # input -> messages it sent on this timeline
    intervals: dict = field(default_factory=dict)  # input -> its intervals on this timeline
    messages: int = 0
    in_a_row: int = 0                              # on this timeline, none on the fusion's since

    def add(self, stream: str, s: float) -> None:
        if stream in self.on and s > self.on[stream]:
            self.intervals.setdefault(stream, []).append(s - self.on[stream])
        self.newest = max(self.newest, s)
        self.on[stream] = max(self.on.get(stream, s), s)
        self.counts[stream] = self.counts.get(stream, 0) + 1
        self.messages += 1
        self.in_a_row += 1

    def forget(self, stream: str) -> None:
        """``stream`` is (back) on the fusion's timeline."""
        self.on.pop(stream, None)
        self.counts.pop(stream, None)
        self.intervals.pop(stream, None)
        self.in_a_row = 0


class ClockGuard:
    """Classifies each input's stamp against the fusion's clock (see the module docstring)."""

    def __init__(self, max_future_s: float, max_back_s: float, max_gap_s: float):
        self.max_future_s = float(max_future_s)
        self.max_back_s = float(max_back_s)
        self.max_gap_s = float(max_gap_s)      # >= max_future_s (FusionSettings checks it)
        self.clock: float | None = None    # newest stamp of any input on the fusion's timeline
        self.newest: dict = {}             # input -> its newest stamp on the fusion's timeline
        self.counts: dict = {}             # input -> messages it sent on the fusion's timeline
        self.intervals: dict = {}          # input -> deque of its recent intervals there
        self._candidate: _Timeline | None = None
        self._support = 0                  # inputs that agreed with the clock since it was set

    def check(self, stream: str, s: float) -> Verdict:
        """The verdict for an input ``stream`` (absolute, coarse, odom, imu) stamped ``s``."""
        if self.clock is None or (self._support < CONFIRM_MESSAGES and self._off_start(s)):
            # the first input sets the clock; while no second one agrees with it, an input
            # far off it sets it anew (the first may have been the spike: it must not hold
            # the clock for the rest of the run), and what came before it is to be forgotten
            verdict = Verdict("pass") if self.clock is None else Verdict("rebase", s - self.clock, self.clock)
            self.clock, self.newest, self.counts, self.intervals = s, {}, {}, {}
            self._support, self._candidate = 0, None
            self._on_clock(stream, s)
            return verdict
        candidate = self._candidate
        if not self._off_clock(stream, s):
            self._on_clock(stream, s)
            if candidate is not None:   # this input is (back) on the fusion's timeline
                candidate.forget(stream)
                if not candidate.on:    # no input is on the other timeline any more: a spike
                    self._candidate = None
            return Verdict("pass")
        if candidate is not None and self._holds(candidate, stream, s):
            candidate.add(stream, s)
            verdict = self._confirmed(candidate)
            if verdict is not None:
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

    def period(self, stream: str) -> float | None:
        """The typical interval of ``stream`` on the fusion's timeline (None: unknown)."""
        recent = self.intervals.get(stream)
        return median(recent) if recent else None

    # -- helpers ---------------------------------------------------------------------
    def _allowance(self, period: float | None) -> float:
        """How far past an input's newest stamp its next message may be stamped."""
        return self.max_future_s if period is None else max(self.max_future_s, CADENCE_FACTOR * period)

    def _ahead(self, stream: str, s: float) -> bool:
        """Past the next stamp that any input still sending could bring (module docstring)."""
        if s <= self.clock + self.max_future_s:
            return False
        own = self.newest.get(stream)
        if own is not None and s <= own + self._allowance(self.period(stream)):
            # on at its own cadence, unless an input that is still sending says it is not "now"
            for other, newest in self.newest.items():
                if other == stream:
                    continue
                limit = newest + self._allowance(self.period(other))
                if limit >= self.clock and s > limit:
                    return True
            return False
        return True

    def _off_start(self, s: float) -> bool:
        """While the clock is being set: behind it by more than ``max_back_s``, or ahead by
        more than ``max_gap_s`` (a slow input's next message is within that: it goes the
        usual way, held until the one after it shows whether it went on)."""
        return s > self.clock + self.max_gap_s or s < self.clock - self.max_back_s

    def _off_clock(self, stream: str, s: float) -> bool:
        """Off the clock: ahead of it (see :meth:`_ahead`), or behind the input's own newest
        stamp (for an input's first message, :data:`ACTIVE_S` behind the clock)."""
        if self._ahead(stream, s):
            return True
        own = self.newest.get(stream)
        return s < own - self.max_back_s if own is not None else s < self.clock - ACTIVE_S

    def _holds(self, candidate: _Timeline, stream: str, s: float) -> bool:
        """``s`` is on ``candidate``: not far behind its newest, and not further ahead than
        its input's cadence allows (an input of a candidate is judged by its intervals
        there or on the old timeline, else by its step onto the candidate)."""
        if s < candidate.newest - self.max_back_s:
            return False
        if s <= candidate.newest + self.max_future_s:
            return True
        last = candidate.on.get(stream)
        if last is None:
            return False
        intervals = candidate.intervals.get(stream) or list(self.intervals.get(stream, ()))
        if not intervals and stream in self.newest and last > self.newest[stream]:
            intervals = [last - self.newest[stream]]
        return s <= last + self._allowance(median(intervals) if intervals else None)

    def _held(self, stream: str, s: float) -> Verdict:
        own = self.newest.get(stream)
        if s > self.clock or own is None:
            return Verdict("hold", s - self.clock, self.clock)
        return Verdict("hold", s - own, own)

    def _on_clock(self, stream: str, s: float) -> None:
        self._support += 1
        self.clock = s if self.clock is None else max(self.clock, s)
        own = self.newest.get(stream)
        if own is not None and s > own:
            self.intervals.setdefault(stream, deque(maxlen=PERIOD_HISTORY)).append(s - own)
        self.newest[stream] = max(own if own is not None else s, s)
        self.counts[stream] = self.counts.get(stream, 0) + 1

    def _active(self) -> list:
        """The inputs a jump waits for: recent on the fusion's timeline, and more than a
        single message there (a lone one may be the spike that set the clock)."""
        return [k for k, t in self.newest.items() if t >= self.clock - ACTIVE_S and self.counts.get(k, 0) >= 2]

    def _confirmed(self, candidate: _Timeline) -> Verdict | None:
        """``gap`` or ``jump`` when the candidate is confirmed, else None (hold)."""
        if candidate.messages < CONFIRM_MESSAGES:
            return None
        offset = candidate.newest - self.clock
        if 0.0 < offset <= self.max_gap_s and min(candidate.on.values()) > self.clock - self.max_back_s:
            went_on = len(candidate.on) > 1 or any(candidate.intervals.values())
            if candidate.in_a_row < CONFIRM_MESSAGES or not went_on:   # not a spike sent twice
                return None
            verdict = Verdict("gap", offset, self.clock)
            self._gap_to(candidate)
            return verdict
        if all(k in candidate.on for k in self._active()) or candidate.in_a_row >= SILENT_OLD_MESSAGES:
            verdict = Verdict("jump", offset, self.clock)
            self._jump_to(candidate)
            return verdict
        return None

    def _gap_to(self, candidate: _Timeline) -> None:
        """The inputs on ``candidate`` went on after a silence: the fusion's timeline moves
        on with them, and keeps what it knows of the others."""
        self.clock = max(self.clock, candidate.newest)
        for stream, s in candidate.on.items():
            recent = self.intervals.setdefault(stream, deque(maxlen=PERIOD_HISTORY))
            recent.extend(candidate.intervals.get(stream, ()))
            self.newest[stream] = s
            self.counts[stream] = self.counts.get(stream, 0) + candidate.counts[stream]
        self._candidate = None

    def _jump_to(self, candidate: _Timeline) -> None:
        self.clock = candidate.newest
        self.newest = dict(candidate.on)
        self.counts = dict(candidate.counts)
        self.intervals = {k: deque(v, maxlen=PERIOD_HISTORY) for k, v in candidate.intervals.items()}
        self._support = candidate.messages
        self._candidate = None
