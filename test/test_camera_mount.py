"""The camera-mount resolver shared by the regressor node, the replay and the training
datasets: override, /tf_static chains, transforms fixed over the first seconds of /tf,
ROS 1 frame names, and a missing path that says how to fix it."""
import threading
import time
from types import SimpleNamespace as NS

import numpy as np
import pytest

from vizloc_ros import geometry
from vizloc_ros.ros_io import camera_mount
from vizloc_ros.ros_io.camera_mount import (FROM_FIXED_TF, FROM_OVERRIDE, FROM_SAME_FRAME, FROM_TF_STATIC,
                                            TF_FIXED_WINDOW_S, CameraMountResolver, resolve_in_bag)

S = 1_000_000_000  # ns per second


def _tf(parent, child, t, q, stamp=0.0):
    sec = int(np.floor(stamp))
    return NS(header=NS(stamp=NS(sec=sec, nanosec=int(round((stamp - sec) * 1e9))), frame_id=parent),
              child_frame_id=child,
              transform=NS(translation=NS(x=t[0], y=t[1], z=t[2]),
                           rotation=NS(w=q[0], x=q[1], y=q[2], z=q[3])))


def _msg(*transforms):
    return NS(transforms=list(transforms))


def _yaw(angle):
    return np.array([np.cos(angle / 2), 0.0, 0.0, np.sin(angle / 2)])


BASE_T_MAST = (np.array([0.2, 0.0, 0.5]), _yaw(np.pi / 2))
MAST_T_CAMERA = (np.array([0.0, 0.1, 0.05]), geometry.quat_normalize(np.array([0.5, -0.5, 0.5, -0.5])))
BASE_T_CAMERA = geometry.pose_compose(*BASE_T_MAST, *MAST_T_CAMERA)


def _assert_pose(pose, expected):
    np.testing.assert_allclose(pose[0], expected[0], atol=1e-12)
    assert geometry.rotation_angle(pose[1], expected[1]) < 1e-9


def _fixed_mount_on_tf(resolver, seconds, step=0.5):
    """/tf as a ROS 1 bag has it: the mount republished unchanged beside moving odometry."""
    for k in range(int(seconds / step) + 1):
        resolver.feed(_msg(_tf("odom", "base_link", [0.1 * k, 0, 0], _yaw(0.05 * k), k * step),
                           _tf("base_link", "mast", *BASE_T_MAST, k * step),
                           _tf("mast", "camera", *MAST_T_CAMERA, k * step)),
                      static=False, time_ns=int(k * step * S))


def test_a_chain_on_tf_static_in_either_direction():
    resolver = CameraMountResolver()
    resolver.feed(_msg(_tf("base_link", "mast", *BASE_T_MAST)), static=True)
    resolver.feed(_msg(_tf("mast", "camera", *MAST_T_CAMERA)), static=True)
    mount = resolver.resolve("base_link", "camera")
    assert mount.found and mount.source == FROM_TF_STATIC
    _assert_pose(mount.pose, BASE_T_CAMERA)
    _assert_pose(resolver.resolve("camera", "base_link").pose, geometry.pose_inverse(*BASE_T_CAMERA))


def test_transforms_fixed_over_the_first_seconds_of_tf_are_used_once_the_window_closed():
    resolver = CameraMountResolver()
    _fixed_mount_on_tf(resolver, seconds=3.0)
    assert not resolver.resolve("base_link", "camera").found  # fixed so far, but the window is open
    assert resolver.feed(_msg(_tf("base_link", "mast", *BASE_T_MAST)), static=False, time_ns=4 * S)
    # the first message past the window closes it and is not taken
    moved = (BASE_T_MAST[0] + 1.0, BASE_T_MAST[1])
    assert not resolver.feed(_msg(_tf("base_link", "mast", *moved)), static=False,
                             time_ns=int((TF_FIXED_WINDOW_S + 0.1) * S))
    assert resolver.tf_window_closed
    mount = resolver.resolve("base_link", "camera")
    assert mount.found and mount.source == FROM_FIXED_TF
    _assert_pose(mount.pose, BASE_T_CAMERA)
    # the moving odometry is not a mount
    assert not resolver.resolve("odom", "camera").found


def test_an_edge_that_moves_within_the_window_is_no_mount():
    resolver = CameraMountResolver()
    resolver.feed(_msg(_tf("base_link", "camera", *BASE_T_CAMERA, 0.0)), static=False, time_ns=0)
    moved = (BASE_T_CAMERA[0] + 0.01, BASE_T_CAMERA[1])
    resolver.feed(_msg(_tf("base_link", "camera", *moved, 1.0)), static=False, time_ns=S)
    resolver.close_tf_window()
    assert not resolver.resolve("base_link", "camera").found


def test_tf_static_wins_over_a_fixed_edge_on_tf():
    resolver = CameraMountResolver()
    other = (np.array([9.0, 9.0, 9.0]), _yaw(1.0))
    for k in range(3):
        resolver.feed(_msg(_tf("base_link", "camera", *other, k)), static=False, time_ns=k * S)
    resolver.close_tf_window()
    _assert_pose(resolver.resolve("base_link", "camera").pose, other)
    resolver.feed(_msg(_tf("base_link", "camera", *BASE_T_CAMERA)), static=True)
    mount = resolver.resolve("base_link", "camera")
    assert mount.source == FROM_TF_STATIC
    _assert_pose(mount.pose, BASE_T_CAMERA)


def test_ros1_leading_slashes_are_one_frame_with_the_plain_names():
    resolver = CameraMountResolver()
    resolver.feed(_msg(_tf("/base_link", "/mast", *BASE_T_MAST)), static=True)
    resolver.feed(_msg(_tf("mast", "/camera", *MAST_T_CAMERA)), static=True)
    _assert_pose(resolver.resolve("base_link", "/camera").pose, BASE_T_CAMERA)
    _assert_pose(resolver.resolve("/base_link", "camera").pose, BASE_T_CAMERA)
    assert resolver.resolve("/camera", "camera").source == FROM_SAME_FRAME


def test_a_missing_path_names_it_and_the_options_that_fix_it():
    resolver = CameraMountResolver(hint="pass --camera-extrinsic, or --base-frame if the robot's base "
                                        "has another name")
    resolver.feed(_msg(_tf("base_link", "mast", *BASE_T_MAST)), static=True)
    mount = resolver.resolve("/base_link", "/camera_optical")
    assert not mount.found and mount.pose is None
    assert mount.reason == ("no TF path base_link -> camera_optical (the images' frame) on /tf_static or "
                            "fixed on /tf: pass --camera-extrinsic, or --base-frame if the robot's base "
                            "has another name")
    assert CameraMountResolver().resolve("base_link", "camera").reason.endswith("fixed on /tf")


def test_the_override_comes_before_any_tf():
    override = (np.array([1.0, 2.0, 3.0]), _yaw(0.3))
    resolver = CameraMountResolver(override=override)
    resolver.feed(_msg(_tf("base_link", "camera", *BASE_T_CAMERA)), static=True)
    mount = resolver.resolve("base_link", "camera")
    assert mount.source == FROM_OVERRIDE
    _assert_pose(mount.pose, override)
    assert resolver.resolve("base_link", "base_link").source == FROM_OVERRIDE


def test_images_in_the_base_frame_need_no_tf():
    mount = CameraMountResolver().resolve("base_link", "base_link")
    assert mount.source == FROM_SAME_FRAME
    _assert_pose(mount.pose, (np.zeros(3), np.array([1.0, 0.0, 0.0, 0.0])))


def test_an_unusable_tf_static_transform_is_left_out_alone_and_named_when_the_mount_is_missing():
    resolver = CameraMountResolver(hint="pass --camera-extrinsic")
    bad = _tf("mast", "camera", [0, 0, 0], [float("nan"), 0.0, 0.0, 1.0])  # a NaN from a broken driver
    resolver.feed(_msg(_tf("base_link", "mast", *BASE_T_MAST), bad), static=True)
    assert list(resolver.static_edges()) == [("base_link", "mast")]  # the good one of the message counts
    mount = resolver.resolve("base_link", "camera")
    assert not mount.found
    assert mount.reason.startswith("no TF path base_link -> camera (the images' frame) on /tf_static or fixed "
                                   "on /tf; transforms on /tf_static that could not be used: mast -> camera (")
    assert "NaN" in mount.reason and mount.reason.endswith(": pass --camera-extrinsic")
    # the same edge republished right: the mount resolves, and the problem is forgotten
    resolver.feed(_msg(_tf("mast", "camera", *MAST_T_CAMERA)), static=True)
    _assert_pose(resolver.resolve("base_link", "camera").pose, BASE_T_CAMERA)
    assert resolver.static_skipped() == {}
    # a later bad copy of a known edge leaves the good value in place
    resolver.feed(_msg(_tf("mast", "camera", [0, 0, 0], [2.0, 0.0, 0.0, 0.0])), static=True)
    _assert_pose(resolver.resolve("base_link", "camera").pose, BASE_T_CAMERA)
    assert "norm 2 is not 1" in resolver.static_skipped()[("mast", "camera")]
    with pytest.raises(ValueError, match="time_ns"):
        resolver.feed(_msg(), static=False)


def test_resolve_waits_for_a_mount_that_arrives_from_another_thread():
    """The node's first frame: its worker waits while the /tf_static callback feeds."""
    resolver = CameraMountResolver()
    feeder = threading.Timer(0.1, lambda: resolver.feed(_msg(_tf("base_link", "camera", *BASE_T_CAMERA)),
                                                         static=True))
    feeder.start()
    try:
        mount = resolver.resolve("base_link", "camera", timeout_s=60.0)
    finally:
        feeder.join()
    # found, so it returned on the feed (a timeout returns no mount): no wall-clock bound,
    # which a loaded machine could miss
    assert mount.source == FROM_TF_STATIC
    started = time.monotonic()
    assert not resolver.resolve("base_link", "elsewhere", timeout_s=0.05).found
    assert time.monotonic() - started >= 0.05


def test_a_bag_reader_reads_the_start_of_tf_once_and_only_when_tf_static_has_no_path(monkeypatch):
    reads = []

    def fake_read_messages(bag, topics):
        reads.append(topics)
        for k in range(100):  # 0.5 s apart: the window ends at the 12th message
            reads.append(k)
            yield NS(topic="/tf", log_time_ns=int(k * 0.5 * S),
                     msg=_msg(_tf("base_link", "camera", *BASE_T_CAMERA, k * 0.5)))

    monkeypatch.setattr(camera_mount, "read_messages", fake_read_messages)
    topics = {"/tf": "tf2_msgs/msg/TFMessage", "/camera/image_raw": "sensor_msgs/msg/Image"}
    resolver = CameraMountResolver()
    mount = resolve_in_bag(resolver, "bag", topics, "base_link", "camera")
    assert mount.source == FROM_FIXED_TF
    assert reads[0] == ["/tf"] and reads[-1] == int(TF_FIXED_WINDOW_S / 0.5) + 1
    reads.clear()
    assert not resolve_in_bag(resolver, "bag", topics, "base_link", "other").found
    assert reads == []  # read once
    with_static = CameraMountResolver()
    with_static.feed(_msg(_tf("base_link", "camera", *BASE_T_CAMERA)), static=True)
    assert resolve_in_bag(with_static, "bag", topics, "base_link", "camera").source == FROM_TF_STATIC
    assert reads == []
