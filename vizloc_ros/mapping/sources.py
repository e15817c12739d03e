"""Where mapping frames come from: any pose dataset of the package (a rosbag2 / ROS 1 bag,
a 7-Scenes, Cambridge or KITTI folder), as :class:`~vizloc_ros.mapping.mapper.MapFrame`
items read on demand, with depth where the dataset has it (7-Scenes ``.depth.png``), and
the intrinsics of their images.

:func:`open_source` is what ``vizloc-map SOURCE`` calls: it tells the kind of ``SOURCE``
from what is in it, opens it with the training loaders (so a bag is read with the same
options, defaults and checks as ``vizloc-replay`` and ``vizloc-train``: image topic,
ground truth from a pose topic or a TF chain, the camera mount from ``/tf_static``, fixed
``/tf`` or ``--camera-extrinsic``) and finds the intrinsics (``--intrinsics``, else the
bag's ``camera_info``, else the folder's ``scene.json`` / ``calib.txt`` / 7-Scenes'
published camera). Every way this can fail is a :class:`SourceError` with one line that
names the file, topic or frame at fault and what fixes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vizloc_ros.localize.camera import CameraError, check_camera
from vizloc_ros.mapping.mapper import MapFrame, MappingError
from vizloc_ros.ros_io import messages
from vizloc_ros.ros_io.bag_io import read_messages
from vizloc_ros.ros_io.ground_truth import GroundTruthError
from vizloc_ros.training.bag_dataset import BagDataset
from vizloc_ros.training.datasets import Cambridge, KittiOdometry, SevenScenes
from vizloc_ros.training.pose_dataset import CAMERA_MOUNT_HINT, DatasetError, bag_topics
from vizloc_ros.training.scene_geometry import dataset_camera, dataset_root, depth_path, load_depth

#: what ``vizloc-map`` accepts as SOURCE, for the error that refuses anything else
ACCEPTED_SOURCES = ("a rosbag2 folder (with metadata.yaml), a ROS 1 .bag file, a 7-Scenes folder "
                    "(TrainSplit.txt), a Cambridge Landmarks folder (dataset_train.txt) or a KITTI "
                    "odometry folder (poses.txt)")
CAMERA_INFO_TYPE = "sensor_msgs/msg/CameraInfo"
#: what fixes a missing camera mount, in vizloc-map's flags
CAMERA_MOUNT_FLAGS = ("pass --camera-extrinsic X Y Z QX QY QZ QW (base -> camera optical frame), or "
                      "--base-frame if the robot's base has another name")
#: image_transport suffixes of an image topic that are not part of the camera's namespace
_TRANSPORTS = ("compressed", "compressedDepth", "theora", "zstd")


class SourceError(MappingError):
    """SOURCE cannot give mapping frames: missing, of no known kind, or its contents are
    not usable (no matching poses, no intrinsics, mixed image sizes, ...)."""


class DatasetFrames:
    """A :class:`~vizloc_ros.training.pose_dataset.PoseDataset` seen as mapping frames."""

    def __init__(self, dataset, use_depth: bool = True):
        self.dataset = dataset
        items = getattr(dataset, "items", [])
        self.use_depth = bool(use_depth) and bool(items) and all(
            depth_path(item[0]).is_file() for item in items[:3]) and getattr(dataset, "name", "") == "7scenes"

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> MapFrame:
        try:  # read when the mapping gets to it: a broken file is said then, as this source's error
            sample = self.dataset[index]
            depth = load_depth(depth_path(self.dataset.items[index][0])) if self.use_depth else None
        except (DatasetError, FileNotFoundError) as exc:
            raise SourceError(str(exc)) from None
        image = np.asarray(sample["image"])
        if not image.flags.writeable:  # Pillow's arrays are read-only; torch.from_numpy warns on them
            image = image.copy()
        return MapFrame(image=image, t=np.asarray(sample["t"], float),
                        q=np.asarray(sample["q"], float), depth=depth, stamp=float(sample["stamp"]))


@dataclass
class BagOptions:
    """How a bag is read (``vizloc-replay``'s flags, same names and defaults)."""

    image_topic: str = "/camera/image_raw"
    ground_truth: str = "/ground_truth/pose"
    base_frame: str = "base_link"
    camera_extrinsic: tuple | None = None  # (t, q_wxyz) base -> camera, wins over the bag's TF
    camera_info_topic: str | None = None  # None: beside the image topic (camera_info_topic_for)
    tolerance: float = 0.05  # seconds between an image and the nearest ground truth


@dataclass
class MappingSource:
    """What :func:`open_source` found: the frames, their camera and where both came from."""

    frames: DatasetFrames
    camera: dict
    kind: str
    camera_from: str
    left_out: dict


def source_kind(path: Path) -> str:
    """``bag``, ``7scenes``, ``cambridge`` or ``kitti`` from what ``path`` holds."""
    path = Path(path)
    if not path.exists():
        raise SourceError(f"SOURCE {path} does not exist; give {ACCEPTED_SOURCES}")
    if path.is_file():
        if path.suffix == ".bag":
            return "bag"
        if path.suffix in (".mcap", ".db3"):
            raise SourceError(f"SOURCE {path} is one file of a rosbag2: give its folder (the one with "
                              "metadata.yaml)")
    elif (path / "metadata.yaml").is_file():
        return "bag"
    elif (path / "TrainSplit.txt").is_file():
        return "7scenes"
    elif (path / "dataset_train.txt").is_file():
        return "cambridge"
    elif (path / "poses.txt").is_file():
        return "kitti"
    raise SourceError(f"SOURCE {path} is not a recording vizloc-map knows; give {ACCEPTED_SOURCES}")


def camera_info_topic_for(image_topic: str) -> str:
    """The ``camera_info`` beside an image topic, as image_transport names it:
    ``/camera/image_raw`` and ``/camera/image_raw/compressed`` -> ``/camera/camera_info``."""
    parts = [p for p in image_topic.split("/") if p]
    if parts and parts[-1] in _TRANSPORTS:
        parts.pop()
    return "/" + "/".join(parts[:-1] + ["camera_info"])


def parse_intrinsics(text: str) -> tuple[float, float, float, float]:
    """``fx,fy,cx,cy`` (pixels of the recorded images) -> four floats; ``SourceError`` if malformed."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or not all(np.isfinite(values)) or min(values[:2]) <= 0:
        raise SourceError(f"--intrinsics {text!r}: give fx,fy,cx,cy in pixels of the recorded images, "
                          "four numbers with positive focal lengths (e.g. 525,525,319.5,239.5)")
    return values  # type: ignore[return-value]


def _camera_info(bag: Path, topics: dict, topic: str) -> dict:
    """Intrinsics from the first usable message of the bag's ``topic``."""
    fix = "pass --intrinsics fx,fy,cx,cy (or --camera-info-topic)"
    if topic not in topics:
        others = sorted(name for name, kind in topics.items() if kind == CAMERA_INFO_TYPE)
        there = f"CameraInfo topics there: {', '.join(others)}" if others else "the bag has no CameraInfo topic"
        raise SourceError(f"no camera intrinsics: camera_info topic {topic!r} is not in {bag} ({there}); {fix}")
    if topics[topic] != CAMERA_INFO_TYPE:
        raise SourceError(f"camera_info topic {topic!r} carries {topics[topic]}, not {CAMERA_INFO_TYPE}; {fix}")
    problem = "it has no messages"
    for record in read_messages(bag, [topic]):
        try:
            return messages.camera_info_to_intrinsics(record.msg)
        except (ValueError, AttributeError) as exc:
            problem = str(exc)
    raise SourceError(f"no camera intrinsics: camera_info topic {topic!r} of {bag} is unusable ({problem}); {fix}")


def _open_bag(path: Path, options: BagOptions, every: int, intrinsics) -> tuple[BagDataset, dict | None, str]:
    gt_source = "/tf" if options.ground_truth.startswith("tf:") else options.ground_truth
    # the topics first (cheap, names what the bag has), the intrinsics next, then the images
    topics = bag_topics(path, {options.image_topic: "image", gt_source: "ground-truth"})
    camera, camera_from = None, "--intrinsics"
    if intrinsics is None:
        info_topic = options.camera_info_topic or camera_info_topic_for(options.image_topic)
        camera, camera_from = _camera_info(path, topics, info_topic), info_topic
    dataset = BagDataset(path, image_topic=options.image_topic, gt_topic=options.ground_truth,
                         tolerance=options.tolerance, base_frame=options.base_frame,
                         camera_extrinsic=options.camera_extrinsic, every=every, require_camera_mount=True)
    return dataset, camera, camera_from


def _camera_file(dataset) -> str:
    """Where :func:`~vizloc_ros.training.scene_geometry.dataset_camera` found the intrinsics
    (the same order), for the line that shows them."""
    root = dataset_root(dataset)
    for name in ("scene.json", "calib.txt"):
        if root is not None and (root / name).is_file():
            return str(root / name)
    return "7-Scenes' published camera (585 px at 640x480)"


def _open_folder(path: Path, kind: str, every: int):
    dataset = {"7scenes": lambda: SevenScenes(path, split="train"),
               "cambridge": lambda: Cambridge(path, split="train"),
               "kitti": lambda: KittiOdometry(path)}[kind]()
    dataset.items = dataset.items[::every]
    return dataset


def open_source(path, bag_options: BagOptions = BagOptions(), intrinsics=None, every: int = 1,
                use_depth: bool = True) -> MappingSource:
    """The mapping frames of ``path`` (see the module docstring), every ``every``-th one,
    and their camera. ``intrinsics``: (fx, fy, cx, cy) that win over what the source says."""
    path = Path(path)
    if int(every) < 1:
        raise SourceError(f"--every must be >= 1, got {every}")
    kind = source_kind(path)
    try:
        if kind == "bag":
            dataset, camera, camera_from = _open_bag(path, bag_options, int(every), intrinsics)
        else:
            dataset, camera, camera_from = _open_folder(path, kind, int(every)), None, "--intrinsics"
        if not len(dataset):
            raise SourceError(f"{path}: no frames with poses")
        width, height = dataset.check_image_sizes()
        if intrinsics is not None:
            camera = check_camera(dict(zip(("fx", "fy", "cx", "cy"), intrinsics), width=width, height=height))
        elif camera is None:
            camera, camera_from = dataset_camera(dataset), _camera_file(dataset)
    except SourceError:
        raise
    except (DatasetError, GroundTruthError) as exc:  # the loaders' hint, in this command's flags
        raise SourceError(str(exc).replace(CAMERA_MOUNT_HINT, CAMERA_MOUNT_FLAGS)) from None
    except CameraError as exc:
        raise SourceError(f"no camera intrinsics for {path} ({str(exc).split(': give')[0]}); "
                          "pass --intrinsics fx,fy,cx,cy") from None
    except ValueError as exc:  # rosbags' and the message decoders' own errors
        raise SourceError(f"{path}: {exc}") from None
    if (camera["width"], camera["height"]) != (width, height):
        raise SourceError(f"the intrinsics from {camera_from} are for {camera['width']}x{camera['height']} images, "
                          f"but the images of {path} are {width}x{height}; pass --intrinsics fx,fy,cx,cy "
                          "for the recorded size")
    left_out = dict(getattr(dataset, "left_out", {}) or {})
    return MappingSource(DatasetFrames(dataset, use_depth), camera, kind, camera_from, left_out)


__all__ = ["ACCEPTED_SOURCES", "BagOptions", "DatasetFrames", "MappingSource", "SourceError",
           "camera_info_topic_for", "open_source", "parse_intrinsics", "source_kind"]
