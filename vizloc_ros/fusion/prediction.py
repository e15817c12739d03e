"""Prediction of the robot pose at any stamp from the graph: the key before it moved by the
relative motion, the key after it moved back, or, with velocity states, the navigation
state propagated by the (real or virtual) preintegration.

Why apart: the gate compares every absolute measurement with this prediction before the
graph sees it, the graph takes it as the new key's initial value, and the output uses the
same propagation to carry the newest pose forward to the newest IMU stamp.
"""
from __future__ import annotations

import bisect

import gtsam
import numpy as np

from vizloc_ros.fusion.conventions import ros_cov_to_gtsam, transport
from vizloc_ros.fusion.graph import V, GraphKey, WindowGraph
from vizloc_ros.fusion.motion import MotionModel


class Predictor:
    """Pose and covariance (GTSAM order, body axes) at a stamp, from the window's keys."""

    def __init__(self, graph: WindowGraph, motion: MotionModel):
        self.graph = graph
        self.motion = motion

    def predict(self, s: float):
        """Pose and covariance (GTSAM order, body axes) at stamp ``s`` from the graph, with
        the network's common bias (``abs_bias_share``) that the graph cannot see."""
        pose, cov = self._predict(s)
        bias = self.graph.bias_cov_ros
        if bias is not None:
            cov = cov + ros_cov_to_gtsam(bias, rotation=pose.rotation().matrix())
        return pose, cov

    def _predict(self, s: float):
        graph = self.graph
        pos = bisect.bisect_right(graph.key_stamps, s)
        if pos > 0:
            ref = graph.keys[pos - 1]
            pose, cov = graph.key_state(ref)
            if self.motion.nav and not self.motion.odom_covers(ref, s):
                return self.nav_predict(ref, pose, cov, s)
            delta, q = self.motion.relative(ref.stamp, s, ref)
            return pose.compose(delta), transport(cov, delta) + q
        ref = graph.keys[0]
        pose, cov = graph.key_state(ref)
        delta, q = self.motion.relative(s, ref.stamp, None, ref)
        inv = delta.inverse()
        A = delta.AdjointMap()
        return pose.compose(inv), A @ (cov + q) @ A.T

    def nav_predict(self, key: GraphKey, pose, cov, s, require_imu: bool = False):
        """Prediction with the velocity state and the (real or virtual) preintegration;
        None if ``require_imu`` and no real IMU covers the interval."""
        graph = self.graph
        pim, real = self.motion.pim(key.stamp, s, graph.bias_of(key))
        if require_imu and not real:
            return None
        vel = graph.velocity_of(key)
        state = pim.predict(gtsam.NavState(pose, vel), graph.bias_of(key))
        pred = state.pose()
        delta = pose.between(pred)
        R = delta.rotation().matrix()
        Q = np.asarray(pim.preintMeasCov(), dtype=float)[:6, :6]
        B = np.zeros((6, 6))
        B[:3, :3] = R.T
        B[3:, 3:] = R.T
        q = B @ Q @ B.T
        dt = s - key.stamp
        try:
            cov_v = graph.smoother.marginal(V(key.idx))
        except Exception:  # noqa: BLE001
            cov_v = np.eye(3) * self.motion.config.init_velocity_sigma ** 2
        Rb = pred.rotation().matrix()
        q[3:, 3:] += Rb.T @ cov_v @ Rb * dt * dt
        return pred, transport(cov, delta) + q
