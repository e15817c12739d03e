"""Conventions shared by every part of the fusion: quaternion order, covariance orders and
axes, REP-105 ``map -> odom``, and the chi-square gate threshold.

Why one module: ROS and GTSAM order a pose covariance differently ((trans, rot) in the
parent's axes against (rot, trans) in the body's); DESIGN.md allows the swap in one
place only, and this is it.
"""
from __future__ import annotations

import math

import gtsam
import numpy as np

from vizloc_ros.geometry import pose_compose, pose_inverse, quat_to_matrix

# --------------------------------------------------------------------------- helpers


def pose3(t, q_wxyz) -> gtsam.Pose3:
    """(t, q_wxyz) -> gtsam.Pose3; the fusion's quaternions are (w, x, y, z)."""
    return gtsam.Pose3(gtsam.Rot3.Quaternion(float(q_wxyz[0]), float(q_wxyz[1]),
                                             float(q_wxyz[2]), float(q_wxyz[3])),
                       np.asarray(t, dtype=float))


def pose_tq(pose: gtsam.Pose3):
    """gtsam.Pose3 -> (t, q_wxyz) with w >= 0."""
    x, y, z, w = pose.rotation().toQuaternion().coeffs()
    q = np.array([w, x, y, z])
    if w < 0.0:
        q = -q
    return np.array(pose.translation(), dtype=float), q / np.linalg.norm(q)


def transport(cov: np.ndarray, delta: gtsam.Pose3) -> np.ndarray:
    """Covariance of X * delta (GTSAM right perturbation) given the covariance of X."""
    A = delta.inverse().AdjointMap()
    return A @ cov @ A.T


_SWAP = np.ix_([3, 4, 5, 0, 1, 2], [3, 4, 5, 0, 1, 2])


def _swap_rot_trans(m: np.ndarray) -> np.ndarray:
    """Swap the two 3-blocks of a 6x6 matrix: (rot, trans) <-> (trans, rot).

    The permutation is its own inverse, so this one function serves both directions.
    """
    return m[_SWAP]


def _rotation_matrix(q_wxyz, rotation):
    if rotation is not None:
        return np.asarray(rotation, dtype=float)
    if q_wxyz is not None:
        return quat_to_matrix(q_wxyz)
    return None


def _rotate_blocks(m: np.ndarray, R: np.ndarray) -> np.ndarray:
    """blockdiag(R, R) @ m @ blockdiag(R, R)^T without building the 6x6 block matrix."""
    B = np.zeros((6, 6))
    B[:3, :3] = R
    B[3:, 3:] = R
    return B @ m @ B.T


def gtsam_cov_to_ros(cov, q_wxyz=None, *, rotation=None) -> np.ndarray:
    """GTSAM Pose3 covariance (rot, trans; body axes) -> ROS order (x, y, z, rx, ry, rz).

    Without a rotation this is the pure permutation. With the pose's rotation (quaternion
    ``q_wxyz`` or 3x3 ``rotation``) both blocks are also turned from the body axes (GTSAM's
    right perturbation ``T * Exp(xi)``) into the parent frame's axes, which is how ROS users
    read a PoseWithCovariance (rviz ellipses, robot_localization, AMCL).
    """
    out = _swap_rot_trans(np.asarray(cov, dtype=float))
    R = _rotation_matrix(q_wxyz, rotation)
    if R is not None:
        out = _rotate_blocks(out, R)
    return 0.5 * (out + out.T)


def ros_cov_to_gtsam(cov, q_wxyz=None, *, rotation=None) -> np.ndarray:
    """Inverse of :func:`gtsam_cov_to_ros`: ROS order (parent axes) -> GTSAM (rot, trans)."""
    c = np.asarray(cov, dtype=float)
    R = _rotation_matrix(q_wxyz, rotation)
    if R is not None:
        c = _rotate_blocks(c, R.T)
    out = _swap_rot_trans(c)
    return 0.5 * (out + out.T)


def map_to_odom(map_T_base, odom_T_base):
    """REP-105 ``map -> odom`` transform: ``map_T_base * inverse(odom_T_base)``.

    Both arguments and the result are ``(t, q_wxyz)`` pairs. Publishing this instead of
    ``map -> base_link`` keeps the odometry chain ``odom -> base_link`` continuous.
    """
    t_inv, q_inv = pose_inverse(*odom_T_base)
    return pose_compose(map_T_base[0], map_T_base[1], t_inv, q_inv)


def _chi2_cdf(x: float, dof: int) -> float:
    """Regularised lower incomplete gamma P(dof/2, x/2) by its power series."""
    if x <= 0.0:
        return 0.0
    a = 0.5 * dof
    h = 0.5 * x
    term = 1.0 / a
    total = term
    n = 1
    while term > total * 1e-16 and n < 10000:
        term *= h / (a + n)
        total += term
        n += 1
    return min(1.0, math.exp(a * math.log(h) - h - math.lgamma(a)) * total)


_CHI2_CACHE: dict = {}


def chi2_quantile(p: float, dof: int) -> float:
    """Chi-square quantile by bisection (no scipy needed at run time); memoised."""
    key = (float(p), int(dof))
    if key not in _CHI2_CACHE:
        _CHI2_CACHE[key] = _chi2_quantile(*key)
    return _CHI2_CACHE[key]


def _chi2_quantile(p: float, dof: int) -> float:
    lo, hi = 0.0, max(10.0, 10.0 * dof)
    while _chi2_cdf(hi, dof) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _chi2_cdf(mid, dof) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
