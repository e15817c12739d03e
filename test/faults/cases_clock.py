"""Fault classes of time (issue #19, item 1): stamps off the fusion's clock.

Each case feeds ``FusionCore`` like the fusion node (odometry and absolute poses at 10 Hz,
IMU at 100 Hz where used), injects a fault, then good inputs, and checks beyond the
catalogue's usual (no crash, no NaN, localized again): no output stamped ahead of the
newest good input (a spike taken in freezes the output there), and outputs that follow
the good inputs (not frozen). The classes: single-message spikes into the future and the
past for each input (absolute, coarse, odometry, IMU, initial pose), duplicates, bursts,
jumps of every input's clock back and forward (a clean restart), slow inputs and gaps
(an input, or every input, silent for a while, then on: no restart, at most the first
message after the silence held and dropped), and the same spikes through
``vizloc-replay --order receive``, which feeds a bag as the node receives it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import fault_cases as F
from vizloc_ros.pipeline.fusion_core import FusionCore, FusionSettings

HOUR = 3600.0
#: how far an output may be stamped past the newest good input: the TF's tolerance aside,
#: the fusion publishes at an input's own stamp
AHEAD_TOLERANCE_S = 1e-6


class _ClockRun(F._FusionRun):
    """A fusion run that also records how far ahead of the newest good input any output
    was stamped, and the stamps of the outputs."""

    def __init__(self, use_imu=False, use_odom=True):
        super().__init__(use_imu)
        if not use_odom:   # the camera poses alone (odometry fed to it is ignored)
            self.core = FusionCore(settings=FusionSettings(use_imu=use_imu, use_odom=False))
        self.newest_good = -np.inf
        self.worst_ahead = 0.0
        self.output_stamps: list = []
        self._good = False

    def feed(self, method, msg):
        out = super().feed(method, msg)
        if self._good:
            self.newest_good = max(self.newest_good, F.messages.header_stamp_sec(msg))
        for stamp in ([out.stamp] if out is not None else []):
            self.output_stamps.append(stamp)
            self.worst_ahead = max(self.worst_ahead, stamp - self.newest_good)
        return out

    def good(self, start, n, origin=F.T0):
        self._good = True
        try:
            super().good(start, n, origin)
        finally:
            self._good = False


def _clock_case(name, expected, inject, why, use_imu=False, resume=None, follow=None,
                genuine=False, held=0) -> F.Case:
    """``inject(run)`` after 3 s of good inputs; then ``follow(run, start)`` (default: 12
    good steps from ``resume = (start, odometry origin)``), which must localize again.
    ``genuine``: the injected stamps are true ones (duplicates, bursts): outputs may be
    stamped like them. ``held``: drops that still make the case "ok" (the first message
    after a silence, held until the next shows the inputs went on)."""
    def run(res) -> F.Observation:
        fr = _ClockRun(use_imu)
        fr.good(F.T0, F.HISTORY)
        drops0, resets0 = fr.counts()
        fr._good = genuine
        inject(fr)
        fr._good = False
        detail = fr.last_drop.detail if fr.last_drop is not None and fr.drops > drops0 else ""
        start, origin = resume if resume is not None else (F.FAULT_AT + F.STEP, F.T0)
        n_before = len(fr.output_stamps)
        (follow or (lambda r, s: r.good(s, 12, origin)))(fr, start)
        drops, resets = fr.counts()
        obs = F.Observation("reset" if resets > resets0 else "drop" if drops > drops0 + held else "ok",
                            detail=detail)
        return _judged(obs, fr, fr.output_stamps[n_before:], start + F.STEP * 11, F.STEP)
    return F.Case(name, "clock", tuple(expected) if not isinstance(expected, str) else (expected,), run, why)


def _judged(obs, fr, after, last, tolerance) -> F.Observation:
    """``obs`` with what the catalogue checks beyond its usual: no output stamped ahead of
    the newest good input, outputs ``after`` the fault that follow the inputs (the last
    within ``tolerance`` of the ``last`` input's stamp: not frozen), the estimate there."""
    if fr.worst_ahead > AHEAD_TOLERANCE_S:
        obs.behaviour = f"output stamped {fr.worst_ahead:.3f} s ahead of the newest input"
    elif not after or abs(after[-1] - last) > tolerance:
        obs.behaviour = f"frozen output (the last one stamped {after[-1] - last if after else None} s off)"
    estimate = fr.core.fusion.estimate()
    obs.recovered = (estimate is not None and F._finite(estimate.t, estimate.cov_ros)
                     and float(np.linalg.norm(estimate.t - F._truth(last))) < 0.3)
    obs.nan_outputs = fr.nan
    return obs


def _pose_now(stamp):
    """The camera pose where the robot is at the next good stamp, stamped ``stamp``."""
    return F._abs(stamp, t=F._truth(F.FAULT_AT))


def _odom_now(stamp):
    """The odometry where the robot is at the next good stamp, stamped ``stamp``."""
    return F._odom(stamp, x=0.5 * (F.FAULT_AT - F.T0))


def _spike(method, make, offset):
    """One message of ``make(stamp)`` (the right pose) stamped ``offset`` s off the next
    good stamp: only its stamp is wrong."""
    return lambda fr: fr.feed(method, make(F.FAULT_AT + offset))


def _imu_spike(offset):
    return lambda fr: fr.feed("on_imu", F._imu(F.FAULT_AT + offset))


def _initial_pose(offset):
    # the right pose (where the robot is now), stamped off the clock: rviz on another clock
    return lambda fr: fr.feed("on_initial_pose", F._abs(F.FAULT_AT + offset, t=F._truth(F.FAULT_AT - F.STEP)))


def _twice(method, make):
    def inject(fr):
        msg = make(F.FAULT_AT)
        fr.feed(method, msg)
        fr.feed(method, msg)
    return inject


def _stall_then_burst(fr):
    """2 s of inputs held up (a stalled executor), then delivered at once: odometry first,
    the poses after it (late behind the odometry, but each stream in order)."""
    stamps = F.FAULT_AT + F.STEP * np.arange(20)
    for s in stamps:
        fr.feed("on_odometry", F._odom(s))
    for s in stamps:
        fr.feed("on_absolute", F._abs(s))


def _burst_resume():
    return (F.FAULT_AT + F.STEP * 20, F.T0)


def _only_odometry_jumps(offset):
    """Odometry moves to another clock and stays there; the camera does not."""
    def follow(fr, start):
        for k in range(12):
            s = start + F.STEP * k
            fr._good = False
            fr.feed("on_odometry", F._odom(s + offset, origin=F.T0 + offset))
            fr._good = True
            fr.feed("on_absolute", F._abs(s))
        fr._good = False
    return follow


def _silent(streams, seconds):
    """``inject``: ``streams`` (``"all"``, or a tuple of "odom", "absolute") silent for
    ``seconds`` from the fault on, the others going on; the robot moves on all the time."""
    def inject(fr):
        if streams == "all":
            return
        for k in range(int(round(seconds / F.STEP))):
            s = F.FAULT_AT + F.STEP * k
            if "odom" not in streams:
                fr.feed("on_odometry", F._odom(s))
            if "absolute" not in streams:
                fr.feed("on_absolute", F._abs(s))
    return inject


def _after_silence(seconds):
    return (F.FAULT_AT + seconds, F.T0)


def _slow_case(name, rate, use_odom) -> F.Case:
    """Absolute poses at ``rate`` Hz for 60 s (with odometry at 10 Hz, or alone): each more
    than max_future_s after the previous one at 1 Hz or slower. The outputs must follow the
    poses; at most the second pose of a stream slower than max_future_s is held."""
    def run(res) -> F.Observation:
        fr = _ClockRun(use_odom=use_odom)
        fr._good = True
        poses = F.T0 + np.arange(int(60 * rate)) / rate
        odometry = F.T0 + F.STEP * np.arange(600) if use_odom else np.zeros(0)
        events = sorted([(s, 1) for s in poses] + [(s, 0) for s in odometry])
        for s, is_pose in events:
            fr.feed("on_absolute", F._abs(s)) if is_pose else fr.feed("on_odometry", F._odom(s))
        drops, resets = fr.counts()
        obs = F.Observation("reset" if resets else "drop" if drops > 1 else "ok",
                            detail=fr.last_drop.detail if fr.last_drop is not None else "")
        return _judged(obs, fr, fr.output_stamps, events[-1][0], AHEAD_TOLERANCE_S)
    return F.Case(name, "clock", ("ok",), run,
                  "the clock moves at the input's own cadence: every pose fused, no restart")


def _gap_cases() -> list[F.Case]:
    gap = ("a gap, not a clock jump: the fusion goes on without a restart, at most the first "
           "message after the silence held and dropped")
    cases = []
    for seconds in (1.0, 3.0):
        cases.append(_clock_case(f"odometry silent {seconds:g} s, then on (poses go on)", "ok",
                                 _silent(("odom",), seconds), gap, resume=_after_silence(seconds), held=1,
                                 genuine=True))
    for seconds in (0.6, 3.0, 8.0):
        cases.append(_clock_case(f"every input silent {seconds:g} s, then on", "ok", _silent("all", seconds), gap,
                                 resume=_after_silence(seconds), held=1))
    cases.append(_clock_case("every input, IMU included, silent 3 s, then on", "ok", _silent("all", 3.0), gap,
                             use_imu=True, resume=_after_silence(3.0), held=1))
    for rate, use_odom in ((1.0, False), (1.7, False), (0.5, False), (1.0, True)):
        alone = "alone" if not use_odom else "with odometry"
        cases.append(_slow_case(f"absolute poses at {rate:g} Hz {alone} for 60 s", rate, use_odom))
    return cases


def _message_cases() -> list[F.Case]:
    drop = "dropped and counted as a stamp off the fusion's clock; the output goes on at the good stamps"
    jump = "every input jumped: one clean restart (counted, logged), then localized again"
    cases = []
    # single-message spikes into the future, each input
    for offset in (1.0, 5.0, 30.0, HOUR):
        cases.append(_clock_case(f"absolute pose stamped +{offset:g} s (one message)", "drop",
                                 _spike("on_absolute", _pose_now, offset), drop))
    cases += [
        _clock_case("coarse pose stamped +3600 s (one message)", "drop",
                    _spike("on_coarse_pose", _pose_now, HOUR), drop),
        _clock_case("odometry stamped +3600 s (one message)", "drop", _spike("on_odometry", _odom_now, HOUR), drop),
        _clock_case("odometry stamped +5 s (one message)", "drop", _spike("on_odometry", _odom_now, 5.0), drop),
        _clock_case("IMU stamped +3600 s (one message)", "drop", _imu_spike(HOUR), drop, use_imu=True),
        _clock_case("initial pose stamped +3600 s (rviz on the wall clock)", "reset", _initial_pose(HOUR),
                    "taken as 'now' (with a warning): restarts at the pose, never stamped an hour ahead"),
    ]
    # single-message spikes into the past
    cases += [
        _clock_case("absolute pose stamped -3600 s (one message)", "drop",
                    _spike("on_absolute", _pose_now, -HOUR), drop),
        _clock_case("absolute pose stamped -2 s (one message)", "drop", _spike("on_absolute", _pose_now, -2.0), drop),
        _clock_case("odometry stamped -3600 s (one message)", "drop", _spike("on_odometry", _odom_now, -HOUR),
                    "dropped and counted: one old message is no bag loop (it used to restart the fusion)"),
        _clock_case("IMU stamped -3600 s (one message)", "drop", _imu_spike(-HOUR),
                    "dropped and counted: one old message is no bag loop (it used to restart the fusion)",
                    use_imu=True),
        _clock_case("initial pose stamped -3600 s", "reset", _initial_pose(-HOUR),
                    "taken as 'now' (with a warning): restarts at the pose"),
    ]
    # duplicates
    cases += [
        _clock_case("absolute pose: the same message twice", ("ok", "drop"), _twice("on_absolute", F._abs),
                    "the second is dropped as a duplicate stamp", genuine=True),
        _clock_case("odometry: the same message twice", ("ok", "drop"), _twice("on_odometry", F._odom),
                    "the second is dropped (stamp not after the previous one)", genuine=True),
        _clock_case("IMU: the same message twice", ("ok", "drop"), _twice("on_imu", F._imu),
                    "the second is dropped (stamp not after the previous one)", use_imu=True,
                    genuine=True),
    ]
    # bursts
    cases += [
        _clock_case("burst: 2 s of odometry, then 2 s of poses, at once", ("ok", "drop"), _stall_then_burst,
                    "each input in stamp order: fused (poses late behind the odometry are fine)",
                    resume=_burst_resume(), genuine=True),
    ]
    # jumps of every input's clock: a clean restart
    for offset in (-HOUR, -3.0, 30.0, HOUR):
        cases.append(_clock_case(f"every input jumps {offset:+g} s and stays", "reset", lambda fr: None, jump,
                                 resume=(F.FAULT_AT + offset, F.T0 + offset)))
    cases.append(_clock_case("every input, IMU included, jumps +3600 s and stays", "reset", lambda fr: None,
                             jump, use_imu=True, resume=(F.FAULT_AT + HOUR, F.T0 + HOUR)))
    cases.append(_clock_case("only odometry jumps +3600 s and stays", "drop", lambda fr: None,
                             "odometry off the other inputs' clock: dropped and counted (a misconfigured "
                             "clock), the camera poses go on", follow=_only_odometry_jumps(HOUR)))
    return cases


# --------------------------------------------------------------------------- the replay

def _spiked_bag(topic, index, offset_s):
    """``prepare`` for a replay case: the synthetic bag with message ``index`` of ``topic``
    stamped ``offset_s`` off (its receive time, the log time, unchanged)."""
    def prepare(res, folder):
        from rosbags.highlevel import AnyReader
        from rosbags.rosbag2 import StoragePlugin, Writer

        store = F.messages.rosbags_typestore()
        types = F.messages.rosbags_types()
        dst = folder / "spiked"
        with AnyReader([res.bag], default_typestore=store) as reader, \
                Writer(dst, version=8, storage_plugin=StoragePlugin.MCAP) as writer:
            out = {c.id: writer.add_connection(c.topic, c.msgtype, typestore=store) for c in reader.connections}
            seen = 0
            for c, log_ns, raw in reader.messages():
                if c.topic == topic:
                    if seen == index:
                        msg = reader.deserialize(raw, c.msgtype)
                        ns = F.messages.header_stamp_ns(msg) + int(offset_s * 1e9)
                        msg.header.stamp = F.messages.time_from_ns(types, ns)
                        raw = store.serialize_cdr(msg, c.msgtype)
                    seen += 1
                writer.write(out[c.id], log_ns, raw)
        return {"bag": dst}
    return prepare


def _replay_spike(name, topic, counter, offset_s=HOUR):
    """``vizloc-replay --order receive`` of a bag with one message of ``topic`` stamped off:
    counted under ``counter``, and no fused pose stamped past the bag's end."""
    def run(res, folder: Path) -> F.Observation:
        obs = F.replay_case(["--order", "receive", "--single-process"], prepare=_spiked_bag(topic, 12, offset_s))(
            res, folder)
        if obs.behaviour != "ok":
            return obs
        report = folder / "report"
        counts = json.loads((report / "metrics.json").read_text())["counts"]
        fused = np.loadtxt(report / "fused.tum", ndmin=2)[:, 0]
        truth = np.loadtxt(report / "ground_truth.tum", ndmin=2)[:, 0]
        if fused.max() > truth.max() + 1.0:
            obs.behaviour = f"fused pose stamped {fused.max() - truth.max():.1f} s past the bag's end"
        elif counts.get(counter, 0) >= 1:
            obs.behaviour, obs.detail = "drop", f"{counter}: {counts[counter]}"
        return obs
    return F.in_workdir("clock", name, "drop", run,
                        "fed in receive order like the node: the spike is dropped and counted, never fused")


def _replay_cases() -> list[F.Case]:
    return [_replay_spike("replay --order receive: image stamped +3600 s", "/camera/image_raw",
                          "absolute_off_clock"),
            _replay_spike("replay --order receive: odometry stamped +3600 s", "/odom", "odom_off_clock")]


def cases() -> list[F.Case]:
    return _message_cases() + _gap_cases() + _replay_cases()
