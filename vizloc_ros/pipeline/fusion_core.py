"""Fusion core: absolute pose / odometry / IMU / initial pose messages ->
``SlidingWindowFusion`` -> fused pose, path and the ``map -> odom`` transform.

Why a core without ROS: the fusion node and the replay's fusion side feed it the same
messages and must publish the same result.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, fields

import numpy as np

from vizloc_ros.localize.weights import network_noise
from vizloc_ros.pipeline.clock_guard import ClockGuard
from vizloc_ros.pipeline.drops import Drop, DropCounting, DropReason
from vizloc_ros.pipeline.plausibility import ImuPlausibility, OdomCovariancePlausibility
from vizloc_ros.ros_io import messages
from vizloc_ros.settings import field_setting, setting

LOG = logging.getLogger(__name__)


# --------------------------------------------------------------------------- fusion

@dataclass
class TransformOut:
    """A TF transform to broadcast: ``parent -> child`` at ``stamp``."""

    stamp: float
    parent: str
    child: str
    t: np.ndarray
    q: np.ndarray
    stamp_ns: int = 0


@dataclass
class FusionOutput:
    """Everything the fusion node publishes after one update."""

    stamp: float
    frame_id: str
    t: np.ndarray
    q: np.ndarray
    cov: np.ndarray
    transform: TransformOut | None
    path_appended: bool
    stamp_ns: int = 0  # exact stamp of the input the estimate is at (float seconds lose ns)


@dataclass(frozen=True)
class FusionStep:
    """What one input message became: the output to publish, or why there is none.

    Both are None when the input was used without a new estimate (IMU, odometry before
    initialisation, a coarse pose that agrees with the estimate) or not used at all.
    """

    output: FusionOutput | None = None
    drop: Drop | None = None
    #: ``(kind, line)`` the node logs, throttled per kind: the fusion restarted (clock
    #: jump), an implausible input, an initial pose taken as "now"
    notices: tuple = ()


def _with_notices(method):
    """An input method whose step carries the notices raised while it ran."""
    @functools.wraps(method)
    def wrapper(self, msg):
        step = method(self, msg)
        if not self._notices:
            return step
        notices, self._notices = tuple(self._notices), []
        return dataclasses.replace(step, notices=step.notices + notices)
    return wrapper


@dataclass
class FusionSettings:
    """Node-level settings around the fusion (frames, TF, path), DESIGN.md names.

    Each field is defined once (:func:`~vizloc_ros.settings.setting`): the fusion node
    declares it as a parameter of the same name, and ``config/vizloc.yaml`` and
    ``docs/ROS.md`` are generated from it.

    ``use_odom`` / ``use_imu`` are the one source of which inputs are fused: the core
    subscribes to nothing, but it reads odometry / IMU only when they are set, chooses
    the TF it publishes by ``use_odom``, and builds its fusion from a copy of the given
    :class:`~vizloc_ros.fusion.FusionConfig` with these two values.
    """

    map_frame: str = setting("map", "global frame (REP-105)", required=True)
    odom_frame: str = setting("odom", "odometry frame (REP-105)", required=True)
    base_frame: str = setting("base_link", "robot base frame", required=True)
    publish_tf: bool = setting(True, "broadcast map -> odom (or map -> base_frame without odometry)")
    transform_tolerance: float = setting(
        0.1, "s added to the TF stamp (as in amcl): how far into the future the transform is valid",
        minimum=0.0)
    use_odom: bool = setting(True, "fuse odometry as relative constraints and publish map -> odom; "
                                   "false: publish map -> base_frame")
    use_imu: bool = setting(False, "fuse the IMU (see imu_mode)")
    path_max_length: int = setting(10000, "poses kept in /vizloc/path", minimum=1)
    path_min_spacing: float = setting(0.0, "m between consecutive poses of /vizloc/path", minimum=0.0)
    # 1 s is far beyond any input's latency or jitter; slower inputs get their own cadence
    # on top (3 x their typical interval), so a pose stream at 1 Hz is never "ahead"
    max_future_s: float = setting(
        1.0, "s an input may be stamped ahead of the newest stamp of all inputs (and, if slower, "
             "3 x its own typical interval ahead of its previous one); one further ahead is held "
             "and dropped, unless the next messages go on from it (a gap or a clock jump)", above=0.0)
    # 10 s: a stalled executor or a sensor dropout is seconds; a bag restarted, sim time
    # switched on or a clock set by NTP moves by more
    max_gap_s: float = setting(
        10.0, "s the inputs may go on ahead after a silence and the fusion continues (a gap); a "
              "move of every input further ahead is a clock jump: the fusion restarts", above=0.0)
    # a map made by vizloc-map from contiguous frames measures how long its errors stay
    # alike (0.05-0.3 s for maps of the demo room, against the parameter file's second):
    # fused with the default, the fused covariance would be several times too cautious
    noise_from_weights: bool = setting(
        True, "take abs_correlation_time (and abs_bias_share) from the network's checkpoint "
              "(network_weights) where its JSON carries them (maps made by vizloc-map measure "
              "the correlation time); false: this file's values")
    network_weights: str = setting(
        "", "checkpoint the regressor runs, read for noise_from_weights (its JSON only); empty: "
            "the shipped default weights. The launch file sets it to the regressor's weights")

    def __post_init__(self):
        for f in fields(self):
            meta, value = field_setting(f), getattr(self, f.name)
            if meta.required and (not isinstance(value, str) or not value):
                raise ValueError(f"{f.name} must be a non-empty string")
            problem = meta.bounds.violated(value) if isinstance(value, (int, float)) else None
            if problem or (isinstance(value, float) and not np.isfinite(value)):
                raise ValueError(f"{f.name} {problem or 'must be finite'}, got {value}")
        if self.max_gap_s < self.max_future_s:  # a gap is at least what is never "ahead"
            raise ValueError(f"max_gap_s must be >= max_future_s ({self.max_future_s:g}), got {self.max_gap_s:g}")


class FusionCore(DropCounting):
    """Messages in -> fused outputs, exactly as the fusion node publishes them."""

    def __init__(self, fusion_config=None, settings: FusionSettings | None = None):
        """``fusion_config``: a :class:`~vizloc_ros.fusion.FusionConfig`, a dict for
        ``FusionConfig.from_dict`` or None (defaults); it is copied, never changed."""
        # vizloc_ros.fusion loads gtsam: only when a fusion is built, not with this module,
        # so that a missing gtsam is one startup error of the fusion node and
        # ``vizloc-replay --no-fusion`` runs without it
        from vizloc_ros.fusion import FusionConfig, SlidingWindowFusion

        self.settings = settings or FusionSettings()
        if fusion_config is None:
            fusion_config = FusionConfig()
        elif isinstance(fusion_config, dict):
            fusion_config = FusionConfig.from_dict(fusion_config)
        #: the fusion parameters taken from the network's checkpoint (noise_from_weights)
        self.network_noise = (network_noise(self.settings.network_weights)
                              if self.settings.noise_from_weights and self.settings.network_weights else {})
        self.config = dataclasses.replace(fusion_config, use_odom=self.settings.use_odom,
                                          use_imu=self.settings.use_imu, **self.network_noise)
        self.fusion = SlidingWindowFusion(self.config)
        self.counters: Counter = Counter()
        self.path: deque = deque(maxlen=self.settings.path_max_length)
        self.last_drop: Drop | None = None
        # float stamp -> exact ns of recent inputs, so outputs carry the input's stamp exactly
        self._exact_ns: "OrderedDict[float, int]" = OrderedDict()
        self._time_jumps_seen = 0
        self._warned_odom_frames: set = set()
        # stamps far off the other inputs' are spikes (dropped), a gap in the inputs (the
        # fusion goes on) or a clock jump (restart)
        self.clock = ClockGuard(self.settings.max_future_s, self.config.time_jump_s,
                                self.settings.max_gap_s)
        self._notices: list = []
        self._imu_check = ImuPlausibility(self.config.gravity)
        self._odom_cov_check = OdomCovariancePlausibility()

    def _remember(self, msg) -> float:
        stamp_ns = messages.header_stamp_ns(msg)
        stamp = stamp_ns * 1e-9
        if stamp_ns <= 0 or not np.isfinite(stamp):
            raise ValueError(f"stamp {stamp_ns} ns is zero or invalid")
        self._exact_ns[stamp] = stamp_ns
        if len(self._exact_ns) > 4096:
            self._exact_ns.popitem(last=False)
        return stamp

    def exact_ns(self, stamp: float) -> int:
        """The exact ns of an input stamped ``stamp`` (rounded seconds if none matches)."""
        return self._exact_ns.get(stamp, int(round(stamp * 1e9)))

    # -- inputs --------------------------------------------------------------
    @_with_notices
    def on_absolute(self, msg) -> FusionStep:
        """A ``/vizloc/absolute_pose`` message (PoseWithCovarianceStamped of the base)."""
        self.counters["absolute_received"] += 1
        try:
            stamp, t, q, cov = self._map_pose(msg, "absolute pose")
        except ValueError as exc:
            return self._dropped(DropReason.ABSOLUTE_INVALID, str(exc))
        return self._off_clock("absolute", stamp, "absolute pose") or self.add_absolute(stamp, t, q, cov)

    def _map_pose(self, msg, what: str):
        """(stamp, t, q, cov) of a PoseWithCovarianceStamped that must be in ``map``;
        ``ValueError`` naming ``what`` otherwise."""
        frame = msg.header.frame_id
        if frame != self.settings.map_frame:
            raise ValueError(f"{what} in frame {frame!r}, expected {self.settings.map_frame!r}")
        stamp = self._remember(msg)
        return (stamp, *messages.pose_with_covariance_from_msg(msg))

    def add_absolute(self, stamp, t, q, cov) -> FusionStep:
        result = self.fusion.add_absolute(stamp, t, q, cov)
        if result.status in ("accepted", "initialising"):
            self.counters[f"absolute_{result.status}"] += 1
            return self._output()
        return self._dropped(DropReason.refused("absolute", result.status), result.reason)

    @_with_notices
    def on_coarse_pose(self, msg) -> FusionStep:
        """A ``/vizloc/coarse_pose`` message (PoseWithCovarianceStamped of the base, from a
        coarse relocalizer such as NetVLAD): initialisation and kidnap recovery only."""
        self.counters["coarse_received"] += 1
        try:
            stamp, t, q, cov = self._map_pose(msg, "coarse pose")
        except ValueError as exc:
            return self._dropped(DropReason.COARSE_INVALID, str(exc))
        return self._off_clock("coarse", stamp, "coarse pose") or self.add_coarse_prior(stamp, t, q, cov)

    def add_coarse_prior(self, stamp, t, q, cov) -> FusionStep:
        """A coarse pose (e.g. NetVLAD retrieval): initialisation and kidnap recovery only."""
        result = self.fusion.add_coarse_prior(stamp, t, q, cov)
        if result.status in ("accepted", "initialising"):
            self.counters[f"coarse_{result.status}"] += 1
            return self._output()
        if result.status == "dropped" and result.mahalanobis2 is not None:
            # one that agrees with the running estimate is not a problem: counted, not "dropped"
            self.counters["coarse_agreed"] += 1
            return FusionStep()
        return self._dropped(DropReason.refused("coarse", result.status), result.reason)

    @_with_notices
    def on_odometry(self, msg) -> FusionStep:
        if not self.settings.use_odom:
            return FusionStep()
        self.counters["odom_received"] += 1
        try:
            stamp = self._remember(msg)
            t, q, cov = messages.pose_with_covariance_from_msg(msg)
        except ValueError as exc:
            return self._dropped(DropReason.ODOM_INVALID, str(exc))
        off_clock = self._off_clock("odom", stamp, "odometry")
        if off_clock is not None:
            return off_clock
        self._check_odom_frames(msg)
        step = self.add_odometry(stamp, t, q, cov)
        if step.drop is None:
            self._notice("odom_covariance_implausible", self._odom_cov_check.check(cov))
        return step

    def _check_odom_frames(self, msg) -> None:
        """Odometry in other frames than ``odom_frame -> base_frame`` still gives valid
        relative motion, but the published ``map -> odom_frame`` would then hang off a frame
        the robot's TF tree does not join: counted, and said once per pair of frames."""
        s = self.settings
        frames = (str(getattr(msg.header, "frame_id", "")), str(getattr(msg, "child_frame_id", "")))
        if frames[0] in ("", s.odom_frame) and frames[1] in ("", s.base_frame):
            return
        self.counters["odom_frame_mismatch"] += 1
        if frames not in self._warned_odom_frames:
            self._warned_odom_frames.add(frames)
            LOG.warning("odometry is %s -> %s but odom_frame/base_frame are %s -> %s: it is fused, "
                        "but TF %s -> %s will not join your tree; set odom_frame and base_frame",
                        frames[0] or "?", frames[1] or "?", s.odom_frame, s.base_frame,
                        s.map_frame, s.odom_frame)

    def add_odometry(self, stamp, t, q, cov) -> FusionStep:
        result = self.fusion.add_odometry(stamp, t, q, cov)
        if result.status != "accepted":
            return self._dropped(DropReason.refused("odom", result.status), result.reason)
        self.counters["odom_accepted"] += 1
        return self._output()

    @_with_notices
    def on_imu(self, msg) -> FusionStep:
        """An IMU sample: it moves no output by itself (the next pose or odometry does)."""
        if not self.settings.use_imu:
            return FusionStep()
        self.counters["imu_received"] += 1
        try:
            stamp_ns = messages.header_stamp_ns(msg)
            if stamp_ns <= 0:  # a driver before its clock is set: would look like a bag loop
                raise ValueError(f"IMU stamp {stamp_ns} ns is zero or invalid")
            stamp, gyro, accel = messages.imu_motion_from_msg(msg)  # the fusion uses no more
        except ValueError as exc:
            return self._dropped(DropReason.IMU_INVALID, str(exc))
        off_clock = self._off_clock("imu", stamp, "IMU sample")
        if off_clock is not None:
            return off_clock
        result = self.fusion.add_imu(stamp, gyro, accel)
        if result.status != "accepted":
            return self._dropped(DropReason.refused("imu", result.status), result.reason)
        self.counters["imu_accepted"] += 1
        self._notice("imu_accel_implausible", self._imu_check.check(accel))
        return FusionStep()

    @_with_notices
    def on_initial_pose(self, msg) -> FusionStep:
        """rviz "2D Pose Estimate": reset the fusion at the given pose and covariance."""
        self.counters["initialpose_received"] += 1
        try:
            if msg.header.frame_id != self.settings.map_frame:
                raise ValueError(f"initial pose in frame {msg.header.frame_id!r}, "
                                 f"expected {self.settings.map_frame!r}")
            # A zero stamp (``ros2 topic pub /initialpose ...``) means "now": the fusion
            # then uses the newest stamp it has seen.
            stamp = self._remember(msg) if messages.header_stamp_ns(msg) != 0 else 0.0
            t, q, cov = messages.pose_with_covariance_from_msg(msg)
        except ValueError as exc:
            return self._dropped(DropReason.INITIALPOSE_INVALID, str(exc))
        offset = self.clock.off_clock(stamp) if stamp else None
        if offset is not None:
            # rviz on the wall clock while the nodes run on sim time (or the reverse): the
            # pose is meant for now, and at its own stamp it would freeze the fusion there
            self._notice("initialpose_off_clock",
                         f"initial pose stamped {offset:+.3f} s off the newest stamp of the fusion's "
                         "inputs (is rviz on another clock? use_sim_time): taken as 'now'")
            stamp = 0.0
        result = self.fusion.set_initial_pose(stamp, t, q, cov)
        if result.status != "accepted":  # the fusion goes on as it was, and so does its path
            return self._dropped(DropReason.refused("initialpose", result.status), result.reason)
        self.path.clear()
        self.counters["initialpose_accepted"] += 1
        return self._output()

    def reset(self) -> None:
        """``~/reset``: forget the window and the path; re-initialise from measurements."""
        self.fusion.reset()
        self.path.clear()
        self.counters["resets"] += 1

    # -- helpers -------------------------------------------------------------
    def _off_clock(self, stream: str, stamp: float, what: str) -> FusionStep | None:
        """A drop for an input stamped off the fusion's clock (a spike, or the start of a
        clock jump the other inputs have not followed yet); None to fuse it, after a clean
        restart when it confirms that the clock of every input jumped."""
        verdict = self.clock.check(stream, stamp)
        if verdict.action == "hold":
            return self._dropped(DropReason.off_clock(stream),
                                 f"{verdict.describe(what)}: a spike, unless the next messages go on from "
                                 f"it (a gap in the inputs, or a clock jump) (max_future_s={self.settings.max_future_s:g}, "
                                 f"max_gap_s={self.settings.max_gap_s:g}, "
                                 f"time_jump_s={self.config.time_jump_s:g})")
        if verdict.action == "gap":
            # the inputs went on after a silence (a stalled executor, a sensor dropout):
            # no clock jump, the fusion continues (its motion model bridges the gap)
            self._notice("input_gap", f"{verdict.describe(what)} after a silence: "
                                      f"a gap (within max_gap_s={self.settings.max_gap_s:g}), the fusion "
                                      "continues", counter="input_gaps")
        elif verdict.action == "rebase" and not self.fusion.initialised:
            # the first inputs disagreed: what the fusion gathered may be a spike's
            self.fusion.reset()
        elif verdict.action in ("jump", "rebase"):
            self.fusion.reset()
            self.path.clear()
            self._time_jumps_seen = self.fusion.counters.get("time_jumps", 0)
            self._restarted(f"the stamps of every input jumped {verdict.offset:+.3f} s (from "
                            f"{verdict.reference:.3f} s): clock jump, the fusion restarts")
        return None

    def _restarted(self, line: str) -> None:
        """The fusion started over because the clock jumped: counted (``/diagnostics``,
        ``metrics.json``) and said once."""
        self._notice("clock_jump", line, counter="clock_jumps")

    def _notice(self, kind: str, line: str | None, counter: str | None = None) -> None:
        """Count ``counter`` (default: ``kind``) and keep ``line`` for the node's log,
        which throttles it per ``kind``; nothing when ``line`` is None."""
        if line is None:
            return
        self.counters[counter or kind] += 1
        self._notices.append((kind, line))

    def _dropped(self, reason: DropReason, detail: str) -> FusionStep:
        """A step without output because of ``reason``, counted under the reason's name."""
        return FusionStep(drop=self._drop(reason, detail))

    def _output(self) -> FusionStep:
        """The fusion's current estimate (at its newest state, whatever input led to it)
        as an output: the fused pose, its TF and whether the path grew."""
        estimate = self.fusion.estimate()
        if estimate is None:
            return FusionStep()
        t, q, cov = estimate.t, estimate.q, estimate.cov_ros
        if not (np.all(np.isfinite(t)) and np.all(np.isfinite(q)) and np.all(np.isfinite(cov))):
            return self._dropped(DropReason.NON_FINITE_ESTIMATE, "fusion produced a non-finite estimate")
        s = self.settings
        jumps = self.fusion.counters.get("time_jumps", 0)
        if jumps != self._time_jumps_seen:
            # The fusion restarted after a jump back in time (a looping bag): the old path
            # is from another run, and keeping it would stop the path from ever growing
            # again (an entry is only appended after the newest stamp).
            self._time_jumps_seen = jumps
            self.path.clear()
            self._restarted("stamps went back more than time_jump_s (a looping bag, a restarted "
                            "clock): the fusion restarted")
        stamp_ns = self.exact_ns(estimate.stamp)
        transform = None
        if s.publish_tf:
            tf_ns = stamp_ns + int(round(s.transform_tolerance * 1e9))
            tf_stamp = estimate.stamp + s.transform_tolerance
            if s.use_odom and estimate.map_T_odom is not None:
                t_mo, q_mo = estimate.map_T_odom
                transform = TransformOut(tf_stamp, s.map_frame, s.odom_frame,
                                         np.asarray(t_mo, float), np.asarray(q_mo, float), tf_ns)
            elif not s.use_odom:
                transform = TransformOut(tf_stamp, s.map_frame, s.base_frame, t.copy(), q.copy(), tf_ns)
        appended = False
        if not self.path or (estimate.stamp > self.path[-1][0] and
                             np.linalg.norm(t - self.path[-1][1]) >= s.path_min_spacing):
            self.path.append((estimate.stamp, t.copy(), q.copy()))
            appended = True
        return FusionStep(output=FusionOutput(stamp=estimate.stamp, frame_id=s.map_frame, t=t, q=q,
                                              cov=cov, transform=transform, path_appended=appended,
                                              stamp_ns=stamp_ns))

    def path_arrays(self):
        """(stamps, t, q) of the fused path so far."""
        if not self.path:
            return np.zeros(0), np.zeros((0, 3)), np.zeros((0, 4))
        stamps, ts, qs = zip(*self.path)
        return np.array(stamps), np.stack(ts), np.stack(qs)
