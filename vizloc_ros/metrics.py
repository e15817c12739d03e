"""Evaluation metrics of DESIGN.md, in one place for training, ``vizloc-eval`` and replay.

* per-frame translation error (m) and rotation error (deg), the latter
  acos((trace(R_gt^T R) - 1) / 2);
* medians and the share of frames within (5 cm, 5 deg), (25 cm, 2 deg), (50 cm, 5 deg)
  and (5 m, 10 deg);
* ATE and RPE through evo (with and without SE(3) alignment), so figures match what
  users get from the ``evo_ape`` / ``evo_rpe`` command lines on the same TUM files;
* per-step errors: the error of each frame-to-frame motion, what an odometry drifts by
  per step (compares a network's relative head with the robot's odometry);
* planar errors (x, y and heading): what a ground robot's localizer is judged by (the
  allocentric model outputs only these, with the camera height and tilt of its mount);
* covariance honesty: NEES = e^T C^-1 e of each pose against its published 6x6
  covariance, its mean per degree of freedom (near 1 when honest) and the share of frames
  inside the 95 % bound;
* how a localizer's errors behave over a walk: how long they stay alike (correlation
  time) and which share of them is common to the whole walk (bias share), the two figures
  the fusion needs besides the covariance.
"""
from __future__ import annotations

import numpy as np

from vizloc_ros import geometry

#: (metres, degrees) thresholds of DESIGN.md
THRESHOLDS = ((0.05, 5.0), (0.25, 2.0), (0.50, 5.0), (5.0, 10.0))
#: degrees of freedom of a pose error (x, y, z, rot_x, rot_y, rot_z)
POSE_DOF = 6
#: 95 % quantile of chi-square with 6 dof (DESIGN.md's 12.59): a frame whose NEES is at or
#: below it lies inside the 95 % bound of its covariance
NEES_BOUND_95 = 12.591587243743977
#: a covariance whose smallest eigenvalue is below this share of its largest is singular
#: for NEES: its inverse would be dominated by rounding
_SINGULAR_RATIO = 1e-12


#: below this many scored frames, or this share of the frames that could have been scored,
#: the printed tables warn: medians and threshold shares of a handful of frames say little
FEW_SCORED_FRAMES = 10
FEW_SCORED_SHARE = 0.5


def scored_frames_warning(scored: int, total: int, why: str = "") -> str:
    """A one-line warning when few of ``total`` frames could be scored, else "".

    Why in the tables: a ground truth of one message scores 1 frame of 30, and a table of
    medians that does not say so reads as a result; ``why`` says what limited it (e.g.
    "the ground truth covers too little of the bag").
    """
    if total <= 0 or (scored >= FEW_SCORED_FRAMES and scored >= FEW_SCORED_SHARE * total):
        return ""
    reason = f" ({why})" if why else ""
    return (f"WARNING: only {scored} of {total} frames could be scored{reason}: the figures "
            f"above describe {scored} frame{'s' if scored != 1 else ''}")


def threshold_key(metres: float, degrees: float) -> str:
    return f"within_{int(round(metres * 100))}cm_{degrees:g}deg"


def pose_errors(t_est, q_est, t_gt, q_gt) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame translation error (m) and rotation error (deg)."""
    t_err = np.linalg.norm(np.asarray(t_est, float) - np.asarray(t_gt, float), axis=-1)
    R_est = geometry.quat_to_matrix(q_est)
    R_gt = geometry.quat_to_matrix(q_gt)
    trace = np.einsum("...ji,...ji->...", R_gt, R_est)  # trace(R_gt^T R_est)
    r_err = np.degrees(np.arccos(np.clip((trace - 1.0) / 2.0, -1.0, 1.0)))
    return t_err, r_err


def summarize_errors(t_err, r_err) -> dict:
    """Median / mean errors and threshold shares, as plain floats (JSON-ready)."""
    t_err = np.asarray(t_err, dtype=float)
    r_err = np.asarray(r_err, dtype=float)
    if t_err.size == 0:
        return {"frames": 0}
    out = {
        "frames": int(t_err.size),
        "median_translation_m": float(np.median(t_err)),
        "median_rotation_deg": float(np.median(r_err)),
        "mean_translation_m": float(np.mean(t_err)),
        "mean_rotation_deg": float(np.mean(r_err)),
    }
    for metres, degrees in THRESHOLDS:
        out[threshold_key(metres, degrees)] = float(np.mean((t_err <= metres) & (r_err <= degrees)))
    return out


def evaluate_poses(t_est, q_est, t_gt, q_gt) -> dict:
    return summarize_errors(*pose_errors(t_est, q_est, t_gt, q_gt))


def planar_errors(t_est, q_est, t_gt, q_gt) -> dict:
    """Errors in the ground plane of camera poses (orientation of the optical frame, z
    forward, in a z-up world): the median x-y distance (m), the median heading error
    (deg; the heading of the optical axis projected onto the plane) and the share of
    frames within 25 cm and 5 deg of both."""
    t_est, t_gt = np.asarray(t_est, float).reshape(-1, 3), np.asarray(t_gt, float).reshape(-1, 3)
    if len(t_est) == 0:
        return {}
    forward_est = geometry.quat_to_matrix(np.asarray(q_est, float).reshape(-1, 4))[:, :, 2]
    forward_gt = geometry.quat_to_matrix(np.asarray(q_gt, float).reshape(-1, 4))[:, :, 2]
    heading = np.arctan2(forward_est[:, 1], forward_est[:, 0]) - np.arctan2(forward_gt[:, 1], forward_gt[:, 0])
    h_err = np.degrees(np.abs(np.arctan2(np.sin(heading), np.cos(heading))))
    xy_err = np.linalg.norm(t_est[:, :2] - t_gt[:, :2], axis=1)
    return {"median_planar_translation_m": float(np.median(xy_err)), "median_heading_deg": float(np.median(h_err)),
            "planar_within_25cm_5deg": float(np.mean((xy_err <= 0.25) & (h_err <= 5.0)))}


def step_errors(t_est, q_est, t_gt, q_gt) -> dict:
    """Median error of the motions between consecutive poses (est_i^-1 est_i+1 against
    gt_i^-1 gt_i+1): translation (m) and rotation (deg) per step, and the median true
    step length (m)."""
    t_est, q_est = np.asarray(t_est, float), np.asarray(q_est, float)
    t_gt, q_gt = np.asarray(t_gt, float), np.asarray(q_gt, float)
    if len(t_est) < 2:
        return {}
    e_t, e_q = geometry.pose_relative(t_est[:-1], q_est[:-1], t_est[1:], q_est[1:])
    g_t, g_q = geometry.pose_relative(t_gt[:-1], q_gt[:-1], t_gt[1:], q_gt[1:])
    t_err, r_err = pose_errors(e_t, e_q, g_t, g_q)
    return {"median_step_translation_m": float(np.median(t_err)),
            "median_step_rotation_deg": float(np.median(r_err)),
            "median_step_length_m": float(np.median(np.linalg.norm(g_t, axis=1)))}


def pose_error_vectors(t_est, q_est, t_true, q_true) -> np.ndarray:
    """(N, 6) errors e = (t_true - t_est, rotvec(R_true R_est^T)) in ROS order with the axes
    of the parent frame (DESIGN.md "Covariance honesty"): the order and axes of the
    covariance published with the pose, so that e^T C^-1 e is meaningful. Rows where a
    pose is missing (non-finite, e.g. before the fusion's first output) are NaN."""
    t_est, t_true = np.asarray(t_est, float).reshape(-1, 3), np.asarray(t_true, float).reshape(-1, 3)
    q_est, q_true = np.asarray(q_est, float).reshape(-1, 4), np.asarray(q_true, float).reshape(-1, 4)
    rot = np.full(t_est.shape, np.nan)
    known = np.all(np.isfinite(q_est), axis=1) & np.all(np.isfinite(q_true), axis=1)
    if np.any(known):
        R_est = geometry.quat_to_matrix(q_est[known])
        R_true = geometry.quat_to_matrix(q_true[known])
        rot[known] = geometry.so3_log(R_true @ np.swapaxes(R_est, -1, -2))
    return np.concatenate([t_true - t_est, rot], axis=-1)


def usable_covariances(covariances) -> np.ndarray:
    """(N,) True where a 6x6 covariance can be inverted for NEES: finite, and its symmetric
    part (what a PoseWithCovariance message carries) positive definite with a smallest
    eigenvalue above :data:`_SINGULAR_RATIO` of its largest."""
    cov = np.asarray(covariances, float).reshape(-1, POSE_DOF, POSE_DOF)
    usable = np.all(np.isfinite(cov), axis=(1, 2))
    if np.any(usable):
        sym = 0.5 * (cov[usable] + np.swapaxes(cov[usable], 1, 2))
        eig = np.linalg.eigvalsh(sym)
        usable[usable] = (eig[:, -1] > 0) & (eig[:, 0] > _SINGULAR_RATIO * eig[:, -1])
    return usable


def nees(errors, covariances) -> np.ndarray:
    """(N,) normalised estimation error squared e^T C^-1 e of each (6,) error against its
    (6, 6) covariance (symmetrised); NaN where the covariance is not usable
    (:func:`usable_covariances`) or the error not finite."""
    e = np.asarray(errors, float).reshape(-1, POSE_DOF)
    cov = np.asarray(covariances, float).reshape(-1, POSE_DOF, POSE_DOF)
    if len(e) != len(cov):
        raise ValueError(f"{len(e)} errors but {len(cov)} covariances")
    out = np.full(len(e), np.nan)
    ok = usable_covariances(cov) & np.all(np.isfinite(e), axis=1)
    if np.any(ok):
        sym = 0.5 * (cov[ok] + np.swapaxes(cov[ok], 1, 2))
        out[ok] = np.einsum("ni,ni->n", e[ok], np.linalg.solve(sym, e[ok][..., None])[..., 0])
    return out


def nees_summary(t_est, q_est, t_true, q_true, covariances) -> dict:
    """Covariance honesty of a run, as plain JSON values (never NaN):

    * ``nees_per_dof``: mean NEES / 6 (1 when the covariance matches the errors, larger
      when it is over-confident); None when no frame had a usable covariance;
    * ``nees_share_within_95``: share of those frames with NEES <= :data:`NEES_BOUND_95`
      (0.95 when honest); None likewise;
    * ``nees_frames``: frames scored; ``nees_skipped_covariances``: frames left out because
      their covariance was singular or not finite (:func:`usable_covariances`), or their
      NEES overflowed.

    Frames whose estimate or truth is not finite are not frames of the run here.
    """
    errors = pose_error_vectors(t_est, q_est, t_true, q_true)
    values = nees(errors, covariances)
    finite_error = np.all(np.isfinite(errors), axis=1)
    scored = values[np.isfinite(values)]
    # each term divided first: no overflow to inf even for absurdly small covariances
    return {"nees_per_dof": float(np.sum(scored / (POSE_DOF * scored.size))) if scored.size else None,
            "nees_share_within_95": float(np.mean(scored <= NEES_BOUND_95)) if scored.size else None,
            "nees_frames": int(scored.size),
            "nees_skipped_covariances": int(np.sum(finite_error) - scored.size)}


def _normalised_errors(errors, covariances) -> np.ndarray:
    """Each error axis divided by its own sigma (the covariance's diagonal); rows with a
    non-finite value left as they are (the callers drop them)."""
    sigma = np.sqrt(np.maximum(np.einsum("nii->ni", np.asarray(covariances, float).reshape(-1, POSE_DOF, POSE_DOF)),
                               1e-18))
    return np.asarray(errors, float).reshape(-1, POSE_DOF) / sigma


def bias_share(errors, covariances) -> float:
    """Share of a localizer's error that is common to the whole recording: the squared
    mean of the normalised errors (each axis by its sigma) over their mean square, summed
    over the axes. What no amount of fusing removes (the fusion's ``abs_bias_share``)."""
    z = _normalised_errors(errors, covariances)
    z = z[np.all(np.isfinite(z), axis=1)]
    if not len(z):
        return 0.0
    energy = float(np.sum(np.mean(z * z, axis=0)))
    return float(np.sum(np.mean(z, axis=0) ** 2) / energy) if energy > 0 else 0.0


def correlation_time(stamps, errors, covariances, segments=None) -> float:
    """How long a localizer's errors stay alike, in seconds (the fusion's
    ``abs_correlation_time``): the integral of the mean autocorrelation of the normalised
    errors (each axis by its sigma, mean removed) over the lags up to the first that is not
    positive. For an exponential correlation exp(-dt / T) that integral is T.

    ``segments`` (optional, one label per pose): lags are taken only between poses of the
    same segment, for poses that come in separate runs (the held-out blocks of a map's
    mapping walks); the time step is the median step inside the segments.
    """
    stamps = np.asarray(stamps, float).reshape(-1)
    z = _normalised_errors(errors, covariances)
    labels = np.zeros(len(stamps), int) if segments is None else np.asarray(segments).reshape(-1)
    if len(z) != len(stamps) or len(labels) != len(stamps):
        raise ValueError(f"{len(stamps)} stamps, {len(z)} errors and {len(labels)} segment labels")
    finite = np.all(np.isfinite(z), axis=1) & np.isfinite(stamps)
    stamps, z, labels = stamps[finite], z[finite], labels[finite]
    if len(stamps) < 3:
        return 0.0
    z = z - np.mean(z, axis=0)
    var = np.mean(z * z, axis=0)
    keep = var > 0
    if not np.any(keep):
        return 0.0
    z, var = z[:, keep], var[keep]
    same = labels[1:] == labels[:-1]
    steps = np.diff(stamps)[same]
    steps = steps[steps > 0]
    if not len(steps):
        return 0.0
    period = float(np.median(steps))
    total = 0.0
    for lag in range(1, len(z) // 2):
        pairs = labels[:-lag] == labels[lag:]
        if not np.any(pairs):
            break
        rho = float(np.mean(np.mean(z[:-lag][pairs] * z[lag:][pairs], axis=0) / var))
        if rho <= 0.0:
            break
        total += rho
    return total * period


def _evo_trajectory(stamps, t, q):
    from evo.core.trajectory import PoseTrajectory3D

    return PoseTrajectory3D(positions_xyz=np.asarray(t, float),
                            orientations_quat_wxyz=np.asarray(q, float),
                            timestamps=np.asarray(stamps, float))


def trajectory_metrics(stamps, t_est, q_est, t_gt, q_gt, rpe_delta_m: float = 1.0) -> dict:
    """ATE (translation RMSE, m) with and without SE(3) alignment and RPE (translation
    RMSE per ``rpe_delta_m`` metres travelled) through evo, on time-associated poses."""
    import copy

    from evo.core import metrics as evo_metrics
    from evo.core.geometry import GeometryException
    from evo.core.units import Unit
    from evo.main_ape import ape
    from evo.main_rpe import rpe

    if len(stamps) < 3:
        return {}
    ref = _evo_trajectory(stamps, t_gt, q_gt)
    est = _evo_trajectory(stamps, t_est, q_est)
    out = {}
    for aligned in (False, True):
        suffix = "_se3_aligned" if aligned else ""
        try:
            result = ape(copy.deepcopy(ref), copy.deepcopy(est), evo_metrics.PoseRelation.translation_part,
                         align=aligned)
        except GeometryException:
            # a degenerate estimate (e.g. one pose for every frame) has no SE(3) alignment:
            # report the unaligned figure and say so
            result = ape(copy.deepcopy(ref), copy.deepcopy(est), evo_metrics.PoseRelation.translation_part,
                         align=False)
            out["se3_alignment_degenerate"] = True
        out[f"ate_rmse_m{suffix}"] = float(result.stats["rmse"])
        try:
            result = rpe(copy.deepcopy(ref), copy.deepcopy(est),
                         evo_metrics.PoseRelation.translation_part, delta=rpe_delta_m,
                         delta_unit=Unit.meters, all_pairs=False, align=aligned)
            out[f"rpe_rmse_m_per_{rpe_delta_m:g}m{suffix}"] = float(result.stats["rmse"])
        except Exception:  # evo raises when the path is shorter than delta: no RPE then
            out[f"rpe_rmse_m_per_{rpe_delta_m:g}m{suffix}"] = None
    return out
