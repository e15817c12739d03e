"""Odometry and IMU sample buffers: storage, trimming, interpolation of odometry at a
stamp and the IMU samples that cover an interval.

Why buffers at all: the graph grows at the camera rate, so odometry and IMU messages are
kept here until the absolute measurements they bridge have arrived (which can be late),
and :mod:`vizloc_ros.fusion.motion` turns them into relative motion on demand.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import gtsam
import numpy as np


@dataclass(eq=False)
class SensorBuffers:
    """Time-ordered odometry (``odom_T_base`` pose, ROS covariance) and IMU (gyro, accel
    in the IMU frame) samples, and the newest stamp of any message seen."""

    odom_t: list[float] = field(default_factory=list)
    odom_pose: list[gtsam.Pose3] = field(default_factory=list)
    odom_cov: list[np.ndarray] = field(default_factory=list)
    imu_t: list[float] = field(default_factory=list)
    imu_gyro: list[np.ndarray] = field(default_factory=list)
    imu_acc: list[np.ndarray] = field(default_factory=list)
    newest: float = -math.inf
    odom_at_memo: dict = field(default_factory=dict)   # stamp -> interpolated sample (immutable once found)

    def clear(self) -> None:
        """Forget every sample (a reset, or the clock jumped back)."""
        for samples in (self.odom_t, self.odom_pose, self.odom_cov,
                        self.imu_t, self.imu_gyro, self.imu_acc):
            samples.clear()
        self.newest = -math.inf
        self.odom_at_memo.clear()

    def add_odometry(self, s: float, pose: gtsam.Pose3, cov: np.ndarray) -> None:
        self.odom_t.append(s)
        self.odom_pose.append(pose)
        self.odom_cov.append(cov)
        self.newest = max(self.newest, s)

    def add_imu(self, s: float, gyro: np.ndarray, accel: np.ndarray) -> None:
        self.imu_t.append(s)
        self.imu_gyro.append(gyro)
        self.imu_acc.append(accel)
        self.newest = max(self.newest, s)

    def trim(self, buffer_seconds: float) -> None:
        """Drop samples older than ``buffer_seconds`` before the newest stamp, in blocks
        (deleting list heads one by one would cost more than keeping them)."""
        horizon = self.newest - buffer_seconds
        for stamps, *lists in ((self.odom_t, self.odom_pose, self.odom_cov),
                               (self.imu_t, self.imu_gyro, self.imu_acc)):
            if len(stamps) > 256 and stamps[128] < horizon:
                n = bisect.bisect_left(stamps, horizon) - 1
                if n > 0:
                    del stamps[:n]
                    for lst in lists:
                        del lst[:n]

    def odom_at(self, s: float, max_gap: float):
        """Odometry pose and covariance at ``s``, interpolated between the two bracketing
        messages; None if ``s`` is outside the buffer or in a gap > ``max_gap``."""
        got = self.odom_at_memo.get(s)
        if got is not None:
            return got
        ts = self.odom_t
        if not ts or s < ts[0] or s > ts[-1]:
            return None
        i = bisect.bisect_left(ts, s)
        if ts[i] == s:
            got = (self.odom_pose[i], self.odom_cov[i])
        else:
            t0, t1 = ts[i - 1], ts[i]
            if t1 - t0 > max_gap:
                return None
            a = (s - t0) / (t1 - t0)
            p0, p1 = self.odom_pose[i - 1], self.odom_pose[i]
            got = (p0.slerp(a, p1),
                   self.odom_cov[i - 1] + a * (self.odom_cov[i] - self.odom_cov[i - 1]))
        if len(self.odom_at_memo) > 64:
            self.odom_at_memo.clear()
        self.odom_at_memo[s] = got
        return got

    def imu_holds(self, sa: float, sb: float, max_gap: float):
        """(sample index, seconds) of each IMU sample's hold within [sa, sb], in time order,
        empty holds left out; None unless the samples cover [sa, sb] without a gap longer
        than ``max_gap``. Integrating these is integrating the zero-order-held signal.

        The newest sample is held up to ``sb`` when ``sb`` is less than ``max_gap`` after it:
        the sample after it can only end that hold later than ``sb``, so the holds are the
        same as they will be once it has come. Without this an edge to a camera stamp
        between two IMU samples (nearly every one) was built without the IMU and rebuilt
        with it one sample later: twice the work, and the gate judged the measurement
        against the weaker prediction."""
        ts = self.imu_t
        if not ts or ts[0] > sa or sb <= sa or sb - ts[-1] > max_gap:
            return None
        i0 = bisect.bisect_right(ts, sa) - 1
        i1 = bisect.bisect_left(ts, sb)
        last = len(ts) - 1
        for k in range(i0, min(i1, last)):
            if ts[k + 1] - ts[k] > max_gap:
                return None
        holds = []
        t = sa
        for k in range(i0, i1):
            end = min(ts[k + 1], sb) if k < last else sb
            dt = end - t
            if dt > 0.0:
                holds.append((k, dt))
            t = end
        return holds
