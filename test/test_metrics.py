"""Metrics of DESIGN.md against independent computations."""
import numpy as np
import pytest
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


# --------------------------------------------------------------------------- NEES

def _rz(angle):
    return geometry.matrix_to_quat(geometry.so3_exp(np.array([0.0, 0.0, angle])))


def test_nees_of_a_hand_computed_case_uses_ros_order_and_parent_axes():
    # truth turned 90 deg about z; the estimate is off by 0.01 rad about the PARENT x axis
    # (in the body's axes that would be y) and by (0.1, 0.2, 0) m
    q_est = _rz(np.pi / 2)
    q_true = geometry.matrix_to_quat(geometry.so3_exp(np.array([0.01, 0.0, 0.0]))
                                     @ geometry.quat_to_matrix(q_est))
    t_true = np.array([1.0, 2.0, 3.0])
    t_est = t_true - np.array([0.1, 0.2, 0.0])
    e = metrics.pose_error_vectors(t_est[None], q_est[None], t_true[None], q_true[None])[0]
    np.testing.assert_allclose(e, [0.1, 0.2, 0.0, 0.01, 0.0, 0.0], atol=1e-12)
    # x-y translation correlated: C_xy = [[2, 1], [1, 2]] * 0.01 -> inverse [[2, -1], [-1, 2]] / 0.03
    cov = np.diag([0.02, 0.02, 0.09, 1e-4, 1.0, 1.0])
    cov[0, 1] = cov[1, 0] = 0.01
    translation = (2 * 0.1**2 - 2 * 0.1 * 0.2 + 2 * 0.2**2) / 0.03  # = 2.0
    rotation = 0.01**2 / 1e-4                                      # = 1.0 (rot_x)
    value = metrics.nees(e[None], cov[None])[0]
    assert value == pytest.approx(translation + rotation, rel=1e-9)
    assert value == pytest.approx(3.0, rel=1e-9)
    summary = metrics.nees_summary(t_est[None], q_est[None], t_true[None], q_true[None], cov[None])
    assert summary == {"nees_per_dof": pytest.approx(0.5), "nees_share_within_95": 1.0,
                       "nees_frames": 1, "nees_skipped_covariances": 0}


def test_nees_bound_is_the_chi_square_95_percent_quantile_with_6_dof():
    from vizloc_ros.fusion.conventions import chi2_quantile

    assert metrics.NEES_BOUND_95 == pytest.approx(chi2_quantile(0.95, 6), abs=1e-4)
    assert round(metrics.NEES_BOUND_95, 2) == 12.59


def test_nees_monte_carlo_poses_drawn_from_their_covariance_score_one_per_dof():
    rng = np.random.default_rng(7)
    n = 20000
    # a different correlated covariance per frame, translation and rotation coupled
    a = rng.normal(size=(n, 6, 6)) * np.array([0.05, 0.05, 0.02, 0.01, 0.01, 0.03])[:, None]
    cov = a @ np.swapaxes(a, 1, 2) + np.eye(6) * 1e-6
    e = np.einsum("nij,nj->ni", np.linalg.cholesky(cov), rng.normal(size=(n, 6)))
    # truth poses along a path; each estimate moved off its truth by exactly -e
    t_true = rng.normal(size=(n, 3))
    q_true = geometry.quat_normalize(rng.normal(size=(n, 4)))
    t_est = t_true - e[:, :3]
    R_est = geometry.so3_exp(-e[:, 3:]) @ geometry.quat_to_matrix(q_true)  # R_true R_est^T = exp(e_rot)
    q_est = geometry.matrix_to_quat(R_est)
    np.testing.assert_allclose(metrics.pose_error_vectors(t_est, q_est, t_true, q_true), e, atol=1e-9)
    summary = metrics.nees_summary(t_est, q_est, t_true, q_true, cov)
    assert summary["nees_frames"] == n and summary["nees_skipped_covariances"] == 0
    # mean of chi-square(6)/6 over 20000 frames: standard deviation sqrt(2/6/n) = 0.004
    assert summary["nees_per_dof"] == pytest.approx(1.0, abs=0.02)
    assert summary["nees_share_within_95"] == pytest.approx(0.95, abs=0.01)
    # the same errors against a covariance 4x too small: over-confident by 4
    over = metrics.nees_summary(t_est, q_est, t_true, q_true, cov / 4)
    assert over["nees_per_dof"] == pytest.approx(4.0, rel=0.03)
    assert over["nees_share_within_95"] < 0.5


def test_singular_or_non_finite_covariances_are_skipped_and_counted_never_nan():
    n = 5
    t = np.zeros((n, 3))
    q = np.tile([1.0, 0.0, 0.0, 0.0], (n, 1))
    t_est = t + 0.1
    good = np.eye(6) * 0.01
    singular = np.diag([0.01, 0.01, 0.01, 0.01, 0.01, 0.0])
    with_nan = good.copy()
    with_nan[2, 3] = np.nan
    indefinite = np.diag([0.01, 0.01, 0.01, 0.01, 0.01, -0.01])
    infinite = np.where(good > 0, np.inf, 0.0)
    covs = np.stack([good, singular, with_nan, indefinite, infinite])
    assert metrics.usable_covariances(covs).tolist() == [True, False, False, False, False]
    values = metrics.nees(metrics.pose_error_vectors(t_est, q, t, q), covs)
    assert values[0] == pytest.approx(3.0) and np.all(np.isnan(values[1:]))
    summary = metrics.nees_summary(t_est, q, t, q, covs)
    assert summary == {"nees_per_dof": pytest.approx(0.5), "nees_share_within_95": 1.0,
                       "nees_frames": 1, "nees_skipped_covariances": 4}
    # nothing usable: None (null in JSON), not NaN
    none = metrics.nees_summary(t_est[1:], q[1:], t[1:], q[1:], covs[1:])
    assert none == {"nees_per_dof": None, "nees_share_within_95": None,
                    "nees_frames": 0, "nees_skipped_covariances": 4}
    # a frame without truth is no frame at all, not a skipped covariance
    missing = metrics.nees_summary(t_est, q, np.full((n, 3), np.nan), q, np.stack([good] * n))
    assert missing["nees_frames"] == 0 and missing["nees_skipped_covariances"] == 0
    with pytest.raises(ValueError, match="5 errors but 4 covariances"):
        metrics.nees(np.zeros((5, 6)), covs[:4])


def test_nees_of_an_absurdly_small_covariance_stays_finite():
    n = 10
    t = np.zeros((n, 3))
    q = np.tile([1.0, 0.0, 0.0, 0.0], (n, 1))
    summary = metrics.nees_summary(t + 1e3, q, t, q, np.stack([np.eye(6) * 1e-300] * n))
    assert np.isfinite(summary["nees_per_dof"]) and summary["nees_per_dof"] > 1e300


def test_pose_error_vectors_of_missing_poses_are_nan_rows():
    q = np.array([[1.0, 0.0, 0.0, 0.0], [np.nan] * 4])
    t = np.array([[0.0, 0.0, 0.0], [np.nan] * 3])
    e = metrics.pose_error_vectors(t, q, np.zeros((2, 3)), np.tile([1.0, 0, 0, 0], (2, 1)))
    assert np.all(e[0] == 0.0) and np.all(np.isnan(e[1]))


def test_few_scored_frames_are_warned_about_in_one_line():
    assert metrics.scored_frames_warning(300, 300) == ""
    assert metrics.scored_frames_warning(12, 20) == ""  # most of them, and enough
    one = metrics.scored_frames_warning(1, 30, "the others have no ground truth near their stamp")
    assert one == ("WARNING: only 1 of 30 frames could be scored (the others have no ground truth near their "
                   "stamp): the figures above describe 1 frame")
    assert metrics.scored_frames_warning(9, 9).endswith("describe 9 frames")  # all, but too few for medians
    assert metrics.scored_frames_warning(40, 100) != ""  # enough, but under half
    assert metrics.scored_frames_warning(0, 0) == ""


def test_planar_errors_measure_x_y_and_the_heading_of_the_optical_axis():
    from vizloc_ros.localize.models.allocentric import OPTICAL_IN_LEVEL, rot_zyx
    q_of = lambda yaw, pitch: geometry.matrix_to_quat(rot_zyx(yaw, pitch, 0.0) @ OPTICAL_IN_LEVEL)
    t_gt = np.array([[1.0, 2.0, 1.3], [0.0, 0.0, 1.5]])
    q_gt = np.stack([q_of(0.3, 0.0), q_of(-3.1, 0.1)])
    t_est = np.array([[1.1, 2.0, 1.0], [0.3, 0.4, 1.3]])          # z errors do not count
    q_est = np.stack([q_of(0.3 + np.radians(2), 0.2), q_of(3.1, 0.0)])   # nor does pitch; -3.1 vs 3.1 wraps
    errors = metrics.planar_errors(t_est, q_est, t_gt, q_gt)
    assert errors["median_planar_translation_m"] == pytest.approx((0.1 + 0.5) / 2)
    assert errors["median_heading_deg"] == pytest.approx((2.0 + np.degrees(2 * np.pi - 6.2)) / 2, abs=1e-6)
    assert errors["planar_within_25cm_5deg"] == 0.5
