"""The fusion's model of the network's errors (issue #20): correlated poses weighted as
such, an online scale where the network under-states its errors, no restart for an error
that is only correlated, and IMU edges built once."""
import math

import numpy as np
import pytest

from vizloc_ros.fusion import FusionConfig, SlidingWindowFusion
from vizloc_ros.fusion.adaptive import NoiseScale
from vizloc_ros.fusion.measurements import correlation_inflation
from vizloc_ros.sim.fusion_sim import DEFAULT_BASE_T_CAMERA, FUSION_MODES, SimConfig, run_sequence, simulate, summarize


def test_correlation_inflation_is_the_inverse_information_share_of_a_gauss_markov_sequence():
    assert correlation_inflation(0.1, 0.0) == 1.0            # independent
    r = math.exp(-0.1 / 1.0)
    assert correlation_inflation(0.1, 1.0) == pytest.approx((1 + r) / (1 - r))
    assert correlation_inflation(math.inf, 1.0) == 1.0       # no neighbour
    assert correlation_inflation(0.0, 1.0) == 1e4            # capped, never infinite
    assert correlation_inflation(100.0, 1.0) == pytest.approx(1.0, abs=1e-12)


def test_noise_scale_finds_the_axes_whose_errors_are_larger_than_stated():
    rng = np.random.default_rng(0)
    scale = NoiseScale(50)
    cov_pred = np.eye(6) * 1e-4
    cov_meas = np.eye(6) * 0.01
    true_var = np.array([0.01, 0.01, 0.01, 0.04, 0.04, 0.09])   # translation under-stated 2x, 3x
    for _ in range(200):
        scale.observe(rng.normal(0.0, np.sqrt(true_var + 1e-4)), cov_pred, cov_meas)
    np.testing.assert_allclose(scale.scales[:3], 1.0, atol=0.35)
    np.testing.assert_allclose(scale.scales[3:], [4.0, 4.0, 9.0], rtol=0.35)
    assert np.all(scale.scales >= 1.0)
    applied = scale.apply(cov_meas)
    np.testing.assert_allclose(np.diag(applied), scale.scales * 0.01)


def test_noise_scale_is_off_with_a_zero_window_and_ignores_non_finite_innovations():
    off = NoiseScale(0)
    off.observe(np.full(6, 10.0), np.eye(6), np.eye(6))
    assert off.value == 1.0
    on = NoiseScale(10)
    for _ in range(30):
        on.observe(np.full(6, np.nan), np.eye(6), np.eye(6))
    assert on.value == 1.0


@pytest.fixture(scope="module")
def trajectory():
    from vizloc_ros.ros_io.tum import read_tum
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "shared/data/trajectories/euroc_V1_02_groundtruth.tum"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return read_tum(path)


def _run(trajectory, sim_kw, fusion_kw, duration=40.0):
    seq = simulate(*trajectory, SimConfig(seed=5, duration=duration, **sim_kw))
    fusion = SlidingWindowFusion(FusionConfig(base_T_camera=DEFAULT_BASE_T_CAMERA, **FUSION_MODES["abs+odom"],
                                              **fusion_kw))
    res = run_sequence(fusion, seq)
    return fusion, summarize(res, seq)


def test_correlated_network_errors_neither_restart_nor_overstate_the_fusion(trajectory):
    """Network errors correlated over 1 s, as the shipped MapNet's (and no walk-wide bias,
    so ``abs_bias_share`` 0): modelled, the fused covariance is not over-confident and no
    pose restarts the window; modelled as independent, the fused NEES is several times
    larger. (Weighting each pose (1 - r) / (1 + r) is exact for an average over many
    correlation times; over the few that the odometry's drift allows it errs on the
    cautious side, hence the lower bound of 0.3.)"""
    sim_kw = dict(abs_correlation_time=1.0, outlier_ratio=0.0)
    fusion, modelled = _run(trajectory, sim_kw, dict(abs_correlation_time=1.0, abs_bias_share=0.0))
    assert fusion.counters["reinitialisations"] == 0
    assert 0.3 <= modelled["nees_per_dim"] <= 2.0, modelled
    _, independent = _run(trajectory, sim_kw, dict(abs_correlation_time=0.0, abs_cov_adaptive_window=0,
                                                   abs_bias_share=0.0))
    assert independent["nees_per_dim"] > 2.0 * modelled["nees_per_dim"], (independent, modelled)


def test_imu_edges_are_built_once_with_the_imu(trajectory):
    """A camera stamp between two IMU samples is covered by the newest sample's hold: the
    edge is built with the IMU at once, never as a fallback rebuilt one sample later."""
    seq = simulate(*trajectory, SimConfig(seed=2, duration=20.0))
    fusion = SlidingWindowFusion(FusionConfig(base_T_camera=DEFAULT_BASE_T_CAMERA, abs_correlation_time=0.0,
                                              **FUSION_MODES["abs+odom+imu"]))
    run_sequence(fusion, seq)
    assert fusion.counters["accepted"] > 100
    assert fusion.counters["fallback_edges"] == 0, fusion.counters
    assert fusion.counters["edges_upgraded"] == 0, fusion.counters
