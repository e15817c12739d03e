"""Stateful fuzzing of ``FusionCore`` (issue #19, "beyond the list").

Hypothesis interleaves the fusion node's inputs (absolute poses, odometry, IMU, coarse
poses, /initialpose, ~/reset) with what clocks do to them: jumps of every input's clock
back and forward, single messages stamped far off (future and past), duplicates,
bursts, and gaps (one input or all of them silent for 0.6-5 s, then on where the time
went on: no clock jump, so no restart). The robot moves at 0.5 m/s along x; each input
says where it truly is, only the stamps go wrong. After every rule:

* nothing raised, and no output (pose, covariance, TF) holds a NaN or inf;
* no output is stamped past the newest accepted good input (since the fusion last
  restarted) by more than the tolerance; a spike taken in would put it there;
* the estimate is never frozen: after a run of undisturbed steps, each step's output is
  at that step's stamp and near the truth.

Derandomized, with no example database: the same examples on every run and machine.
"""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vizloc_ros.pipeline.fusion_core import FusionCore, FusionSettings
from vizloc_ros.ros_io import messages

T = messages.rosbags_types()
T0 = 1_700_000_000.0
STEP = 0.1                       # s between camera poses (10 Hz); odometry at the same stamps
IMU_PER_STEP = 4
SPEED = 0.5                      # m/s along x
COV_ABS = np.diag([0.04] * 3 + [0.003] * 3)
COV_ODOM = np.diag([1e-4] * 6)
#: an output stamp may exceed the newest good input by float rounding only
AHEAD_TOLERANCE_S = 1e-6
#: undisturbed steps after which every step must give an output at its own stamp: a
#: restart needs 2 messages to confirm a jump and init_consistent (3) poses
SETTLED_STEPS = 8
#: offsets of single spikes and of clock jumps: all beyond max_future_s (1 s) ahead and
#: time_jump_s (1 s) behind, so each is off the clock (forward by less than max_gap_s,
#: 10 s, a jump of every input is a gap: no restart)
OFFSETS = st.sampled_from([3600.0, 30.0, 1.5, -2.0, -30.0, -3600.0])
STREAMS = st.sampled_from(["absolute", "odom", "imu", "coarse"])


def _x(t):
    return np.array([SPEED * t, 1.0, 0.0])


class FusionMachine(RuleBasedStateMachine):
    """The model: true time ``t`` (s since T0, only forward) and the clock's offset; a good
    message is stamped ``T0 + t + offset`` and carries the truth at ``t``."""

    USE_ODOM = USE_IMU = True

    @initialize()
    def start(self):
        self.core = FusionCore(settings=FusionSettings(use_odom=self.USE_ODOM, use_imu=self.USE_IMU,
                                                       transform_tolerance=0.1))
        self.t = 0.0
        self.offset = 0.0
        self.newest_good = -np.inf      # newest accepted good input since the last restart
        self.restarts = 0
        self.undisturbed = 0
        self.last = {}                  # stream -> the last good message (for duplicates)
        self.outputs = []               # (stamp, x) of the outputs of the last step
        self.restarts_before_gap = None  # restarts before a gap, while no rule may restart

    # -- messages ----------------------------------------------------------------------
    def _stamp(self, t=None, off=0.0):
        return T0 + (self.t if t is None else t) + self.offset + off

    def _message(self, stream, stamp, t):
        if stream == "odom":
            return "on_odometry", messages.make_odometry(T, stamp, "odom", "base_link", _x(t),
                                                        (1.0, 0.0, 0.0, 0.0), COV_ODOM)
        if stream == "imu":
            return "on_imu", messages.make_imu(T, stamp, "imu", (0.0, 0.0, 0.0), (0.0, 0.0, 9.81),
                                               np.eye(3) * 1e-4, np.eye(3) * 1e-3)
        method = {"absolute": "on_absolute", "coarse": "on_coarse_pose", "initialpose": "on_initial_pose"}[stream]
        return method, messages.make_pose_with_covariance_stamped(T, stamp, "map", _x(t), (1.0, 0.0, 0.0, 0.0),
                                                                  COV_ABS)

    def _feed(self, stream, stamp, t, good=True):
        method, msg = self._message(stream, stamp, t)
        if good:
            self.last[stream] = msg
        step = getattr(self.core, method)(msg)
        self._restarted()
        if good and step.drop is None:
            self.newest_good = max(self.newest_good, stamp)
        self._check(step)
        return step

    def _restarted(self):
        """After a restart (clock jump, ~/reset) the outputs come from later inputs only."""
        restarts = self.core.counters["clock_jumps"] + self.core.counters["resets"]
        assert self.restarts_before_gap is None or restarts == self.restarts_before_gap, \
            "a gap in the inputs restarted the fusion"
        if restarts != self.restarts:
            self.restarts = restarts
            self.newest_good = -np.inf

    def _check(self, step):
        out = step.output
        if out is None:
            return
        arrays = [out.t, out.q, out.cov] + ([out.transform.t, out.transform.q] if out.transform else [])
        assert all(np.all(np.isfinite(a)) for a in arrays), "non-finite output"
        assert out.stamp <= self.newest_good + AHEAD_TOLERANCE_S, \
            f"output stamped {out.stamp - self.newest_good:.3f} s past the newest good input"
        if out.transform is not None:
            assert out.transform.stamp <= self.newest_good + 0.1 + AHEAD_TOLERANCE_S
        self.outputs.append((out.stamp, out.t[0]))

    # -- rules -------------------------------------------------------------------------
    @rule(steps=st.integers(1, 4))
    def advance(self, steps):
        """Normal operation: IMU, odometry and a camera pose every STEP."""
        for _ in range(steps):
            self.outputs = []
            t0 = self.t
            self.t += STEP
            for j in range(1, IMU_PER_STEP + 1):
                t_imu = t0 + STEP * j / IMU_PER_STEP
                self._feed("imu", self._stamp(t_imu), t_imu)
            self._feed("odom", self._stamp(), self.t)
            self._feed("absolute", self._stamp(), self.t)
            self.undisturbed += 1
            if self.undisturbed >= SETTLED_STEPS:  # never frozen: the output follows the inputs
                assert self.outputs, f"no output after {self.undisturbed} undisturbed steps"
                stamp, x = self.outputs[-1]
                assert abs(stamp - self._stamp()) <= AHEAD_TOLERANCE_S, \
                    f"output at {stamp - self._stamp():+.3f} s from the newest input: frozen"
                assert abs(x - _x(self.t)[0]) < 0.5, f"output {x - _x(self.t)[0]:+.2f} m off the truth"

    @rule(stream=STREAMS, off=OFFSETS)
    def spike(self, stream, off):
        """One message whose stamp alone is wrong."""
        self._feed(stream, self._stamp(off=off), self.t, good=False)

    @rule(off=OFFSETS)
    def clock_jump(self, off):
        """Every input's clock jumps (a bag restarted or looping, sim time, NTP)."""
        self.offset += off
        self.undisturbed = 0
        self.restarts_before_gap = None

    @rule(silent=st.sampled_from(["all", "odom", "absolute", "imu"]), seconds=st.sampled_from([0.6, 1.3, 5.0]))
    def gap(self, silent, seconds):
        """One input, or every input, silent for a while (a stalled executor, a sensor
        dropout), then on where the time went on: a gap, never a restart (checked on
        until a rule that may restart: a clock jump, a reset, an initial pose)."""
        guard = self.core.clock.clock
        if guard is not None and abs(guard - self._stamp()) <= STEP:   # no clock jump pending
            self.restarts_before_gap = self.restarts
        for _ in range(int(round(seconds / STEP))):
            t0 = self.t
            self.t += STEP
            if silent == "all":
                continue
            for stream in ("imu", "odom", "absolute"):
                if stream == silent:
                    continue
                for t in ([t0 + STEP * j / IMU_PER_STEP for j in range(1, IMU_PER_STEP + 1)]
                          if stream == "imu" else [self.t]):
                    self._feed(stream, self._stamp(t), t)
        self.undisturbed = 0   # the first message after the silence may be held

    @rule(stream=STREAMS)
    def duplicate(self, stream):
        msg = self.last.get(stream)
        if msg is not None:
            method = {"absolute": "on_absolute", "odom": "on_odometry", "imu": "on_imu",
                      "coarse": "on_coarse_pose"}[stream]
            self._check(getattr(self.core, method)(msg))

    @rule(steps=st.integers(2, 15))
    def burst(self, steps):
        """Inputs held up, then delivered at once: all the odometry first, then the poses."""
        stamps = [(self._stamp(self.t + STEP * k), self.t + STEP * k) for k in range(1, steps + 1)]
        for stamp, t in stamps:
            self._feed("odom", stamp, t)
        for stamp, t in stamps:
            self._feed("absolute", stamp, t)
        self.t += STEP * steps
        self.undisturbed = 0   # the IMU has a gap now: bridged by the motion model

    @precondition(lambda self: self.undisturbed >= 1)
    @rule(kind=st.sampled_from(["now", "zero", "ahead", "behind"]))
    def initial_pose(self, kind):
        """rviz's 2D Pose Estimate (once the fusion has seen the current clock): at the
        right stamp, with none (``ros2 topic pub``), or stamped by a clock an hour off."""
        off = {"now": 0.0, "ahead": 3600.0, "behind": -3600.0}.get(kind)
        stamp = 0.0 if off is None else self._stamp(off=off)
        self.restarts_before_gap = None
        self._feed("initialpose", stamp, self.t, good=kind == "now")
        self.undisturbed = 0

    @rule()
    def reset(self):
        self.restarts_before_gap = None
        self.core.reset()
        self._restarted()
        self.undisturbed = 0

    @invariant()
    def counters_are_sane(self):
        assert all(v >= 0 for v in self.core.counters.values())


class AbsoluteOnlyMachine(FusionMachine):
    """The same without odometry and IMU (the node's use_odom: false): the camera poses
    alone are the fusion's clock, so a gap in them looks like a jump of every input."""

    USE_ODOM = USE_IMU = False


SETTINGS = settings(derandomize=True, database=None, max_examples=15, stateful_step_count=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FusionMachine.TestCase.settings = SETTINGS
AbsoluteOnlyMachine.TestCase.settings = SETTINGS
TestFusionFuzz = FusionMachine.TestCase
TestAbsoluteOnlyFusionFuzz = AbsoluteOnlyMachine.TestCase
