"""Fault cases of issue #10 that reach the running pipeline: bad images and bad messages.

They go through the ROS-free cores the nodes run (RegressorCore, FusionCore) with
rosbags messages. Each case states its expected behaviour: a counted drop (never an
exception out of the core), or a clean reset, and never a NaN in what would be
published.
"""
from dataclasses import replace

import numpy as np
import pytest
import torch

from vizloc_ros import messages
from vizloc_ros.estimator import PoseEstimator
from vizloc_ros.models import build_model, save_checkpoint
from vizloc_ros.pipeline import FusionCore, FusionSettings, RegressorCore

TYPES = messages.rosbags_types()
T0 = 1_700_000_000.0


@pytest.fixture(scope="module")
def regressor(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("posenet_resnet18", feat_dim=32)
    path = tmp_path_factory.mktemp("w") / "tiny"
    save_checkpoint(path, model.eval(), {"input": {"resize": 48, "crop": [48, 64]}})
    return PoseEstimator(path, device="cpu", cpu_threads=1)


def _good_image(stamp, h=60, w=80, value=None):
    rng = np.random.default_rng(int(stamp * 10) % 1000)
    data = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if value is None else \
        np.full((h, w, 3), value, np.uint8)
    return messages.make_image(TYPES, stamp, "camera_optical_frame", data)


def _bad_images():
    good = _good_image(T0 + 1)
    data = np.asarray(good.data)
    cases = {
        "empty": replace(good, height=0, width=0, step=0, data=np.zeros(0, np.uint8)),
        "truncated data": replace(good, data=data[: len(data) // 2]),
        "unknown encoding": replace(good, encoding="yuv422_yuy2"),
        "wrong step": replace(good, step=good.step - 7),
        "16-bit image": messages.make_image(TYPES, T0 + 1, "cam", np.zeros((60, 80), np.uint16)),
        "float image": messages.make_image(TYPES, T0 + 1, "cam", np.zeros((60, 80), np.float32)),
        "zero stamp": _good_image(0.0),
        "smaller than the crop": _good_image(T0 + 1, h=20, w=30),
    }
    jpeg = messages.make_compressed_image(TYPES, T0 + 1, "cam", np.zeros((60, 80, 3), np.uint8))
    cases["corrupt JPEG"] = replace(jpeg, data=np.asarray(jpeg.data)[:40])
    return cases


@pytest.mark.parametrize("case", sorted(_bad_images()))
def test_bad_images_are_counted_drops_and_the_next_frame_works(regressor, case):
    core = RegressorCore(regressor)
    assert core.process(_bad_images()[case]) is None  # expected: counted drop, no exception
    assert sum(v for k, v in core.counters.items() if k.startswith("dropped_")) == 1
    assert core.last_error
    pose = core.process(_good_image(T0 + 2))
    assert pose is not None and np.all(np.isfinite(pose.cov))


def test_resolution_changes_and_black_or_saturated_frames_give_finite_poses(regressor):
    core = RegressorCore(regressor)
    frames = [_good_image(T0 + 1), _good_image(T0 + 2, h=120, w=160), _good_image(T0 + 3, value=0),
              _good_image(T0 + 4, value=255), _good_image(T0 + 5, h=48, w=64)]
    poses = [core.process(f) for f in frames]
    assert all(p is not None for p in poses)  # expected: processed, finite
    for p in poses:
        assert np.all(np.isfinite(p.t)) and np.all(np.isfinite(p.q)) and np.all(np.isfinite(p.cov))


def _abs_msg(stamp, t=(1.0, 2.0, 0.0), q=(1.0, 0.0, 0.0, 0.0), cov=None, frame="map"):
    cov = np.diag([0.04] * 3 + [0.003] * 3) if cov is None else cov
    return TYPES.PoseWithCovarianceStamped(
        header=messages.make_header(TYPES, stamp, frame),
        pose=TYPES.PoseWithCovariance(pose=messages.make_pose(TYPES, t, q),
                                      covariance=np.asarray(cov, float).reshape(-1)))


def _odom_msg(stamp, x):
    return messages.make_odometry(TYPES, stamp, "odom", "base_link", (x, 0.0, 0.0), (1.0, 0, 0, 0),
                                  np.diag([1e-4] * 6))


def _core_with_history(n=8):
    core = FusionCore(settings=FusionSettings())
    for k in range(n):
        core.on_odometry(_odom_msg(T0 + 0.1 * k, 0.05 * k))
        core.on_absolute(_abs_msg(T0 + 0.1 * k, t=(1.0 + 0.05 * k, 2.0, 0.0)))
    return core


def _nan_message_field(msg):
    msg.pose.pose.position.x = float("nan")
    return msg


def _zero_quaternion(msg):
    msg.pose.pose.orientation = TYPES.Quaternion(x=0.0, y=0.0, z=0.0, w=0.0)
    return msg


BAD_MESSAGES = {
    "NaN position": lambda: _nan_message_field(_abs_msg(T0 + 1.0)),
    "inf covariance": lambda: _abs_msg(T0 + 1.0, cov=np.full((6, 6), np.inf)),
    "non-positive-definite covariance": lambda: _abs_msg(T0 + 1.0, cov=-np.eye(6)),
    "zero quaternion": lambda: _zero_quaternion(_abs_msg(T0 + 1.0)),
    "frame other than map": lambda: _abs_msg(T0 + 1.0, frame="odom"),
    "zero stamp": lambda: _abs_msg(0.0),
    "duplicate stamp": lambda: _abs_msg(T0 + 0.7, t=(1.35, 2.0, 0.0)),
}


@pytest.mark.parametrize("case", sorted(BAD_MESSAGES))
def test_bad_absolute_messages_never_raise_nor_publish_nan(case):
    core = _core_with_history()
    before = core.fusion.estimate()
    output = core.on_absolute(BAD_MESSAGES[case]())  # expected: drop / reject, no exception
    if output is not None:
        assert np.all(np.isfinite(output.t)) and np.all(np.isfinite(output.cov))
    after = core.fusion.estimate()
    assert after is not None and np.all(np.isfinite(after.t)) and np.all(np.isfinite(after.cov_ros))
    if case != "duplicate stamp":  # a duplicate is a valid re-measurement, not a fault
        assert np.linalg.norm(after.t - before.t) < 0.2


def test_stamps_going_backwards_reset_cleanly_and_recover():
    core = _core_with_history()
    for k in range(12):  # the bag loops: time jumps back by 0.8 s
        core.on_odometry(_odom_msg(T0 + 0.1 * k, 0.05 * k))
        out = core.on_absolute(_abs_msg(T0 + 0.1 * k, t=(1.0 + 0.05 * k, 2.0, 0.0)))
        if out is not None:
            assert np.all(np.isfinite(out.t)) and np.all(np.isfinite(out.cov))
    estimate = core.fusion.estimate()
    assert estimate is not None and np.linalg.norm(estimate.t - np.array([1.55, 2.0, 0.0])) < 0.3


def test_a_gap_longer_than_the_window_and_an_odometry_reset_do_not_break_the_fusion():
    core = _core_with_history()
    later = T0 + 120.0
    for k in range(10):  # odometry restarted from zero after a long gap
        core.on_odometry(_odom_msg(later + 0.1 * k, 0.05 * k))
        out = core.on_absolute(_abs_msg(later + 0.1 * k, t=(3.0 + 0.05 * k, 2.0, 0.0)))
        if out is not None:
            assert np.all(np.isfinite(out.t)) and np.all(np.isfinite(out.cov))
    estimate = core.fusion.estimate()
    assert estimate is not None and np.all(np.isfinite(estimate.cov_ros))
