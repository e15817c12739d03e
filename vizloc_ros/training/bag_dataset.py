"""Training / evaluation samples from a recording (rosbag2 mcap or sqlite3, or ROS 1 .bag).

Images come from an Image or CompressedImage topic; ground truth from a pose topic
(PoseStamped, PoseWithCovarianceStamped, Odometry, TransformStamped) or a TF chain
(``tf:map->base_link``), interpolated to each image stamp and accepted only when a
ground-truth sample lies within ``tolerance`` seconds. The ground truth is the pose of
the base frame; the sample's pose is the camera's (DESIGN.md), obtained through the
camera mount base -> camera optical frame (:mod:`vizloc_ros.ros_io.camera_mount`:
``camera_extrinsic``, else /tf_static, else transforms that stay fixed on /tf).

Decoded images are held in memory (a bag cannot be read at random quickly); for very
long recordings export a 7-Scenes folder first.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from vizloc_ros import geometry
from vizloc_ros.ros_io.bag_io import read_messages
from vizloc_ros.ros_io.camera_mount import CameraMountResolver, resolve_in_bag
from vizloc_ros.ros_io.ground_truth import (GT_TYPES, TF_TYPES, GroundTruthError, GroundTruthReader,
                                          interpolate_poses)
from vizloc_ros.ros_io.messages import IMAGE_TYPES
from vizloc_ros.training.pose_dataset import (CAMERA_MOUNT_HINT, DatasetError, ImageSampler, PoseDataset,
                                             bag_topics)

LOG = logging.getLogger(__name__)


class BagDataset(PoseDataset):
    name = "bag"

    def __init__(self, bag, image_topic: str = "/camera/image_raw",
                 gt_topic: str = "/ground_truth/pose", tolerance: float = 0.05,
                 base_frame: str = "base_link", camera_extrinsic=None, split: str | None = None,
                 every: int = 1, require_camera_mount: bool = False):
        """``require_camera_mount``: refuse a bag whose camera mount cannot be found, instead
        of warning and taking the ground truth (the base) as the camera pose; a scene-coordinate
        map made from base poses would be rotated and shifted against the images."""
        super().__init__()
        bag = Path(bag)
        gt_source = "/tf" if gt_topic.startswith("tf:") else gt_topic
        topics = bag_topics(bag, {image_topic: "image", gt_source: "ground-truth"})
        for topic, allowed in ((image_topic, IMAGE_TYPES),
                               (gt_source, TF_TYPES if gt_source == "/tf" else GT_TYPES)):
            if topics[topic] not in allowed:
                raise DatasetError(f"{bag}: topic {topic} carries {topics[topic]}, expected one of "
                                   f"{', '.join(allowed)}")
        sampler = ImageSampler(bag, image_topic, every)
        wanted = [image_topic, gt_source] + (["/tf_static"] if "/tf_static" in topics else [])
        reader = GroundTruthReader(gt_topic, base_frame)
        camera_mount = CameraMountResolver(override=camera_extrinsic, hint=CAMERA_MOUNT_HINT)
        images: list[tuple[int, np.ndarray, str]] = []  # (stamp_ns, rgb, frame_id)
        try:
            for record in read_messages(bag, wanted):
                if record.topic == image_topic:
                    image = sampler.decode(record.msg)
                    if image is not None:
                        images.append(image)
                elif record.topic == "/tf_static":
                    camera_mount.feed(record.msg, static=True)
                if record.topic == gt_source:
                    reader.add(record.topic, record.msg)
            gt_stamps, gt_t, gt_q = reader.finish(camera_mount.static_edges(), camera_mount.static_skipped())
        except (ValueError, GroundTruthError) as exc:
            raise DatasetError(f"{bag}: {exc}") from None
        sampler.warn(LOG)
        if not images:
            raise DatasetError(f"{bag}: no decodable image on {image_topic}")
        mount = resolve_in_bag(camera_mount, bag, topics, base_frame, images[0][2])
        camera_extrinsic = mount.pose
        if not mount.found and require_camera_mount:
            raise DatasetError(f"{bag}: the camera's pose on the robot is unknown: {mount.reason}")
        if not mount.found:
            LOG.warning("%s: %s; using the ground truth as the camera pose", bag, mount.reason)
        stamps = np.array([ns * 1e-9 for ns, _, _ in images])
        t_base, q_base = interpolate_poses(gt_stamps, gt_t, gt_q, stamps)
        nearest = np.abs(gt_stamps[np.clip(np.searchsorted(gt_stamps, stamps), 0, len(gt_stamps) - 1)] - stamps)
        nearest = np.minimum(nearest, np.abs(gt_stamps[np.clip(np.searchsorted(gt_stamps, stamps) - 1, 0,
                                                               len(gt_stamps) - 1)] - stamps))
        self._images: list[np.ndarray] = []
        for k, (ns, image, _) in enumerate(images):
            if not np.all(np.isfinite(t_base[k])) or nearest[k] > tolerance:
                continue
            if camera_extrinsic is not None:
                t, q = geometry.pose_compose(t_base[k], q_base[k], *camera_extrinsic)
            else:
                t, q = t_base[k], q_base[k]
            self.items.append((Path(f"{bag}#{ns}"), t, geometry.quat_hemisphere(q), ns * 1e-9))
            self._images.append(image)
        if not self.items:
            raise DatasetError(f"{bag}: none of the {len(images)} images on {image_topic} has ground truth "
                               f"within {tolerance} s ({len(gt_stamps)} poses on {gt_topic}; images "
                               f"{stamps.min():.3f}..{stamps.max():.3f} s, ground truth "
                               f"{gt_stamps.min():.3f}..{gt_stamps.max():.3f} s)")
        self._cache = dict(enumerate(self._images))
        self.left_out = {"without ground truth": len(images) - len(self.items), "not decodable": sampler.bad}

    def preload(self) -> "BagDataset":
        return self  # already in memory
