"""pipeline.py: the decisions the nodes and the replay share, tested without ROS with
rosbags messages: which frame is processed, what is dropped, stamps and frames of the
outputs, the camera -> base conversion (with its covariance) and the map -> odom TF."""
from __future__ import annotations

import ast
import math
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from vizloc_ros import geometry
from vizloc_ros.fusion import FusionConfig
from vizloc_ros.ros_io import messages
from vizloc_ros.pipeline.diagnostics import RateMeter, diagnostics_summary
from vizloc_ros.pipeline.drops import Drop, DropReason
from vizloc_ros.pipeline.fusion_core import FusionCore, FusionSettings, FusionStep
from vizloc_ros.pipeline.outputs import PATH_GROWTH, PATH_PERIOD_S, FusionMessages, OutputTopics, PathMirror, regressor_messages
from vizloc_ros.pipeline.regressor import OdometryPose, RegressorCore, StampRateLimiter, camera_to_base
from vizloc_ros.pipeline.worker import LatestFrameSlot

T = messages.rosbags_types()
EPOCH_NS = 1_700_000_000_000_000_000
ODD_NS = 123_456_789  # stamps with nanoseconds a float64 of seconds cannot hold exactly


def yaw_quat(angle):
    return np.array([math.cos(angle / 2), 0.0, 0.0, math.sin(angle / 2)])


def random_pose(rng):
    q = geometry.quat_hemisphere(geometry.quat_normalize(rng.normal(size=4)))
    return rng.normal(size=3), q


def random_spd(rng, scale=0.01):
    a = rng.normal(size=(6, 6)) * math.sqrt(scale)
    return a @ a.T + np.eye(6) * 1e-4


# --------------------------------------------------------------------------- latest frame

def test_ten_puts_then_one_take_gives_the_newest_and_counts_nine_drops():
    slot = LatestFrameSlot()
    replaced = [slot.put(i) for i in range(10)]
    assert replaced == [False] + [True] * 9
    assert slot.take(timeout=0.01) == 9
    assert (slot.received, slot.dropped) == (10, 9)
    assert slot.take(timeout=0.01) is None  # nothing left: the old frames are gone


def test_close_wakes_a_waiting_worker():
    slot = LatestFrameSlot()
    got = []
    worker = threading.Thread(target=lambda: got.append(slot.take()))
    worker.start()
    time.sleep(0.02)  # usually waiting by now; if not, take() on a closed slot returns at once
    slot.close()
    worker.join(timeout=60.0)  # a hang fails; a loaded machine only makes it slower
    assert not worker.is_alive() and got == [None]


def test_slow_worker_only_ever_sees_newer_frames():
    """A producer much faster than the worker: no queue builds, frames arrive in order,
    the last frame is processed, and processed + dropped = received.

    "Much faster" is arranged, not timed: the worker's "network" holds each frame until
    the producer has put ten more (or all), so drops happen whatever the machine's load.
    """
    slot = LatestFrameSlot()
    n = 300
    seen = []
    produced = threading.Condition()
    put_count = [0]

    def work():
        while True:
            item = slot.take(timeout=60.0)  # returns at once when a frame is there
            if item is None:
                return
            seen.append(item)
            with produced:  # the "network": busy while ten newer frames arrive
                produced.wait_for(lambda: put_count[0] >= min(item + 11, n), timeout=60.0)
            if item == n - 1:
                return

    worker = threading.Thread(target=work)
    worker.start()
    for i in range(n):
        slot.put(i)
        with produced:
            put_count[0] = i + 1
            produced.notify_all()
    worker.join(timeout=60.0)
    assert not worker.is_alive()
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    assert seen[-1] == n - 1
    assert len(seen) + slot.dropped == slot.received == n
    assert slot.dropped >= n // 2  # at most one frame in eleven could be taken


# --------------------------------------------------------------------------- rate limit

def test_rate_limiter_uses_message_time():
    limiter = StampRateLimiter(10.0)
    stamps = 100.0 + np.arange(40) * 0.025  # 40 Hz for one second
    accepted = [s for s in stamps if limiter.accept(s)]
    assert len(accepted) == 10
    assert np.allclose(np.diff(accepted), 0.1)


def test_rate_limiter_zero_accepts_all_and_a_jump_back_restarts():
    assert all(StampRateLimiter(0.0).accept(s) for s in [1.0, 1.0, 1.001])
    limiter = StampRateLimiter(1.0)
    assert limiter.accept(50.0) and not limiter.accept(50.5)
    assert limiter.accept(10.0)  # a bag loop: accepted at once, not after 40 s


@pytest.mark.parametrize("rate", [-1.0, float("nan"), float("inf")])
def test_rate_limiter_refuses_bad_rates(rate):
    with pytest.raises(ValueError, match="max_rate"):
        StampRateLimiter(rate)


# --------------------------------------------------------------------------- regressor

class FakeEstimator:
    """Stands in for PoseEstimator: a fixed camera pose, records the images it got."""

    def __init__(self, t=(1.0, 2.0, 0.5), q=None, cov=None, fail=None):
        self.t = np.asarray(t, float)
        self.q = yaw_quat(0.3) if q is None else np.asarray(q, float)
        self.cov = np.diag([0.04, 0.04, 0.04, 0.01, 0.01, 0.01]) if cov is None else cov
        self.fail = fail
        self.calls = []

    def estimate_batch(self, images):
        self.calls.append([img.shape for img in images])
        if self.fail is not None:
            raise self.fail
        return [SimpleNamespace(t=self.t, q=self.q, cov=self.cov, latency_s=0.01) for _ in images]


def image_msg(ns, frame="camera_optical_frame", shape=(24, 32), encoding="rgb8"):
    rgb = np.random.default_rng(ns % 97).integers(0, 255, size=(*shape, 3), dtype=np.uint8)
    return messages.make_image(T, messages.time_from_ns(T, ns), frame, rgb, encoding)


BASE_T_CAMERA = (np.array([0.1, 0.0, 0.2]), np.array([0.5, -0.5, 0.5, -0.5]))


def test_regressor_output_carries_the_image_stamp_exactly_and_the_map_frame():
    core = RegressorCore(FakeEstimator(), base_T_camera=BASE_T_CAMERA, map_frame="world")
    ns = EPOCH_NS + ODD_NS
    pose = core.process(image_msg(ns)).pose
    assert pose.stamp_ns == ns and pose.frame_id == "world"
    assert messages.stamp_to_ns(messages.make_pose_with_covariance_stamped(
        T, messages.time_from_ns(T, pose.stamp_ns), pose.frame_id, pose.t, pose.q, pose.cov).header.stamp) == ns
    expected_t, expected_q = geometry.pose_compose(core.estimator.t, core.estimator.q,
                                                   *geometry.pose_inverse(*BASE_T_CAMERA))
    assert np.allclose(pose.t, expected_t) and np.allclose(pose.q, expected_q)
    assert np.allclose(pose.t_cam, core.estimator.t)  # the camera pose is kept too
    assert core.counters["published"] == 1


def test_regressor_drops_bad_images_and_counts_them():
    est = FakeEstimator()
    core = RegressorCore(est, base_T_camera=BASE_T_CAMERA)
    good = image_msg(EPOCH_NS + 1)
    depth = messages.make_image(T, messages.time_from_ns(T, EPOCH_NS + 2), "cam",
                                np.ones((24, 32), np.uint16), "16UC1")
    truncated = image_msg(EPOCH_NS + 3)
    truncated.data = truncated.data[:-5]
    unstamped = image_msg(EPOCH_NS + 4)
    unstamped.header.stamp = T.Time(sec=0, nanosec=0)
    corrupt = T.CompressedImage(header=messages.make_header(T, messages.time_from_ns(T, EPOCH_NS + 5), "cam"),
                                format="jpeg", data=T.byte_array(b"\xff\xd8 not a jpeg"))
    out = core.process_batch([good, depth, truncated, unstamped, corrupt])
    assert out[0].pose is not None and out[0].drop is None
    assert [r.pose for r in out[1:]] == [None] * 4
    assert [r.drop.reason for r in out[1:]] == [DropReason.INVALID_IMAGE] * 4
    assert "16UC1" in out[1].drop.detail and "corrupt CompressedImage" in out[4].drop.detail
    # the counters are the drops', under the reason's name
    assert core.counters["dropped_invalid_image"] == 4 and core.counters["published"] == 1
    assert core.last_drop == out[4].drop
    assert est.calls == [[(24, 32, 3)]]  # bad images never reach the network


def test_an_image_above_max_image_pixels_is_a_counted_drop_of_its_own_kind():
    est = FakeEstimator()
    core = RegressorCore(est, max_image_pixels=24 * 32)
    large = image_msg(EPOCH_NS + 1, shape=(25, 32))
    compressed = messages.make_compressed_image(T, messages.time_from_ns(T, EPOCH_NS + 2), "cam",
                                                np.zeros((48, 64, 3), np.uint8), "png")
    out = core.process_batch([large, compressed, image_msg(EPOCH_NS + 3)])
    assert [r.drop.reason for r in out[:2]] == [DropReason.IMAGE_TOO_LARGE] * 2
    assert "32x25 = 800 pixels exceeds max_image_pixels = 768" in out[0].drop.detail
    assert out[2].pose is not None and est.calls == [[(24, 32, 3)]]  # the next frame runs
    assert core.counters["dropped_image_too_large"] == 2 and core.counters["dropped_invalid_image"] == 0
    assert RegressorCore(FakeEstimator()).max_image_pixels == messages.DEFAULT_MAX_IMAGE_PIXELS
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="max_image_pixels"):
            RegressorCore(FakeEstimator(), max_image_pixels=bad)


def test_regressor_decodes_compressed_images():
    rgb = np.full((24, 32, 3), 128, np.uint8)
    msg = messages.make_compressed_image(T, messages.time_from_ns(T, EPOCH_NS + ODD_NS), "cam", rgb, "png")
    est = FakeEstimator()
    pose = RegressorCore(est).process(msg).pose
    assert pose is not None and pose.stamp_ns == EPOCH_NS + ODD_NS and est.calls == [[(24, 32, 3)]]


def test_regressor_estimator_failures_and_non_finite_poses_are_drops():
    core = RegressorCore(FakeEstimator(fail=ValueError("image smaller than the crop")))
    result = core.process(image_msg(EPOCH_NS + 1))
    assert result.pose is None and result.drop == Drop(DropReason.ESTIMATOR, "image smaller than the crop")
    assert core.counters["dropped_estimator"] == 1
    core = RegressorCore(FakeEstimator(t=(np.nan, 0.0, 0.0)))
    result = core.process(image_msg(EPOCH_NS + 1))
    assert result.pose is None and result.drop.reason is DropReason.NON_FINITE
    assert core.counters["dropped_non_finite"] == 1


def test_regressor_rate_limit_and_unknown_extrinsic():
    core = RegressorCore(FakeEstimator(), max_rate=10.0)
    out = [core.process(image_msg(EPOCH_NS + i * 20_000_000)) for i in range(10)]  # 50 Hz
    assert sum(o.pose is not None for o in out) == 2
    # max_rate at work is counted, not reported as a drop (the node warns about drops)
    assert sum(o.skipped for o in out) == 8 and all(o.drop is None for o in out)
    assert core.counters["skipped_rate"] == 8 and core.counters["dropped_rate"] == 0
    # no extrinsic: the camera pose is published as the base pose
    assert np.allclose(out[0].pose.t, core.estimator.t)
    core.set_extrinsic(*BASE_T_CAMERA)
    assert not np.allclose(core.process(image_msg(EPOCH_NS + 10**9)).pose.t, core.estimator.t)


def test_camera_to_base_pose_matches_pose_compose():
    rng = np.random.default_rng(1)
    for _ in range(20):
        t_cam, q_cam = random_pose(rng)
        extrinsic = random_pose(rng)
        t, q, _ = camera_to_base(t_cam, q_cam, np.eye(6), extrinsic)
        t_ref, q_ref = geometry.pose_compose(t_cam, q_cam, *geometry.pose_inverse(*extrinsic))
        assert np.allclose(t, t_ref) and np.allclose(q, q_ref)


def test_camera_to_base_covariance_matches_finite_differences():
    """Perturb the camera pose on the left in map axes (the covariance convention), see
    how the base pose moves, and compare J cov J^T with the propagated covariance."""
    rng = np.random.default_rng(2)
    t_cam, q_cam = random_pose(rng)
    extrinsic = (np.array([0.3, -0.2, 0.5]), geometry.quat_normalize(rng.normal(size=4)))
    t0, q0, _ = camera_to_base(t_cam, q_cam, np.eye(6), extrinsic)
    R0 = geometry.quat_to_matrix(q0)
    eps = 1e-6
    J = np.zeros((6, 6))
    for k in range(6):
        d = np.zeros(6)
        d[k] = eps
        t_p = t_cam + d[:3]
        q_p = geometry.matrix_to_quat(geometry.so3_exp(d[3:]) @ geometry.quat_to_matrix(q_cam))
        t1, q1, _ = camera_to_base(t_p, q_p, np.eye(6), extrinsic)
        J[:3, k] = (t1 - t0) / eps
        J[3:, k] = geometry.so3_log(geometry.quat_to_matrix(q1) @ R0.T) / eps
    cov_cam = random_spd(rng)
    _, _, cov_base = camera_to_base(t_cam, q_cam, cov_cam, extrinsic)
    assert np.allclose(cov_base, J @ cov_cam @ J.T, atol=1e-6, rtol=1e-4)
    assert np.allclose(cov_base, cov_base.T)
    # a lever arm adds translation uncertainty from the rotation uncertainty
    assert np.trace(cov_base[:3, :3]) > np.trace(cov_cam[:3, :3]) - 1e-12


# --------------------------------------------------------------------------- fusion

MAP_T_ODOM = (np.array([2.0, -1.0, 0.0]), yaw_quat(0.4))
COV_ABS = np.diag([0.02 ** 2] * 3 + [0.01 ** 2] * 3)
COV_ODOM = np.diag([1e-4] * 6)


def trajectory(i, dt=1 / 30):
    """odom_T_base at step i: a gentle arc."""
    s = i * dt
    return np.array([0.5 * s, 0.1 * s * s, 0.0]), yaw_quat(0.2 * s)


def stamp_ns(i, dt_ns=33_333_333):
    return EPOCH_NS + ODD_NS + i * dt_ns


def odom_msg(i, frame="odom"):
    t, q = trajectory(i)
    return messages.make_odometry(T, messages.time_from_ns(T, stamp_ns(i)), frame, "base_link", t, q, COV_ODOM)


def absolute_msg(i, frame="map", cov=COV_ABS):
    t, q = geometry.pose_compose(*MAP_T_ODOM, *trajectory(i))
    return messages.make_pose_with_covariance_stamped(T, messages.time_from_ns(T, stamp_ns(i)), frame, t, q, cov)


def run_fusion(core, steps, abs_every=3, start=0):
    outputs = []
    for i in range(start, start + steps):
        if core.settings.use_odom:
            outputs.append((i, "odom", core.on_odometry(odom_msg(i)).output))
        if i % abs_every == 0:
            outputs.append((i, "abs", core.on_absolute(absolute_msg(i)).output))
    return outputs


@pytest.fixture(scope="module")
def fused():
    core = FusionCore(settings=FusionSettings(transform_tolerance=0.25))
    return core, run_fusion(core, 60)


def test_map_to_odom_is_map_T_base_times_inverse_odom_T_base(fused):
    core, outputs = fused
    odom_outputs = [(i, o) for i, kind, o in outputs if kind == "odom" and o is not None]
    assert len(odom_outputs) > 30
    for i, out in odom_outputs[-10:]:
        tr = out.transform
        assert (tr.parent, tr.child) == ("map", "odom")
        t_ref, q_ref = geometry.pose_compose(out.t, out.q, *geometry.pose_inverse(*trajectory(i)))
        assert np.allclose(tr.t, t_ref, atol=1e-6)
        assert geometry.rotation_angle(tr.q, q_ref) < 1e-6
        # and it recovers the true offset of the odometry frame
        assert np.allclose(tr.t, MAP_T_ODOM[0], atol=0.05)


def test_outputs_and_tf_carry_exact_stamps_plus_tolerance(fused):
    _, outputs = fused
    for i, kind, out in outputs[-20:]:
        if out is None:
            continue
        assert out.stamp_ns == stamp_ns(i) and out.frame_id == "map"
        assert out.transform.stamp_ns == stamp_ns(i) + 250_000_000
        msg = messages.make_transform_stamped(T, messages.time_from_ns(T, out.transform.stamp_ns),
                                              out.transform.parent, out.transform.child,
                                              out.transform.t, out.transform.q)
        assert messages.stamp_to_ns(msg.header.stamp) == stamp_ns(i) + 250_000_000
        assert np.all(np.isfinite(out.cov)) and np.allclose(out.cov, out.cov.T)


def test_path_grows_with_outputs(fused):
    core, outputs = fused
    stamps, ts, qs = core.path_arrays()
    assert len(stamps) == sum(o is not None and o.path_appended for _, _, o in outputs)
    assert np.all(np.diff(stamps) > 0) and ts.shape == (len(stamps), 3) and qs.shape == (len(stamps), 4)
    messages.make_path(T, stamps[-1], "map", ts, qs, stamps)  # publishable


def test_wrong_frame_and_nan_covariance_are_dropped_without_exception():
    core = FusionCore()
    step = core.on_absolute(absolute_msg(0, frame="odom"))
    assert step.output is None and step.drop.reason is DropReason.ABSOLUTE_INVALID
    assert core.counters["dropped_absolute_invalid"] == 1 and "'odom'" in step.drop.detail
    bad = absolute_msg(1)
    bad.pose.covariance = np.full(36, np.nan)  # the builders refuse NaN; a driver may not
    assert core.on_absolute(bad).drop.reason is DropReason.ABSOLUTE_INVALID
    bad = absolute_msg(2)
    bad.pose.pose.position.x = float("nan")
    assert core.on_absolute(bad).drop.reason is DropReason.ABSOLUTE_INVALID
    assert core.counters["dropped_absolute_invalid"] == 3
    odom = odom_msg(3)
    odom.pose.covariance = np.full(36, np.inf)
    step = core.on_odometry(odom)
    assert step.output is None and step.drop.reason is DropReason.ODOM_INVALID
    assert core.counters["dropped_odom_invalid"] == 1
    assert core.fusion.initialised is False


def test_without_odometry_tf_is_map_to_base_link():
    core = FusionCore(settings=FusionSettings(use_odom=False))
    outs = [o for _, _, o in run_fusion(core, 40, abs_every=2) if o is not None]
    assert outs
    for out in outs:
        assert (out.transform.parent, out.transform.child) == ("map", "base_link")
        assert np.allclose(out.transform.t, out.t) and np.allclose(out.transform.q, out.q)
    assert core.on_odometry(odom_msg(41)) == FusionStep()  # not used, not a drop either


def test_publish_tf_false_gives_no_transform():
    core = FusionCore(settings=FusionSettings(publish_tf=False, use_odom=False))
    outs = [o for _, _, o in run_fusion(core, 20, abs_every=2) if o is not None]
    assert outs and all(o.transform is None for o in outs)


def test_reset_clears_the_path_and_the_fusion():
    core = FusionCore(settings=FusionSettings(use_odom=False))
    run_fusion(core, 20, abs_every=2)
    assert len(core.path) > 0 and core.fusion.initialised
    core.reset()
    assert len(core.path) == 0 and not core.fusion.initialised
    assert len(core.path_arrays()[0]) == 0 and core.counters["resets"] == 1


def test_a_bag_loop_restarts_the_path():
    """The fusion resets on a jump back in time; the path must follow, or it would never
    grow again (an entry is appended only after the newest stamp)."""
    core = FusionCore()
    run_fusion(core, 45)
    first = len(core.path)
    assert first > 10
    outs = run_fusion(core, 45)  # the same stamps again: the bag looped
    assert core.counters["clock_jumps"] == 1  # counted once, for /diagnostics
    assert sum(o is not None and o.path_appended for _, _, o in outs) > 10
    stamps = core.path_arrays()[0]
    assert np.all(np.diff(stamps) > 0) and stamps[-1] == pytest.approx(stamp_ns(44) * 1e-9)


def test_initial_pose_resets_there_and_zero_stamp_means_now():
    core = FusionCore(settings=FusionSettings(use_odom=False))
    run_fusion(core, 20, abs_every=2)
    msg = messages.make_pose_with_covariance_stamped(T, messages.time_from_ns(T, 1), "map",
                                                     [5.0, 5.0, 0.0], yaw_quat(1.0), np.eye(6) * 0.01)
    msg.header.stamp = T.Time(sec=0, nanosec=0)  # `ros2 topic pub /initialpose ...`
    out = core.on_initial_pose(msg).output
    assert out is not None and np.allclose(out.t, [5.0, 5.0, 0.0])
    # "now": 2 ms before the newest stamp the fusion had seen (a frame at that stamp can follow)
    assert out.stamp_ns == pytest.approx(stamp_ns(18) - 2_000_000, abs=1000)
    assert len(core.path) == 1
    wrong = messages.make_pose_with_covariance_stamped(T, 1.0, "odom", [0, 0, 0], [1, 0, 0, 0], np.eye(6))
    assert core.on_initial_pose(wrong).drop.reason is DropReason.INITIALPOSE_INVALID
    assert core.counters["dropped_initialpose_invalid"] == 1
    run_fusion(core, 20, abs_every=2)
    before = len(core.path)
    bad_cov = messages.make_pose_with_covariance_stamped(T, messages.time_from_ns(T, stamp_ns(19)), "map",
                                                         [0, 0, 0], [1, 0, 0, 0], np.zeros((6, 6)))
    step = core.on_initial_pose(bad_cov)  # refused by the fusion: it goes on, and so does its path
    assert step.drop.reason is DropReason.INITIALPOSE_DROPPED and step.output is None
    assert len(core.path) == before > 1 and core.fusion.initialised


# --------------------------------------------------------------------------- diagnostics

def test_diagnostics_summary_and_rate_meter():
    meter = RateMeter(window=2.0)
    for k in range(20):
        meter.tick(now=100.0 + k * 0.1)
    assert meter.rate(now=101.9) == pytest.approx(10.0)
    assert meter.rate(now=200.0) == 0.0
    summary = diagnostics_summary({"published": 3, "dropped_rate": 1}, latency_s=0.0123, rate_hz=15.0)
    assert summary == {"dropped_rate": "1", "published": "3", "latency_ms": "12.3", "input_rate_hz": "15.0"}


def test_odometry_in_other_frames_is_fused_counted_and_said_once(caplog):
    core = FusionCore(settings=FusionSettings())
    with caplog.at_level("WARNING", logger="vizloc_ros.pipeline"):
        for i in range(12):
            core.on_odometry(odom_msg(i, frame="odom_combined"))
            if i % 3 == 0:
                core.on_absolute(absolute_msg(i))
    assert core.counters["odom_frame_mismatch"] == 12
    assert core.counters["odom_accepted"] > 0  # the motion itself is still used
    warnings = [r for r in caplog.records if "odom_combined" in r.getMessage()]
    assert len(warnings) == 1 and "set odom_frame" in warnings[0].getMessage()
    fused_ok = FusionCore(settings=FusionSettings())
    run_fusion(fused_ok, 6)
    assert fused_ok.counters["odom_frame_mismatch"] == 0


def test_path_mirror_converts_each_pose_once_and_rebuilds_after_the_core_clears_its_path():
    core = FusionCore()
    mirror = PathMirror(core, messages.rosbags_types())
    q = np.array([1.0, 0.0, 0.0, 0.0])
    for k in range(3):
        core.path.append((10.0 + k, np.array([k, 0.0, 0.0]), q))
        mirror.sync()
    first = mirror.poses[0][1]
    core.path.append((13.0, np.array([3.0, 0.0, 0.0]), q))
    mirror.sync()
    assert mirror.poses[0][1] is first  # not converted again
    msg = mirror.message()
    assert [p.pose.position.x for p in msg.poses] == [0.0, 1.0, 2.0, 3.0]
    assert msg.header.frame_id == "map" and msg.header.stamp.sec == 13
    core.path.clear()  # a reset, then a new path
    core.path.append((20.0, np.array([7.0, 0.0, 0.0]), q))
    mirror.sync()
    assert [p.pose.position.x for p in mirror.message().poses] == [7.0]
    core.path.clear()
    mirror.sync()
    assert mirror.newest_stamp is None and mirror.message(messages.time_from_ns(
        messages.rosbags_types(), 5)).poses == []


def test_coarse_pose_messages_initialise_the_fusion_and_bad_ones_are_counted_drops():
    core = FusionCore(settings=FusionSettings(use_odom=False))
    cov = np.diag([0.3, 0.3, 0.3, 0.05, 0.05, 0.05]) ** 2
    q = np.array([1.0, 0.0, 0.0, 0.0])
    outputs = []
    for k in range(8):
        msg = messages.make_pose_with_covariance_stamped(T, 100.0 + 0.1 * k, "map", np.array([1.0, 2.0, 0.0]),
                                                         q, cov)
        outputs.append(core.on_coarse_pose(msg))
    assert core.fusion.initialised
    assert any(o.output is not None for o in outputs)
    assert all(o.drop is None for o in outputs)
    assert core.counters["coarse_received"] == 8
    # once running, an agreeing coarse pose is neither fused nor a "drop" to warn about
    assert core.counters["coarse_agreed"] >= 1 and core.counters["coarse_dropped"] == 0
    wrong = messages.make_pose_with_covariance_stamped(T, 101.0, "odom", np.zeros(3), q, cov)
    assert core.on_coarse_pose(wrong).drop.reason is DropReason.COARSE_INVALID
    assert core.counters["dropped_coarse_invalid"] == 1


# --------------------------------------------------------------------------- drops as data

def test_drop_reasons_are_typed_and_the_drop_counters_are_derived_from_them():
    counters = [r.counter for r in DropReason]
    assert len(set(counters)) == len(counters)  # one counter per reason
    assert DropReason.refused("absolute", "rejected") is DropReason.ABSOLUTE_REJECTED
    assert DropReason.refused("odom", "dropped").counter == "odom_dropped"
    core = FusionCore()
    steps = [core.on_absolute(absolute_msg(0, frame="odom"))]
    steps += [core.on_odometry(odom_msg(i)) for i in (1, 1)]  # the same stamp twice: dropped
    steps += [step for _, _, step in run_fusion_steps(core, 30)]
    far = absolute_msg(31)
    far.pose.pose.position.x += 50.0  # an outlier once running
    steps.append(core.on_absolute(far))
    drops = [s.drop for s in steps if s.drop is not None]
    assert all(isinstance(d, Drop) and isinstance(d.reason, DropReason) and d.detail for d in drops)
    reasons = {d.reason for d in drops}
    assert {DropReason.ABSOLUTE_INVALID, DropReason.ODOM_DROPPED, DropReason.ABSOLUTE_REJECTED} <= reasons
    assert all(s.output is None for s in steps if s.drop is not None)
    # every drop counter of the core is exactly the count of the drops it returned
    from_drops = Counter(d.reason.counter for d in drops)
    assert {k: v for k, v in core.counters.items() if k in counters} == dict(from_drops)
    assert core.last_drop == drops[-1]


def run_fusion_steps(core, steps, start=1):
    out = []
    for i in range(start, start + steps):
        out.append((i, "odom", core.on_odometry(odom_msg(i))))
        if i % 3 == 0:
            out.append((i, "abs", core.on_absolute(absolute_msg(i))))
    return out


def test_a_drop_the_node_saw_is_counted_like_the_cores_own():
    core = RegressorCore(FakeEstimator())
    core.record_drop(Drop(DropReason.ERROR, "RuntimeError: boom"))
    assert core.counters["dropped_error"] == 1 and core.last_drop.detail == "RuntimeError: boom"


# --------------------------------------------------------------------------- use_odom

def test_the_fusion_core_copies_the_callers_config_and_use_odom_comes_from_its_settings():
    config = FusionConfig(window_size=7)
    core = FusionCore(config, FusionSettings(use_odom=False, use_imu=True))
    assert config.use_odom is True and config.use_imu is False  # never changed
    assert core.config is not config and core.config.window_size == 7
    assert (core.config.use_odom, core.config.use_imu) == (False, True)
    assert core.fusion.config is core.config
    assert FusionCore({"use_odom": False}, FusionSettings(use_odom=True)).fusion.config.use_odom is True


# --------------------------------------------------------------------------- one output path

def test_fusion_messages_throttle_the_path_by_message_time():
    core = FusionCore(settings=FusionSettings(use_odom=False))
    outputs = FusionMessages(core, T)
    published = []  # (step, topics), each output turned into messages as it comes
    for i in range(120):  # 4 s at 30 Hz
        out = core.on_absolute(absolute_msg(i)).output
        if out is not None:
            published.append((i, [topic for topic, _ in outputs.of(out)]))
    assert all(topics[:2] == ["/vizloc/pose", "/tf"] for _, topics in published)
    path_at = [stamp_ns(i) * 1e-9 for i, topics in published if "/vizloc/path" in topics]
    assert len(path_at) >= 2 and np.all(np.diff(path_at) >= PATH_PERIOD_S - 1e-9)
    assert len(path_at) < len(published) / 2
    topic, msg = outputs.path_now()  # whatever the throttle says
    assert topic == "/vizloc/path" and len(msg.poses) == len(core.path)
    # a jump back in time (a looping bag) publishes the restarted path at once
    steps = (core.on_absolute(absolute_msg(i)) for i in range(8))
    items = [outputs.of(step.output) for step in steps if step.output is not None]
    assert "/vizloc/path" in [topic for topic, _ in items[0]]


def test_a_long_path_is_sent_after_it_grew_and_keeps_updating_at_its_cap():
    """Each /vizloc/path carries the whole path: sent every period, the bytes would grow with
    the square of the run. After PATH_GROWTH new poses it is sent again, also at the cap."""
    core = FusionCore(settings=FusionSettings(use_odom=False, path_max_length=1000))
    outputs = FusionMessages(core, T)
    sent = []  # (step, poses in the path sent)
    for i in range(3000):  # 100 s at 30 Hz
        out = core.on_absolute(absolute_msg(i)).output
        if out is not None:
            sent += [(i, len(msg.poses)) for topic, msg in outputs.of(out) if topic == "/vizloc/path"]
    steps = [i for i, _ in sent]
    lengths = [n for _, n in sent]
    assert lengths[-1] == 1000 and steps[-1] > 3000 - 2 * PATH_GROWTH * 1000  # updating at the cap
    gaps = np.diff(steps)
    assert np.all(gaps >= 15)                                # never more often than 0.5 s (15 frames)
    assert np.all(gaps[-10:] == PATH_GROWTH * 1000)          # at the cap: after 50 new poses
    assert len(sent) < 100                                   # every period would be 200
    assert sum(lengths) < 40 * 3000                          # every period: ~150,000 poses


def test_regressor_messages_put_the_visual_odometry_before_the_pose():
    pose = RegressorCore(FakeEstimator()).process(image_msg(EPOCH_NS + ODD_NS)).pose
    assert [topic for topic, _ in regressor_messages(T, pose, OutputTopics())] == ["/vizloc/absolute_pose"]
    pose.odometry = OdometryPose(stamp=pose.stamp, stamp_ns=pose.stamp_ns, frame_id="odom",
                                 child_frame_id="base_link", t=np.zeros(3), q=np.array([1.0, 0, 0, 0]),
                                 cov=np.eye(6) * 1e-3)
    items = regressor_messages(T, pose, OutputTopics(visual_odometry="/vo"), odometry_tf=False)
    assert [topic for topic, _ in items] == ["/vo", "/vizloc/absolute_pose"]
    assert all(messages.stamp_to_ns(msg.header.stamp) == EPOCH_NS + ODD_NS for _, msg in items)
    with_tf = regressor_messages(T, pose, OutputTopics())
    assert [topic for topic, _ in with_tf] == ["/vizloc/visual_odometry", "/tf", "/vizloc/absolute_pose"]


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["nodes/fusion_node.py", "nodes/regressor_node.py",
                                    "replay/fusion_side.py", "replay/cli.py"])
def test_nodes_and_replay_build_no_output_message_themselves(module):
    """The nodes publish and the replay writes what pipeline.outputs builds: none of them
    calls a message builder of its own (the output path exists once)."""
    tree = ast.parse((ROOT / "vizloc_ros" / module).read_text())
    builders = {"make_pose_with_covariance_stamped", "make_odometry", "make_tf_message",
                "make_transform_stamped", "make_path", "make_pose_stamped"}
    called = {node.func.attr for node in ast.walk(tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    assert not called & builders
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module == "vizloc_ros.pipeline.outputs" for alias in node.names}
    if module != "replay/cli.py":  # the regressor side hands its poses to fusion_side.py
        assert imported & {"FusionMessages", "regressor_messages", "absolute_pose_messages"}
