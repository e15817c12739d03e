"""The checkpoint selection rule of vizloc-train (optim.select_by)."""
import numpy as np
import pytest

from vizloc_ros import geometry
from vizloc_ros.training import selection


def _yaw(deg):
    half = np.radians(np.asarray(deg, dtype=float)) / 2
    return np.stack([np.cos(half), np.zeros_like(half), np.zeros_like(half), np.sin(half)], axis=-1)


def test_mean_pose_baseline_is_the_error_of_predicting_the_training_mean():
    # training: a straight 100 m drive heading 0 deg; validation: 4 frames at x = 0, 20, 80, 100
    # heading -10, 0, 0, 10 deg. The mean pose is x = 50 heading 0: errors 50, 30, 30, 50 m and
    # 10, 0, 0, 10 deg, medians 40 m and 5 deg.
    train_t = np.stack([np.linspace(0, 100, 11), np.zeros(11), np.zeros(11)], axis=1)
    train_q = _yaw(np.zeros(11))
    val_t = np.array([[0.0, 0, 0], [20, 0, 0], [80, 0, 0], [100, 0, 0]])
    val_q = _yaw([-10, 0, 0, 10])
    baseline = selection.mean_pose_baseline(train_t, train_q, val_t, val_q)
    assert baseline["median_translation_m"] == pytest.approx(40.0)
    assert baseline["median_rotation_deg"] == pytest.approx(5.0)


def test_mean_rotation_ignores_quaternion_signs():
    q = _yaw([20.0, 40.0])
    q[1] *= -1  # the same rotation, other sign
    assert geometry.rotation_angle(selection.mean_rotation(q), _yaw(30.0)) == pytest.approx(0.0, abs=1e-9)


def test_a_baseline_below_the_tightest_accuracy_asked_for_is_floored_there():
    t = np.zeros((3, 3))
    q = _yaw(np.zeros(3))
    assert selection.mean_pose_baseline(t, q, t, q) == {"median_translation_m": 0.05,
                                                        "median_rotation_deg": 2.0}
    # a straight drive (mean-pose rotation error ~0.5 deg): an epoch that learned where the
    # car is (0.6 m / 1.1 deg) beats one that answers the mean pose (15.6 m / 0.4 deg)
    baseline = {"median_translation_m": 15.5, "median_rotation_deg": 2.0}
    learned = selection.selection_score({"median_translation_m": 0.6, "median_rotation_deg": 1.1},
                                        "mean-pose", baseline)
    constant = selection.selection_score({"median_translation_m": 15.6, "median_rotation_deg": 0.4},
                                         "mean-pose", baseline)
    assert learned < constant


def test_the_mean_pose_rule_keeps_the_accurate_rotation_the_old_rule_threw_away():
    """The KITTI case of issue #18: on a drive whose mean pose is 25 m / 10 deg off, an
    early epoch at 20 m / 38 deg and a later one at 24 m / 3 deg."""
    baseline = {"median_translation_m": 25.0, "median_rotation_deg": 10.0}
    early = {"median_translation_m": 20.0, "median_rotation_deg": 38.0}
    late = {"median_translation_m": 24.0, "median_rotation_deg": 3.0}

    def score(rule, metrics):
        return selection.selection_score(metrics, rule, baseline)

    assert score("translation+rotation/10", early) == pytest.approx(23.8)
    assert score("translation+rotation/10", early) < score("translation+rotation/10", late)
    assert score("mean-pose", early) == pytest.approx(20 / 25 + 38 / 10)
    assert score("mean-pose", late) == pytest.approx(24 / 25 + 3 / 10)
    assert score("mean-pose", late) < score("mean-pose", early)
    assert score("translation", early) == 20.0 and score("rotation", late) == 3.0
    # always answering the mean pose scores 2.0
    assert score("mean-pose", baseline) == pytest.approx(2.0)


def test_an_unknown_rule_is_one_line_naming_the_rules():
    with pytest.raises(ValueError, match=r"^optim.select_by must be one of mean-pose, "
                                         r"translation\+rotation/10, translation, rotation; got 'best'$"):
        selection.selection_score({"median_translation_m": 1.0, "median_rotation_deg": 1.0}, "best")
