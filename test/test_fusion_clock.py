"""Stamps off the fusion's clock (issue #19, items 1, 9 and 14).

A single message stamped far ahead used to become the newest graph pose and freeze every
later output there (stamped in the future, every counter saying "accepted"); a single
odometry or IMU message stamped off restarted the whole fusion and published a TF an
hour ahead. Now: a spike is dropped and counted, a jump of every input's clock is one
clean restart (counted for /diagnostics and said once), and the outputs always follow
the good inputs. Also: the plausibility notices for an IMU in g and odometry whose
covariance says "unknown".
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from vizloc_ros.pipeline.clock_guard import ACTIVE_S, SILENT_OLD_MESSAGES, ClockGuard
from vizloc_ros.pipeline.diagnostics import diagnostics_summary
from vizloc_ros.pipeline.drops import DropReason
from vizloc_ros.pipeline.fusion_core import FusionCore, FusionSettings
from vizloc_ros.pipeline.regressor import AbsolutePose
from vizloc_ros.replay.fusion_side import FusionSide, FusionSideSpec, ReplayError
from vizloc_ros.ros_io import messages
from vizloc_ros.ros_io.bag_io import read_messages

T = messages.rosbags_types()
T0 = 1_700_000_000.0
HOUR = 3600.0
RATE = 15.0
COV_ABS = np.diag([0.04] * 3 + [0.003] * 3)


def truth(s):
    return np.array([1.0 + 0.5 * (s - T0), 2.0, 0.0])


def absolute(stamp, at=None):
    """A camera pose of the base where the robot is at ``at`` (default: ``stamp``)."""
    t = truth(stamp if at is None else at)
    return messages.make_pose_with_covariance_stamped(T, stamp, "map", t, (1.0, 0.0, 0.0, 0.0), COV_ABS)


def odometry(stamp, at=None, cov=None):
    x = 0.5 * ((stamp if at is None else at) - T0)
    msg = messages.make_odometry(T, stamp, "odom", "base_link", (x, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0),
                                 np.diag([1e-4] * 6))
    if cov is not None:  # as a driver sends it (the builder refuses what is not a covariance)
        msg.pose.covariance = np.asarray(cov, float).reshape(-1).copy()
    return msg


def imu(stamp, accel=(0.0, 0.0, 9.81)):
    return messages.make_imu(T, stamp, "imu", (0.0, 0.0, 0.0), accel, np.eye(3) * 1e-4, np.eye(3) * 1e-3)


class Run:
    """FusionCore fed 15 Hz absolute poses (and odometry at the same stamps), recording
    every output's stamp, its TF's stamp and the newest good stamp fed before it."""

    def __init__(self, use_odom=True, use_imu=False):
        self.core = FusionCore(settings=FusionSettings(use_odom=use_odom, use_imu=use_imu))
        self.outputs = []      # (k, output stamp, TF stamp or None, newest good stamp)
        self.steps = []
        self.newest_good = -np.inf

    def feed(self, k, method, msg, good=True):
        if good:
            self.newest_good = max(self.newest_good, messages.header_stamp_sec(msg))
        step = getattr(self.core, method)(msg)
        self.steps.append((k, method, step))
        out = step.output
        if out is not None:
            tf = out.transform.stamp if out.transform is not None else None
            self.outputs.append((k, out.stamp, tf, self.newest_good))
        return step

    def good(self, k, offset=0.0):
        s = T0 + k / RATE + offset
        if self.core.settings.use_imu:
            for j in range(10):
                self.feed(k, "on_imu", imu(s - (9 - j) / (10 * RATE)))
        if self.core.settings.use_odom:
            self.feed(k, "on_odometry", odometry(s, at=s - offset))
        return self.feed(k, "on_absolute", absolute(s, at=s - offset))

    def assert_follows_the_inputs(self, after_k):
        """No output stamped past the newest good input; and the outputs after ``after_k``
        move on with the inputs (the last one at the last input's stamp)."""
        tol = self.core.settings.transform_tolerance
        for k, stamp, tf, newest in self.outputs:
            assert stamp <= newest + 1e-6, f"output #{k} stamped {stamp - newest:.3f} s ahead"
            assert tf is None or tf <= newest + tol + 1e-6, f"TF #{k} stamped {tf - newest:.3f} s ahead"
        later = [stamp for k, stamp, _, _ in self.outputs if k > after_k]
        assert later and np.all(np.diff(later) >= 0)
        assert later[-1] == pytest.approx(self.newest_good, abs=1e-6)

    def notices(self, kind):
        return [line for _, _, step in self.steps for k, line in step.notices if k == kind]


# --------------------------------------------------------------------------- item 1: spikes

@pytest.mark.parametrize("use_odom", [False, True])
@pytest.mark.parametrize("offset", [1.0, 5.0, 30.0, HOUR])
def test_one_absolute_pose_stamped_ahead_is_dropped_and_the_output_goes_on(use_odom, offset):
    """The issue's reproduction: pose #50 of a 15 Hz stream stamped +offset. It used to
    freeze the output at T0 + offset + 3.3 s (+30 s, +1 h), or for the spike's offset."""
    run = Run(use_odom=use_odom)
    for k in range(150):
        if k == 50:
            s = T0 + k / RATE
            step = run.feed(k, "on_absolute", absolute(s + offset, at=s), good=False)
            assert step.drop is not None and step.drop.reason is DropReason.ABSOLUTE_OFF_CLOCK
            assert "absolute pose stamped" in step.drop.detail and f"{offset:.0f}." in step.drop.detail
        else:
            run.good(k)
    run.assert_follows_the_inputs(50)
    assert run.core.counters["absolute_off_clock"] == 1
    assert run.core.counters["absolute_accepted"] == 147  # 149 good ones, 2 of them initialising
    assert run.core.counters["clock_jumps"] == 0
    est = run.core.fusion.estimate()
    np.testing.assert_allclose(est.t, truth(T0 + 149 / RATE), atol=0.1)


@pytest.mark.parametrize("method, make, use_imu", [
    ("on_odometry", lambda s, at: odometry(s, at=at), False),
    ("on_imu", lambda s, at: imu(s), True),
    ("on_coarse_pose", lambda s, at: absolute(s, at=at), False),
])
@pytest.mark.parametrize("offset", [HOUR, -HOUR])
def test_one_message_of_another_input_stamped_off_is_dropped_not_a_restart(method, make, use_imu, offset):
    """A single odometry / IMU message an hour off used to restart the fusion (and, ahead,
    to publish a TF stamped an hour ahead); a coarse pose was taken in like a camera pose."""
    run = Run(use_imu=use_imu)
    for k in range(60):
        run.good(k)
        if method == "on_coarse_pose" and k % 5 == 0:  # a coarse relocalizer at 3 Hz
            run.feed(k, method, absolute(T0 + k / RATE))
        if k == 30:
            s = T0 + k / RATE + 0.01
            step = run.feed(k, method, make(s + offset, s), good=False)
            assert step.drop is not None and step.drop.reason.counter.endswith("_off_clock")
    run.assert_follows_the_inputs(30)
    fusion = run.core.fusion.counters
    assert fusion["resets"] == 0 and fusion["time_jumps"] == 0 and run.core.counters["clock_jumps"] == 0
    assert sum(v for k, v in run.core.counters.items() if k.endswith("_off_clock")) == 1


@pytest.mark.parametrize("offset", [HOUR, -HOUR])
def test_an_initial_pose_stamped_an_hour_off_is_taken_as_now(offset):
    """rviz on the wall clock while the nodes run on sim time: the pose is meant for now.
    At its own stamp it froze the fusion an hour ahead."""
    run = Run()
    for k in range(40):
        run.good(k)
    now = T0 + 39 / RATE
    target = truth(now) + np.array([0.0, 0.3, 0.0])
    msg = messages.make_pose_with_covariance_stamped(T, now + offset, "map", target, (1.0, 0.0, 0.0, 0.0),
                                                     np.diag([0.01] * 3 + [0.001] * 3))
    step = run.feed(39, "on_initial_pose", msg, good=False)
    assert step.output is not None and step.output.stamp <= now + 1e-6
    np.testing.assert_allclose(step.output.t, target, atol=0.01)
    assert run.core.counters["initialpose_off_clock"] == 1 and run.core.counters["initialpose_accepted"] == 1
    assert len(run.notices("initialpose_off_clock")) == 1
    for k in range(40, 80):
        run.good(k)
    run.assert_follows_the_inputs(40)


# --------------------------------------------------------------------------- items 1 + 14: jumps

@pytest.mark.parametrize("use_odom, use_imu", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("jump", [HOUR, 30.0, -HOUR, -3.0])
def test_a_jump_of_every_input_is_one_clean_restart_counted_and_said_once(use_odom, use_imu, jump):
    run = Run(use_odom=use_odom, use_imu=use_imu)
    for k in range(60):
        run.good(k)
    for k in range(60, 120):
        run.good(k, offset=jump)
    assert run.core.counters["clock_jumps"] == 1
    restarts = run.notices("clock_jump")
    assert len(restarts) == 1 and "clock jump, the fusion restarts" in restarts[0]
    said = float(re.search(r"jumped ([-+][0-9.]+) s", restarts[0]).group(1))
    assert said == pytest.approx(jump, abs=0.2)
    assert "clock_jumps" in diagnostics_summary(run.core.counters)
    # nothing of the old timeline is kept: the path restarted with the new stamps
    stamps = run.core.path_arrays()[0]
    assert stamps[0] >= T0 + 60 / RATE + jump - 1e-6
    later = [s for k, s, _, _ in run.outputs if k >= 70]
    assert later and later[-1] == pytest.approx(T0 + 119 / RATE + jump, abs=1e-6)
    np.testing.assert_allclose(run.core.fusion.estimate().t, truth(T0 + 119 / RATE), atol=0.1)


def test_an_input_that_stays_on_another_clock_is_dropped_not_followed():
    """Odometry on another machine's clock (+1 h), the camera on ours: no restart, the
    odometry is dropped and counted, the camera poses go on."""
    run = Run()
    for k in range(40):
        run.good(k)
    for k in range(40, 100):
        s = T0 + k / RATE
        run.feed(k, "on_odometry", odometry(s + HOUR, at=s), good=False)
        run.feed(k, "on_absolute", absolute(s))
    assert run.core.counters["clock_jumps"] == 0
    assert run.core.counters["odom_off_clock"] == 60
    run.assert_follows_the_inputs(40)


def test_the_guard_waits_for_every_active_input_then_jumps():
    guard = ClockGuard(max_future_s=0.5, max_back_s=1.0, max_gap_s=10.0)
    for k in range(20):
        for stream in ("odom", "absolute"):
            assert guard.check(stream, T0 + 0.1 * k).action == "pass"
    # odometry jumps first; the camera follows a little later
    assert guard.check("odom", T0 + HOUR).action == "hold"
    assert guard.check("odom", T0 + HOUR + 0.1).action == "hold"
    assert guard.check("absolute", T0 + 2.0).action == "pass"   # still on the old clock
    verdict = guard.check("absolute", T0 + HOUR + 0.05)
    assert verdict.action == "jump" and verdict.offset == pytest.approx(HOUR + 0.1 - 2.0)
    assert guard.check("odom", T0 + HOUR + 0.2).action == "pass"


def test_a_jump_is_followed_even_when_an_input_stopped_at_it():
    """An input that was active but never arrives on the new timeline (its driver died at
    the jump) cannot hold the others back forever."""
    guard = ClockGuard(max_future_s=0.5, max_back_s=1.0, max_gap_s=10.0)
    for k in range(20):
        guard.check("odom", T0 + 0.1 * k)
        guard.check("absolute", T0 + 0.1 * k)
    actions = [guard.check("absolute", T0 + HOUR + 0.1 * k).action for k in range(SILENT_OLD_MESSAGES)]
    assert actions[:-1] == ["hold"] * (SILENT_OLD_MESSAGES - 1) and actions[-1] == "jump"


@pytest.mark.parametrize("first", [("coarse",), ("coarse", "odom")])
def test_spikes_as_the_very_first_inputs_do_not_hold_the_clock(first):
    """Found by the fuzz: one or two messages stamped an hour ahead before anything else
    set the clock there; the good inputs that follow take it back within two messages."""
    guard = ClockGuard(max_future_s=0.5, max_back_s=1.0, max_gap_s=10.0)
    for stream in first:
        guard.check(stream, T0 + HOUR)
    actions = [guard.check(stream, T0 + 0.1 * k) for k in range(3) for stream in ("imu", "odom", "absolute")]
    taken_back = next(i for i, v in enumerate(actions) if v.action in ("rebase", "jump"))
    assert taken_back <= 1 and all(v.action == "hold" for v in actions[:taken_back])
    assert all(v.action == "pass" for v in actions[taken_back + 1:]) and guard.clock == pytest.approx(T0 + 0.2)


def test_a_stream_silent_for_a_while_is_not_waited_for():
    guard = ClockGuard(max_future_s=0.5, max_back_s=1.0, max_gap_s=10.0)
    guard.check("coarse", T0)
    for k in range(int(10 * (ACTIVE_S + 1))):
        guard.check("absolute", T0 + 0.1 * k)
    assert guard.check("absolute", T0 + HOUR).action == "hold"
    assert guard.check("absolute", T0 + HOUR + 0.1).action == "jump"


# --------------------------------------------------------------------------- slow inputs and gaps

def _feed_timeline(core, events):
    """Feed ``(stamp, kind)`` in stamp order (odometry before a pose of the same stamp);
    the outputs' stamps with the newest stamp fed before each, and the drops."""
    outputs, drops, newest = [], [], -np.inf
    for s, kind in sorted(events, key=lambda e: (e[0], e[1] == "absolute")):
        newest = max(newest, s)
        step = core.on_absolute(absolute(s)) if kind == "absolute" else core.on_odometry(odometry(s))
        if step.output is not None:
            outputs.append((step.output.stamp, newest))
        if step.drop is not None:
            drops.append(step.drop)
    return outputs, drops


def _stamps(rate, duration=60.0, silent=None):
    """Stamps of an input at ``rate`` Hz for ``duration`` s, none in ``silent`` = (from, to)."""
    stamps = T0 + np.arange(int(round(duration * rate))) / rate
    if silent is not None:
        stamps = stamps[(stamps < T0 + silent[0]) | (stamps >= T0 + silent[1])]
    return list(stamps)


def _assert_followed_the_truth(core, outputs, last_stamp):
    assert outputs, "no output at all: a frozen estimate"
    assert all(stamp <= newest + 1e-6 for stamp, newest in outputs), "an output stamped ahead of its inputs"
    assert outputs[-1][0] == pytest.approx(last_stamp, abs=1e-6)
    np.testing.assert_allclose(core.fusion.estimate().t, truth(last_stamp), atol=0.1)
    assert core.counters["clock_jumps"] == 0 and core.fusion.counters.get("resets", 0) == 0
    assert core.fusion.counters.get("time_jumps", 0) == 0


@pytest.mark.parametrize("use_odom", [False, True])
@pytest.mark.parametrize("rate", [1.0, 1.7, 0.5])
def test_a_slow_pose_stream_moves_the_clock_at_its_own_cadence(rate, use_odom):
    """Absolute poses at 1 Hz (a Jetson at 1.7 Hz, 0.5 Hz under load), with and without
    odometry at 50 Hz: each pose is more than max_future_s after the previous one. The
    guard used to hold every one of them (a frozen estimate, no output at all without
    odometry); now nothing is dropped and nothing restarts, but for the second pose of a
    stream slower than max_future_s, held while its cadence is unknown."""
    core = FusionCore(settings=FusionSettings(use_odom=use_odom))
    poses = _stamps(rate)
    events = [(s, "absolute") for s in poses] + [(s, "odom") for s in (_stamps(50.0) if use_odom else [])]
    outputs, drops = _feed_timeline(core, events)
    _assert_followed_the_truth(core, outputs, max(s for s, _ in events))
    slower = 1.0 / rate > core.settings.max_future_s and not use_odom
    assert [d.reason for d in drops] == [DropReason.ABSOLUTE_OFF_CLOCK] * slower
    assert core.counters["absolute_accepted"] + core.counters["absolute_initialising"] == len(poses) - slower


@pytest.mark.parametrize("silent_inputs, silence", [("odom", 1.0), ("odom", 3.0), ("all", 3.0), ("all", 0.6),
                                                    ("all", 8.0)])
def test_a_dropout_is_a_gap_not_a_clock_jump(silent_inputs, silence):
    """Odometry at 50 Hz and poses at 10 Hz; odometry (or every input) silent for a while
    mid-run, then on where the time went on: a stalled executor or a sensor dropout, no
    clock jump. It used to restart the fusion once every input was back; now it goes on,
    with at most the first message after the silence held and dropped."""
    core = FusionCore()
    gap = (10.0, 10.0 + silence)
    odom = _stamps(50.0, 20.0, gap)
    poses = _stamps(10.0, 20.0, gap if silent_inputs == "all" else None)
    outputs, drops = _feed_timeline(core, [(s, "odom") for s in odom] + [(s, "absolute") for s in poses])
    _assert_followed_the_truth(core, outputs, T0 + 20.0 - 0.02)
    assert len(drops) <= 1 and all(d.reason.counter.endswith("_off_clock") for d in drops), drops
    assert core.counters["input_gaps"] == len(drops)   # a silence of every input is said once
    assert core.counters["absolute_accepted"] + core.counters["absolute_initialising"] == len(poses)


def test_the_guard_tells_a_gap_from_a_spike_and_a_jump():
    """After a silence the next message is ahead of everything: held; the one after it
    decides. Back on the old timeline: a spike. On from it, less than max_gap_s ahead: a
    gap (no restart). More: a clock jump."""
    def warmed():
        guard = ClockGuard(max_future_s=1.0, max_back_s=1.0, max_gap_s=10.0)
        for k in range(20):
            for stream in ("odom", "absolute"):
                assert guard.check(stream, T0 + 0.1 * k).action == "pass"
        return guard
    guard = warmed()
    assert guard.check("odom", T0 + 5.0).action == "hold"
    assert guard.check("absolute", T0 + 2.0).action == "pass"          # the old timeline: a spike
    assert guard.check("odom", T0 + 2.0).action == "pass"
    guard = warmed()
    assert guard.check("odom", T0 + 5.0).action == "hold"
    gap = guard.check("odom", T0 + 5.1)
    assert gap.action == "gap" and gap.offset == pytest.approx(5.1 - 1.9)
    assert guard.check("absolute", T0 + 5.05).action == "pass"        # the other input goes on too
    guard = warmed()
    assert guard.check("odom", T0 + 5.0).action == "hold"
    assert guard.check("odom", T0 + 5.0).action == "hold"             # the spike twice: time did not go on
    assert guard.check("absolute", T0 + 2.0).action == "pass"
    guard = warmed()
    assert guard.check("odom", T0 + 15.0).action == "hold"
    assert guard.check("odom", T0 + 15.1).action == "hold"            # waits for the camera
    assert guard.check("absolute", T0 + 15.05).action == "jump"


def test_a_slow_input_alone_is_judged_by_its_cadence_and_a_spike_by_the_fast_ones():
    """A camera at 1 Hz alone: each pose passes. Beside odometry at 50 Hz a camera pose
    2 s ahead of the odometry is a spike all the same, although within 3 camera periods."""
    guard = ClockGuard(max_future_s=1.0, max_back_s=1.0, max_gap_s=10.0)
    assert [guard.check("absolute", T0 + 0.9 * k).action for k in range(5)] == ["pass"] * 5
    assert guard.check("absolute", T0 + 3.6 + 2.5).action == "pass"     # skipped two frames
    guard = ClockGuard(max_future_s=1.0, max_back_s=1.0, max_gap_s=10.0)
    for k in range(200):
        guard.check("odom", T0 + 0.02 * k)
        if k % 45 == 0:
            guard.check("absolute", T0 + 0.02 * k)
    assert guard.check("absolute", T0 + 3.98 + 2.0).action == "hold"
    assert guard.check("odom", T0 + 4.0).action == "pass"


def test_a_gap_shorter_than_what_is_never_ahead_is_refused():
    with pytest.raises(ValueError, match=r"max_gap_s must be >= max_future_s \(2\), got 1"):
        FusionSettings(max_future_s=2.0, max_gap_s=1.0)


# --------------------------------------------------------------------------- item 9: plausibility

@pytest.mark.parametrize("scale, warned", [(1.0, False), (1 / 9.81, True)])
def test_an_imu_in_g_is_warned_and_counted(scale, warned):
    run = Run(use_imu=True)
    for k in range(60):
        s = T0 + k / RATE
        for j in range(10):
            run.feed(k, "on_imu", imu(s - (9 - j) / (10 * RATE), accel=(0.1, 0.0, 9.81 * scale)))
        run.feed(k, "on_odometry", odometry(s))
        run.feed(k, "on_absolute", absolute(s))
    lines = run.notices("imu_accel_implausible")
    assert bool(lines) is warned
    assert run.core.counters["imu_accel_implausible"] == len(lines) == (3 if warned else 0)
    if warned:
        assert "in g?" in lines[0] and "1 m/s^2" in lines[0]


@pytest.mark.parametrize("cov, warned", [
    (-np.eye(6), True),                 # ROS's "unknown"
    (np.eye(6) * 1e9, True),            # "do not use"
    (np.zeros((6, 6)), False),          # common, documented: the floors apply
    (np.eye(6) * 1e-3, False),          # a constant noise figure
])
def test_odometry_whose_constant_covariance_says_unknown_is_warned_and_counted(cov, warned):
    run = Run()
    for k in range(30):
        s = T0 + k / RATE
        run.feed(k, "on_odometry", odometry(s, cov=cov))
        run.feed(k, "on_absolute", absolute(s))
    lines = run.notices("odom_covariance_implausible")
    assert run.core.counters["odom_covariance_implausible"] == len(lines) == (29 if warned else 0)
    if warned:
        assert "odom_floor_trans" in lines[0]


def test_growing_odometry_covariance_is_not_warned_about():
    run = Run()
    for k in range(30):
        s = T0 + k / RATE
        run.feed(k, "on_odometry", odometry(s, cov=np.eye(6) * (1e4 + k)))
    assert run.core.counters["odom_covariance_implausible"] == 0


# --------------------------------------------------------------------------- the replay's order

class _Recording(FusionSide):
    """Records what the replay's fusion side would fuse, in order, instead of fusing it."""

    def __init__(self, spec):
        super().__init__(spec)
        self.seen = []

    def _process(self, kind, payload):
        self.seen.append(kind)


def _spike_received_mid_bag(small_bag, tmp_path, order):
    side = _Recording(FusionSideSpec(bag=small_bag, out_bag=tmp_path / order, order=order))
    side.read_bag()
    odometry_log = [r for r in read_messages(small_bag, ["/odom"])]
    mid = odometry_log[len(odometry_log) // 2]
    ns = messages.header_stamp_ns(mid.msg) + int(HOUR * 1e9)   # stamped an hour ahead
    pose = AbsolutePose(stamp=ns * 1e-9, frame_id="map", t=np.zeros(3), q=np.array([1.0, 0, 0, 0]),
                        cov=np.eye(6) * 0.1, latency_s=0.0, t_cam=np.zeros(3),
                        q_cam=np.array([1.0, 0, 0, 0]), stamp_ns=ns)
    side.add([(pose.stamp, "absolute", pose)], pose.stamp, {ns: mid.log_time_ns})
    side._release(np.inf)
    return side.seen, len(odometry_log)


def test_receive_order_fuses_a_spike_when_the_node_would_get_it(small_bag, tmp_path):
    """Stamp order fuses a pose stamped an hour ahead after everything else, which hides
    what the node does with it; receive order fuses it among the odometry logged with it."""
    seen, n_odometry = _spike_received_mid_bag(small_bag, tmp_path, "receive")
    assert seen.count("odom") == n_odometry and abs(seen.index("absolute") - n_odometry // 2) <= 1
    seen, _ = _spike_received_mid_bag(small_bag, tmp_path, "stamp")
    assert seen[-1] == "absolute"


def test_an_unknown_order_is_a_replay_error(small_bag, tmp_path):
    with pytest.raises(ReplayError, match="order must be one of stamp, receive"):
        FusionSide(FusionSideSpec(bag=small_bag, out_bag=tmp_path / "bag", order="arrival"))
