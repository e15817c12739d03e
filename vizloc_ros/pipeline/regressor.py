"""Regressor core: image message -> ``PoseEstimator`` -> base pose in ``map``
(``/vizloc/absolute_pose``), and the visual odometry of a network with a relative head.

Why a core without ROS: the regressor node and ``vizloc-replay`` make the same decisions
(which frame runs, what is dropped and why, which stamp and frame an output carries).
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np

from vizloc_ros import geometry
from vizloc_ros.pipeline.drops import Drop, DropCounting, DropReason
from vizloc_ros.ros_io import messages

LOG = logging.getLogger(__name__)


def load_estimator(weights, **kwargs):
    """A :class:`~vizloc_ros.localize.estimator.PoseEstimator`; any problem with the weights is one
    ``ValueError`` naming the file, never a traceback.

    This is where a user's file meets the code, for the node, ``vizloc-replay`` and
    ``vizloc-eval`` alike: a missing, truncated or pickled file, a sidecar with missing
    keys or values of the wrong type, tensors of another network, or weights that give a
    non-finite pose (NaN/inf in them, a diverged training; the estimator's warm-up frame
    shows it). A setting that is wrong whatever the file (``mc_dropout_samples``) is a
    ``ValueError`` naming the setting, not the weights.
    """
    # torch is loaded with the first weights, not with this module: vizloc-replay forks its
    # fusion process before any torch thread exists, and the fusion node never loads it
    from vizloc_ros.localize.estimator import PoseEstimator, check_mc_dropout_samples

    check_mc_dropout_samples(kwargs.get("mc_dropout_samples", 0))
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


@dataclass(frozen=True)
class FrameResult:
    """What one image message became: a pose to publish, or why there is none.

    ``skipped``: ``max_rate`` left the frame out (not a problem, so not a drop).
    """

    pose: AbsolutePose | None = None
    drop: Drop | None = None
    skipped: bool = False


class RegressorCore(DropCounting):
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
        max_image_pixels: an image whose header announces more pixels (width x height)
            is dropped before it is decoded (``dropped_image_too_large``).
    """

    def __init__(self, estimator, base_T_camera=None, map_frame: str = "map",
                 max_rate: float = 0.0, visual_odometry: bool = False, odom_frame: str = "odom",
                 base_frame: str = "base_link",
                 max_image_pixels: int = messages.DEFAULT_MAX_IMAGE_PIXELS):
        self.estimator = estimator
        self.map_frame = map_frame
        self.limiter = StampRateLimiter(max_rate)
        if isinstance(max_image_pixels, bool) or int(max_image_pixels) != max_image_pixels \
                or max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be a whole number >= 1, got {max_image_pixels!r}")
        self.max_image_pixels = int(max_image_pixels)
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
        self.last_drop: Drop | None = None
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
        return stamp_ns, messages.image_to_rgb(msg, self.max_image_pixels)

    def _dropped(self, reason: DropReason, detail: str) -> FrameResult:
        return FrameResult(drop=self._drop(reason, detail))

    def process(self, msg) -> FrameResult:
        """One image message -> its pose, or why there is none (dropped and counted)."""
        results = self.process_batch([msg])
        return results[0]

    def process_batch(self, msgs) -> list[FrameResult]:
        """Many image messages (replay batches them for GPU throughput), one result each.

        Images of one size go through the estimator together; a bad image is dropped and
        counted without affecting the others.
        """
        out: list[FrameResult] = [FrameResult()] * len(msgs)
        decoded: dict[tuple, list[tuple[int, float, np.ndarray]]] = {}
        for i, msg in enumerate(msgs):
            self.counters["received"] += 1
            try:
                stamp_ns, image = self.decode(msg)
            except messages.ImageTooLarge as exc:
                out[i] = self._dropped(DropReason.IMAGE_TOO_LARGE, str(exc))
                continue
            except (ValueError, AttributeError) as exc:
                out[i] = self._dropped(DropReason.INVALID_IMAGE, str(exc))
                continue
            if not self.limiter.accept(stamp_ns * 1e-9):
                self.counters["skipped_rate"] += 1  # max_rate at work: not a problem to warn about
                out[i] = FrameResult(skipped=True)
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
                for i, _, _ in group:
                    out[i] = self._dropped(DropReason.ESTIMATOR, str(exc))
                continue
            for (i, stamp_ns, _), est in zip(group, estimates):
                odometry = None
                if self.visual_odometry is not None:  # every step counts, even if the pose is dropped
                    odometry = self.visual_odometry.add(stamp_ns, getattr(est, "relative", None),
                                                        self.base_T_camera)
                out[i] = self._to_base(stamp_ns, est)
                if out[i].pose is not None:
                    out[i].pose.odometry = odometry
                    self.counters["published"] += 1
        return out

    def _to_base(self, stamp_ns: int, est) -> FrameResult:
        cov = np.asarray(est.cov, dtype=float)
        if not (np.all(np.isfinite(est.t)) and np.all(np.isfinite(est.q)) and np.all(np.isfinite(cov))):
            return self._dropped(DropReason.NON_FINITE, "estimator returned a non-finite pose")
        if self.base_T_camera is None:
            if not self._warned_extrinsic:
                LOG.warning("camera extrinsic unknown: publishing the camera pose as the base pose")
                self._warned_extrinsic = True
            t, q, cov_b = np.asarray(est.t, float), np.asarray(est.q, float), cov
        else:
            t, q, cov_b = camera_to_base(est.t, est.q, cov, self.base_T_camera)
        return FrameResult(pose=AbsolutePose(
            stamp=stamp_ns * 1e-9, frame_id=self.map_frame, t=t, q=q, cov=cov_b,
            latency_s=float(est.latency_s), t_cam=np.asarray(est.t, float),
            q_cam=np.asarray(est.q, float), stamp_ns=int(stamp_ns)))
