"""Bad input and failure handling of the fusion: every case is a counted drop or a clean
reset, never an exception out of an update and never a NaN in the output."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vizloc_ros.fusion import FusionConfig, SlidingWindowFusion
from vizloc_ros.sim.fusion_sim import DEFAULT_BASE_T_CAMERA, SimConfig, simulate, synthetic_trajectory

TRAJ = synthetic_trajectory(20.0)
COV = np.diag([0.09] * 3 + [0.0076] * 3)


def make_fusion(**kw) -> SlidingWindowFusion:
    kw.setdefault("base_T_camera", DEFAULT_BASE_T_CAMERA)
    return SlidingWindowFusion(FusionConfig(**kw))


@pytest.fixture(scope="module")
def seq():
    return simulate(*TRAJ, SimConfig(seed=7))


def assert_finite_estimate(fusion):
    est = fusion.estimate()
    assert est is not None
    for arr in (est.t, est.q, est.cov_ros, est.t_cam, est.q_cam):
        assert np.all(np.isfinite(arr))
    if est.map_T_odom is not None:
        assert np.all(np.isfinite(est.map_T_odom[0])) and np.all(np.isfinite(est.map_T_odom[1]))
    return est


def run_events(fusion, events):
    for _, _, kind, p in events:
        if kind == "imu":
            fusion.add_imu(*p)
        elif kind == "odom":
            fusion.add_odometry(*p)
        else:
            fusion.add_absolute(*p[:4])


def initialised(seq, t_stop=4.0, **kw):
    fusion = make_fusion(**kw)
    events = [e for e in seq.events if e[0] <= seq.truth.t0 + t_stop]
    run_events(fusion, events)
    assert fusion.initialised
    return fusion, [e for e in seq.events if e[0] > seq.truth.t0 + t_stop]


def next_abs(rest):
    return next(e[3] for e in rest if e[2] == "abs")


@pytest.mark.parametrize("mutate, reason", [
    (lambda t, q, c: (t, q, np.full((6, 6), np.nan)), "not finite"),
    (lambda t, q, c: (np.array([np.nan, 0, 0]), q, c), "not finite"),
    (lambda t, q, c: (t, np.zeros(4), c), "zero quaternion"),
    (lambda t, q, c: (t, q, -c), "not positive definite"),
    (lambda t, q, c: (t, q, np.zeros((6, 6))), "not positive definite"),
    (lambda t, q, c: (t, q, np.diag([0.09, 0.09, -0.01, 0.01, 0.01, 0.01])), "not positive definite"),
    (lambda t, q, c: (t[:2], q, c), "3 elements"),
    (lambda t, q, c: (t, q, np.eye(5)), "6x6"),
])
def test_bad_absolute_measurement_is_a_counted_drop(seq, mutate, reason):
    fusion, rest = initialised(seq)
    s, t, q, c, _ = next_abs(rest)
    before = fusion.estimate()
    dropped = fusion.counters["dropped"]
    r = fusion.add_absolute(s, *mutate(t, q, c))
    assert r.status == "dropped" and reason in r.reason
    assert fusion.counters["dropped"] == dropped + 1
    after = assert_finite_estimate(fusion)
    np.testing.assert_array_equal(before.t, after.t)


def test_bad_stamps_and_garbage_types_never_raise(seq):
    fusion, rest = initialised(seq)
    assert fusion.add_absolute(math.nan, np.zeros(3), [1, 0, 0, 0], COV).status == "dropped"
    assert fusion.add_absolute("soon", np.zeros(3), [1, 0, 0, 0], COV).status == "dropped"
    assert fusion.add_absolute(None, None, None, None).status == "dropped"
    assert fusion.add_odometry(math.inf, np.zeros(3), [1, 0, 0, 0], None).status == "dropped"
    assert fusion.add_odometry(1e9, [np.nan, 0, 0], [1, 0, 0, 0], None).status == "dropped"
    assert fusion.add_imu(1e9, [0, 0, math.nan], [0, 0, 9.8]).status == "dropped"
    assert fusion.set_initial_pose(1.0, [0, 0, 0], [1, 0, 0, 0], -np.eye(6)).status == "dropped"
    assert_finite_estimate(fusion)


def test_zero_covariance_odometry_uses_the_floor(seq):
    fusion = make_fusion(use_odom=True)
    for _, _, kind, p in seq.events:
        if kind == "odom":
            fusion.add_odometry(p[0], p[1], p[2], np.zeros((6, 6)))
        elif kind == "abs":
            fusion.add_absolute(*p[:4])
    est = assert_finite_estimate(fusion)
    assert est.map_T_odom is not None
    assert fusion.counters["accepted"] > 150 and fusion.counters["errors"] == 0
    tt, _ = seq.truth.pose([est.stamp])
    assert np.linalg.norm(est.t - tt[0]) < 0.3


def test_non_psd_odometry_covariance_is_tolerated(seq):
    fusion = make_fusion(use_odom=True)
    rng = np.random.default_rng(0)
    for _, _, kind, p in seq.events:
        if kind == "odom":
            bad = rng.normal(size=(6, 6)) * 1e-3          # asymmetric, indefinite
            fusion.add_odometry(p[0], p[1], p[2], bad)
        elif kind == "abs":
            fusion.add_absolute(*p[:4])
    assert_finite_estimate(fusion)
    assert fusion.counters["errors"] == 0 and fusion.counters["accepted"] > 150


@pytest.mark.parametrize("use_imu", [False, True])
def test_time_going_backwards_bag_loop_resets_cleanly(seq, use_imu):
    fusion = make_fusion(use_odom=True, use_imu=use_imu)
    run_events(fusion, seq.events)
    first = assert_finite_estimate(fusion)
    run_events(fusion, seq.events)                   # the bag starts over
    assert fusion.counters["time_jumps"] >= 1
    assert fusion.counters["errors"] == 0
    est = assert_finite_estimate(fusion)
    assert abs(est.stamp - first.stamp) < 0.5       # back at the end of the bag, recovered
    tt, _ = seq.truth.pose([est.stamp])
    assert np.linalg.norm(est.t - tt[0]) < 0.4


def test_absolute_only_bag_loop_resets_after_a_few_old_measurements(seq):
    fusion = make_fusion(use_odom=False)
    abs_events = [e for e in seq.events if e[2] == "abs"]
    run_events(fusion, abs_events)
    run_events(fusion, abs_events[:60])
    assert fusion.counters["time_jumps"] == 1
    est = assert_finite_estimate(fusion)
    assert est.stamp < seq.truth.t0 + 7.0


def test_duplicate_stamps_are_dropped(seq):
    fusion, rest = initialised(seq)
    s, t, q, c, _ = next_abs(rest)
    odom = [e[3] for e in rest if e[2] == "odom" and e[3][0] > s][0]
    fusion.add_odometry(*odom)
    assert fusion.add_absolute(s, t, q, c).status in ("accepted", "rejected")
    r = fusion.add_absolute(s, t, q, c)
    assert r.status in ("dropped", "rejected")
    if r.status == "dropped":
        assert "duplicate" in r.reason
    assert fusion.add_odometry(*odom).status == "dropped"
    assert fusion.counters["odometry_dropped"] == 1
    assert_finite_estimate(fusion)


def test_gap_longer_than_the_window(seq):
    """No network output for 8 s (the window is 2 s): the next one is fused normally."""
    fusion = make_fusion(use_odom=True, window_size=20)
    t0 = seq.truth.t0
    events = [e for e in seq.events if not (e[2] == "abs" and t0 + 6.0 < e[3][0] < t0 + 14.0)]
    res_before = fusion.counters["dropped"]
    run_events(fusion, events)
    est = assert_finite_estimate(fusion)
    assert fusion.counters["dropped"] == res_before and fusion.counters["errors"] == 0
    tt, _ = seq.truth.pose([est.stamp])
    assert np.linalg.norm(est.t - tt[0]) < 0.3


def test_everything_stops_longer_than_the_window_abs_only(seq):
    fusion = make_fusion(use_odom=False, window_size=None, window_seconds=1.0)
    t0 = seq.truth.t0
    events = [e for e in seq.events if e[2] == "abs" and not (t0 + 5.0 < e[3][0] < t0 + 12.0)]
    run_events(fusion, events)
    assert_finite_estimate(fusion)
    assert fusion.counters["errors"] == 0


def test_graph_failure_becomes_a_drop_and_a_clean_rebuild(seq):
    fusion, rest = initialised(seq)
    before = fusion.estimate()

    class FailingSmoother:
        """Delegates to the real smoother but fails its next update like GTSAM does."""

        def __init__(self, real):
            self.real = real

        def __getattr__(self, name):
            return getattr(self.real, name)

        def update(self, *args, **kwargs):
            raise RuntimeError("Indeterminant linear system detected while working near variable x7")

    fusion._graph.smoother = FailingSmoother(fusion._graph.smoother)
    r = fusion.add_absolute(*next_abs(rest)[:4])
    assert r.status == "dropped" and "optimiser failure" in r.reason
    assert fusion.counters["graph_failures"] == 1
    est = assert_finite_estimate(fusion)
    np.testing.assert_allclose(est.t, before.t, atol=0.5)
    assert not isinstance(fusion._graph.smoother, FailingSmoother)   # rebuilt with a fresh one
    run_events(fusion, rest)
    est = assert_finite_estimate(fusion)
    tt, _ = seq.truth.pose([est.stamp])
    assert np.linalg.norm(est.t - tt[0]) < 0.3
    assert fusion.counters["errors"] == 0


def test_reset_and_estimate_before_initialisation(seq):
    fusion = make_fusion()
    assert fusion.estimate() is None
    fusion, _ = initialised(seq)
    fusion.reset()
    assert fusion.estimate() is None and fusion.counters["resets"] == 1


def test_initial_pose_without_stamp_uses_the_newest(seq):
    fusion, _ = initialised(seq)
    newest = fusion.estimate().stamp
    r = fusion.set_initial_pose(0.0, [1.0, 2.0, 0.0], [1, 0, 0, 0], np.eye(6) * 0.1)
    assert r.status == "accepted"
    est = assert_finite_estimate(fusion)
    assert est.graph_stamp == pytest.approx(newest, abs=0.01)


def test_a_network_pose_stamped_like_the_newest_message_is_fused_after_an_unstamped_initial_pose(seq):
    """rviz's unstamped initial pose goes just before "now"; the next camera frame, often
    stamped like the newest odometry, must not be dropped as a duplicate of it."""
    fusion, rest = initialised(seq)
    event = next(e for e in rest if e[2] == "abs")
    run_events(fusion, [e for e in rest if e[0] < event[0]])
    fusion.add_absolute(*event[3][:4])  # the newest stamp is now this frame's
    t_true, q_true = seq.truth.pose([event[0]])
    r = fusion.set_initial_pose(0.0, t_true[0], q_true[0], np.eye(6) * 0.01)
    assert r.status == "accepted" and r.stamp < event[0]
    again = fusion.add_absolute(*event[3][:4])  # same stamp as the newest message
    assert again.status == "accepted", again.reason


_finite = st.floats(-1e3, 1e3, allow_nan=False)
_any = st.one_of(st.floats(allow_nan=True, allow_infinity=True), _finite)


@st.composite
def operation(draw):
    kind = draw(st.sampled_from(["abs", "odom", "imu", "init", "reset", "est"]))
    stamp = draw(st.one_of(st.floats(0.0, 30.0), st.just(math.nan), st.just(-5.0)))
    vec3 = draw(st.lists(_any if draw(st.booleans()) else _finite, min_size=3, max_size=3))
    quat = draw(st.lists(_finite, min_size=4, max_size=4))
    diag = draw(st.lists(st.floats(-1.0, 10.0), min_size=6, max_size=6))
    return kind, stamp, vec3, quat, np.diag(diag)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operation(), min_size=5, max_size=40), st.sampled_from([
    dict(use_odom=True), dict(use_odom=False), dict(use_odom=True, use_imu=True),
    dict(use_odom=False, use_imu=True, imu_mode="gyro")]))
def test_fuzz_never_raises_and_never_outputs_nan(ops, mode):
    fusion = make_fusion(init_consistent=1, **mode)
    for kind, stamp, vec3, quat, cov in ops:
        if kind == "abs":
            r = fusion.add_absolute(stamp, vec3, quat, cov)
            assert r.status in ("accepted", "rejected", "dropped", "initialising")
        elif kind == "odom":
            fusion.add_odometry(stamp, vec3, quat, cov)
        elif kind == "imu":
            fusion.add_imu(stamp, vec3, [0.0, 0.0, 9.81])
        elif kind == "init":
            fusion.set_initial_pose(stamp, vec3, quat, cov)
        elif kind == "reset":
            fusion.reset()
        est = fusion.estimate()
        if est is not None:
            assert np.all(np.isfinite(est.t)) and np.all(np.isfinite(est.cov_ros))
            assert np.all(np.isfinite(est.q)) and abs(np.linalg.norm(est.q) - 1) < 1e-6
