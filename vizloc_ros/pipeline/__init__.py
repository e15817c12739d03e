"""The relocalization pipeline without ROS: what the nodes do, so the replay does it too.

The two rclpy nodes are thin adapters over the two cores defined here, and
``vizloc-replay`` drives the very same cores from a bag. Every decision (which frame
is processed, what is dropped and why, which stamp and frame an output carries, the
``map -> odom`` arithmetic) lives here and is tested without ROS 2.

* :class:`LatestFrameSlot` - keep only the newest camera frame; older ones are
  dropped and counted (a slow network never builds a queue);
* :class:`FrameWorker` - the worker thread that runs the newest frame of the slot;
* :class:`RegressorCore` - image message -> ``PoseEstimator`` -> base pose in ``map``
  (through the camera extrinsic, covariance propagated) = ``/vizloc/absolute_pose``;
  sequence models get their frames in stamp order, and a network with a relative head
  (VLocNet) can also drive :class:`VisualOdometry` = ``/vizloc/visual_odometry``;
* :class:`FusionCore` - absolute pose / odometry / IMU / initial pose messages ->
  ``SlidingWindowFusion`` -> ``/vizloc/pose``, ``/vizloc/path`` and the TF transform.

Messages may be rclpy or rosbags messages: the cores only read fields (messages.py).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from vizloc_ros import geometry
from vizloc_ros.ros_io import messages

LOG = logging.getLogger(__name__)


# --------------------------------------------------------------------------- frames

class LatestFrameSlot:
    """A one-element mailbox between a subscription callback and a worker thread.

    ``put`` never blocks: a frame not yet taken is replaced by the newer one and counted
    as dropped. ``take`` waits for a frame. Memory is bounded by one frame whatever the
    input rate, and the worker always processes the newest frame.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._item = None
        self._closed = False
        self.received = 0
        self.dropped = 0

    def put(self, item) -> bool:
        """Store ``item``; returns True when it replaced (dropped) an unprocessed one."""
        with self._cond:
            replaced = self._item is not None
            if replaced:
                self.dropped += 1
            self._item = item
            self.received += 1
            self._cond.notify()
            return replaced

    def take(self, timeout: float | None = None):
        """The newest item, or None on timeout / close."""
        with self._cond:
            if self._item is None and not self._closed:
                self._cond.wait(timeout)
            item, self._item = self._item, None
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class FrameWorker:
    """The regressor node's worker thread, ROS-free: newest frame of a slot -> ``handle``.

    The thread takes the newest frame from a :class:`LatestFrameSlot` and calls
    ``handle(msg)`` on it. An exception out of ``handle`` drops that frame (counted in
    ``errors``) and goes to ``on_error(exc)``; the worker goes on unless ``on_error``
    returns False (the node does when rclpy is shutting down). The node, the tests and
    ``benchmarks/fault_suite.py`` run this same loop.
    """

    def __init__(self, slot: LatestFrameSlot, handle, on_error=None, name: str = "vizloc_worker",
                 poll_s: float = 0.5):
        self.slot = slot
        self.handle = handle
        self.on_error = on_error
        self.poll_s = poll_s
        self.errors = 0
        self._running = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "FrameWorker":
        self._running = True
        self._thread.start()
        return self

    def _run(self) -> None:
        while self._running:
            msg = self.slot.take(timeout=self.poll_s)
            if msg is None:
                continue
            try:
                self.handle(msg)
            except Exception as exc:  # noqa: BLE001 - one bad frame never ends the worker
                self.errors += 1
                if self.on_error is not None and self.on_error(exc) is False:
                    return

    def stop(self, timeout: float = 5.0) -> None:
        """End the loop (the frame being processed finishes) and join the thread."""
        self._running = False
        self.slot.close()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()


def load_estimator(weights, **kwargs):
    """A :class:`~vizloc_ros.localize.estimator.PoseEstimator`; any problem with the weights is one
    ``ValueError`` naming the file, never a traceback.

    This is where a user's file meets the code, for the node, ``vizloc-replay`` and
    ``vizloc-eval`` alike: a missing, truncated or pickled file, a sidecar with missing
    keys or values of the wrong type, tensors of another network, or weights that give a
    non-finite pose (NaN/inf in them, a diverged training; the estimator's warm-up frame
    shows it).
    """
    from vizloc_ros.localize.estimator import PoseEstimator

    try:
        return PoseEstimator(weights, **kwargs)
    except FloatingPointError as exc:
        raise ValueError(f"cannot load weights {weights}: {exc} on a blank image (NaN or inf in "
                         "the weights? a diverged training?)") from None
    except (ValueError, OSError, RuntimeError, ImportError) as exc:
        raise ValueError(f"cannot load weights {weights}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - e.g. a sidecar value of the wrong type
        raise ValueError(f"cannot load weights {weights}: {type(exc).__name__}: {exc}") from None


class StampRateLimiter:
    """Accept at most ``max_rate`` frames per second of *message time* (0 = all).

    Using header stamps rather than the wall clock makes replay and live runs drop
    the same frames.
    """

    def __init__(self, max_rate: float = 0.0):
        if not np.isfinite(max_rate) or max_rate < 0:
            raise ValueError(f"max_rate must be >= 0, got {max_rate}")
        self.period = 1.0 / max_rate if max_rate > 0 else 0.0
        self._last = None

    def accept(self, stamp: float) -> bool:
        if self.period == 0.0:
            return True
        if self._last is not None and 0.0 <= stamp - self._last < self.period * 0.999:
            return False
        self._last = stamp
        return True


def camera_to_base(t_cam, q_cam, cov_cam, base_T_camera):
    """Camera pose in ``map`` (+ ROS-order covariance) -> base pose in ``map``.

    map_T_base = map_T_camera * inverse(base_T_camera). A rotation error delta (left,
    map axes) of the camera moves the base by delta x r, where r = R_cam * t_cb is the
    lever arm from camera to base in map axes; the covariance is propagated with that
    Jacobian, so a camera mounted far from the base gets an honest translation spread.
    """
    t_bc, q_bc = base_T_camera
    t_cb, q_cb = geometry.pose_inverse(t_bc, q_bc)
    t_base, q_base = geometry.pose_compose(t_cam, q_cam, t_cb, q_cb)
    lever = geometry.quat_rotate(q_cam, t_cb)
    J = np.eye(6)
    J[:3, 3:] = -geometry.hat(lever)
    cov = J @ np.asarray(cov_cam, dtype=float) @ J.T
    return t_base, q_base, 0.5 * (cov + cov.T)


@dataclass
class OdometryPose:
    """What ``/vizloc/visual_odometry`` carries (nav_msgs/Odometry): the pose of
    ``child_frame_id`` in ``frame_id`` with its accumulated covariance (ROS order, axes
    of ``frame_id``), like any visual-odometry node."""

    stamp: float
    stamp_ns: int
    frame_id: str
    child_frame_id: str
    t: np.ndarray
    q: np.ndarray
    cov: np.ndarray


class VisualOdometry:
    """The network's camera motion between consecutive frames (VLocNet's relative head,
    :class:`~vizloc_ros.localize.estimator.RelativeEstimate`) integrated into the pose of the base
    in ``odom_frame``: visual odometry for robots that have none, fused as relative
    constraints like wheel odometry.

    The base moves by ``E * C * E^-1`` (E: base -> camera extrinsic, C: camera motion);
    the per-step covariance is moved into the base and then the odometry frame (first
    order) and accumulated, so the fusion sees its growth between two poses as the
    uncertainty of that step. A frame without a relative estimate (the first one, or the
    first after a gap) holds the pose: the fusion does not bridge odometry gaps.
    """

    def __init__(self, odom_frame: str = "odom", base_frame: str = "base_link"):
        self.odom_frame, self.base_frame = odom_frame, base_frame
        self.reset()

    def reset(self) -> None:
        self.t = np.zeros(3)
        self.q = np.array([1.0, 0.0, 0.0, 0.0])
        self.cov = np.diag([1e-6] * 6)
        self.steps = 0
        self.holds = 0

    def add(self, stamp_ns: int, relative, base_T_camera=None) -> OdometryPose:
        if relative is not None:
            t_c = np.asarray(relative.t, float)
            q_c = np.asarray(relative.q, float)
            cov_c = np.asarray(relative.cov, float)
            if base_T_camera is None:
                t_e, q_e = np.zeros(3), np.array([1.0, 0.0, 0.0, 0.0])
            else:
                t_e, q_e = base_T_camera
            t_ei, q_ei = geometry.pose_inverse(t_e, q_e)
            t_b, q_b = geometry.pose_compose(*geometry.pose_compose(t_e, q_e, t_c, q_c), t_ei, q_ei)
            R_e = geometry.quat_to_matrix(q_e)
            R_b = geometry.quat_to_matrix(q_b)
            J = np.zeros((6, 6))
            J[:3, :3] = J[3:, 3:] = R_e
            J[:3, 3:] = geometry.hat(R_b @ np.asarray(t_e, float)) @ R_e
            R_o = geometry.quat_to_matrix(self.q)
            A = np.zeros((6, 6))
            A[:3, :3] = A[3:, 3:] = R_o
            step = A @ J @ cov_c @ J.T @ A.T
            self.t, self.q = geometry.pose_compose(self.t, self.q, t_b, q_b)
            self.cov = 0.5 * ((self.cov + step) + (self.cov + step).T)
            self.steps += 1
        else:
            self.holds += 1
        return OdometryPose(stamp=stamp_ns * 1e-9, stamp_ns=int(stamp_ns), frame_id=self.odom_frame,
                            child_frame_id=self.base_frame, t=self.t.copy(), q=self.q.copy(),
                            cov=self.cov.copy())


@dataclass
class AbsolutePose:
    """What ``/vizloc/absolute_pose`` carries: base pose in ``frame_id`` at ``stamp``;
    ``odometry``: the visual odometry at the same stamp, when the core produces it."""

    stamp: float
    frame_id: str
    t: np.ndarray
    q: np.ndarray
    cov: np.ndarray
    latency_s: float = 0.0
    t_cam: np.ndarray | None = None
    q_cam: np.ndarray | None = None
    stamp_ns: int | None = None  # the image header stamp, exact (float seconds lose ns)
    odometry: OdometryPose | None = None


class RegressorCore:
    """Image messages -> absolute base poses in ``map``.

    Args:
        estimator: a :class:`~vizloc_ros.localize.estimator.PoseEstimator` (anything with
            ``estimate_batch(images)`` returning objects with t, q, cov, latency_s).
        base_T_camera: (t, q_wxyz) of the camera optical frame in the base frame;
            None means "not known yet" (the node may learn it from TF later) and the
            camera pose is then used as the base pose, with one warning.
        map_frame: frame of the published poses.
        max_rate: process at most this many frames per second of message time.
        visual_odometry: also integrate the network's relative head (VLocNet) into
            :class:`VisualOdometry` (``odom_frame`` -> ``base_frame``); the estimator must
            have one (``estimator.has_relative_head``).
    """

    def __init__(self, estimator, base_T_camera=None, map_frame: str = "map",
                 max_rate: float = 0.0, visual_odometry: bool = False, odom_frame: str = "odom",
                 base_frame: str = "base_link"):
        self.estimator = estimator
        self.map_frame = map_frame
        self.limiter = StampRateLimiter(max_rate)
        # sequence models (VidLoc, VLocNet) read earlier frames: feed them in stamp order
        self.sequential = bool(getattr(estimator, "sequential", False))
        self.visual_odometry = None
        if visual_odometry:
            if not getattr(estimator, "has_relative_head", False):
                arch = (getattr(estimator, "meta", None) or {}).get("architecture", "this network")
                raise ValueError(f"visual odometry needs a network with a relative-pose head "
                                 f"(vlocnet); {arch!r} has none")
            self.visual_odometry = VisualOdometry(odom_frame, base_frame)
        self.base_T_camera = None
        if base_T_camera is not None:
            self.set_extrinsic(*base_T_camera)
        self.counters: Counter = Counter()
        self.last_error: str | None = None
        self._warned_extrinsic = False

    def set_extrinsic(self, t, q_wxyz) -> None:
        t = np.asarray(t, dtype=float).reshape(3)
        q = geometry.quat_normalize(np.asarray(q_wxyz, dtype=float).reshape(4))
        if not np.all(np.isfinite(t)):
            raise ValueError("camera extrinsic translation is not finite")
        self.base_T_camera = (t, q)

    def decode(self, msg) -> tuple[int, np.ndarray]:
        """(stamp in ns, HxWx3 RGB) of an Image or CompressedImage message; ValueError if bad."""
        stamp_ns = messages.header_stamp_ns(msg)
        if stamp_ns <= 0:
            raise ValueError(f"image stamp {stamp_ns} ns is zero or invalid")
        return stamp_ns, messages.image_to_rgb(msg)

    def _drop(self, reason: str, detail: str) -> None:
        self.counters[f"dropped_{reason}"] += 1
        self.last_error = detail

    def process(self, msg) -> AbsolutePose | None:
        """One image message -> AbsolutePose, or None (dropped and counted)."""
        results = self.process_batch([msg])
        return results[0]

    def process_batch(self, msgs) -> list[AbsolutePose | None]:
        """Many image messages (replay batches them for GPU throughput).

        Images of one size go through the estimator together; a bad image is dropped and
        counted without affecting the others.
        """
        out: list[AbsolutePose | None] = [None] * len(msgs)
        decoded: dict[tuple, list[tuple[int, float, np.ndarray]]] = {}
        for i, msg in enumerate(msgs):
            self.counters["received"] += 1
            try:
                stamp_ns, image = self.decode(msg)
            except (ValueError, AttributeError) as exc:
                self._drop("invalid_image", str(exc))
                continue
            if not self.limiter.accept(stamp_ns * 1e-9):
                self.counters["skipped_rate"] += 1  # max_rate at work: not a problem to warn about
                continue
            decoded.setdefault(image.shape, []).append((i, stamp_ns, image))
        for group in decoded.values():
            try:
                if self.sequential:
                    group.sort(key=lambda g: g[1])
                    estimates = self.estimator.estimate_batch([g[2] for g in group],
                                                              stamps=[g[1] * 1e-9 for g in group])
                else:
                    estimates = self.estimator.estimate_batch([g[2] for g in group])
            except (ValueError, FloatingPointError) as exc:
                for _ in group:
                    self._drop("estimator", str(exc))
                continue
            for (i, stamp_ns, _), est in zip(group, estimates):
                odometry = None
                if self.visual_odometry is not None:  # every step counts, even if the pose is dropped
                    odometry = self.visual_odometry.add(stamp_ns, getattr(est, "relative", None),
                                                        self.base_T_camera)
                pose = self._to_base(stamp_ns, est)
                if pose is not None:
                    pose.odometry = odometry
                    out[i] = pose
                    self.counters["published"] += 1
        return out

    def _to_base(self, stamp_ns: int, est) -> AbsolutePose | None:
        cov = np.asarray(est.cov, dtype=float)
        if not (np.all(np.isfinite(est.t)) and np.all(np.isfinite(est.q)) and np.all(np.isfinite(cov))):
            self._drop("non_finite", "estimator returned a non-finite pose")
            return None
        if self.base_T_camera is None:
            if not self._warned_extrinsic:
                LOG.warning("camera extrinsic unknown: publishing the camera pose as the base pose")
                self._warned_extrinsic = True
            t, q, cov_b = np.asarray(est.t, float), np.asarray(est.q, float), cov
        else:
            t, q, cov_b = camera_to_base(est.t, est.q, cov, self.base_T_camera)
        return AbsolutePose(stamp=stamp_ns * 1e-9, frame_id=self.map_frame, t=t, q=q, cov=cov_b,
                            latency_s=float(est.latency_s), t_cam=np.asarray(est.t, float),
                            q_cam=np.asarray(est.q, float), stamp_ns=int(stamp_ns))


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


@dataclass
class FusionSettings:
    """Node-level settings around the fusion (frames, TF, path), DESIGN.md names."""

    map_frame: str = "map"
    odom_frame: str = "odom"
    base_frame: str = "base_link"
    publish_tf: bool = True
    transform_tolerance: float = 0.1
    use_odom: bool = True
    use_imu: bool = False
    path_max_length: int = 10000
    path_min_spacing: float = 0.0

    def __post_init__(self):
        if not np.isfinite(self.transform_tolerance) or self.transform_tolerance < 0:
            raise ValueError(f"transform_tolerance must be >= 0, got {self.transform_tolerance}")
        for name in ("map_frame", "odom_frame", "base_frame"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string")


class FusionCore:
    """Messages in -> fused outputs, exactly as the fusion node publishes them."""

    def __init__(self, fusion_config=None, settings: FusionSettings | None = None):
        from vizloc_ros.fusion import FusionConfig, SlidingWindowFusion

        self.settings = settings or FusionSettings()
        if fusion_config is None:
            fusion_config = FusionConfig()
        elif isinstance(fusion_config, dict):
            fusion_config = FusionConfig.from_dict(fusion_config)
        fusion_config.use_odom = self.settings.use_odom
        fusion_config.use_imu = self.settings.use_imu
        self.fusion = SlidingWindowFusion(fusion_config)
        self.counters: Counter = Counter()
        self.path: deque = deque(maxlen=self.settings.path_max_length)
        self.last_reason: str | None = None
        # float stamp -> exact ns of recent inputs, so outputs carry the input's stamp exactly
        self._exact_ns: "OrderedDict[float, int]" = OrderedDict()
        self._time_jumps_seen = 0
        self._warned_odom_frames: set = set()

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
    def on_absolute(self, msg) -> FusionOutput | None:
        """A ``/vizloc/absolute_pose`` message (PoseWithCovarianceStamped of the base)."""
        self.counters["absolute_received"] += 1
        try:
            stamp, t, q, cov = self._map_pose(msg, "absolute pose")
        except ValueError as exc:
            return self._drop("absolute_invalid", str(exc))
        return self.add_absolute(stamp, t, q, cov)

    def _map_pose(self, msg, what: str):
        """(stamp, t, q, cov) of a PoseWithCovarianceStamped that must be in ``map``;
        ``ValueError`` naming ``what`` otherwise."""
        frame = msg.header.frame_id
        if frame != self.settings.map_frame:
            raise ValueError(f"{what} in frame {frame!r}, expected {self.settings.map_frame!r}")
        stamp = self._remember(msg)
        return (stamp, *messages.pose_with_covariance_from_msg(msg))

    def add_absolute(self, stamp, t, q, cov) -> FusionOutput | None:
        result = self.fusion.add_absolute(stamp, t, q, cov)
        self.counters[f"absolute_{result.status}"] += 1
        self.last_reason = result.reason
        return self._output(stamp) if result.status in ("accepted", "initialising") else None

    def on_coarse_pose(self, msg) -> FusionOutput | None:
        """A ``/vizloc/coarse_pose`` message (PoseWithCovarianceStamped of the base, from a
        coarse relocalizer such as NetVLAD): initialisation and kidnap recovery only."""
        self.counters["coarse_received"] += 1
        try:
            stamp, t, q, cov = self._map_pose(msg, "coarse pose")
        except ValueError as exc:
            return self._drop("coarse_invalid", str(exc))
        return self.add_coarse_prior(stamp, t, q, cov)

    def add_coarse_prior(self, stamp, t, q, cov) -> FusionOutput | None:
        """A coarse pose (e.g. NetVLAD retrieval): initialisation and kidnap recovery only."""
        result = self.fusion.add_coarse_prior(stamp, t, q, cov)
        # one that agrees with the running estimate is not a problem: counted, not "dropped"
        agrees = result.status == "dropped" and result.mahalanobis2 is not None
        self.counters["coarse_agreed" if agrees else f"coarse_{result.status}"] += 1
        self.last_reason = result.reason
        return self._output(stamp) if result.status in ("accepted", "initialising") else None

    def on_odometry(self, msg) -> FusionOutput | None:
        if not self.settings.use_odom:
            return None
        self.counters["odom_received"] += 1
        try:
            stamp = self._remember(msg)
            t, q, cov = messages.pose_with_covariance_from_msg(msg)
        except ValueError as exc:
            return self._drop("odom_invalid", str(exc))
        self._check_odom_frames(msg)
        return self.add_odometry(stamp, t, q, cov)

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

    def add_odometry(self, stamp, t, q, cov) -> FusionOutput | None:
        result = self.fusion.add_odometry(stamp, t, q, cov)
        self.counters[f"odom_{result.status}"] += 1
        if result.status != "accepted":
            self.last_reason = result.reason
            return None
        return self._output(stamp)

    def on_imu(self, msg) -> None:
        if not self.settings.use_imu:
            return None
        self.counters["imu_received"] += 1
        try:
            stamp_ns = messages.header_stamp_ns(msg)
            if stamp_ns <= 0:  # a driver before its clock is set: would look like a bag loop
                raise ValueError(f"IMU stamp {stamp_ns} ns is zero or invalid")
            stamp, gyro, accel = messages.imu_motion_from_msg(msg)  # the fusion uses no more
        except ValueError as exc:
            self._drop("imu_invalid", str(exc))
            return None
        result = self.fusion.add_imu(stamp, gyro, accel)
        self.counters[f"imu_{result.status}"] += 1
        if result.status != "accepted":
            self.last_reason = result.reason
        return None

    def on_initial_pose(self, msg) -> FusionOutput | None:
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
            return self._drop("initialpose_invalid", str(exc))
        result = self.fusion.set_initial_pose(stamp, t, q, cov)
        self.counters[f"initialpose_{result.status}"] += 1
        self.last_reason = result.reason
        self.path.clear()
        return self._output(stamp) if result.status == "accepted" else None

    def reset(self) -> None:
        """``~/reset``: forget the window and the path; re-initialise from measurements."""
        self.fusion.reset()
        self.path.clear()
        self.counters["resets"] += 1

    # -- helpers -------------------------------------------------------------
    def _drop(self, reason: str, detail: str) -> None:
        self.counters[f"dropped_{reason}"] += 1
        self.last_reason = detail
        return None

    def _output(self, stamp: float) -> FusionOutput | None:
        estimate = self.fusion.estimate()
        if estimate is None:
            return None
        t, q, cov = estimate.t, estimate.q, estimate.cov_ros
        if not (np.all(np.isfinite(t)) and np.all(np.isfinite(q)) and np.all(np.isfinite(cov))):
            return self._drop("non_finite_estimate", "fusion produced a non-finite estimate")
        s = self.settings
        jumps = self.fusion.counters.get("time_jumps", 0)
        if jumps != self._time_jumps_seen:
            # The fusion restarted after a jump back in time (a looping bag): the old path
            # is from another run, and keeping it would stop the path from ever growing
            # again (an entry is only appended after the newest stamp).
            self._time_jumps_seen = jumps
            self.path.clear()
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
        return FusionOutput(stamp=estimate.stamp, frame_id=s.map_frame, t=t, q=q, cov=cov,
                            transform=transform, path_appended=appended, stamp_ns=stamp_ns)

    def path_arrays(self):
        """(stamps, t, q) of the fused path so far."""
        if not self.path:
            return np.zeros(0), np.zeros((0, 3)), np.zeros((0, 4))
        stamps, ts, qs = zip(*self.path)
        return np.array(stamps), np.stack(ts), np.stack(qs)


#: /vizloc/path is republished at most this often (seconds of message time): it can hold
#: thousands of poses, and rviz does not need it at the odometry rate.
PATH_PERIOD_S = 0.5


class PathMirror:
    """The fused path as PoseStamped messages for ``/vizloc/path``, each pose converted once.

    The path holds thousands of poses and is republished over and over; converting it
    whole each time made publishing quadratic in its length. The mirror follows
    ``core.path`` one appended pose at a time and rebuilds itself when the core has
    cleared its path (reset, initial pose, a jump back in time).
    """

    def __init__(self, core: FusionCore, types):
        self.core = core
        self.types = types
        self.poses: deque = deque(maxlen=core.settings.path_max_length)  # (stamp, PoseStamped)

    def clear(self) -> None:
        self.poses.clear()

    def sync(self) -> None:
        """Call after an output with ``path_appended``."""
        path = self.core.path
        if not path:
            self.poses.clear()
            return
        if len(path) == 1 or not self.poses or path[-2][0] != self.poses[-1][0]:
            self.poses.clear()  # the core cleared its path: rebuild
            entries = list(path)
        else:
            entries = [path[-1]]
        for stamp, t, q in entries:
            self.poses.append((stamp, messages.make_pose_stamped(
                self.types, messages.time_from_ns(self.types, self.core.exact_ns(stamp)),
                self.core.settings.map_frame, t, q)))

    @property
    def newest_stamp(self) -> float | None:
        return self.poses[-1][0] if self.poses else None

    def message(self, stamp=None):
        """nav_msgs/Path of the mirrored poses, stamped with the newest pose's stamp
        (or ``stamp``, a Time message, when the path is empty)."""
        if self.poses:
            stamp = self.poses[-1][1].header.stamp
        return self.types.Path(header=self.types.Header(stamp=stamp, frame_id=self.core.settings.map_frame),
                               poses=[m for _, m in self.poses])


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
