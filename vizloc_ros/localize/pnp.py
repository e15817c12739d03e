"""Camera pose from 2D-3D correspondences: OpenCV PnP-RANSAC, inlier refinement, and the
covariance of the result, for the scene-coordinate maps (``ace``).

Why OpenCV: ``cv2.solvePnPRansac`` runs its minimal solver (AP3P) and its inlier loop in
C++, a few milliseconds for the 1,200 correspondences of a 320x240 frame; numpy would
spend that on the loop alone. The RANSAC result is re-solved on its inliers with
Levenberg-Marquardt (``cv2.solvePnPRefineLM``) and the inlier set re-selected until it
is stable. The covariance is ``sigma^2 (J^T J)^-1`` of the inlier reprojections
(:func:`pose_covariance`, shared with DSAC++), floored
for the cells' correlation: neighbouring cells see overlapping image patches, so their
errors are not independent, and the textbook formula would be over-confident by the
number of cells that share one error; and grown by the share of cells that disagree
(``(cells / inliers) ** inlier_power``), because a pose that few cells support is wrong
far more often than its inliers' spread says. A frame with fewer than ``min_inliers`` inliers
gets :data:`FAILED_COVARIANCE` (10 m, 90 deg), never a confident wrong pose.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vizloc_ros import geometry

FAILED_SIGMA_T = 10.0
FAILED_SIGMA_R = math.radians(90.0)
#: the covariance (ROS order) of a frame whose coordinates support no pose
FAILED_COVARIANCE = np.diag([FAILED_SIGMA_T ** 2] * 3 + [FAILED_SIGMA_R ** 2] * 3)


def _cv2():
    try:
        import cv2  # on first use: a pose-regressor robot need not load OpenCV
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise RuntimeError("scene-coordinate localization needs OpenCV: pip install opencv-python-headless") from exc
    return cv2


@dataclass(frozen=True)
class PnpSettings:
    """PnP-RANSAC settings (pixels are network-input pixels)."""

    inlier_threshold: float = 6.0
    iterations: int = 200
    min_inliers: int = 30
    refine_iterations: int = 10
    confidence: float = 0.999
    seed: int = 0
    #: how many cells one independent error spans (covariance inflation, see module doc)
    correlated_cells: float = 4.0
    #: the covariance grows as (cells / inliers) ** inlier_power: a frame that few cells
    #: agree on is wrong far more often than its inliers' spread says (measured on the
    #: bench_mapping walks: NEES fell as inliers^-1.6 .. inliers^-2.4)
    inlier_power: float = 2.0


@dataclass
class PnpResult:
    t_map_cam: np.ndarray  # (3,) camera position in map
    q_map_cam: np.ndarray  # (4,) w x y z, w >= 0
    covariance: np.ndarray  # (6, 6) ROS order, position in map + rotation on the left
    inliers: np.ndarray  # (N,) bool
    residuals: np.ndarray  # (N,) pixels


def residuals(R_wc: np.ndarray, t_wc: np.ndarray, X: np.ndarray, p: np.ndarray, K: np.ndarray,
              min_depth: float = 0.05) -> np.ndarray:
    """Reprojection error (N,) of world points X under world-to-camera (R, t); points
    behind the camera (or closer than ``min_depth``) get 1e6."""
    Xc = X @ R_wc.T + t_wc
    z = Xc[:, 2]
    zs = np.where(z > min_depth, z, 1.0)
    u = K[0, 0] * Xc[:, 0] / zs + K[0, 2]
    v = K[1, 1] * Xc[:, 1] / zs + K[1, 2]
    r = np.hypot(u - p[:, 0], v - p[:, 1])
    return np.where(z > min_depth, r, 1e6)


def pose_covariance(X: np.ndarray, K: np.ndarray, R_wc: np.ndarray, t_wc: np.ndarray,
                    inliers: np.ndarray, residuals: np.ndarray, min_sigma_px: float = 0.5,
                    min_inliers: int = 6) -> np.ndarray:
    """6x6 ROS-order covariance of the camera-to-world pose from its inlier reprojections.

    Perturbation as the estimator documents: position in ``map`` and a rotation vector
    on the left (R_true = exp(delta) R). Linearised least squares: sigma^2 (J^T J)^-1 with
    sigma^2 the inliers' residual variance (at least ``min_sigma_px`` squared).
    """
    n = int(inliers.sum())
    if n < min_inliers:
        return FAILED_COVARIANCE.copy()
    Xi = X[inliers]
    c = -R_wc.T @ t_wc
    d = Xi - c
    Xc = d @ R_wc.T
    z = np.maximum(Xc[:, 2], 1e-6)
    fx, fy = K[0, 0], K[1, 1]
    dpi = np.zeros((n, 2, 3))
    dpi[:, 0, 0] = fx / z
    dpi[:, 0, 2] = -fx * Xc[:, 0] / z ** 2
    dpi[:, 1, 1] = fy / z
    dpi[:, 1, 2] = -fy * Xc[:, 1] / z ** 2
    d_trans = np.broadcast_to(-R_wc, (n, 3, 3))
    d_rot = R_wc[None] @ geometry.hat(d)
    J = dpi @ np.concatenate([d_trans, d_rot], axis=2)  # (n, 2, 6)
    J = J.reshape(-1, 6)
    dof = max(2 * n - 6, 1)
    sigma2 = max(float(np.sum(residuals[inliers] ** 2)) / dof, min_sigma_px ** 2)
    H = J.T @ J
    try:
        cov = sigma2 * np.linalg.inv(H)
    except np.linalg.LinAlgError:
        return FAILED_COVARIANCE.copy()
    return 0.5 * (cov + cov.T)


def localize_from_coordinates(X: np.ndarray, pixels: np.ndarray, K: np.ndarray,
                              settings: PnpSettings = PnpSettings()) -> PnpResult | None:
    """Pose of the camera that sees world points ``X`` (N, 3) at ``pixels`` (N, 2).

    None when no pose has ``min_inliers`` inliers (the caller reports the failed
    covariance). Deterministic: OpenCV's RNG is seeded from ``settings.seed``.
    """
    cv2 = _cv2()
    X = np.asarray(X, dtype=np.float64)
    pixels = np.asarray(pixels, dtype=np.float64)
    finite = np.all(np.isfinite(X), axis=1) & (np.abs(X).max(axis=1) < 1e6)
    index = np.flatnonzero(finite)
    if len(index) < max(settings.min_inliers, 6):
        return None
    Xf, pf = np.ascontiguousarray(X[index]), np.ascontiguousarray(pixels[index])
    cv2.setRNGSeed(int(settings.seed))
    try:
        ok, rvec, tvec, inl = cv2.solvePnPRansac(
            Xf, pf, K, None, iterationsCount=int(settings.iterations),
            reprojectionError=float(settings.inlier_threshold), confidence=float(settings.confidence),
            flags=cv2.SOLVEPNP_AP3P)
    except cv2.error:
        return None
    if not ok or inl is None or len(inl) < settings.min_inliers or not np.all(np.isfinite(tvec)):
        return None
    inliers = np.zeros(len(index), dtype=bool)
    inliers[inl.reshape(-1)] = True
    for _ in range(max(int(settings.refine_iterations), 0)):
        try:
            rvec, tvec = cv2.solvePnPRefineLM(Xf[inliers], pf[inliers], K, None, rvec.copy(), tvec.copy())
        except cv2.error:
            break
        if not (np.all(np.isfinite(rvec)) and np.all(np.isfinite(tvec))):
            return None
        R = cv2.Rodrigues(rvec)[0]
        r = residuals(R, tvec.reshape(3), Xf, pf, K)
        new_inliers = r < settings.inlier_threshold
        if new_inliers.sum() < settings.min_inliers:
            return None
        if np.array_equal(new_inliers, inliers):
            break
        inliers = new_inliers
    R_wc = cv2.Rodrigues(rvec)[0]
    t_wc = tvec.reshape(3)
    r = residuals(R_wc, t_wc, Xf, pf, K)
    inliers = r < settings.inlier_threshold
    if inliers.sum() < settings.min_inliers:
        return None
    support = (len(index) / float(inliers.sum())) ** float(settings.inlier_power)
    cov = pose_covariance(Xf, K, R_wc, t_wc, inliers, r) * float(settings.correlated_cells) * support
    R_cw = R_wc.T
    full_inliers = np.zeros(len(X), dtype=bool)
    full_inliers[index[inliers]] = True
    full_r = np.full(len(X), np.inf)
    full_r[index] = r
    return PnpResult(t_map_cam=-R_cw @ t_wc, q_map_cam=geometry.quat_hemisphere(geometry.matrix_to_quat(R_cw)),
                     covariance=cov, inliers=full_inliers, residuals=full_r)


__all__ = ["FAILED_COVARIANCE", "PnpResult", "PnpSettings", "localize_from_coordinates", "pose_covariance",
           "residuals"]
