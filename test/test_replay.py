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


def test_a_folder_that_is_not_a_report_is_never_offered_to_overwrite(small_bag, tiny_weights, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("x")
    with pytest.raises(replay.ReplayError, match="exists; it is not a vizloc-replay report: choose another --out"):
        _run(small_bag, tiny_weights, notes)
    with pytest.raises(replay.ReplayError, match=r"not a vizloc-replay report folder \(no metrics.json and report.md\)"):
        _run(small_bag, tiny_weights, notes, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["notes"] and (notes / "thesis.tex").read_text() == "x"


def test_a_second_run_to_the_same_out_is_refused_while_the_first_writes(small_bag, tiny_weights, tmp_path):
    """Two replays started 3 s apart to one --out both exited 0 and the first report was
    gone; now the second sees the first's locked temporary and stops before its run."""
    import fcntl
    import os

    from vizloc_ros.files import partial_path

    first = partial_path(tmp_path / "o", pid=1)
    first.mkdir()
    fd = os.open(first, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(replay.ReplayError, match=r"another process \(pid 1\) is writing report folder"):
            _run(small_bag, tiny_weights, tmp_path / "o")
        assert first.is_dir() and not (tmp_path / "o").exists()
    finally:
        os.close(fd)
        first.rmdir()


def test_a_linked_out_is_refused_before_the_run(small_bag, tiny_weights, tmp_path):
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "metrics.json").write_text("{}")
    (tmp_path / "earlier" / "report.md").write_text("#")
    (tmp_path / "o").symlink_to(tmp_path / "earlier")
    with pytest.raises(replay.ReplayError, match=r"--out .*o is a symbolic link \(to .*earlier\); give the real"):
        _run(small_bag, tiny_weights, tmp_path / "o", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "earlier").iterdir()) == ["metrics.json", "report.md"]


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


# --------------------------------------------------------------------------- covariance honesty

def _published(bag, topic):
    """(stamps, t, q, cov) of a PoseWithCovarianceStamped topic of the result bag."""
    from vizloc_ros.ros_io import messages

    rows = [(messages.header_stamp_sec(r.msg), *messages.pose_with_covariance_from_msg(r.msg))
            for r in read_messages(bag, [topic])]
    return (np.array([r[0] for r in rows]), np.stack([r[1] for r in rows]), np.stack([r[2] for r in rows]),
            np.stack([r[3] for r in rows]))


def test_nees_in_metrics_equals_nees_of_the_published_messages(report):
    """NEES of both outputs recomputed from what the result bag carries: each network
    pose, and the latest fused pose at or before each image, against the ground truth."""
    from vizloc_ros.metrics import nees

    out, metrics = report
    g_s, g_t, g_q = read_tum(out / "ground_truth.tum")
    a_s, a_t, a_q, a_cov = _published(out / "bag", "/vizloc/absolute_pose")
    rows = np.abs(g_s[None, :] - a_s[:, None]).argmin(axis=1)
    truth_t, truth_q = g_t[rows], g_q[rows]

    def error(t, q):
        rot = np.stack([geometry.so3_log(geometry.quat_to_matrix(tq) @ geometry.quat_to_matrix(eq).T)
                        for tq, eq in zip(truth_q, q)])
        return np.concatenate([truth_t - t, rot], axis=1)

    values = nees(error(a_t, a_q), a_cov)
    absolute = metrics["sources"]["absolute"]
    assert absolute["nees_frames"] == len(a_s) and absolute["nees_skipped_covariances"] == 0
    assert absolute["nees_per_dof"] == pytest.approx(np.mean(values) / 6, rel=1e-6)
    assert absolute["nees_share_within_95"] == pytest.approx(np.mean(values <= 12.5916))

    f_s, f_t, f_q, f_cov = _published(out / "bag", "/vizloc/pose")
    held = np.array([np.flatnonzero(f_s <= s + 1e-9)[-1] if np.any(f_s <= s + 1e-9) else -1 for s in a_s])
    scored = held >= 0
    last = held[scored]
    values = nees(error(f_t[held], f_q[held])[scored], f_cov[last])
    fused = metrics["sources"]["fused"]
    assert fused["nees_frames"] == fused["frames"] == scored.sum()
    assert fused["nees_per_dof"] == pytest.approx(np.mean(values) / 6, rel=1e-6)
    assert fused["nees_share_within_95"] == pytest.approx(np.mean(values <= 12.5916))
    assert fused["reinitialisations"] == metrics["counts"]["fusion_reinitialisations"]
    assert "nees_per_dof" not in metrics["sources"]["odometry"]


def test_report_shows_nees_and_links_the_fused_error_band(report):
    out, metrics = report
    text = (out / "report.md").read_text()
    assert "![fused error and its 2-sigma band](fused_error_band.png)" in text
    assert (out / "fused_error_band.png").stat().st_size > 10_000
    table = replay.format_table(metrics)
    nees_row = next(line for line in table.splitlines() if line.startswith("NEES / dof"))
    assert f"{metrics['sources']['fused']['nees_per_dof']:.2f}" in nees_row
    assert any(line.startswith("inside 95 % bound") for line in table.splitlines())
    assert next(line for line in table.splitlines() if line.startswith("reinitialisations")).split()[1:] == \
        ["-", str(metrics["sources"]["fused"]["reinitialisations"]), "-"]


def test_no_fusion_report_has_network_nees_and_no_error_band(small_bag, tiny_weights, tmp_path):
    metrics = _run(small_bag, tiny_weights, tmp_path / "raw", fusion=False)
    assert metrics["sources"]["absolute"]["nees_frames"] == 24
    assert not (tmp_path / "raw" / "fused_error_band.png").exists()
    assert "fused_error_band" not in (tmp_path / "raw" / "report.md").read_text()


def test_singular_and_non_finite_covariances_are_skipped_counted_and_never_nan(tmp_path):
    """A network pose published with a singular or NaN covariance and a fused one with a
    singular covariance: left out of the NEES, counted, and metrics.json stays valid JSON
    without NaN."""
    from types import SimpleNamespace

    from vizloc_ros.pipeline.regressor import AbsolutePose
    from vizloc_ros.replay.report import write_report

    n = 12
    stamps = np.arange(n) * 0.1
    gt_t = np.c_[np.linspace(0, 1, n), np.zeros(n), np.zeros(n)]
    gt_q = np.tile([1.0, 0.0, 0.0, 0.0], (n, 1))
    good = np.eye(6) * 0.01
    singular = np.diag([0.01] * 5 + [0.0])
    not_finite = np.full((6, 6), np.nan)
    network_covs = [good] * n
    network_covs[3], network_covs[7] = singular, not_finite
    absolute = [AbsolutePose(stamp=s, frame_id="map", t=t + [0.1, 0.0, 0.0], q=q, cov=c)
                for s, t, q, c in zip(stamps, gt_t, gt_q, network_covs)]
    fused = [(s, t + 0.05, q, singular if i == 5 else good)
             for i, (s, t, q) in enumerate(zip(stamps, gt_t, gt_q))]
    regressor = SimpleNamespace(counters={"received": n}, estimator=SimpleNamespace(device="cpu"))
    result = replay._assemble(replay.ReplayOptions(bag=tmp_path / "b", out=tmp_path / "o", weights=tmp_path / "w"),
                              absolute, fused, [], (stamps, gt_t, gt_q), regressor,
                              {"fusion_reinitialisations": 2}, 1.0, 1.0, n)
    absolute_nees = result["metrics"]["sources"]["absolute"]
    assert absolute_nees["nees_skipped_covariances"] == 2 and absolute_nees["nees_frames"] == n - 2
    # the error (0.1, 0, 0) against 0.01 I: NEES 1 on every scored frame
    assert absolute_nees["nees_per_dof"] == pytest.approx(1 / 6)
    fused_nees = result["metrics"]["sources"]["fused"]
    assert fused_nees["nees_skipped_covariances"] == 1 and fused_nees["reinitialisations"] == 2
    assert np.isnan(result["per_frame"]["fused_sigma_xyz_m"][5]).all()
    write_report(tmp_path, result)
    text = (tmp_path / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(json.loads(text), METRICS_SCHEMA)
    assert "singular or non-finite covariance: 2 absolute, 1 fused" in (tmp_path / "report.md").read_text()
