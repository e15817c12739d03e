"""What the fusion hands out: the result of each message (:class:`MeasurementResult`) and
the fused estimate (:class:`FusedEstimate`), assembled from the newest graph pose carried
forward to the newest odometry (or IMU) stamp.

Why apart: the output is asked for on every odometry message, far more often than the
graph changes, so it is cached against the graph and buffer state, and it must hold the
output guarantees (no NaN, the last good ``map -> odom`` when odometry has a gap) in one place.
"""
from __future__ import annotations

from dataclasses import dataclass

import gtsam
import numpy as np

from vizloc_ros.fusion.config import FusionConfig
from vizloc_ros.fusion.conventions import gtsam_cov_to_ros, pose_tq, transport
from vizloc_ros.fusion.graph import WindowGraph
from vizloc_ros.fusion.motion import MotionModel
from vizloc_ros.fusion.prediction import Predictor


@dataclass(frozen=True)
class MeasurementResult:
    """What happened to one message: ``status`` is accepted | rejected | dropped |
    initialising; ``reason`` says why in words; ``mahalanobis2`` is the gate statistic."""

    status: str
    reason: str
    stamp: float
    mahalanobis2: float | None = None

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"


@dataclass(frozen=True)
class FusedEstimate:
    """Fused ``map -> base_link`` pose at ``stamp`` with its 6x6 covariance in ROS order
    (parent-frame axes), the camera pose (``map_T_base * base_T_camera``) and, when odometry
    is fused, the REP-105 ``map -> odom`` transform. ``graph_stamp`` is the stamp of the
    newest graph pose; ``stamp`` is later when odometry / IMU propagated it."""

    stamp: float
    t: np.ndarray
    q: np.ndarray
    cov_ros: np.ndarray
    t_cam: np.ndarray
    q_cam: np.ndarray
    map_T_odom: tuple | None
    graph_stamp: float
    velocity: np.ndarray | None = None     # map frame, IMU preintegration only
    imu_bias: np.ndarray | None = None     # (accel xyz, gyro xyz), IMU preintegration only


class EstimateAssembler:
    """Builds :class:`FusedEstimate` from the newest graph pose; keeps the last good
    ``map -> odom`` and the last estimate with the state it was computed for."""

    def __init__(self, config: FusionConfig, base_T_cam: gtsam.Pose3, graph: WindowGraph,
                 motion: MotionModel, predictor: Predictor):
        self.config = config
        self.base_T_cam = base_T_cam
        self.graph = graph
        self.motion = motion
        self.predictor = predictor
        self.clear()

    def clear(self) -> None:
        """Forget what belonged to the previous graph."""
        self.last_map_T_odom = None
        self.cache = None                # (graph and buffer state, FusedEstimate)

    def estimate(self) -> FusedEstimate | None:
        """Newest fused pose, or None before initialisation. May raise; the facade falls
        back to :meth:`plain_estimate`."""
        if self.graph.latest is None:
            return None
        sensors = self.motion.sensors
        tag = (self.graph.version, len(sensors.odom_t), sensors.odom_t[-1] if sensors.odom_t else None,
               len(sensors.imu_t), sensors.imu_t[-1] if sensors.imu_t else None)
        if self.cache is not None and self.cache[0] == tag:
            return self.cache[1]
        est = self._compute()
        self.cache = (tag, est)
        return est

    def plain_estimate(self) -> FusedEstimate | None:
        """The newest graph pose as it is (no propagation), or None if even that fails."""
        try:
            lt = self.graph.latest
            if lt is None:
                return None
            return self._make(lt.stamp, lt.pose, lt.cov, None, lt.stamp, lt.vel)
        except Exception:  # noqa: BLE001
            return None

    def _compute(self):
        lt = self.graph.latest
        key = lt.key
        pose, cov, stamp, vel = lt.pose, lt.cov, lt.stamp, lt.vel
        sensors = self.motion.sensors
        map_T_odom = None
        if self.config.use_odom and sensors.odom_t:
            ok = self.motion.key_odom(key)
            if ok is not None:
                odom_pose = ok[0]
                mto = pose.compose(odom_pose.inverse())
                map_T_odom = pose_tq(mto)
                self.last_map_T_odom = map_T_odom
                newest = sensors.odom_t[-1]
                if newest > stamp:
                    delta, q = self.motion.odom_between(ok, (sensors.odom_pose[-1], sensors.odom_cov[-1]))
                    cov = transport(cov, delta) + q
                    pose = pose.compose(delta)
                    stamp = newest
            else:
                map_T_odom = self.last_map_T_odom
        elif self.motion.preint and sensors.imu_t and sensors.imu_t[-1] > stamp:
            got = self.predictor.nav_predict(key, pose, cov, sensors.imu_t[-1], require_imu=True)
            if got is not None:
                pose, cov = got
                stamp = sensors.imu_t[-1]
        return self._make(stamp, pose, cov, map_T_odom, lt.stamp, vel)

    def _make(self, stamp, pose, cov, map_T_odom, graph_stamp, vel):
        t, q = pose_tq(pose)
        cam_t, cam_q = pose_tq(pose.compose(self.base_T_cam))
        cov_ros = gtsam_cov_to_ros(cov, rotation=pose.rotation().matrix())
        if self.graph.bias_cov_ros is not None:   # the network's common bias (abs_bias_share)
            cov_ros = cov_ros + self.graph.bias_cov_ros
        if not (np.all(np.isfinite(t)) and np.all(np.isfinite(q)) and np.all(np.isfinite(cov_ros))):
            raise ValueError("non-finite estimate")
        if map_T_odom is not None and not (np.all(np.isfinite(map_T_odom[0]))
                                           and np.all(np.isfinite(map_T_odom[1]))):
            map_T_odom = None
        v = None if vel is None else np.array(vel, dtype=float)
        latest = self.graph.latest
        bias = latest.bias if (latest is not None and self.config.use_imu) else None
        b = None if bias is None else np.asarray(bias.vector(), dtype=float)
        return FusedEstimate(stamp=float(stamp), t=t, q=q, cov_ros=cov_ros, t_cam=cam_t,
                             q_cam=cam_q, map_T_odom=map_T_odom, graph_stamp=float(graph_stamp),
                             velocity=v, imu_bias=b)
