"""vizloc-replay on a small generated bag: report consistent with its own TUM files and evo,
output bag readable, schema-valid metrics, and clear refusals of bad input."""
import json
import logging
import shutil

import numpy as np
import pytest

from vizloc_ros import geometry
from vizloc_ros.replay import cli as replay
from vizloc_ros.ros_io.bag_io import list_topics, read_messages
from vizloc_ros.ros_io.tum import read_tum
from vizloc_ros.metrics import pose_errors
from vizloc_ros.replay.report import METRICS_SCHEMA

from ros1_bags import as_ros1_bag


def _run(bag, weights, out, **kwargs):
    options = replay.ReplayOptions(bag=bag, out=out, weights=weights, device="cpu", batch_size=8,
                                   progress=False, **kwargs)
    return replay.run_replay(options)


@pytest.fixture(scope="module")
def report(small_bag, tiny_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("r") / "report"
    metrics = _run(small_bag, tiny_weights, out)
    return out, metrics


def test_report_files_exist_and_metrics_validate(report):
    jsonschema = pytest.importorskip("jsonschema")
    out, metrics = report
    for name in ("metrics.json", "report.md", "trajectories.png", "errors.png", "error_cdf.png",
                 "ground_truth.tum", "absolute.tum", "fused.tum", "odometry.tum"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "metrics.json").read_text())
    jsonschema.validate(on_disk, METRICS_SCHEMA)
    assert on_disk["frames"]["images"] == 24
    assert not list(out.parent.glob(".report.partial*"))


def test_metrics_equal_independent_computation_from_tum_files(report):
    out, metrics = report
    g_s, g_t, g_q = read_tum(out / "ground_truth.tum")
    a_s, a_t, a_q = read_tum(out / "absolute.tum")
    rows = np.abs(g_s[None, :] - a_s[:, None]).argmin(axis=1)
    assert np.abs(g_s[rows] - a_s).max() < 1e-6  # images are stamped on ground-truth ticks here
    t_err, r_err = pose_errors(a_t, a_q, g_t[rows], g_q[rows])
    source = metrics["sources"]["absolute"]
    assert source["median_translation_m"] == pytest.approx(np.median(t_err), abs=1e-6)
    assert source["median_rotation_deg"] == pytest.approx(np.median(r_err), abs=1e-4)


def test_evo_ate_on_the_tum_files_equals_the_report(report):
    from evo.core import metrics as evo_metrics
    from evo.core import sync
    from evo.tools import file_interface

    out, metrics = report
    ref = file_interface.read_tum_trajectory_file(str(out / "ground_truth.tum"))
    est = file_interface.read_tum_trajectory_file(str(out / "absolute.tum"))
    ref, est = sync.associate_trajectories(ref, est, max_diff=1e-3)
    ape = evo_metrics.APE(evo_metrics.PoseRelation.translation_part)
    ape.process_data((ref, est))
    assert metrics["sources"]["absolute"]["ate_rmse_m"] == pytest.approx(ape.get_statistic(
        evo_metrics.StatisticsType.rmse), rel=1e-6)


def test_output_bag_has_the_promised_topics_frames_and_stamps(report, small_bag):
    out, metrics = report
    topics = list_topics(out / "bag")
    assert topics == {"/vizloc/absolute_pose": "geometry_msgs/msg/PoseWithCovarianceStamped",
                      "/vizloc/pose": "geometry_msgs/msg/PoseWithCovarianceStamped",
                      "/vizloc/path": "nav_msgs/msg/Path", "/tf": "tf2_msgs/msg/TFMessage"}
    image_stamps = {m.stamp_ns for m in read_messages(small_bag, ["/camera/image_raw"])}
    absolute = list(read_messages(out / "bag", ["/vizloc/absolute_pose"]))
    assert {m.stamp_ns for m in absolute} == image_stamps
    assert all(m.msg.header.frame_id == "map" for m in absolute)
    for record in read_messages(out / "bag", ["/tf", "/vizloc/pose"]):
        if record.topic == "/tf":
            tf = record.msg.transforms[0]
            assert (tf.header.frame_id, tf.child_frame_id) == ("map", "odom")
        else:
            cov = np.asarray(record.msg.pose.covariance)
            assert np.all(np.isfinite(cov)) and record.msg.header.frame_id == "map"


def test_missing_topic_lists_the_bag_topics(small_bag, tiny_weights, tmp_path):
    with pytest.raises(replay.ReplayError, match=r"(?s)not in .*The bag has:.*/camera/image_raw"):
        _run(small_bag, tiny_weights, tmp_path / "o", image_topic="/nope")
    assert not (tmp_path / "o").exists()
    # the image topics are named first, as the likely fix
    with pytest.raises(replay.ReplayError, match=r"image topics there: /camera/image_raw; pass one"):
        _run(small_bag, tiny_weights, tmp_path / "o", image_topic="/nope")
    with pytest.raises(replay.ReplayError, match=r"pose topics there: /ground_truth/pose, /odom; or "
                                                 r"--ground-truth tf:PARENT->CHILD"):
        _run(small_bag, tiny_weights, tmp_path / "o", ground_truth="/mocap")


def test_existing_output_is_refused_unless_overwrite(small_bag, tiny_weights, tmp_path):
    (tmp_path / "o").mkdir()
    with pytest.raises(replay.ReplayError, match="exists"):
        _run(small_bag, tiny_weights, tmp_path / "o")
    assert replay.main([str(small_bag), "--weights", str(tiny_weights), "--out", str(tmp_path / "o"),
                        "--no-progress", "--device", "cpu"]) == 2


def test_truncated_bag_is_a_clear_error_and_writes_nothing(small_bag, tiny_weights, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(small_bag, broken)
    mcap = next(broken.glob("*.mcap"))
    data = mcap.read_bytes()
    mcap.write_bytes(data[: len(data) // 2])
    with pytest.raises(replay.ReplayError):
        _run(broken, tiny_weights, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    assert not list(tmp_path.glob(".o.partial*"))


def _copy_bag(src, dst, topic, change):
    """Copy a bag, passing every message of ``topic`` through ``change(msg) -> msg``."""
    from vizloc_ros.ros_io.bag_io import BagWriter

    with BagWriter(dst) as writer:
        for name, kind in list_topics(src).items():
            writer.add_topic(name, kind)
        for record in read_messages(src):
            msg = change(record.msg) if record.topic == topic else record.msg
            writer.write(record.topic, record.log_time_ns, msg)


def _shift_stamp(shift_s):
    from vizloc_ros.ros_io import messages

    types = messages.rosbags_types()

    def change(msg):
        t, q = messages.pose_from_msg(msg)
        return messages.make_pose_stamped(types, messages.header_stamp_sec(msg) + shift_s,
                                          msg.header.frame_id, t, q)
    return change


def test_ground_truth_without_overlap_is_a_clear_error(small_bag, tiny_weights, tmp_path):
    shifted = tmp_path / "shifted"
    _copy_bag(small_bag, shifted, "/ground_truth/pose", _shift_stamp(1000.0))
    with pytest.raises(replay.ReplayError, match="never overlaps"):
        _run(shifted, tiny_weights, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_ground_truth_with_a_dropout_over_all_images_names_the_gap(small_bag, tiny_weights, tmp_path):
    from vizloc_ros.ros_io import messages

    stamps = [messages.header_stamp_sec(r.msg) for r in read_messages(small_bag, ["/ground_truth/pose"])]
    middle = 0.5 * (stamps[0] + stamps[-1])
    early, late = _shift_stamp(-10.0), _shift_stamp(10.0)
    gapped = tmp_path / "gapped"  # the motion capture lost the robot for 20 s around the images
    _copy_bag(small_bag, gapped, "/ground_truth/pose",
              lambda msg: early(msg) if messages.header_stamp_sec(msg) < middle else late(msg))
    with pytest.raises(replay.ReplayError, match=r"has a gap of more than 0.25 s around every image"):
        _run(gapped, tiny_weights, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_missing_tf_chain_is_a_clear_error(small_bag, tiny_weights, tmp_path):
    with pytest.raises(replay.ReplayError, match="no TF path map -> nowhere"):
        _run(small_bag, tiny_weights, tmp_path / "o", ground_truth="tf:map->nowhere")


def test_unsupported_image_encoding_is_a_clear_error(small_bag, tiny_weights, tmp_path):
    from dataclasses import replace as dc_replace

    bad = tmp_path / "bad_encoding"
    _copy_bag(small_bag, bad, "/camera/image_raw", lambda msg: dc_replace(msg, encoding="yuv422_yuy2"))
    with pytest.raises(replay.ReplayError, match="could be processed.*encoding"):
        _run(bad, tiny_weights, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_no_fusion_gives_raw_only(small_bag, tiny_weights, tmp_path):
    metrics = _run(small_bag, tiny_weights, tmp_path / "raw", fusion=False)
    assert set(metrics["sources"]) == {"absolute", "odometry"}


def test_ros1_bag_with_old_tf_type_and_a_tf_chain(small_bag, tiny_weights, report, tmp_path):
    """A real recording's shape: ROS 1, tf/tfMessage, '/world', a chain of a moving and a
    fixed edge, the camera mount only on /tf. The ground truth read through the chain
    equals the pose topic's."""
    ros1 = tmp_path / "tum_style.bag"
    offset = (np.array([0.05, -0.02, 0.3]), geometry.quat_normalize(np.array([0.9, 0.1, 0.0, 0.2])))
    as_ros1_bag(small_bag, ros1, offset)
    metrics = _run(ros1, tiny_weights, tmp_path / "o", image_topic="/camera/rgb/image_color",
                   ground_truth="tf:world->base_link", odom_topic="", camera_extrinsic=None)
    assert metrics["frames"]["images"] == 24
    truth_s, truth_t, truth_q = read_tum(report[0] / "ground_truth.tum")
    chain_s, chain_t, chain_q = read_tum(tmp_path / "o" / "ground_truth.tum")
    np.testing.assert_allclose(chain_s, truth_s)
    np.testing.assert_allclose(chain_t, truth_t, atol=1e-6)
    assert np.max(geometry.rotation_angle(chain_q, truth_q)) < 1e-5
    # no /tf_static: the camera mount was found among the transforms that stay fixed on /tf,
    # so the network's poses become the same base poses as from the original bag
    _, raw_t, raw_q = read_tum(report[0] / "absolute.tum")
    _, ros1_t, ros1_q = read_tum(tmp_path / "o" / "absolute.tum")
    np.testing.assert_allclose(ros1_t, raw_t, atol=1e-4)
    assert np.max(geometry.rotation_angle(ros1_q, raw_q)) < 1e-3


def test_a_missing_camera_mount_is_warned_once_with_the_flags_that_fix_it(small_bag, tiny_weights, tmp_path,
                                                                          caplog):
    with caplog.at_level(logging.WARNING, logger="vizloc-replay"):
        _run(small_bag, tiny_weights, tmp_path / "o", fusion=False, base_frame="/chassis")
    warnings = [r.getMessage() for r in caplog.records if "no TF path" in r.getMessage()]
    assert len(warnings) == 1  # once, though every batch looks again
    assert warnings[0].startswith("no TF path chassis -> ")
    assert "pass --camera-extrinsic, or --base-frame" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vizloc-replay"):
        _run(small_bag, tiny_weights, tmp_path / "p", fusion=False, base_frame="/chassis",
             camera_extrinsic=(np.zeros(3), np.array([1.0, 0.0, 0.0, 0.0])))
    assert not [r for r in caplog.records if "no TF path" in r.getMessage()]
