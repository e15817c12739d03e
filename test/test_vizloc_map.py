"""`vizloc-map`: a tiny rendered room mapped from its 7-Scenes folder and from its bag into a
checkpoint that every entry point loads; each bad input is one line and exit 2; an
interrupted run (Ctrl-C, SIGTERM) writes nothing and leaves nothing behind.

Tiny on purpose: 64x48 images, a random-weight encoder written by the test (never the
shipped one), 5 head steps; what is checked is the command, not the map's accuracy.
"""
from __future__ import annotations

import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from vizloc_ros.localize.estimator import PoseEstimator
from vizloc_ros.localize.models import load_checkpoint
from vizloc_ros.localize.weights import network_noise
from vizloc_ros.localize.models.ace import AceLocalizer, SceneEncoder
from vizloc_ros.mapping import cli, mapper
from vizloc_ros.mapping.pretrain import write_encoder
from vizloc_ros.mapping.sources import camera_info_topic_for
from vizloc_ros.ros_io import messages
from vizloc_ros.ros_io.bag_io import BagWriter, list_topics, read_messages
from vizloc_ros.sim.synthetic import generate_demo


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    torch.manual_seed(0)
    return write_encoder(tmp_path_factory.mktemp("encoder") / "encoder", SceneEncoder(), {"made_by": "test: random"})


@pytest.fixture(scope="module")
def room(tmp_path_factory):
    """The demo room's 4 training walks, 30 frames each: a 7-Scenes folder (120 frames, depth)
    and one bag per walk."""
    return generate_demo(tmp_path_factory.mktemp("room") / "demo", split="train", fmt="both", frames=30,
                         size=(64, 48), progress=False)


def _map(source, out, encoder, *extra):
    return cli.main([str(source), "--out", str(out), "--encoder", str(encoder), "--steps", "5",
                     "--threads", "1", "--quiet", *map(str, extra)])


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("vizloc-map: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def _copy_bag(src, dst, change):
    """Copy a bag; ``change(topic, msg)`` returns the message to write, or None to drop it
    (a topic whose messages are all dropped is left out)."""
    records = [(r.topic, r.log_time_ns, change(r.topic, r.msg)) for r in read_messages(src)]
    kept = {topic for topic, _, msg in records if msg is not None}
    with BagWriter(dst) as writer:
        for name, kind in list_topics(src).items():
            if name in kept:
                writer.add_topic(name, kind)
        for topic, log_ns, msg in records:
            if msg is not None:
                writer.write(topic, log_ns, msg)
    return dst


# --------------------------------------------------------------------------- mapping

def test_a_7scenes_folder_maps_into_a_checkpoint_every_entry_point_runs(room, encoder, tmp_path):
    out = tmp_path / "maps" / "room.safetensors"
    assert _map(room, out, encoder) == 0
    model, meta = load_checkpoint(out)
    assert isinstance(model, AceLocalizer) and meta["architecture"] == "ace"
    training = meta["training"]
    assert training["frames"] == 120 and training["head_steps"] == 5 and training["depth_supervised"]
    assert training["command"].startswith("vizloc-map ") and "--steps 5" in training["command"]
    assert meta["metrics"]["validation_frames"] > 0 and "model_cov_scale" in meta["validation_errors"]
    # how long its errors stay alike, for the fusion (noise_from_weights), unless no
    # validation frame was localized at all
    validation = meta["metrics"]["validation"]
    if validation["failed_frames"] < meta["metrics"]["validation_frames"]:
        noise = meta["validation_errors"]["fusion_noise"]
        assert network_noise(out) == {"abs_correlation_time": noise["abs_correlation_time"]}
    # no copies by default, and the map says which augmentation it was made with
    assert training["augmentation"]["copies"] == 0 and training["augmentation"]["scale_max"] == 2.0
    # the network input never exceeds the 64x48 images: the map localizes the camera it was made from
    assert max(meta["input"]["crop"]) <= 64
    estimator = PoseEstimator(out, device="cpu")
    image = np.asarray(Image.open(room / "seq-01" / "frame-000000.color.png").convert("RGB"))
    estimate = estimator.estimate(image)
    assert np.all(np.isfinite(estimate.t)) and np.all(np.isfinite(estimate.q))
    assert estimate.cov.shape == (6, 6) and np.all(np.isfinite(estimate.cov))
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]


def test_a_bag_maps_with_intrinsics_from_camera_info_and_every_nth_frame(room, encoder, tmp_path):
    out = tmp_path / "bag_map"  # the suffix is added, as save_checkpoint does
    assert _map(room / "bags" / "seq-01", out, encoder, "--every", "2", "--no-depth", "--augment", "2",
                "--head-width", "32") == 0
    meta = json.loads((tmp_path / "bag_map.json").read_text())
    scene = json.loads((room / "scene.json").read_text())["camera"]
    # a bag has no depth: its depth targets are triangulated
    assert meta["training"]["frames"] == 15 and meta["training"]["triangulation"]["frames"] == 15
    assert meta["model_config"]["head_width"] == 32
    # the two augmented copies add rows: more than one view's cells per mapping frame
    assert meta["training"]["buffer_samples"] > meta["metrics"]["mapping_frames"] * 48
    assert meta["model_config"]["camera"]["fx"] == pytest.approx(scene["fx"])


def test_intrinsics_given_by_hand_stand_in_for_a_missing_camera_info(room, encoder, tmp_path, capsys):
    bag = room / "bags" / "seq-02"
    assert _map(bag, tmp_path / "m", encoder, "--camera-info-topic", "/left/camera_info") == 2
    err = _one_line_error(capsys)
    assert "'/left/camera_info' is not in" in err and "/camera/camera_info" in err and "--intrinsics" in err
    assert _map(bag, tmp_path / "m", encoder, "--camera-info-topic", "/left/camera_info",
                "--intrinsics", "50,51,31.5,23.5", "--no-triangulate") == 0
    meta = json.loads((tmp_path / "m.json").read_text())
    assert "triangulation" not in meta["training"] and not meta["training"]["depth_supervised"]
    camera = meta["model_config"]["camera"]
    assert (camera["fx"], camera["fy"], camera["width"], camera["height"]) == (50, 51, 64, 48)


def test_refinement_runs_and_is_recorded(room, encoder, tmp_path):
    out = tmp_path / "refined.safetensors"
    assert _map(room, out, encoder, "--refine-minutes", "0.005") == 0
    refinement = load_checkpoint(out)[1]["training"]["refinement"]
    assert refinement["steps"] >= 1 and isinstance(refinement["kept"], bool)
    assert refinement["validation_before"] and refinement["validation_after"]


def test_the_camera_info_topic_is_found_beside_the_image_topic():
    assert camera_info_topic_for("/camera/image_raw") == "/camera/camera_info"
    assert camera_info_topic_for("/cam/color/image_raw/compressed") == "/cam/color/camera_info"
    assert camera_info_topic_for("image") == "/camera_info"


def test_camera_info_of_a_ros1_bag_reads_its_upper_case_k():
    from rosbags.typesys import Stores, get_typestore

    T = get_typestore(Stores.ROS1_NOETIC).types
    header = T["std_msgs/msg/Header"](seq=0, stamp=T["builtin_interfaces/msg/Time"](sec=0, nanosec=0), frame_id="cam")
    roi = T["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
    info = T["sensor_msgs/msg/CameraInfo"](
        header=header, height=480, width=640, distortion_model="plumb_bob", D=np.zeros(5),
        K=np.array([517.3, 0, 318.6, 0, 516.5, 255.3, 0, 0, 1.0]), R=np.eye(3).ravel(), P=np.zeros(12),
        binning_x=0, binning_y=0, roi=roi)
    assert messages.camera_info_to_intrinsics(info) == {"width": 640, "height": 480, "fx": 517.3, "fy": 516.5,
                                                        "cx": 318.6, "cy": 255.3}


# --------------------------------------------------------------------------- bad input

def test_a_bag_without_camera_info_says_which_topic_was_looked_for(room, encoder, tmp_path, capsys):
    bag = _copy_bag(room / "bags" / "seq-01", tmp_path / "no_info",
                    lambda topic, msg: None if topic == "/camera/camera_info" else msg)
    assert _map(bag, tmp_path / "m", encoder) == 2
    err = _one_line_error(capsys)
    assert "'/camera/camera_info'" in err and "no CameraInfo topic" in err and "--intrinsics" in err


def test_images_without_matching_poses_give_the_counts_and_time_ranges(room, encoder, tmp_path, capsys):
    types = messages.rosbags_types()

    def shifted(topic, msg):  # the ground truth 1000 s after the images
        if topic != "/ground_truth/pose":
            return msg
        t, q = messages.pose_from_msg(msg)
        return messages.make_pose_stamped(types, messages.header_stamp_sec(msg) + 1000.0, msg.header.frame_id, t, q)

    bag = _copy_bag(room / "bags" / "seq-01", tmp_path / "shifted", shifted)
    assert _map(bag, tmp_path / "m", encoder) == 2
    err = _one_line_error(capsys)
    assert "none of the 30 images" in err and "poses on /ground_truth/pose" in err and ".." in err


def test_a_missing_topic_names_the_topics_the_bag_has(room, encoder, tmp_path, capsys):
    assert _map(room / "bags" / "seq-01", tmp_path / "m", encoder, "--image-topic", "/left/image") == 2
    err = _one_line_error(capsys)
    assert "'/left/image' is not in" in err and "/camera/image_raw" in err and "/ground_truth/pose" in err
    assert _map(room / "bags" / "seq-01", tmp_path / "m", encoder, "--ground-truth", "/mocap") == 2
    assert "'/mocap' is not in" in _one_line_error(capsys)


def test_an_unknown_camera_mount_is_refused_not_guessed(room, encoder, tmp_path, capsys):
    assert _map(room / "bags" / "seq-01", tmp_path / "m", encoder, "--base-frame", "robot") == 2
    err = _one_line_error(capsys)
    assert "camera's pose on the robot is unknown" in err and "--camera-extrinsic" in err


def test_frames_of_mixed_sizes_name_an_odd_frame(room, encoder, tmp_path, capsys):
    folder = tmp_path / "mixed"
    shutil.copytree(room, folder, ignore=shutil.ignore_patterns("bags"))
    odd = folder / "seq-02" / "frame-000007.color.png"
    Image.open(odd).resize((80, 60)).save(odd)
    assert _map(folder, tmp_path / "m", encoder) == 2
    err = _one_line_error(capsys)
    assert "frame-000007.color.png: image is 80x60" in err and "64x48" in err


def test_a_broken_image_found_while_mapping_is_one_line(room, encoder, tmp_path, capsys):
    folder = tmp_path / "broken"
    shutil.copytree(room, folder, ignore=shutil.ignore_patterns("bags"))
    broken = folder / "seq-03" / "frame-000004.color.png"
    broken.write_bytes(broken.read_bytes()[:100])  # the header is whole: the size check passes
    assert _map(folder, tmp_path / "m", encoder) == 2
    assert "image file is unreadable" in _one_line_error(capsys) and not (tmp_path / "m.safetensors").exists()


def test_an_existing_map_is_kept_unless_overwrite(room, encoder, tmp_path, capsys):
    out = tmp_path / "old.safetensors"
    out.write_bytes(b"an earlier map")
    assert _map(room, out, encoder) == 2
    assert "exists; pass --overwrite" in _one_line_error(capsys)
    assert out.read_bytes() == b"an earlier map" and not (tmp_path / "old.json").exists()


@pytest.mark.parametrize("make_source, expected", [
    (lambda tmp: tmp / "nowhere", "does not exist"),
    (lambda tmp: tmp, "is not a recording vizloc-map knows; give a rosbag2 folder"),
])
def test_a_source_that_is_missing_or_unknown_says_what_is_accepted(make_source, expected, encoder, tmp_path, capsys):
    assert _map(make_source(tmp_path), tmp_path / "m", encoder) == 2
    err = _one_line_error(capsys)
    assert expected in err and "7-Scenes" in err and "KITTI" in err


def test_too_few_frames(room, encoder, tmp_path, capsys):
    assert _map(room, tmp_path / "m", encoder, "--every", "20") == 2
    assert "6 frames with poses: a map needs at least" in _one_line_error(capsys)


@pytest.mark.parametrize("flags, expected", [
    (["--intrinsics", "500,500,320"], "--intrinsics '500,500,320': give fx,fy,cx,cy"),
    (["--intrinsics", "0,500,320,240"], "positive focal lengths"),
    (["--input-height", "96"], "--input-height 96 is more than the images' shorter side"),
    (["--camera-extrinsic", "0", "0", "0", "0", "0", "0", "3"], "--camera-extrinsic"),
])
def test_malformed_flags(flags, expected, room, encoder, tmp_path, capsys):
    assert _map(room / "bags" / "seq-01", tmp_path / "m", encoder, *flags) == 2
    assert expected in _one_line_error(capsys)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flag, value", [("--steps", "-3"), ("--augment", "-1"), ("--augment", "two"),
                                         ("--head-width", "0")])
def test_a_usage_error_is_one_line_too(capsys, flag, value):
    with pytest.raises(SystemExit) as stop:
        cli.main(["somewhere", "--out", "m", flag, value])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and flag in err


# --------------------------------------------------------------------------- interrupts

@pytest.mark.parametrize("stop, status", [
    (lambda: (_ for _ in ()).throw(KeyboardInterrupt()), 130),  # Ctrl-C
    (lambda: os.kill(os.getpid(), signal.SIGTERM), 143),  # SIGTERM, through the installed handler
])
def test_an_interrupted_run_writes_nothing_and_leaves_nothing(stop, status, room, encoder, tmp_path, monkeypatch,
                                                             capsys):
    out_dir = tmp_path / "maps"
    out_dir.mkdir()
    (out_dir / "map.safetensors").write_bytes(b"the previous map")
    handler_before = signal.getsignal(signal.SIGTERM)

    def interrupted(*args, **kwargs):
        stop()
        raise AssertionError("the stop did not stop")

    monkeypatch.setattr(mapper, "train_head", interrupted)
    assert _map(room, out_dir / "map.safetensors", encoder, "--overwrite") == status
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no map was written" in err
    assert sorted(p.name for p in out_dir.iterdir()) == ["map.safetensors"]
    assert (out_dir / "map.safetensors").read_bytes() == b"the previous map"
    assert signal.getsignal(signal.SIGTERM) == handler_before


def test_a_signal_while_the_map_is_published_waits_for_it(tmp_path):
    scratch_map = tmp_path / "scratch.safetensors"
    scratch_map.write_bytes(b"tensors")
    scratch_map.with_suffix(".json").write_text("{}")
    out = tmp_path / "map.safetensors"
    real_staged = cli.staged

    def staged_then_signalled(*args, **kwargs):  # Ctrl-C lands while the files are being written
        os.kill(os.getpid(), signal.SIGINT)
        return real_staged(*args, **kwargs)

    cli.staged = staged_then_signalled
    try:
        with pytest.raises(KeyboardInterrupt) as stop:
            cli.publish(scratch_map, out, out.with_suffix(".json"), overwrite=False)
    finally:
        cli.staged = real_staged
    assert getattr(stop.value, "written", False)
    assert out.read_bytes() == b"tensors" and out.with_suffix(".json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.json", "map.safetensors", "scratch.json",
                                                         "scratch.safetensors"]


def test_refinement_moves_a_shifted_map_back_towards_the_true_poses(room):
    """The e2e stage on a head whose points are exact but shifted 10 cm: DSAC's expected
    pose loss has a gradient into the head, and following it takes the shift back."""
    from torch import nn

    from vizloc_ros.localize.camera import input_camera
    from vizloc_ros.mapping.mapper import input_spec_for
    from vizloc_ros.mapping.refine import RefineOptions, refine_head
    from vizloc_ros.mapping.sources import DatasetFrames
    from vizloc_ros.training.datasets import SevenScenes
    from vizloc_ros.training.scene_geometry import dataset_camera, grid_scene_coordinates

    dataset = SevenScenes(room)
    frames, camera = DatasetFrames(dataset), dataset_camera(dataset)
    spec = input_spec_for(camera, 48)
    model = AceLocalizer(input_camera=input_camera(camera, spec), camera=camera)
    frame = frames[0]
    truth = grid_scene_coordinates(frame.depth, camera, spec, frame.t, frame.q, (6, 8), 8)

    class ShiftedTruth(nn.Module):  # the true points of frame 0, moved by a learnable offset
        def __init__(self):
            super().__init__()
            self.offset = nn.Parameter(torch.tensor([0.1, 0.0, 0.0]))

        def forward(self, features):
            return torch.from_numpy(truth).permute(2, 0, 1)[None] + self.offset[None, :, None, None]

    model.head = ShiftedTruth()
    history = refine_head(model, frames, [0], spec, RefineOptions(steps=40, lr=5e-3, threads=1), progress=None)
    assert history["steps"] == 40
    assert history["mean_expected_loss_last"] < 0.6 * history["mean_expected_loss_first"]
    assert float(model.head.offset.detach().norm()) < 0.06


@pytest.mark.parametrize("flag, value", [("--minutes", "inf"), ("--minutes", "nan"), ("--every", "0"),
                                         ("--threads", "-1"), ("--steps", "2.5")])
def test_a_number_flag_out_of_range_is_one_usage_line(flag, value, tmp_path, capsys):
    """``--minutes inf`` once passed and crashed turning the budget into a step count."""
    from vizloc_ros.mapping import cli

    with pytest.raises(SystemExit) as stopped:
        cli.main([str(tmp_path), "--out", str(tmp_path / "m.safetensors"), flag, value])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("vizloc-map: error:") and flag in err[-1] and "positive" in err[-1]
    assert not list(tmp_path.iterdir())
