"""Pose geometry shared by every part of vizloc_ros.

One module so that every conversion exists exactly once. Conventions (DESIGN.md):

* quaternions here are (w, x, y, z) like transforms3d and the model outputs; ROS
  messages carry (x, y, z, w) and :func:`ros_to_wxyz` / :func:`wxyz_to_ros` are the
  only places where the order changes;
* a pose is a pair ``(t, q)``: translation (..., 3) and unit quaternion (..., 4); a
  camera pose is camera-to-world unless a name says otherwise;
* SE(3) tangent vectors are ordered (translation, rotation) = (rho, omega), the same
  order as ROS covariances; GTSAM's (rot, trans) order is handled in ``fusion/conventions.py``.

Every numpy function works on a single element or on a batch (leading dimensions).
The ``torch_*`` twins take batched tensors, are differentiable everywhere including at
the identity and at 180 degrees (no NaN gradients), and agree with the numpy versions.
"""
from __future__ import annotations

import numpy as np



class _TorchOnFirstUse:
    """Stands for the ``torch`` module until a ``torch_*`` function first runs.

    Everything imports this module (messages, the fusion, the nodes), but only the
    network code needs torch: importing it here eagerly cost the fusion node and the
    replay's fusion side about 1.6 s and a few hundred MB for nothing.
    """

    def __getattr__(self, name):
        import torch as module

        globals()["torch"] = module
        return getattr(module, name)


torch = _TorchOnFirstUse()

_EPS = 1e-12
_SMALL_ANGLE = 1e-4


# --------------------------------------------------------------------------- numpy

def ros_to_wxyz(q_xyzw) -> np.ndarray:
    """ROS message order (x, y, z, w) -> (w, x, y, z)."""
    q = np.asarray(q_xyzw, dtype=float)
    return np.concatenate([q[..., 3:4], q[..., 0:3]], axis=-1)


def wxyz_to_ros(q_wxyz) -> np.ndarray:
    """(w, x, y, z) -> ROS message order (x, y, z, w)."""
    q = np.asarray(q_wxyz, dtype=float)
    return np.concatenate([q[..., 1:4], q[..., 0:1]], axis=-1)


def quat_normalize(q) -> np.ndarray:
    """Unit quaternion; raises ``ValueError`` on a zero or non-finite quaternion."""
    q = np.asarray(q, dtype=float)
    norm = np.linalg.norm(q, axis=-1, keepdims=True)
    if not np.all(np.isfinite(q)) or np.any(norm < _EPS):
        raise ValueError("quaternion is zero or not finite and cannot be normalised")
    return q / norm


def quat_hemisphere(q) -> np.ndarray:
    """Sign-flip so that w >= 0 (q and -q are the same rotation)."""
    q = np.asarray(q, dtype=float)
    sign = np.where(q[..., 0:1] < 0.0, -1.0, 1.0)
    return q * sign


def quat_conjugate(q) -> np.ndarray:
    """Conjugate (the inverse of a unit quaternion)."""
    q = np.asarray(q, dtype=float)
    return q * np.array([1.0, -1.0, -1.0, -1.0])


def quat_multiply(a, b) -> np.ndarray:
    """Hamilton product a * b (rotation b first, then a)."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    aw, ax, ay, az = np.moveaxis(a, -1, 0)
    bw, bx, by, bz = np.moveaxis(b, -1, 0)
    return np.stack([
        aw * bw - ax * bx - ay * by - az * bz,
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
    ], axis=-1)


def quat_rotate(q, v) -> np.ndarray:
    """Rotate vectors v (..., 3) by unit quaternions q (..., 4)."""
    return np.einsum("...ij,...j->...i", quat_to_matrix(q), np.asarray(v, dtype=float))


def quat_to_matrix(q) -> np.ndarray:
    """Unit quaternion (w, x, y, z) -> rotation matrix (..., 3, 3)."""
    q = quat_normalize(q)
    w, x, y, z = np.moveaxis(q, -1, 0)
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ]
    return np.stack([np.stack(r, axis=-1) for r in rows], axis=-2)


def matrix_to_quat(R) -> np.ndarray:
    """Rotation matrix -> unit quaternion with w >= 0 (Shepperd's method, batched)."""
    R = np.asarray(R, dtype=float)
    m00, m11, m22 = R[..., 0, 0], R[..., 1, 1], R[..., 2, 2]
    trace = m00 + m11 + m22
    # Four candidate solutions; each is accurate when its pivot is the largest.
    cands = np.stack([
        np.stack([1 + trace, R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0],
                  R[..., 1, 0] - R[..., 0, 1]], -1),
        np.stack([R[..., 2, 1] - R[..., 1, 2], 1 + m00 - m11 - m22,
                  R[..., 0, 1] + R[..., 1, 0], R[..., 0, 2] + R[..., 2, 0]], -1),
        np.stack([R[..., 0, 2] - R[..., 2, 0], R[..., 0, 1] + R[..., 1, 0],
                  1 - m00 + m11 - m22, R[..., 1, 2] + R[..., 2, 1]], -1),
        np.stack([R[..., 1, 0] - R[..., 0, 1], R[..., 0, 2] + R[..., 2, 0],
                  R[..., 1, 2] + R[..., 2, 1], 1 - m00 - m11 + m22], -1),
    ], axis=-2)
    pivots = np.stack([1 + trace, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22,
                       1 - m00 - m11 + m22], -1)
    best = np.argmax(pivots, axis=-1)
    q = np.take_along_axis(cands, best[..., None, None], axis=-2)[..., 0, :]
    return quat_hemisphere(quat_normalize(q))


def quat_log(q) -> np.ndarray:
    """Log-quaternion u = v/|v| * angle/2 of a unit quaternion taken with w >= 0 (MapNet)."""
    q = quat_hemisphere(quat_normalize(q))
    w = q[..., 0:1]
    v = q[..., 1:]
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    safe_n = np.where(n < _SMALL_ANGLE, 1.0, n)
    safe_w = np.where(np.abs(w) < _EPS, 1.0, w)  # both branches are evaluated: no 1/0 at 180 deg
    factor = np.where(n < _SMALL_ANGLE, (1.0 - n * n / (3.0 * safe_w * safe_w)) / safe_w,
                      np.arctan2(n, w) / safe_n)
    return v * factor


def quat_exp(u) -> np.ndarray:
    """Inverse of :func:`quat_log`: 3-vector -> unit quaternion."""
    u = np.asarray(u, dtype=float)
    theta = np.linalg.norm(u, axis=-1, keepdims=True)
    return np.concatenate([np.cos(theta), _sinc(theta) * u], axis=-1)


def so3_exp(omega) -> np.ndarray:
    """Rotation vector (axis * angle) -> rotation matrix."""
    return quat_to_matrix(quat_exp(0.5 * np.asarray(omega, dtype=float)))


def so3_log(R) -> np.ndarray:
    """Rotation matrix -> rotation vector with angle in [0, pi]."""
    return 2.0 * quat_log(matrix_to_quat(R))


def rotation_angle(q_a, q_b) -> np.ndarray:
    """Angle (radians, in [0, pi]) of the rotation between two unit quaternions."""
    d = np.abs(np.sum(quat_normalize(q_a) * quat_normalize(q_b), axis=-1))
    return 2.0 * np.arccos(np.clip(d, 0.0, 1.0))


def hat(v) -> np.ndarray:
    """Skew-symmetric matrix [v]x with hat(a) @ b == cross(a, b)."""
    v = np.asarray(v, dtype=float)
    z = np.zeros_like(v[..., 0])
    x, y, w = v[..., 0], v[..., 1], v[..., 2]
    return np.stack([np.stack([z, -w, y], -1), np.stack([w, z, -x], -1),
                     np.stack([-y, x, z], -1)], -2)


def _sinc(x):
    """sin(x)/x, accurate near 0."""
    safe = np.where(np.abs(x) < _SMALL_ANGLE, 1.0, x)
    return np.where(np.abs(x) < _SMALL_ANGLE, 1.0 - x * x / 6.0, np.sin(safe) / safe)


def _se3_coeffs(theta):
    """(1-cos t)/t^2 and (t-sin t)/t^3 with Taylor series near 0."""
    small = theta < 1e-3
    safe = np.where(small, 1.0, theta)
    b = np.where(small, 0.5 - theta ** 2 / 24.0, (1.0 - np.cos(safe)) / safe ** 2)
    c = np.where(small, 1.0 / 6.0 - theta ** 2 / 120.0, (safe - np.sin(safe)) / safe ** 3)
    return b, c


def se3_exp(xi) -> np.ndarray:
    """Tangent vector (rho, omega) -> 4x4 homogeneous transform."""
    xi = np.asarray(xi, dtype=float)
    rho, omega = xi[..., :3], xi[..., 3:]
    theta = np.linalg.norm(omega, axis=-1)[..., None, None]
    W = hat(omega)
    b, c = _se3_coeffs(theta)
    V = np.eye(3) + b * W + c * (W @ W)
    T = np.zeros(xi.shape[:-1] + (4, 4))
    T[..., :3, :3] = so3_exp(omega)
    T[..., :3, 3] = np.einsum("...ij,...j->...i", V, rho)
    T[..., 3, 3] = 1.0
    return T


def se3_log(T) -> np.ndarray:
    """4x4 homogeneous transform -> tangent vector (rho, omega)."""
    T = np.asarray(T, dtype=float)
    omega = so3_log(T[..., :3, :3])
    theta = np.linalg.norm(omega, axis=-1)[..., None, None]
    W = hat(omega)
    small = theta < 1e-3
    safe = np.where(small, 1.0, theta)
    d = np.where(small, 1.0 / 12.0 + theta ** 2 / 720.0,
                 (1.0 - safe * np.sin(safe) / (2.0 * (1.0 - np.cos(safe)))) / safe ** 2)
    V_inv = np.eye(3) - 0.5 * W + d * (W @ W)
    rho = np.einsum("...ij,...j->...i", V_inv, T[..., :3, 3])
    return np.concatenate([rho, omega], axis=-1)


def pose_to_matrix(t, q) -> np.ndarray:
    """(t, q) -> 4x4 homogeneous transform."""
    t = np.asarray(t, dtype=float)
    R = quat_to_matrix(q)
    T = np.zeros(R.shape[:-2] + (4, 4))
    T[..., :3, :3] = R
    T[..., :3, 3] = t
    T[..., 3, 3] = 1.0
    return T


def matrix_to_pose(T):
    """4x4 homogeneous transform -> (t, q) with w >= 0."""
    T = np.asarray(T, dtype=float)
    return T[..., :3, 3].copy(), matrix_to_quat(T[..., :3, :3])


def pose_compose(t_a, q_a, t_b, q_b):
    """a * b: the pose b expressed through a (frames chain left to right)."""
    t = np.asarray(t_a, dtype=float) + quat_rotate(q_a, t_b)
    return t, quat_hemisphere(quat_normalize(quat_multiply(q_a, q_b)))


def pose_inverse(t, q):
    """Inverse pose: (-R^T t, q*)."""
    q_inv = quat_conjugate(quat_normalize(q))
    return -quat_rotate(q_inv, t), quat_hemisphere(q_inv)


def pose_relative(t_a, q_a, t_b, q_b):
    """Relative pose a^-1 * b: pose of b in the frame of a."""
    t_ai, q_ai = pose_inverse(t_a, q_a)
    return pose_compose(t_ai, q_ai, t_b, q_b)


# --------------------------------------------------------------------------- torch
# Batched, differentiable twins. Norms go through _torch_safe_norm so that gradients stay
# finite at zero vectors (identity rotations), which is where training starts and ends.

def _torch_safe_norm(v, dim=-1, keepdim=True):
    sq = (v * v).sum(dim=dim, keepdim=keepdim)
    tiny = sq < _EPS * _EPS
    return torch.where(tiny, torch.zeros_like(sq), torch.sqrt(torch.where(tiny, torch.ones_like(sq), sq)))


def torch_ros_to_wxyz(q):
    return torch.cat([q[..., 3:4], q[..., 0:3]], dim=-1)


def torch_wxyz_to_ros(q):
    return torch.cat([q[..., 1:4], q[..., 0:1]], dim=-1)


def torch_quat_normalize(q, eps: float = 1e-12):
    """Unit quaternion; a zero input stays finite (divides by eps) instead of NaN."""
    return q / _torch_safe_norm(q).clamp_min(eps)


def torch_quat_hemisphere(q):
    sign = torch.where(q[..., 0:1] < 0, -torch.ones_like(q[..., 0:1]), torch.ones_like(q[..., 0:1]))
    return q * sign


def torch_quat_conjugate(q):
    return q * q.new_tensor([1.0, -1.0, -1.0, -1.0])


def torch_quat_multiply(a, b):
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([
        aw * bw - ax * bx - ay * by - az * bz,
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
    ], dim=-1)


def torch_quat_to_matrix(q):
    w, x, y, z = torch_quat_normalize(q).unbind(-1)
    return torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], dim=-2)


def torch_matrix_to_quat(R):
    m00, m11, m22 = R[..., 0, 0], R[..., 1, 1], R[..., 2, 2]
    trace = m00 + m11 + m22
    cands = torch.stack([
        torch.stack([1 + trace, R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0],
                     R[..., 1, 0] - R[..., 0, 1]], -1),
        torch.stack([R[..., 2, 1] - R[..., 1, 2], 1 + m00 - m11 - m22,
                     R[..., 0, 1] + R[..., 1, 0], R[..., 0, 2] + R[..., 2, 0]], -1),
        torch.stack([R[..., 0, 2] - R[..., 2, 0], R[..., 0, 1] + R[..., 1, 0],
                     1 - m00 + m11 - m22, R[..., 1, 2] + R[..., 2, 1]], -1),
        torch.stack([R[..., 1, 0] - R[..., 0, 1], R[..., 0, 2] + R[..., 2, 0],
                     R[..., 1, 2] + R[..., 2, 1], 1 - m00 - m11 + m22], -1),
    ], dim=-2)
    pivots = torch.stack([1 + trace, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22,
                          1 - m00 - m11 + m22], -1)
    best = pivots.argmax(dim=-1)
    idx = best[..., None, None].expand(*best.shape, 1, 4)
    q = torch.gather(cands, -2, idx)[..., 0, :]
    return torch_quat_hemisphere(torch_quat_normalize(q))


def torch_quat_log(q):
    """Log-quaternion of q taken with w >= 0 (MapNet's rotation parametrisation)."""
    q = torch_quat_hemisphere(torch_quat_normalize(q))
    w = q[..., 0:1]
    v = q[..., 1:]
    n = _torch_safe_norm(v)
    small = n < _SMALL_ANGLE
    safe_n = torch.where(small, torch.ones_like(n), n)
    safe_w = torch.where(w.abs() < _EPS, torch.ones_like(w), w)
    factor = torch.where(small, (1.0 - n * n / (3.0 * safe_w * safe_w)) / safe_w,
                         torch.atan2(n, w) / safe_n)
    return v * factor


def _torch_sinc(x):
    small = x.abs() < _SMALL_ANGLE
    safe = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, 1.0 - x * x / 6.0, torch.sin(safe) / safe)


def torch_quat_exp(u):
    theta = _torch_safe_norm(u)
    return torch.cat([torch.cos(theta), _torch_sinc(theta) * u], dim=-1)


def torch_so3_exp(omega):
    return torch_quat_to_matrix(torch_quat_exp(0.5 * omega))


def torch_so3_log(R):
    return 2.0 * torch_quat_log(torch_matrix_to_quat(R))


def torch_hat(v):
    """Batched, differentiable twin of :func:`hat`."""
    z = torch.zeros_like(v[..., 0])
    x, y, w = v.unbind(-1)
    return torch.stack([torch.stack([z, -w, y], -1), torch.stack([w, z, -x], -1),
                        torch.stack([-y, x, z], -1)], -2)


def torch_se3_exp(xi):
    rho, omega = xi[..., :3], xi[..., 3:]
    theta = _torch_safe_norm(omega)[..., None]
    small = theta < 1e-3
    safe = torch.where(small, torch.ones_like(theta), theta)
    b = torch.where(small, 0.5 - theta ** 2 / 24.0, (1.0 - torch.cos(safe)) / safe ** 2)
    c = torch.where(small, 1.0 / 6.0 - theta ** 2 / 120.0, (safe - torch.sin(safe)) / safe ** 3)
    W = torch_hat(omega)
    eye = torch.eye(3, dtype=xi.dtype, device=xi.device)
    V = eye + b * W + c * (W @ W)
    t = (V @ rho[..., None])[..., 0]
    top = torch.cat([torch_so3_exp(omega), t[..., None]], dim=-1)
    bottom = torch.zeros_like(top[..., :1, :])
    bottom[..., 0, 3] = 1.0
    return torch.cat([top, bottom], dim=-2)


def torch_se3_log(T):
    omega = torch_so3_log(T[..., :3, :3])
    theta = _torch_safe_norm(omega)[..., None]
    small = theta < 1e-3
    safe = torch.where(small, torch.ones_like(theta), theta)
    d = torch.where(small, 1.0 / 12.0 + theta ** 2 / 720.0,
                    (1.0 - safe * torch.sin(safe) / (2.0 * (1.0 - torch.cos(safe)))) / safe ** 2)
    W = torch_hat(omega)
    eye = torch.eye(3, dtype=T.dtype, device=T.device)
    V_inv = eye - 0.5 * W + d * (W @ W)
    rho = (V_inv @ T[..., :3, 3:4])[..., 0]
    return torch.cat([rho, omega], dim=-1)


def torch_quat_rotate(q, v):
    return (torch_quat_to_matrix(q) @ v[..., None])[..., 0]


def torch_pose_compose(t_a, q_a, t_b, q_b):
    return t_a + torch_quat_rotate(q_a, t_b), torch_quat_normalize(torch_quat_multiply(q_a, q_b))


def torch_pose_inverse(t, q):
    q_inv = torch_quat_conjugate(torch_quat_normalize(q))
    return -torch_quat_rotate(q_inv, t), q_inv


def torch_pose_relative(t_a, q_a, t_b, q_b):
    t_ai, q_ai = torch_pose_inverse(t_a, q_a)
    return torch_pose_compose(t_ai, q_ai, t_b, q_b)


def torch_rotation_angle(q_a, q_b):
    """Geodesic angle ||log(R_a^T R_b)|| in radians; finite gradient at 0 and at pi."""
    q_rel = torch_quat_multiply(torch_quat_conjugate(torch_quat_normalize(q_a)),
                                torch_quat_normalize(q_b))
    return 2.0 * torch.atan2(_torch_safe_norm(q_rel[..., 1:], keepdim=False), q_rel[..., 0].abs())
