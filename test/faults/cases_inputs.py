"""Fault catalogue: malformed inputs at the edges of the data (issue #19, items 4, 6, 8, 9b).

Each class of fault below, with the defect that found it:

* oversized and zero-size images: a 1 MB PNG announcing 20000x20000 pixels (a
  decompression bomb) once escaped ``RegressorCore`` as Pillow's
  ``DecompressionBombError``, aborting ``vizloc-replay`` and ``vizloc-eval``; now a frame
  whose header announces more than ``max_image_pixels`` is a counted drop
  (``dropped_image_too_large``) before anything is decoded;
* covariances in weights that are not covariances: a sidecar ``cov_ros`` of -I loaded as
  a fully confident network; now refused (naming the file and key) or, for rounding
  asymmetry and a singular matrix, repaired with a warning;
* settings that looked like broken weights: ``--mc-dropout-samples 100000`` said
  "cannot load weights ...: quaternion is zero";
* bad TF quaternions: a NaN or non-unit quaternion on /tf_static made the path "missing";
  now the transform and its problem are named;
* empty topics: an image topic without messages ended a replay with "no image ... ({};
  last error: None)"; now said up front with the image topics that have messages;
* mixed image sizes: a 7-Scenes folder with one odd frame ended training with numpy's
  "all input arrays must have the same shape"; now the odd file is named;
* sparse ground truth: one ground-truth message scored 1 frame of 24 in a table that did
  not say so; now the tables show the scored frames and warn.
"""
from __future__ import annotations

import contextlib
import io
import logging
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np

import fault_cases as F
from vizloc_ros.pipeline.regressor import RegressorCore, load_estimator
from vizloc_ros.ros_io import messages

TYPES = F.TYPES
IMAGE_TOPIC = "/camera/image_raw"
COMPRESSED_TOPIC = "/camera/image_raw/compressed"
MOUNT = ((0.1, 0.0, 0.2), (0.5, -0.5, 0.5, -0.5))


# --------------------------------------------------------------------------- inputs

def forged_png(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header announces ``width`` x ``height`` (0 allowed): a
    decompression bomb as a lazy decoder sees it, in a few dozen bytes."""
    from PIL import Image as PILImage

    buffer = io.BytesIO()
    PILImage.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _compressed(stamp, payload: bytes, fmt="png"):
    return TYPES.CompressedImage(header=messages.make_header(TYPES, stamp, "camera_optical_frame"), format=fmt,
                                 data=np.frombuffer(payload, np.uint8))


def _rewrite(src: Path, dst: Path, edit=None, renames=None, copies=None):
    """Copy a bag message by message: ``edit(topic, msg, index) -> msg | None`` changes or
    leaves out a message (index: its number on its topic; the topic stays, maybe empty),
    ``renames`` {topic: (new topic, new type, convert(msg, index) -> msg)} moves a topic
    to another type, ``copies`` {topic: [other topics]} also writes its messages (before
    ``edit``) on other topics of the same type."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    from vizloc_ros.ros_io.bag_io import list_topics, read_messages

    store = messages.rosbags_typestore()
    renames, copies = renames or {}, copies or {}
    with Writer(dst, version=8, storage_plugin=StoragePlugin.MCAP) as writer:
        connections = {}
        for topic, kind in list_topics(src).items():
            new_topic, new_kind, _ = renames.get(topic, (topic, kind, None))
            connections[topic] = (writer.add_connection(new_topic, new_kind, typestore=store), new_kind)
            for other in copies.get(topic, []):
                connections[other] = (writer.add_connection(other, kind, typestore=store), kind)
        counts: dict = {}
        for record in read_messages(src):
            index = counts.get(record.topic, 0)
            counts[record.topic] = index + 1
            msg = record.msg
            if record.topic in renames:
                msg = renames[record.topic][2](msg, index)
            for other in copies.get(record.topic, []):
                writer.write(connections[other][0], record.log_time_ns, store.serialize_cdr(msg, record.msgtype))
            if edit is not None:
                msg = edit(record.topic, msg, index)
            if msg is not None:
                connection, kind = connections[record.topic]
                writer.write(connection, record.log_time_ns, store.serialize_cdr(msg, kind))
    return dst


def _to_compressed(bomb_at=None, bomb=b""):
    """/camera/image_raw as PNG CompressedImages, frame ``bomb_at`` replaced by ``bomb``."""
    def convert(msg, index):
        if index == bomb_at:
            return replace(_compressed(0.0, bomb), header=msg.header)
        return replace(messages.make_compressed_image(TYPES, 0.0, msg.header.frame_id,
                                                      messages.image_to_rgb(msg), "png"), header=msg.header)

    def make(res, folder):
        dst = _rewrite(res.bag, folder / "compressed", renames={
            IMAGE_TOPIC: (COMPRESSED_TOPIC, "sensor_msgs/msg/CompressedImage", convert)})
        return {"bag": dst, "data": dst}
    return make


def _tf_static_rotation(x, y, z, w):
    """/tf_static with the camera mount's quaternion replaced."""
    def edit(topic, msg, index):
        if topic == "/tf_static":
            for tf in msg.transforms:
                tf.transform.rotation = TYPES.Quaternion(x=x, y=y, z=z, w=w)
        return msg

    def make(res, folder):
        dst = _rewrite(res.bag, folder / "badtf", edit=edit)
        return {"bag": dst, "data": dst}
    return make


def _image_topic_empty_beside_two_others(res, folder):
    """The recorder subscribed to a camera that never published, beside two that did."""
    dst = _rewrite(res.bag, folder / "emptycam", edit=lambda topic, msg, i: None if topic == IMAGE_TOPIC else msg,
                   copies={IMAGE_TOPIC: ["/left/image_raw", "/right/image_raw"]})
    return {"bag": dst, "data": dst}


def _ground_truth_empty(res, folder):
    dst = _rewrite(res.bag, folder / "nogt", edit=lambda topic, msg, i: None if topic == "/ground_truth/pose" else msg)
    return {"bag": dst, "data": dst}


def _images_change_size(res, folder):
    """The camera switches from 80x60 to 64x48 half-way (a driver reconfigured)."""
    def edit(topic, msg, index):
        if topic == IMAGE_TOPIC and index >= 12:
            small = messages.image_to_rgb(msg)[6:54, 8:72]
            return replace(messages.make_image(TYPES, 0.0, msg.header.frame_id, small), header=msg.header)
        return msg
    dst = _rewrite(res.bag, folder / "resized", edit=edit)
    return {"bag": dst, "data": dst}


def _seven_scenes_with_an_odd_frame(folder: Path, odd_size=(64, 48)) -> Path:
    """A 7-Scenes folder (train + test split, 80x60) with frame 7 of the train split
    saved at another size."""
    from PIL import Image as PILImage

    from vizloc_ros import geometry

    root = folder / "scene"
    for seq, split in ((1, "TrainSplit.txt"), (2, "TestSplit.txt")):
        (root / f"seq-{seq:02d}").mkdir(parents=True)
        (root / split).write_text(f"sequence{seq}\n")
        for k in range(12):
            stem = root / f"seq-{seq:02d}" / f"frame-{k:06d}"
            np.savetxt(f"{stem}.pose.txt", geometry.pose_to_matrix(np.array([0.1 * k, 0.0, 1.3]),
                                                                   np.array([1.0, 0.0, 0.0, 0.0])))
            width, height = odd_size if (seq, k) == (1, 7) else (80, 60)
            pixels = np.random.default_rng(k).integers(0, 256, (height, width, 3), dtype=np.uint8)
            PILImage.fromarray(pixels).save(f"{stem}.color.png")
    return root


# --------------------------------------------------------------------------- observing

@contextlib.contextmanager
def _captured_log():
    """The log lines of the package and the command lines while a case runs."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Keep(logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("vizloc_ros", "vizloc-replay")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield lines
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def _requiring(run, *words):
    """``run``'s observation, whose error line (or, for "ok", a warning) must hold ``words``."""
    def checked(res, folder):
        with _captured_log() as lines:
            obs = run(res, folder)
        said = obs.detail if obs.behaviour == "error" else " | ".join(lines)
        missing = [w for w in words if w not in said]
        if missing and obs.behaviour in ("error", "ok"):
            obs.behaviour = f"{obs.behaviour} without {missing} ({said[:300]})"
        return obs
    return checked


def _metrics_counter(key: str, expected: int, run):
    """A replay that must finish with ``metrics.json`` counting ``key`` ``expected`` times
    (under ``counts``)."""
    def checked(res, folder):
        obs = run(res, folder)
        if obs.behaviour == "ok":
            import json

            counted = json.loads((folder / "report" / "metrics.json").read_text())["counts"].get(key, 0)
            if counted != expected:
                obs.behaviour = f"ok with {key} = {counted}, not {expected}"
        return obs
    return checked


# --------------------------------------------------------------------------- images

def _oversized_image_case(name, msg, words) -> F.Case:
    """A frame whose header announces too many pixels: a drop counted as
    ``dropped_image_too_large`` (not any drop), and the next good frame is processed."""
    def run(res):
        core = RegressorCore(res.estimator, base_T_camera=MOUNT)
        obs = F._regress(core, msg)
        if obs.behaviour == "drop" and (core.counters["dropped_image_too_large"] != 1 or words not in obs.detail):
            obs.behaviour = f"drop of another kind ({dict(core.counters)})"
        follow = F._regress(core, F._image(F.T0 + 2))
        obs.recovered = follow.behaviour == "ok" and follow.nan_outputs == 0
        return obs
    return F.Case(name, "images", ("drop",), run, "dropped before decoding, counted as dropped_image_too_large")


def _image_cases() -> list[F.Case]:
    good = F._image(F.T0 + 1)
    oversized = {
        "oversized CompressedImage: a 20000x20000 PNG header (decompression bomb)":
            (_compressed(F.T0 + 1, forged_png(20_000, 20_000)), "Pillow"),
        "oversized CompressedImage: a 9000x9000 PNG header, under Pillow's own limit":
            (_compressed(F.T0 + 1, forged_png(9_000, 9_000)), "exceeds max_image_pixels"),
        "oversized raw Image: header of 100000x100000 pixels": (
            replace(good, width=100_000, height=100_000, step=300_000), "exceeds max_image_pixels"),
    }
    cases = [_oversized_image_case(name, msg, words) for name, (msg, words) in oversized.items()]
    zero = {
        "zero-size CompressedImage: a PNG header of 0x0": _compressed(F.T0 + 1, forged_png(0, 0)),
        "zero-width raw Image (height 60)": replace(good, width=0, step=0, data=np.zeros(0, np.uint8)),
        "absurd step: 2**40 bytes per row": replace(good, step=2 ** 40),
    }
    cases += [F._image_case(name, ("drop",), msg) for name, msg in zero.items()]
    return cases


def _bag_image_cases() -> list[F.Case]:
    bomb = _to_compressed(bomb_at=5, bomb=forged_png(20_000, 20_000))
    args = ("--image-topic", COMPRESSED_TOPIC)
    return [
        F.in_workdir("bags", "a 20000x20000 PNG frame in a CompressedImage bag (vizloc-replay)", "ok",
                     _metrics_counter("images_dropped_image_too_large", 1,
                                      F.replay_case(args=args, prepare=bomb)),
                     "the run finishes; the frame is counted in metrics.json as images_dropped_image_too_large"),
        F.in_workdir("bags", "a 20000x20000 PNG frame in a CompressedImage bag (vizloc-eval)", "ok",
                     F.eval_case(args=args, prepare=bomb), "the frame is skipped with a warning, the others scored"),
        F.in_workdir("bags", "images that change size mid-recording (vizloc-replay)", "ok",
                     F.replay_case(prepare=_images_change_size), "each size runs through the network"),
        F.in_workdir("bags", "images that change size mid-recording (vizloc-eval)", "ok",
                     F.eval_case(prepare=_images_change_size), "each size runs through the network"),
    ]


# --------------------------------------------------------------------------- weights

def _stored(key, value):
    def make(res, folder):
        st = F._copy_weights(res, folder, "badcov")
        F._edit_json(st, lambda meta: meta["validation_errors"].update({key: value}))
        return st
    return make


def _asymmetric():
    cov = np.diag([0.09] * 3 + [0.01] * 3)
    cov[0, 1] = 0.05
    return cov.tolist()


def _not_psd():
    cov = np.diag([0.09] * 3 + [0.01] * 3)
    cov[0, 1] = cov[1, 0] = 0.2  # a correlation of 2.2
    return cov.tolist()


def _one_frame():
    error = np.array([[0.2, -0.1, 0.05, 0.01, 0.02, -0.03]])
    return (error.T @ error).tolist()


#: sidecar uncertainty that is not one: (key, value, words the error must hold)
BAD_COVARIANCES = {
    "cov_ros of -I (a fully confident network once)": ("cov_ros", (-np.eye(6)).tolist(), "negative variances"),
    "an all-zero cov_ros": ("cov_ros", np.zeros((6, 6)).tolist(), "zero variances"),
    "an asymmetric cov_ros": ("cov_ros", _asymmetric(), "not symmetric"),
    "a cov_ros that is not positive semi-definite": ("cov_ros", _not_psd(), "not positive semi-definite"),
    "a cov_ros of null (NaN when saved)": ("cov_ros", [[None] * 6] * 6, "NaN, inf or null"),
    "a model_cov_scale of -1": ("model_cov_scale", -1.0, "finite number > 0"),
}


def _load_case(make, words, expected="error"):
    def run(res, folder):
        path = make(res, folder)
        try:
            estimator = load_estimator(path, device="cpu", cpu_threads=1)
        except ValueError as exc:
            obs = F.Observation("error", detail=str(exc))
            if not all(w in str(exc) for w in words):
                obs.behaviour = f"error without {words}"
            return obs
        cov = estimator._validation_cov
        if not np.all(np.linalg.eigvalsh(cov) > 0):
            return F.Observation("ok with a singular covariance")
        return F.Observation("ok")
    return run


def _weights_cases() -> list[F.Case]:
    cases = []
    for name, (key, value, words) in BAD_COVARIANCES.items():
        make = _stored(key, value)
        cases.append(F.in_workdir("weights", f"sidecar with {name} (node / PoseEstimator)", "error",
                                  _load_case(make, (words, f"validation_errors.{key}", "badcov.json")),
                                  "one ValueError naming the file, the key and the problem"))
        cases.append(F.in_workdir("weights", f"sidecar with {name} (vizloc-replay)", "error",
                                  _requiring(F.replay_case(prepare=lambda res, d, make=make: {"weights": make(res, d)}),
                                             words, f"validation_errors.{key}"),
                                  "exit 2, one line naming the file and the key, no report"))
    cases.append(F.in_workdir("weights", "sidecar with an asymmetric cov_ros (vizloc-eval)", "error",
                              _requiring(F.eval_case(prepare=lambda res, d: {"weights": _stored(
                                  "cov_ros", _asymmetric())(res, d)}), "not symmetric"), "exit 2, one line"))
    cases.append(F.in_workdir(
        "weights", "sidecar with a rank-1 cov_ros (a 1-frame validation split)", "ok",
        _requiring(_load_case(_stored("cov_ros", _one_frame()), ()), "singular (rank 1 of 6", "badcov"),
        "loaded with one warning; each block floored with its mean variance"))
    cases.append(F.in_workdir(
        "weights", "vizloc-replay: --mc-dropout-samples 100000", "error",
        _requiring(F.replay_case(args=("--mc-dropout-samples", 100000)), "mc_dropout_samples = 100000"),
        "exit 2, one line naming the setting (it once said the weights had a zero quaternion)"))
    return cases


# --------------------------------------------------------------------------- TF, empty topics, sizes

def _tf_cases() -> list[F.Case]:
    cases = []
    for name, quaternion, words in (("a NaN quaternion", (float("nan"), 0.0, 0.0, 1.0), "NaN"),
                                    ("a quaternion of norm 2", (-1.0, 1.0, -1.0, 1.0), "norm 2 is not 1")):
        bad = _tf_static_rotation(*quaternion)
        if "NaN" in name:  # a whole run (the resolver's own tests cover the other quaternions)
            cases.append(F.in_workdir(
                "bags", f"/tf_static camera mount with {name} (vizloc-replay)", "ok",
                _requiring(F.replay_case(prepare=bad), "base_link -> camera_optical_frame (", words),
                "runs on the fallback mount; the warning names the transform and its quaternion, "
                "not just 'no TF path'"))
        chain = "tf:odom->camera_optical_frame"
        cases.append(F.in_workdir(
            "bags", f"ground truth through a /tf_static edge with {name} (vizloc-replay)", "error",
            _requiring(F.replay_case(args=("--ground-truth", chain), prepare=bad),
                       "base_link -> camera_optical_frame (", words),
            "exit 2; the line names the unusable transform"))
        cases.append(F.in_workdir(
            "bags", f"ground truth through a /tf_static edge with {name} (vizloc-eval)", "error",
            _requiring(F.eval_case(args=("--gt-topic", chain), prepare=bad),
                       "base_link -> camera_optical_frame (", words),
            "exit 2; the line names the unusable transform"))
    return cases


def _empty_topic_cases() -> list[F.Case]:
    words = ("'/camera/image_raw' has no messages", "/left/image_raw (24)", "/right/image_raw (24)")
    return [
        F.in_workdir("bags", "image topic without messages beside two image topics (vizloc-replay)", "error",
                     _requiring(F.replay_case(prepare=_image_topic_empty_beside_two_others), *words),
                     "exit 2 before any work; names the topics that have images"),
        F.in_workdir("bags", "image topic without messages beside two image topics (vizloc-eval)", "error",
                     _requiring(F.eval_case(prepare=_image_topic_empty_beside_two_others), *words),
                     "exit 2; names the topics that have images"),
        F.in_workdir("bags", "ground-truth topic without messages (vizloc-replay)", "error",
                     _requiring(F.replay_case(prepare=_ground_truth_empty), "'/ground_truth/pose' has no messages"),
                     "exit 2, one line naming the topic"),
        F.in_workdir("bags", "ground-truth topic without messages (vizloc-eval)", "error",
                     _requiring(F.eval_case(prepare=_ground_truth_empty), "'/ground_truth/pose' has no messages"),
                     "exit 2, one line naming the topic"),
    ]


def _train_on(folder_maker):
    def run(res, folder):
        from vizloc_ros.training import train

        root = folder_maker(folder)
        argv = ["--config", Path(train.__file__).parents[2] / "config" / "train_posenet_demo.yaml",
                "--device", "cpu", "--set", "amp=none", "--set", "workers=0", "--set", f"data.root={root}",
                "--set", "data.val_root=", "--set", "data.val_split=train", "--set", f"out={folder / 'w'}",
                "--set", "optim.epochs=1", "--set", "model.name=posenet_resnet18"]
        obs = F.cli_observation(train.main, argv, folder)
        if (folder / "w.safetensors").exists() and obs.behaviour != "ok":
            obs.half_written.append("w.safetensors written by a failed run")
        return obs
    return run


def _dataset_cases() -> list[F.Case]:
    def odd(folder):
        return _seven_scenes_with_an_odd_frame(folder)

    def eval_odd(res, folder):
        root = odd(folder)
        return F.cli_observation(F._eval_main(), [res.weights, root, "--kind", "7scenes", "--device", "cpu",
                                                  "--no-progress"], folder)
    return [
        F.in_workdir("datasets", "7-Scenes folder with one frame of another size (vizloc-train)", "error",
                     _requiring(_train_on(odd), "frame-000007.color.png: image is 64x48", "80x60"),
                     "exit 2 before training; the line names the odd file and the common size"),
        F.in_workdir("datasets", "7-Scenes folder with one frame of another size (vizloc-eval)", "ok",
                     eval_odd, "evaluation groups images by size: every frame is scored"),
    ]


def _ground_truth_of_one_message(res, folder):
    dst = _rewrite(res.bag, folder / "gt1", edit=lambda topic, msg, i: None
                   if topic == "/ground_truth/pose" and i != 10 else msg)
    return {"bag": dst, "data": dst}


def _table_says(main_of, argv_of, *words):
    """A command line that must exit 0 and print ``words`` in its table (stdout); runs of
    spaces count as one (the table's label column widens with its longest label)."""
    def run(res, folder):
        params = _ground_truth_of_one_message(res, folder)
        code, stdout, stderr, crashed = F.call_cli(main_of(), argv_of(res, folder, params))
        obs = F.Observation("ok" if code == 0 else "error", exit_code=code, crashed=crashed,
                            detail=F._error_line(stderr) or F._error_line(stdout))
        obs.half_written = F.leftovers(folder)
        flat = " ".join(stdout.split())
        missing = [w for w in words if " ".join(w.split()) not in flat]
        if obs.behaviour == "ok" and missing:
            obs.behaviour = f"ok without {missing} in its table"
        return obs
    return run


def _scored_frame_cases() -> list[F.Case]:
    warning = "WARNING: only 1 of 24 frames could be scored"
    replay_argv = lambda res, folder, p: [p["bag"], "--weights", res.weights, "--out", folder / "report",  # noqa: E731
                                          "--device", "cpu", "--no-progress"]
    eval_argv = lambda res, folder, p: [res.weights, p["data"], "--kind", "bag", "--device", "cpu",  # noqa: E731
                                        "--no-progress"]
    return [
        F.in_workdir("bags", "ground truth of one message (vizloc-replay)", "ok",
                     _table_says(F._replay_main, replay_argv, "frames scored", "1 with ground truth", warning),
                     "the table shows 1 frame scored per source and warns"),
        F.in_workdir("bags", "ground truth of one message (vizloc-eval)", "ok",
                     _table_says(F._eval_main, eval_argv, "frames scored 1 of 24 (23 without ground truth)",
                                 warning),
                     "the table shows 1 of 24 frames scored and warns"),
    ]


def _param_cases() -> list[F.Case]:
    return [F._param_case("max_image_pixels of 0", "vizloc_regressor", "max_image_pixels: 0", "'max_image_pixels'"),
            F._param_case("max_image_pixels as a float", "vizloc_regressor", "max_image_pixels: 100000000.0",
                          "'max_image_pixels'")]


def cases() -> list[F.Case]:
    return (_image_cases() + _bag_image_cases() + _weights_cases() + _tf_cases() + _empty_topic_cases()
            + _dataset_cases() + _scored_frame_cases() + _param_cases())
