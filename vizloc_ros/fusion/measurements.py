"""Message values in: validation of stamps, vectors, quaternions and covariances, and the
typed absolute measurement the rest of the fusion works with.

Why apart: every public entry point of :class:`~vizloc_ros.fusion.window.SlidingWindowFusion`
turns bad input into a counted drop; the checks that name the bad field live here so
that each entry point says the same thing about the same mistake.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import gtsam
import numpy as np

from vizloc_ros.fusion.conventions import pose3, ros_cov_to_gtsam

DUPLICATE_S = 1e-3      # two poses closer than this in time would make a singular edge


@dataclass(eq=False, slots=True)
class Measurement:
    """An absolute measurement already mapped to the base frame (GTSAM types): the pose of
    ``base_link`` in ``map`` and its covariance in GTSAM order (rot, trans; body axes).
    Compared by identity: the gate keeps and removes particular measurements."""

    stamp: float
    pose: gtsam.Pose3
    cov: np.ndarray


def correlation_inflation(dt: float, correlation_time: float) -> float:
    """Factor on the covariance of an absolute pose whose error is correlated with its
    neighbour's, ``dt`` seconds away, as exp(-dt / correlation_time) (a first-order
    Gauss-Markov error): (1 + r) / (1 - r), the inverse share of an independent pose's
    information that each pose of such a sequence carries. Without it, N poses taken
    within one correlation time would be fused as N independent looks at the truth and the
    fused covariance would shrink N times while the error did not. 1 for independent poses
    (``correlation_time`` 0) or neighbours far apart; at most 1e4 (a duplicate stamp)."""
    if correlation_time <= 0.0 or not math.isfinite(dt):
        return 1.0
    r = math.exp(-max(dt, 0.0) / correlation_time)
    return min((1.0 + r) / max(1.0 - r, 1e-12), 1e4)


def finite(a: np.ndarray) -> bool:
    """All entries finite (a NaN or inf anywhere makes the sum non-finite)."""
    return math.isfinite(float(np.sum(a)))


def as_vector(x, n: int, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=float).reshape(-1)
    if a.shape != (n,):
        raise ValueError(f"{name} must have {n} elements, got {a.size}")
    if not finite(a):
        raise ValueError(f"{name} is not finite")
    return a


def as_cov(x, name: str) -> np.ndarray:
    c = np.asarray(x, dtype=float)
    if c.size == 36:
        c = c.reshape(6, 6)
    if c.shape != (6, 6):
        raise ValueError(f"{name} must be 6x6 (or 36 values), got shape {c.shape}")
    if not finite(c):
        raise ValueError(f"{name} is not finite")
    return 0.5 * (c + c.T)


def as_quat(x, name: str) -> np.ndarray:
    q = as_vector(x, 4, name)
    n = float(np.linalg.norm(q))
    if n < 1e-9:
        raise ValueError(f"{name} is a zero quaternion")
    return q / n


def pose_measurement(t, q_wxyz, cov_ros, what: str):
    """Validated (Pose3, covariance in GTSAM tangent order and body axes) of a pose message;
    ValueError naming the problem (``what`` prefixes the field names)."""
    t = as_vector(t, 3, f"{what}translation")
    q = as_quat(q_wxyz, f"{what}quaternion")
    cov = as_cov(cov_ros, f"{what}covariance")
    pose = pose3(t, q)
    cov_g = ros_cov_to_gtsam(cov, rotation=pose.rotation().matrix())
    try:
        np.linalg.cholesky(cov_g)
    except np.linalg.LinAlgError:
        raise ValueError(f"{what}covariance is not positive definite") from None
    return pose, cov_g


def as_stamp(x, name: str = "stamp") -> float:
    s = float(x)
    if not math.isfinite(s):
        raise ValueError(f"{name} is not finite")
    return s
