"""Ground truth from TF chains: any length, static and moving edges, either direction,
ROS 1 frame names with a leading slash."""
import numpy as np
import pytest
from types import SimpleNamespace as NS

from vizloc_ros import geometry
from vizloc_ros.ros_io.ground_truth import (GroundTruthError, GroundTruthReader, static_chain, tf_chain_poses,
                                          tf_edges)


def _tf(stamp, parent, child, t, q):
    sec = int(np.floor(stamp))
    return NS(header=NS(stamp=NS(sec=sec, nanosec=int(round((stamp - sec) * 1e9))), frame_id=parent),
              child_frame_id=child,
              transform=NS(translation=NS(x=t[0], y=t[1], z=t[2]),
                           rotation=NS(w=q[0], x=q[1], y=q[2], z=q[3])))


def _yaw(angle):
    return np.array([np.cos(angle / 2), 0.0, 0.0, np.sin(angle / 2)])


def _mocap(stamps):
    """A body moving along x and turning: world_T_body at ``stamps``."""
    return [(s, np.array([s, 0.5 * s, 1.0]), _yaw(0.3 * s)) for s in stamps]


def test_chain_through_a_static_edge_and_an_inverted_edge():
    body_T_base = (np.array([0.1, 0.0, -0.2]), _yaw(np.pi / 2))
    map_T_world = (np.array([5.0, -1.0, 0.0]), _yaw(0.5))
    stamps = np.arange(0.0, 2.0, 0.01)
    dynamic = {("world", "body"): _mocap(stamps)}
    # TF is a tree: "world" hangs under "map" here, and the chain asked for starts at map
    static = {("map", "world"): map_T_world, ("body", "base_link"): body_T_base}
    out_stamps, t, q = tf_chain_poses(dynamic, static, "map", "base_link")
    np.testing.assert_allclose(out_stamps, stamps)
    for k in (0, 57, 199):
        s, t_wb, q_wb = dynamic[("world", "body")][k]
        expect = geometry.pose_compose(*geometry.pose_compose(*map_T_world, t_wb, q_wb), *body_T_base)
        np.testing.assert_allclose(t[k], expect[0], atol=1e-9)
        assert geometry.rotation_angle(q[k], expect[1]) < 1e-7
    # the same chain asked for the other way round gives the inverse poses
    _, t_inv, q_inv = tf_chain_poses(dynamic, static, "base_link", "map")
    back_t, back_q = geometry.pose_inverse(t_inv, q_inv)
    np.testing.assert_allclose(back_t, t, atol=1e-9)
    assert np.max(geometry.rotation_angle(back_q, q)) < 1e-7


def test_two_moving_edges_are_interpolated_at_the_denser_ones_stamps():
    slow = np.arange(0.0, 3.0, 0.1)   # map -> odom, 10 Hz
    fast = np.arange(0.05, 2.5, 0.02)  # odom -> base_link, 50 Hz
    dynamic = {("map", "odom"): [(s, np.array([s, 0.0, 0.0]), _yaw(0.0)) for s in slow],
               ("odom", "base_link"): [(s, np.array([0.0, 2 * s, 0.0]), _yaw(0.0)) for s in fast]}
    stamps, t, _ = tf_chain_poses(dynamic, {}, "map", "base_link")
    np.testing.assert_allclose(stamps, fast)
    np.testing.assert_allclose(t[:, 0], fast, atol=1e-9)  # linear in time: interpolation is exact
    np.testing.assert_allclose(t[:, 1], 2 * fast, atol=1e-9)


def test_an_edge_republished_unchanged_on_tf_counts_as_static():
    # ROS 1 bags carry static transforms on /tf at 10 Hz (or 1 Hz); the mocap is at 100 Hz
    mocap = np.arange(0.0, 2.0, 0.01)
    dynamic = {("world", "body"): _mocap(mocap),
               ("body", "camera"): [(s, np.array([0.0, 0.0, 0.3]), _yaw(0.0)) for s in np.arange(0, 2, 1.0)]}
    stamps, t, _ = tf_chain_poses(dynamic, {}, "world", "camera")
    assert len(stamps) == len(mocap)  # not limited by the 1 Hz republishing
    np.testing.assert_allclose(t[:, 2], 1.3)


def test_ros1_leading_slashes_are_ignored():
    reader = GroundTruthReader("tf:world->kinect", "base_link")
    for s in np.arange(0.0, 1.0, 0.1):
        reader.add("/tf", NS(transforms=[_tf(s, "/openni_camera", "/openni_rgb_frame", [0, -0.04, 0], _yaw(0)),
                                         _tf(s, "/world", "/kinect", [s, 0, 0], _yaw(s))]))
    stamps, t, _ = reader.finish({})
    assert len(stamps) == 10
    np.testing.assert_allclose(t[:, 0], stamps)
    edges = tf_edges([_tf(0, "/base_link", "/camera", [0.1, 0, 0], _yaw(0))])
    assert static_chain(edges, "base_link", "/camera")[0][0] == pytest.approx(0.1)


def test_unconnected_or_never_moving_chains_are_clear_errors():
    dynamic = {("world", "body"): _mocap(np.arange(0.0, 1.0, 0.1))}
    with pytest.raises(GroundTruthError, match=r"no TF path map -> body .*world->body"):
        tf_chain_poses(dynamic, {}, "map", "body")
    with pytest.raises(GroundTruthError, match="only on /tf_static"):
        tf_chain_poses({}, {("map", "base_link"): (np.zeros(3), _yaw(0))}, "map", "base_link")


def test_a_robot_that_never_moved_still_has_a_ground_truth():
    still = [(s, np.array([1.0, 2.0, 0.0]), _yaw(0.4)) for s in np.arange(0.0, 3.0, 0.1)]
    stamps, t, q = tf_chain_poses({("map", "base_link"): still}, {}, "map", "base_link")
    assert len(stamps) == 30
    np.testing.assert_allclose(t, np.tile([1.0, 2.0, 0.0], (30, 1)))
    assert np.max(geometry.rotation_angle(q, _yaw(0.4))) < 1e-9
    for spec in ("tf:map", "tf:map->", "tf:->base_link", "tf:a->b->c"):
        with pytest.raises(GroundTruthError, match="expected tf:PARENT->CHILD"):
            GroundTruthReader(spec, "base_link")
    with pytest.raises(GroundTruthError, match="same frame"):
        GroundTruthReader("tf:/map->map", "base_link")


def test_slow_ground_truth_is_interpolated_between_samples_but_not_across_dropouts():
    from vizloc_ros.ros_io.ground_truth import GT_MAX_GAP_S, default_max_gap, interpolate_poses

    mocap = np.arange(0.0, 2.0, 0.01)
    assert default_max_gap(mocap) == GT_MAX_GAP_S  # 100 Hz: the fixed bound
    slow = np.r_[np.arange(0.0, 5.0, 1.0), np.arange(15.0, 20.0, 1.0)]  # 1 Hz, a 10 s dropout
    t = np.stack([slow, np.zeros_like(slow), np.zeros_like(slow)], axis=1)
    q = np.tile([1.0, 0.0, 0.0, 0.0], (len(slow), 1))
    out_t, _ = interpolate_poses(slow, t, q, np.array([2.5, 3.9, 10.0, 16.5]))
    np.testing.assert_allclose(out_t[[0, 1, 3], 0], [2.5, 3.9, 16.5])
    assert np.isnan(out_t[2, 0])
    # an explicit bound still wins
    assert np.isnan(interpolate_poses(slow, t, q, np.array([2.5]), max_gap=0.25)[0][0, 0])


def test_a_stamp_read_two_ways_still_gets_the_pose_at_it_even_at_either_end():
    """sec + nanosec * 1e-9 and ns * 1e-9 of one stamp differ in the last bits at today's
    epoch: ground truth written at the image stamps (vizloc-bag) must still match every
    image, the first and the last included, and a query 1 ms off the end still gets nothing."""
    from vizloc_ros.ros_io.ground_truth import interpolate_poses
    from vizloc_ros.ros_io.messages import ns_to_sec_nanosec

    stamps_ns = 1_700_000_000 * 10**9 + np.array([0, 33_333_333, 66_666_667])
    as_header = np.array([float(sec) + float(ns) * 1e-9 for sec, ns in map(ns_to_sec_nanosec, stamps_ns)])
    as_product = stamps_ns * 1e-9
    assert np.any(as_header != as_product)  # the rounding this is about
    t = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    q = np.tile([1.0, 0.0, 0.0, 0.0], (3, 1))
    out_t, _ = interpolate_poses(as_header, t, q, as_product)
    np.testing.assert_array_equal(out_t, t)
    assert np.isnan(interpolate_poses(as_header, t, q, as_header[[-1]] + 1e-3)[0]).all()


def test_an_unusable_static_transform_is_named_where_the_chain_breaks():
    good = _tf(0.0, "map", "world", [5.0, -1.0, 0.0], _yaw(0.5))
    broken = _tf(0.0, "body", "base_link", [0.1, 0.0, -0.2], [float("nan"), 0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match=r"transform body -> base_link: .*NaN"):
        tf_edges([good, broken])  # without a place to keep it, the problem is an error
    skipped = {}
    static = tf_edges([good, broken], skipped)
    assert list(static) == [("map", "world")] and "NaN" in skipped[("body", "base_link")]
    reader = GroundTruthReader("tf:map->base_link", "base_link")
    for s, t, q in _mocap(np.arange(0.0, 1.0, 0.1)):
        reader.add("/tf", NS(transforms=[_tf(s, "world", "body", t, q)]))
    with pytest.raises(GroundTruthError) as raised:
        reader.finish(static, skipped)
    message = str(raised.value)
    assert message.startswith("no TF path map -> base_link")
    assert "transforms on /tf_static that could not be used: body -> base_link (" in message and "NaN" in message


def test_an_unusable_tf_transform_leaves_the_rest_of_its_message_and_is_named():
    reader = GroundTruthReader("tf:world->base_link", "base_link")
    for s, t, q in _mocap(np.arange(0.0, 1.0, 0.1)):
        reader.add("/tf", NS(transforms=[_tf(s, "odom", "wheel", [0, 0, 0], [2.0, 0.0, 0.0, 0.0]),
                                         _tf(s, "world", "body", t, q)]))
    with pytest.raises(GroundTruthError, match=r"transforms on /tf that could not be used: odom -> wheel \(.*norm 2"):
        reader.finish({})
    stamps, _, _ = reader.finish({("body", "base_link"): (np.zeros(3), _yaw(0.0))})
    assert len(stamps) == 10  # the good transform of every message counted


def test_a_pose_topic_of_unreadable_messages_says_why():
    reader = GroundTruthReader("/gt", "base_link")
    pose = NS(header=NS(stamp=NS(sec=1, nanosec=0)), pose=NS(position=NS(x=0.0, y=0.0, z=0.0),
                                                             orientation=NS(x=0.0, y=0.0, z=0.0, w=0.0)))
    reader.add("/gt", pose)
    with pytest.raises(GroundTruthError, match=r"no valid ground truth on /gt \(1 message\(s\) could not be read, "
                                               r"e.g. .*zero quaternion"):
        reader.finish({})


def test_an_output_at_an_images_own_stamp_is_held_there_whatever_the_rounding():
    """The same header stamp as float seconds two ways (ns * 1e-9, sec + nanosec * 1e-9)
    can differ by a rounding at epoch times; the pose published at the image's stamp must
    be the one scored there, not the one before it."""
    from vizloc_ros.ros_io.ground_truth import held_index, previous_poses

    sec, nanosec = 1700000002, 366666667
    two_ways = (sec * 10**9 + nanosec) * 1e-9, float(sec) + float(nanosec) * 1e-9
    for published, query in (two_ways, two_ways[::-1]):
        stamps = np.array([published - 1 / 30, published])
        assert held_index(stamps, [query])[0] == 1
        t, _ = previous_poses(stamps, np.array([[0.0, 0, 0], [1.0, 0, 0]]), np.tile([1.0, 0, 0, 0], (2, 1)),
                              [query])
        assert t[0, 0] == 1.0
    # a later output is not held before its stamp
    assert held_index([two_ways[0] + 0.01], [two_ways[0]])[0] == -1
