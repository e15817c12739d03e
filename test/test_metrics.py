"""Metrics of DESIGN.md against independent computations."""
import numpy as np
import transforms3d.quaternions as tq

from vizloc_ros import geometry, metrics


def _trajectory(n=120, seed=0):
    rng = np.random.default_rng(seed)
    s = np.arange(n) * 0.1
    t = np.c_[np.cos(s), np.sin(s), 0.05 * s]
    q = geometry.matrix_to_quat(geometry.so3_exp(np.c_[0 * s, 0 * s, s]))
    t_est = t + rng.normal(scale=0.1, size=t.shape)
    q_est = geometry.quat_multiply(q, geometry.quat_exp(rng.normal(scale=0.03, size=(n, 3))))
    return s, t, q, t_est, q_est


def test_rotation_error_matches_angle_of_relative_rotation():
    _, t, q, t_est, q_est = _trajectory()
    t_err, r_err = metrics.pose_errors(t_est, q_est, t, q)
    for i in range(0, len(q), 17):
        _, angle = tq.quat2axangle(tq.qmult(tq.qinverse(q[i]), q_est[i]))
        angle = min(angle, 2 * np.pi - angle)
        assert abs(np.degrees(angle) - r_err[i]) < 1e-6
        assert abs(np.linalg.norm(t_est[i] - t[i]) - t_err[i]) < 1e-12


def test_summary_medians_and_shares():
    t_err = np.array([0.01, 0.2, 0.4, 6.0])
    r_err = np.array([1.0, 1.0, 4.0, 1.0])
    out = metrics.summarize_errors(t_err, r_err)
    assert out["median_translation_m"] == np.median(t_err)
    assert out["within_5cm_5deg"] == 0.25
    assert out["within_25cm_2deg"] == 0.5
    assert out["within_50cm_5deg"] == 0.75
    assert out["within_500cm_10deg"] == 0.75


def test_unaligned_ate_is_the_rmse_of_position_errors():
    s, t, q, t_est, q_est = _trajectory()
    out = metrics.trajectory_metrics(s, t_est, q_est, t, q)
    rmse = np.sqrt(np.mean(np.sum((t_est - t) ** 2, axis=1)))
    assert abs(out["ate_rmse_m"] - rmse) < 1e-9
    assert out["ate_rmse_m_se3_aligned"] <= out["ate_rmse_m"] + 1e-9
    assert out["rpe_rmse_m_per_1m"] > 0


def test_degenerate_estimate_reports_unaligned_ate_instead_of_failing():
    from vizloc_ros.metrics import trajectory_metrics

    n = 10
    stamps = np.arange(n, dtype=float)
    t_gt = np.column_stack([np.linspace(0, 2, n), np.sin(np.arange(n)), np.zeros(n)])
    q = np.tile([1.0, 0.0, 0.0, 0.0], (n, 1))
    out = trajectory_metrics(stamps, np.zeros((n, 3)), q, t_gt, q)
    assert out["se3_alignment_degenerate"] is True
    assert out["ate_rmse_m_se3_aligned"] == out["ate_rmse_m"] > 0
