"""Issue #18: a relative (odometry) head's covariance follows its drift over chained steps,
not the spread of single steps, so the fusion does not trust correlated step errors as
independent ones."""
from __future__ import annotations

import numpy as np
import pytest

from vizloc_ros import geometry
from vizloc_ros.training.evaluate import drift_covariance, validation_covariance


def walk_steps(n=300, seed=0):
    """Steps of a walk: about 5 cm forward and a few degrees of turn each."""
    rng = np.random.default_rng(seed)
    t = np.column_stack([rng.normal(0, 0.005, n), rng.normal(0, 0.002, n), 0.05 + rng.normal(0, 0.005, n)])
    yaw = np.radians(rng.normal(-2.0, 2.0, n))
    q = np.column_stack([np.cos(yaw / 2), np.zeros(n), np.sin(yaw / 2), np.zeros(n)])
    return t, q


def perturbed(t, q, dt, drot):
    """Steps with an error: translation ``dt`` added, rotation ``drot`` (rad, left) applied."""
    R = geometry.quat_to_matrix(q)
    dR = np.stack([geometry.so3_exp(v) for v in drot])
    return t + dt, geometry.matrix_to_quat(dR @ R)


def test_independent_step_errors_keep_the_single_step_covariance():
    t, q = walk_steps()
    rng = np.random.default_rng(1)
    t_est, q_est = perturbed(t, q, rng.normal(0, 0.004, t.shape), rng.normal(0, 0.003, t.shape))
    cov, info = drift_covariance(t_est, q_est, t, q)
    single = np.asarray(validation_covariance(t_est, q_est, t, q))
    # chained white errors add up as the steps say (the rotation moves later translation
    # errors about, a little): no scale far from 1
    assert info["inflation"]["translation"] < 1.6 and info["inflation"]["rotation"] < 1.6
    assert np.allclose(np.diag(cov) / np.diag(single), np.repeat([info["inflation"]["translation"],
                                                                  info["inflation"]["rotation"]], 3), rtol=1e-3)


def test_a_step_bias_inflates_the_covariance_to_the_drift_it_causes():
    t, q = walk_steps()
    rng = np.random.default_rng(2)
    bias_t, bias_r = np.array([0.008, 0.0, 0.0]), np.array([0.0, np.radians(0.3), 0.0])
    t_est, q_est = perturbed(t, q, bias_t + rng.normal(0, 0.002, t.shape),
                             bias_r + rng.normal(0, 0.001, t.shape))
    cov, info = drift_covariance(t_est, q_est, t, q)
    # a constant error grows as K over K steps, its square as K^2: per step K times the
    # single step's, here up to the longest horizon (20)
    assert info["inflation"]["translation"] > 8 and info["inflation"]["rotation"] > 8
    assert info["horizon_steps"] == {"translation": 20, "rotation": 20}
    cov = np.asarray(cov)
    assert np.allclose(cov, cov.T) and np.all(np.linalg.eigvalsh(cov) > 0)
    # honest over 20 chained steps: the drift's NEES per dof is about 1 with it
    starts = range(0, 280, 5)
    errors = []
    for s in starts:
        tp, qp = t[s:s + 20], q[s:s + 20]
        chain_true = _chain(tp, qp)
        chain_est = _chain(t_est[s:s + 20], q_est[s:s + 20])
        rot = geometry.so3_log(geometry.quat_to_matrix(chain_true[1]) @ geometry.quat_to_matrix(chain_est[1]).T)
        errors.append(np.concatenate([chain_true[0] - chain_est[0], rot]))
    errors = np.asarray(errors)
    assert 0.3 < np.mean(np.sum(errors ** 2, axis=1)) / (20 * np.trace(cov)) < 3


def _chain(ts, qs):
    t, q = np.zeros(3), np.array([1.0, 0, 0, 0])
    for a, b in zip(ts, qs):
        t, q = geometry.pose_compose(t, q, a, b)
    return t, q


def test_gaps_break_the_chains_and_exact_steps_give_none():
    t, q = walk_steps(60)
    rng = np.random.default_rng(3)
    t_est, q_est = perturbed(t, q, rng.normal(0, 0.004, t.shape), rng.normal(0, 0.003, t.shape))
    t_est[::4] = np.nan  # no chain longer than 3 steps
    cov, info = drift_covariance(t_est, q_est, t, q)
    assert info["steps"] == 45 and np.all(np.isfinite(cov))
    assert info["horizon_steps"]["translation"] <= 2 and info["horizon_steps"]["rotation"] <= 2
    assert drift_covariance(t, q, t, q)[0] is None


@pytest.mark.parametrize("horizons", [(1,), ()])
def test_no_horizon_beyond_one_step_is_the_single_step_covariance(horizons):
    t, q = walk_steps(40)
    t_est, q_est = perturbed(t, q, np.full(t.shape, 0.003), np.zeros(t.shape))
    cov, info = drift_covariance(t_est, q_est, t, q, horizons=horizons)
    assert np.allclose(cov, validation_covariance(t_est, q_est, t, q))
    assert info["inflation"] == {"translation": 1.0, "rotation": 1.0}
