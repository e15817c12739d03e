"""Unlabeled sequences: camera images with the odometry between them, no ground truth.

MapNet+ (Brahmbhatt et al. 2018) fine-tunes MapNet on recordings that have no absolute
labels: only the relative poses measured by visual odometry between frames of a tuple
are used. Any robot recording with an odometry topic is such a sequence; so are the
synthetic world's bags (``vizloc-synth --format bag``), whose ``/odom`` is the simulated,
drifting visual odometry. Their ``/ground_truth/pose`` is never read here.

A sample is ``{"image": (T, H, W, 3) uint8, "t_rel": (T-1, 3) metres, "q_rel": (T-1, 4)
(w, x, y, z), "index": int}``: ``steps`` frames ``skip`` apart from one recording, and
between consecutive frames the pose of the later camera in the earlier camera's frame
(a^-1 b), from the odometry interpolated to the image stamps and moved into the camera
optical frame through the camera mount (:mod:`vizloc_ros.ros_io.camera_mount`:
``camera_extrinsic``, else /tf_static, else transforms that stay fixed on /tf).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from vizloc_ros import geometry
from vizloc_ros.ros_io import messages
from vizloc_ros.ros_io.bag_io import read_messages
from vizloc_ros.ros_io.camera_mount import CameraMountResolver, resolve_in_bag
from vizloc_ros.ros_io.ground_truth import interpolate_poses
from vizloc_ros.training.pose_dataset import CAMERA_MOUNT_HINT, DatasetError, ImageSampler, bag_topics

LOG = logging.getLogger(__name__)

#: odometry samples further apart than this (s) are not interpolated across
ODOM_MAX_GAP_S = 0.25


class OdometrySequence:
    """One recording: images, their stamps (s) and the camera poses in the odometry frame."""

    def __init__(self, name: str, images: list, stamps, t_cam, q_cam):
        stamps = np.asarray(stamps, dtype=float)
        t_cam = np.asarray(t_cam, dtype=float).reshape(-1, 3)
        q_cam = np.asarray(q_cam, dtype=float).reshape(-1, 4)
        if not (len(images) == len(stamps) == len(t_cam) == len(q_cam)):
            raise DatasetError(f"{name}: {len(images)} images, {len(stamps)} stamps and "
                               f"{len(t_cam)} odometry poses do not match")
        if len(stamps) > 1 and np.any(np.diff(stamps) <= 0):
            raise DatasetError(f"{name}: image stamps are not increasing")
        if not (np.all(np.isfinite(t_cam)) and np.all(np.isfinite(q_cam))):
            raise DatasetError(f"{name}: odometry pose contains NaN or inf")
        self.name, self.images, self.stamps = name, list(images), stamps
        #: per-image outputs of a frozen trunk (``training.trunk``), used instead of the images
        self.features: np.ndarray | None = None
        self.t_cam, self.q_cam = t_cam, geometry.quat_normalize(q_cam)

    def __len__(self) -> int:
        return len(self.images)


def read_bag_sequence(bag, image_topic: str = "/camera/image_raw", odom_topic: str = "/odom",
                      base_frame: str = "base_link", camera_extrinsic=None,
                      every: int = 1) -> OdometrySequence:
    """Images + odometry of one bag (rosbag2 or ROS 1) -> :class:`OdometrySequence`."""
    bag = Path(bag)
    topics = bag_topics(bag, {image_topic: "image", odom_topic: "odometry"})
    sampler = ImageSampler(bag, image_topic, every)
    wanted = [image_topic, odom_topic] + (["/tf_static"] if "/tf_static" in topics else [])
    images, image_stamps, frame_id = [], [], None
    odom_stamps, odom_t, odom_q = [], [], []
    camera_mount = CameraMountResolver(override=camera_extrinsic, hint=CAMERA_MOUNT_HINT)
    try:
        for record in read_messages(bag, wanted):
            if record.topic == image_topic:
                image = sampler.decode(record.msg)
                if image is not None:
                    images.append(image[1])
                    image_stamps.append(messages.header_stamp_sec(record.msg))
                    frame_id = frame_id or image[2]
            elif record.topic == odom_topic:
                try:
                    t, q = messages.pose_from_msg(record.msg)
                    odom_stamps.append(messages.header_stamp_sec(record.msg))
                except (ValueError, TypeError, AttributeError):
                    continue
                odom_t.append(t)
                odom_q.append(q)
            elif record.topic == "/tf_static":
                camera_mount.feed(record.msg, static=True)
    except ValueError as exc:
        raise DatasetError(f"{bag}: {exc}") from None
    sampler.warn(LOG)
    if not images or len(odom_stamps) < 2:
        raise DatasetError(f"{bag}: needs images on {image_topic} and odometry on {odom_topic} "
                           f"(found {len(images)} images, {len(odom_stamps)} odometry messages)")
    mount = resolve_in_bag(camera_mount, bag, topics, base_frame, frame_id or "")
    camera_extrinsic = mount.pose
    if not mount.found:
        LOG.warning("%s: %s; the odometry is used as the camera motion", bag, mount.reason)
    order = np.argsort(odom_stamps, kind="stable")
    o_s = np.asarray(odom_stamps)[order]
    o_t, o_q = np.asarray(odom_t)[order], np.asarray(odom_q)[order]
    i_order = np.argsort(image_stamps, kind="stable")
    i_s = np.asarray(image_stamps)[i_order]
    t_base, q_base = interpolate_poses(o_s, o_t, o_q, i_s, max_gap=ODOM_MAX_GAP_S)
    keep = np.all(np.isfinite(t_base), axis=1) & np.r_[True, np.diff(i_s) > 0]
    if keep.sum() < 2:
        raise DatasetError(f"{bag}: fewer than 2 images have odometry at their stamp")
    t_base, q_base = t_base[keep], q_base[keep]
    if camera_extrinsic is not None:
        t_cam, q_cam = geometry.pose_compose(t_base, q_base, *camera_extrinsic)
    else:
        t_cam, q_cam = t_base, q_base
    kept_images = [images[i] for i, k in zip(i_order, keep) if k]
    return OdometrySequence(str(bag), kept_images, i_s[keep], t_cam, q_cam)


def find_bags(root) -> list[Path]:
    """``root`` itself when it is a bag, else the bags directly inside it (sorted)."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"unlabeled data not found: {root}")
    if root.is_file() or (root / "metadata.yaml").is_file():
        return [root]
    bags = sorted(p for p in root.iterdir()
                  if (p.is_dir() and (p / "metadata.yaml").is_file()) or p.suffix == ".bag")
    if not bags:
        raise DatasetError(f"{root} is neither a bag nor a folder of bags")
    return bags


class UnlabeledTuples:
    """Tuples of ``steps`` frames ``skip`` apart from each sequence, every ``stride``
    frames, with the odometry's relative poses between consecutive frames (see the module
    docstring); a tuple never spans a gap longer than ``max_gap`` seconds."""

    def __init__(self, sequences: list[OdometrySequence], steps: int = 3, skip: int = 5,
                 stride: int = 1, max_gap: float = 5.0):
        if steps < 2 or skip < 1 or stride < 1:
            raise ValueError("unlabeled tuples need steps >= 2, skip >= 1 and stride >= 1")
        self.sequences, self.steps, self.skip = list(sequences), int(steps), int(skip)
        span = (self.steps - 1) * self.skip
        self.starts: list[tuple[int, int]] = []
        for s, seq in enumerate(self.sequences):
            for i in range(0, len(seq) - span, int(stride)):
                gaps = np.diff(seq.stamps[i:i + span + 1])
                if np.all(gaps > 0) and np.all(gaps <= max_gap):
                    self.starts.append((s, i))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict:
        s, first = self.starts[index]
        seq = self.sequences[s]
        idx = first + self.skip * np.arange(self.steps)
        t_rel, q_rel = geometry.pose_relative(seq.t_cam[idx[:-1]], seq.q_cam[idx[:-1]],
                                              seq.t_cam[idx[1:]], seq.q_cam[idx[1:]])
        # the images, or the cached outputs of a frozen trunk (training.trunk) when set
        frames = ("feature", seq.features) if seq.features is not None else ("image", seq.images)
        return {frames[0]: np.stack([frames[1][i] for i in idx]), "t_rel": t_rel,
                "q_rel": geometry.quat_hemisphere(q_rel), "index": index}


def open_unlabeled(kind: str, root, steps: int = 3, skip: int = 5, stride: int = 1,
                   **kwargs) -> UnlabeledTuples:
    """Unlabeled tuples by source kind: ``bag`` (a bag, or a folder of bags: images +
    odometry topic; keyword arguments of :func:`read_bag_sequence`)."""
    if kind != "bag":
        raise DatasetError(f"unknown unlabeled data kind {kind!r}; known: bag "
                           "(any recording with images and an odometry topic)")
    sequences = [read_bag_sequence(bag, **kwargs) for bag in find_bags(root)]
    return UnlabeledTuples(sequences, steps=steps, skip=skip, stride=stride)
