"""vizloc-bag: tiny 7-Scenes, KITTI and Cambridge folders written here become bags that hold
exactly the folders' images, intrinsics, stamps and poses, that the project's own bag
reader gives back, and that vizloc-replay plays with a shipped checkpoint; bad input is
one line and exit 2, Ctrl-C exit 130, and neither leaves a bag or a temporary behind."""
import json

import numpy as np
import pytest
from PIL import Image

from vizloc_ros import geometry
from vizloc_ros.localize.weights import shipped_weights
from vizloc_ros.replay import cli as replay
from vizloc_ros.ros_io import messages
from vizloc_ros.ros_io.bag_io import read_messages, topic_message_counts
from vizloc_ros.training import dataset_bag
from vizloc_ros.training.bag_dataset import BagDataset
from vizloc_ros.training.datasets import open_dataset

RNG = np.random.default_rng(18)


def _pose(k: int):
    """A camera-to-world pose that moves and turns with k (4x4)."""
    t = np.array([0.3 * k, -0.1 * k, 1.0 + 0.05 * k])
    q = geometry.quat_normalize(np.array([1.0, 0.05 * k, -0.1 + 0.02 * k, 0.03 * k]))
    return geometry.pose_to_matrix(t, q)


def _image(shape) -> np.ndarray:
    return RNG.integers(0, 256, size=shape, dtype=np.uint8)


def write_sevenscenes(root, width=64, height=48, scene_camera=True):
    """seq-01 (train, 2 frames) and seq-02 (test, 3 frames), colour; a scene.json camera as
    vizloc-synth writes it, or none (7-Scenes' published camera then applies)."""
    root.mkdir()
    (root / "TrainSplit.txt").write_text("sequence1\n")
    (root / "TestSplit.txt").write_text("sequence2\n")
    for seq, frames in ((1, 2), (2, 3)):
        folder = root / f"seq-{seq:02d}"
        folder.mkdir()
        for k in range(frames):
            Image.fromarray(_image((height, width, 3))).save(folder / f"frame-{k:06d}.color.png")
            np.savetxt(folder / f"frame-{k:06d}.pose.txt", _pose(10 * seq + k))
    if scene_camera:
        camera = {"width": width, "height": height, "fx": 55.0, "fy": 56.0, "cx": 31.5, "cy": 23.5}
        (root / "scene.json").write_text(json.dumps({"camera": camera}))
    return root


def write_kitti(root, frames=6, width=96, height=32, times=None, calib=True):
    """Grey image_0 frames, poses.txt (3x4 rows), times.txt and a calib.txt whose first
    projection matrix carries the intrinsics (as KITTI's odometry release writes it)."""
    (root / "image_0").mkdir(parents=True)
    rows = []
    for k in range(frames):
        Image.fromarray(_image((height, width))).save(root / "image_0" / f"{k:06d}.png")
        rows.append(" ".join(f"{v:.12e}" for v in _pose(k)[:3].reshape(-1)))
    (root / "poses.txt").write_text("\n".join(rows) + "\n")
    times = np.arange(frames) * 0.1037 if times is None else np.asarray(times)
    (root / "times.txt").write_text("".join(f"{s:.6e}\n" for s in times))
    if calib:
        (root / "calib.txt").write_text("P0: 70.5 0 47.25 0 0 71.5 15.75 0 0 0 1 0\n"
                                        "P1: 70.5 0 47.25 -38.6 0 71.5 15.75 0 0 0 1 0\n")
    return root


def write_cambridge(root, frames=3, width=40, height=30):
    """dataset_test.txt: three header lines, then image, camera centre, world-to-camera quaternion."""
    (root / "seq1").mkdir(parents=True)
    lines = ["Cambridge Landmarks", "ImageFile, Camera Position [X Y Z W P Q R]", ""]
    for k in range(frames):
        Image.fromarray(_image((height, width, 3))).save(root / "seq1" / f"frame{k:05d}.png")
        t, q_c2w = geometry.matrix_to_pose(_pose(k))
        q_w2c = geometry.quat_conjugate(q_c2w)
        lines.append(f"seq1/frame{k:05d}.png " + " ".join(f"{v:.12f}" for v in (*t, *q_w2c)))
    (root / "dataset_test.txt").write_text("\n".join(lines) + "\n")
    (root / "dataset_train.txt").write_text("\n".join(lines[:4]) + "\n")
    return root


def convert(*args):
    return dataset_bag.main([str(a) for a in args] + ["--no-progress"])


def bag_records(bag):
    return list(read_messages(bag))


def _of(records, topic):
    return [r for r in records if r.topic == topic]


def assert_nothing_left(folder, *besides):
    """No bag and no temporary (.NAME.partial-PID, .NAME.work.partial-PID) in ``folder``."""
    names = sorted(p.name for p in folder.iterdir() if p.name not in besides)
    assert names == [], names


def assert_camera_poses_equal(bag, dataset):
    """The bag's ground truth, read back by the project's bag reader through the bag's
    /tf_static mount, is the folder's camera poses to float precision."""
    read = BagDataset(bag, require_camera_mount=True)
    t_bag, q_bag = read.poses()
    t_ref, q_ref = dataset.poses()
    assert len(t_bag) == len(t_ref)
    np.testing.assert_allclose(t_bag, t_ref, atol=1e-9)
    assert np.degrees(geometry.rotation_angle(q_bag, q_ref)).max() < 1e-6
    return read


def test_the_bags_names_frames_and_mount_rotation_are_vizloc_synths():
    """The synthetic bags are the replay's reference: a converted bag must not drift from them."""
    from vizloc_ros.sim import synthetic
    from vizloc_ros.sim.trajectories import CAMERA_IN_BASE_Q

    assert (dataset_bag.TOPIC_IMAGE, dataset_bag.TOPIC_CAMERA_INFO, dataset_bag.TOPIC_GROUND_TRUTH,
            dataset_bag.TOPIC_TF_STATIC) == (synthetic.TOPIC_IMAGE, synthetic.TOPIC_CAMERA_INFO,
                                             synthetic.TOPIC_GROUND_TRUTH, synthetic.TOPIC_TF_STATIC)
    assert (dataset_bag.FRAME_MAP, dataset_bag.FRAME_BASE, dataset_bag.FRAME_CAMERA) == (
        synthetic.FRAME_MAP, synthetic.FRAME_BASE, synthetic.FRAME_CAMERA)
    assert dataset_bag.START_NS == synthetic.EPOCH_NS
    np.testing.assert_array_equal(dataset_bag.MOUNT_Q, CAMERA_IN_BASE_Q)


# --------------------------------------------------------------------------- 7-Scenes

def test_a_sevenscenes_test_split_becomes_a_bag_of_its_frames_poses_and_camera(tmp_path):
    root = write_sevenscenes(tmp_path / "scene")
    assert convert(root, "--out", tmp_path / "bag") == 0
    bag = tmp_path / "bag"
    assert topic_message_counts(bag) == {"/camera/image_raw": 3, "/camera/camera_info": 3,
                                         "/ground_truth/pose": 3, "/tf_static": 1}
    records = bag_records(bag)
    images = _of(records, "/camera/image_raw")
    stamps = [r.stamp_ns for r in images]
    assert np.all(np.diff(stamps) > 0)
    assert stamps[0] == dataset_bag.START_NS
    np.testing.assert_allclose(np.diff(stamps) / 1e9, 1 / 30, atol=1e-9)  # 7-Scenes' 30 Hz
    for topic in ("/camera/camera_info", "/ground_truth/pose"):  # one of each at every image stamp
        assert [r.stamp_ns for r in _of(records, topic)] == stamps
    assert all(r.log_time_ns == r.stamp_ns for r in records)
    test = open_dataset("7scenes", root, split="test")
    for record, item in zip(images, test.items):
        assert record.msg.encoding == "rgb8" and record.msg.header.frame_id == "camera_optical_frame"
        np.testing.assert_array_equal(messages.image_to_rgb(record.msg), np.asarray(Image.open(item[0])))
    info = messages.camera_info_to_intrinsics(_of(records, "/camera/camera_info")[0].msg)
    assert info == {"width": 64, "height": 48, "fx": 55.0, "fy": 56.0, "cx": 31.5, "cy": 23.5}
    (mount,) = _of(records, "/tf_static")[0].msg.transforms
    assert (mount.header.frame_id, mount.child_frame_id) == ("base_link", "camera_optical_frame")
    assert_camera_poses_equal(bag, test)


def test_sevenscenes_without_a_camera_gets_the_published_585_px(tmp_path):
    root = write_sevenscenes(tmp_path / "scene", width=640, height=480, scene_camera=False)
    assert convert(root, "--out", tmp_path / "bag", "--split", "train") == 0
    info = messages.camera_info_to_intrinsics(_of(bag_records(tmp_path / "bag"), "/camera/camera_info")[0].msg)
    assert info == {"width": 640, "height": 480, "fx": 585.0, "fy": 585.0, "cx": 320.0, "cy": 240.0}
    assert topic_message_counts(tmp_path / "bag")["/camera/image_raw"] == 2  # the train split: seq-01


def test_compressed_images_are_lossless_png_on_the_compressed_topic(tmp_path):
    root = write_sevenscenes(tmp_path / "scene")
    assert convert(root, "--out", tmp_path / "bag", "--compressed", "--frames", "1:") == 0
    records = bag_records(tmp_path / "bag")
    images = _of(records, "/camera/image_raw/compressed")
    test = open_dataset("7scenes", root, split="test")
    assert len(images) == 2 and not _of(records, "/camera/image_raw")
    for record, item in zip(images, test.items[1:]):
        assert record.msg.format == "png"
        np.testing.assert_array_equal(messages.compressed_image_to_numpy(record.msg), np.asarray(Image.open(item[0])))


# --------------------------------------------------------------------------- KITTI

def test_a_kitti_selection_keeps_its_frame_numbers_times_calibration_and_grey_images(tmp_path):
    root = write_kitti(tmp_path / "kitti")
    assert convert(root, "--out", tmp_path / "bag", "--frames", "1::2") == 0
    records = bag_records(tmp_path / "bag")
    images = _of(records, "/camera/image_raw")
    assert [r.msg.encoding for r in images] == ["mono8"] * 3
    for record, k in zip(images, (1, 3, 5)):
        np.testing.assert_array_equal(messages.image_to_numpy(record.msg),
                                      np.asarray(Image.open(root / "image_0" / f"{k:06d}.png")))
    stamps = np.array([r.stamp_ns for r in images])
    np.testing.assert_allclose((stamps - stamps[0]) / 1e9, [0.0, 2 * 0.1037, 4 * 0.1037], atol=1e-9)
    info = messages.camera_info_to_intrinsics(_of(records, "/camera/camera_info")[0].msg)
    assert info == {"width": 96, "height": 32, "fx": 70.5, "fy": 71.5, "cx": 47.25, "cy": 15.75}
    odd = open_dataset("kitti", root, frames=[1, 3, 5])
    assert_camera_poses_equal(tmp_path / "bag", odd)


def test_a_converted_bag_replays_to_the_end_with_the_shipped_checkpoint(tmp_path, fast_cpu):
    """The whole point: vizloc-replay --no-fusion plays it, scores every frame against the
    bag's ground truth, and that ground truth is the folder's (base = camera * mount^-1)."""
    root = write_kitti(tmp_path / "kitti", frames=3, width=248, height=184)  # MapNet's crop fits
    assert convert(root, "--out", tmp_path / "bag") == 0
    options = replay.ReplayOptions(bag=tmp_path / "bag", out=tmp_path / "report",
                                   weights=shipped_weights("mapnet_demo.safetensors"),
                                   fusion=False, fusion_process=False, device="cpu", progress=False)
    metrics = replay.run_replay(options)
    assert metrics["frames"] == {"images": 3, "estimated": 3, "evaluated": 3}
    absolute = metrics["sources"]["absolute"]
    assert absolute["frames"] == 3
    assert np.isfinite(absolute["median_translation_m"]) and np.isfinite(absolute["median_rotation_deg"])
    from vizloc_ros.ros_io.tum import read_tum

    _, t_est, q_est = read_tum(tmp_path / "report" / "absolute.tum")
    assert len(t_est) == 3 and np.all(np.isfinite(t_est)) and np.all(np.isfinite(q_est))
    _, t_gt, q_gt = read_tum(tmp_path / "report" / "ground_truth.tum")
    t_ref, q_ref = dataset_bag.base_poses(*open_dataset("kitti", root).poses())
    np.testing.assert_allclose(t_gt, t_ref, atol=1e-9)
    assert np.degrees(geometry.rotation_angle(q_gt, q_ref)).max() < 1e-5  # TUM keeps 9 decimals


def test_rate_spaces_frames_evenly_and_fixes_stamps_that_do_not_increase(tmp_path, capsys):
    root = write_kitti(tmp_path / "kitti", frames=3, times=[0.0, 0.2, 0.1])
    assert convert(root, "--out", tmp_path / "bag") == 2
    err = capsys.readouterr().err
    assert "do not increase" in err and "--rate" in err and len(err.strip().splitlines()) == 1
    assert convert(root, "--out", tmp_path / "bag", "--rate", "4") == 0
    stamps = [r.stamp_ns for r in _of(bag_records(tmp_path / "bag"), "/camera/image_raw")]
    assert np.diff(stamps).tolist() == [250_000_000, 250_000_000]


# --------------------------------------------------------------------------- Cambridge

def test_cambridge_needs_intrinsics_and_keeps_the_readers_camera_to_world_poses(tmp_path, capsys):
    root = write_cambridge(tmp_path / "cambridge")
    assert convert(root, "--out", tmp_path / "bag") == 2
    err = capsys.readouterr().err
    assert "--intrinsics" in err and len(err.strip().splitlines()) == 1
    assert_nothing_left(tmp_path, "cambridge")
    assert convert(root, "--out", tmp_path / "bag", "--intrinsics", "40,41,19.5,14.5") == 0
    info = messages.camera_info_to_intrinsics(_of(bag_records(tmp_path / "bag"), "/camera/camera_info")[0].msg)
    assert info == {"width": 40, "height": 30, "fx": 40.0, "fy": 41.0, "cx": 19.5, "cy": 14.5}
    assert_camera_poses_equal(tmp_path / "bag", open_dataset("cambridge", root, split="test"))


# --------------------------------------------------------------------------- bad input

def _mixed_sizes(tmp_path):
    root = write_kitti(tmp_path / "kitti", frames=3)
    Image.fromarray(_image((32, 80))).save(root / "image_0" / "000002.png")
    return root


def _grey_and_colour(tmp_path):
    root = write_kitti(tmp_path / "kitti", frames=3)
    Image.fromarray(_image((32, 96, 3))).save(root / "image_0" / "000001.png")
    return root


def _sixteen_bit(tmp_path):
    root = write_kitti(tmp_path / "kitti", frames=2)
    Image.fromarray(RNG.integers(0, 65535, size=(32, 96), dtype=np.uint16)).save(root / "image_0" / "000000.png")
    return root


def _undetectable(tmp_path):
    (tmp_path / "kitti").mkdir()
    return tmp_path / "kitti"


@pytest.mark.parametrize("make, flags, says", [
    (lambda tmp: tmp / "kitti", [], "does not exist"),
    (lambda tmp: write_kitti(tmp / "kitti"), ["--kind", "tum"], "unknown --kind"),
    (_undetectable, [], "pass --kind"),
    (lambda tmp: write_kitti(tmp / "kitti"), ["--frames", "0-6"], "out of range"),
    (lambda tmp: write_kitti(tmp / "kitti"), ["--frames", "every other"], "give a slice"),
    (lambda tmp: write_kitti(tmp / "kitti"), ["--split", "test"], "--frames"),
    (_mixed_sizes, [], "80x32"),
    (_grey_and_colour, [], "one encoding"),
    (_sixteen_bit, [], "8 bits"),
    (lambda tmp: write_kitti(tmp / "kitti", calib=False), [], "--intrinsics"),
    (lambda tmp: write_kitti(tmp / "kitti"), ["--intrinsics", "70,70,47"], "fx,fy,cx,cy"),
    (lambda tmp: write_kitti(tmp / "kitti"), ["--rate", "-3"], "positive"),
    (lambda tmp: write_sevenscenes(tmp / "kitti", scene_camera=False), [], "640x480"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, make, flags, says):
    root = make(tmp_path)
    assert convert(root, "--out", tmp_path / "bag", *flags) == 2
    err = capsys.readouterr().err
    assert says in err and err.startswith("vizloc-bag: error: ") and len(err.strip().splitlines()) == 1, err
    assert_nothing_left(tmp_path, "kitti")


def test_an_existing_output_is_kept_unless_overwrite_and_only_a_bag_is_replaced(tmp_path, capsys):
    root = write_kitti(tmp_path / "kitti", frames=3)
    assert convert(root, "--out", tmp_path / "bag", "--frames", "0") == 0
    assert convert(root, "--out", tmp_path / "bag") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert topic_message_counts(tmp_path / "bag")["/camera/image_raw"] == 1
    assert convert(root, "--out", tmp_path / "bag", "--overwrite") == 0
    assert topic_message_counts(tmp_path / "bag")["/camera/image_raw"] == 3
    (tmp_path / "notes").mkdir()
    assert convert(root, "--out", tmp_path / "notes", "--overwrite") == 2
    assert "not a rosbag2" in capsys.readouterr().err
    assert_nothing_left(tmp_path, "kitti", "bag", "notes")


@pytest.mark.parametrize("stop, code, says", [(KeyboardInterrupt, 130, "interrupted"),
                                               (dataset_bag.Terminated, 143, "terminated")])
def test_ctrl_c_or_sigterm_mid_bag_exits_130_or_143_and_leaves_no_bag(tmp_path, capsys, monkeypatch, stop, code,
                                                                      says):
    root = write_kitti(tmp_path / "kitti", frames=4)
    read = dataset_bag.read_image
    calls = []

    def stopped_on_the_third(path, encoding):
        calls.append(path)
        if len(calls) == 3:
            raise stop
        return read(path, encoding)

    monkeypatch.setattr(dataset_bag, "read_image", stopped_on_the_third)
    assert convert(root, "--out", tmp_path / "bag") == code
    assert f"{says}; no bag was written" in capsys.readouterr().err
    assert_nothing_left(tmp_path, "kitti")
