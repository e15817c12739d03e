"""Plausibility checks of inputs the fusion accepts, for the mistakes that degrade it
silently: an IMU whose acceleration is in g, odometry whose covariance says "unknown".

Why warn rather than drop: both inputs are valid messages and still carry information
(the IMU's gyro, the odometry's motion), but the fusion uses them as if they were right:
an accelerometer 9.81x too small fights the camera poses (rejected poses, repeated
re-initialisations), and a constant covariance has no growth between two messages, so
the odometry is trusted at the covariance floors. Each check returns a notice (its kind
and one line) that the caller counts and logs, throttled per kind.
"""
from __future__ import annotations

import numpy as np

#: IMU samples averaged for one check of the acceleration's magnitude
IMU_BLOCK = 200
#: a mean |acceleration| outside [LOW, HIGH] x |gravity| is not in m/s^2
IMU_LOW, IMU_HIGH = 0.5, 2.0
#: an odometry variance at or above this (m^2, rad^2) is a "do not use" marker, not a noise
ODOM_MARKER_VARIANCE = 1e4


class ImuPlausibility:
    """Mean |acceleration| over blocks of :data:`IMU_BLOCK` samples against |gravity|:
    a robot moves, but its accelerometer averages about 9.81 m/s^2 (gravity) all the same."""

    def __init__(self, gravity):
        self.g = float(np.linalg.norm(gravity))
        self._sum = 0.0
        self._n = 0

    def check(self, accel) -> str | None:
        """One line when the block that this sample completes is implausible, else None."""
        if self.g < 1.0:  # no gravity configured: nothing to compare with
            return None
        self._sum += float(np.linalg.norm(accel))
        self._n += 1
        if self._n < IMU_BLOCK:
            return None
        mean, self._sum, self._n = self._sum / self._n, 0.0, 0
        if IMU_LOW * self.g <= mean <= IMU_HIGH * self.g:
            return None
        hint = " Is it in g? sensor_msgs/Imu wants m/s^2." if mean < IMU_LOW * self.g else ""
        return (f"IMU acceleration averages {mean:.3g} m/s^2 over {IMU_BLOCK} samples, expected about "
                f"{self.g:.3g} (gravity): the fusion will fight the camera poses.{hint}")


class OdomCovariancePlausibility:
    """A constant odometry covariance whose diagonal is negative (-1: "unknown") or huge
    (1e9: "do not use") is fused at the covariance floors (``odom_floor_*``), the most
    confident the fusion allows: the opposite of what it says."""

    def __init__(self):
        self._previous: np.ndarray | None = None

    def check(self, cov) -> str | None:
        cov = np.asarray(cov, float)
        constant = self._previous is not None and np.array_equal(cov, self._previous)
        self._previous = cov.copy()
        diagonal = np.diagonal(cov)
        if not constant or not (np.any(diagonal < 0.0) or np.any(diagonal >= ODOM_MARKER_VARIANCE)):
            return None
        return (f"odometry covariance is constant with diagonal {np.array2string(diagonal, precision=3)} "
                "(a marker for 'unknown', not a noise): the fusion uses its growth between messages, "
                "which is zero, so odom_floor_trans / odom_floor_rot apply; set them to your odometry's "
                "real noise, or publish a covariance that grows")
