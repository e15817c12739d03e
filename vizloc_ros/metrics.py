"""Evaluation metrics of DESIGN.md, in one place for training, ``vizloc-eval`` and replay.

* per-frame translation error (m) and rotation error (deg), the latter
  acos((trace(R_gt^T R) - 1) / 2);
* medians and the share of frames within (5 cm, 5 deg), (25 cm, 2 deg), (50 cm, 5 deg)
  and (5 m, 10 deg);
* ATE and RPE through evo (with and without SE(3) alignment), so figures match what
  users get from the ``evo_ape`` / ``evo_rpe`` command lines on the same TUM files;
* per-step errors: the error of each frame-to-frame motion, what an odometry drifts by
  per step (compares a network's relative head with the robot's odometry).
"""
from __future__ import annotations

import numpy as np

from vizloc_ros import geometry

#: (metres, degrees) thresholds of DESIGN.md
THRESHOLDS = ((0.05, 5.0), (0.25, 2.0), (0.50, 5.0), (5.0, 10.0))


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
