"""`vizloc-bag`: a 7-Scenes, Cambridge Landmarks or KITTI odometry folder as a rosbag2 that
``vizloc-replay`` plays, so a public dataset can be replayed through the live pipeline.

    vizloc-bag FOLDER --out BAG [--kind 7scenes|cambridge|kitti] [--split train|test]
               [--frames 1::2 | 0-159] [--intrinsics FX,FY,CX,CY] [--rate HZ] [--compressed]

The folder is read by the training loaders (:func:`~vizloc_ros.training.datasets.open_dataset`:
the same files, poses and checks as ``vizloc-train`` and ``vizloc-eval``), so a bag holds
exactly the poses a model was trained and evaluated on. Its kind is told from what the
folder holds (``TrainSplit.txt``, ``dataset_train.txt``, ``poses.txt``) unless ``--kind``.

The bag is laid out like the synthetic bags of ``vizloc-synth`` (same topics, frames, QoS
and stamps as log times), because those are what the replay, the nodes and their tests
are checked against:

=============================  ==========================================================
``/camera/image_raw``          ``sensor_msgs/Image`` in ``camera_optical_frame``: mono8 for
                               grey images (KITTI ``image_0``), rgb8 for colour ones
``/camera/image_raw/compressed``  instead, with ``--compressed``: ``CompressedImage`` png
                               (lossless; replay it with ``--image-topic`` set to it)
``/camera/camera_info``        ``CameraInfo`` of every image, same stamp (pinhole, no
                               distortion: the datasets' images are rectified)
``/ground_truth/pose``         ``PoseStamped`` of ``base_link`` in ``map`` at every image stamp
``/tf_static``                 ``base_link -> camera_optical_frame`` (transient local)
=============================  ==========================================================

Frames: the dataset's world frame is ``map``. The dataset's camera is
``camera_optical_frame`` (REP-103: z forward, x right, y down), which is what its poses
are (camera-to-world). A dataset knows no robot, so ``base_link`` is a REP-103 body frame
(x forward, y left, z up) at the camera's centre: the mount is the optical rotation
:data:`~vizloc_ros.ros_io.camera_mount.OPTICAL_IN_BODY_R`, the synthetic robot's, with no
translation. The replay turns a camera pose into a base pose through that mount and scores
it against ``/ground_truth/pose``; ground truth through the mount is the dataset's pose.

Stamps: the dataset's own times (KITTI ``times.txt``, 7-Scenes at 30 frames a second with
sequences 10 000 s apart, Cambridge one frame a second in listing order), or the kept
frames ``1/HZ`` apart with ``--rate HZ``; both counted from :data:`START_NS` (a ROS time of
zero reads as "unset" to many tools). They must increase.

Intrinsics: ``--intrinsics``, else the folder's ``scene.json`` (a ``vizloc-synth`` 7-Scenes
output) or KITTI ``calib.txt``, else 7-Scenes' published 585 px at 640x480
(:func:`~vizloc_ros.training.scene_geometry.dataset_camera`); Cambridge Landmarks ships
no intrinsics with its listings, so it needs ``--intrinsics``.

The bag is written into a scratch folder beside ``BAG`` and moved into place when complete
(:mod:`vizloc_ros.files`): an error (exit 2), Ctrl-C (exit 130) or SIGTERM (exit 143) leaves no
bag and no temporary; a ``kill -9`` leaves a locked temporary that the next run removes.
"""
from __future__ import annotations

import argparse
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vizloc_ros import geometry
from vizloc_ros.cli_args import positive
from vizloc_ros.files import OutputError, check_not_a_link, move_into_place, scratch_folder
from vizloc_ros.localize.camera import CameraError, check_camera
from vizloc_ros.ros_io import messages
from vizloc_ros.ros_io.bag_io import BagWriter
from vizloc_ros.ros_io.camera_mount import OPTICAL_IN_BODY_R
from vizloc_ros.training.datasets import open_dataset
from vizloc_ros.training.pose_dataset import DatasetError, PoseDataset
from vizloc_ros.training.scene_geometry import dataset_camera, dataset_root

PROG = "vizloc-bag"

#: what tells a dataset's kind, in the order asked: the file at the folder's top
KIND_MARKERS = {"7scenes": "TrainSplit.txt", "cambridge": "dataset_train.txt", "kitti": "poses.txt"}
KINDS = tuple(KIND_MARKERS)
#: the kinds that have train / test listings, and the split replayed by default (held-out frames)
SPLIT_KINDS = ("7scenes", "cambridge")
DEFAULT_SPLIT = "test"

#: the first stamp of a bag (2023-11-14T22:13:20Z, vizloc-synth's simulated start too)
START_NS = 1_700_000_000 * 1_000_000_000

FRAME_MAP = "map"
FRAME_BASE = "base_link"
FRAME_CAMERA = "camera_optical_frame"
TOPIC_IMAGE = "/camera/image_raw"
TOPIC_COMPRESSED = TOPIC_IMAGE + "/compressed"
TOPIC_CAMERA_INFO = "/camera/camera_info"
TOPIC_GROUND_TRUTH = "/ground_truth/pose"
TOPIC_TF_STATIC = "/tf_static"

#: base_link -> camera_optical_frame (see the module docstring)
MOUNT_T = np.zeros(3)
MOUNT_Q = geometry.matrix_to_quat(OPTICAL_IN_BODY_R)

#: Pillow modes written as they are, and the encoding they are written in; other 8-bit
#: modes (palette, RGBA, CMYK, 1-bit) become rgb8 or mono8, 16-bit and float ones are refused
_ENCODING_OF_MODE = {"L": "mono8", "RGB": "rgb8"}
_CONVERTED_MODES = {"1": "L", "P": "RGB", "PA": "RGB", "LA": "L", "RGBA": "RGB", "RGBX": "RGB",
                    "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB"}


class ConversionError(ValueError):
    """The folder, a flag or the output cannot give a bag; the message is one line that
    names the file or flag at fault and what fixes it."""


@dataclass
class Recording:
    """What goes into the bag: the selected frames, their stamps, camera and encoding."""

    dataset: PoseDataset
    kind: str
    split: str | None
    stamps_ns: np.ndarray  # (N,) int64, strictly increasing
    camera: dict  # fx, fy, cx, cy, width, height
    camera_from: str
    encoding: str  # mono8 or rgb8: how the images are read and written

    def __len__(self) -> int:
        return len(self.dataset)


# --------------------------------------------------------------------------- reading

def dataset_kind(folder: Path) -> str:
    """``7scenes``, ``cambridge`` or ``kitti`` from the file that marks the layout."""
    for kind, marker in KIND_MARKERS.items():
        if (folder / marker).is_file():
            return kind
    markers = ", ".join(f"{marker} ({kind})" for kind, marker in KIND_MARKERS.items())
    raise ConversionError(f"cannot tell what dataset {folder} is: it has none of {markers}; "
                          f"pass --kind {'|'.join(KINDS)}")


def parse_intrinsics(text: str) -> tuple[float, float, float, float]:
    """``fx,fy,cx,cy`` (pixels of the images as stored) -> four floats."""
    try:
        values = tuple(float(part) for part in str(text).split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or not all(np.isfinite(values)) or min(values[:2]) <= 0:
        raise ConversionError(f"--intrinsics {text!r}: give fx,fy,cx,cy in pixels of the stored images, "
                              "four numbers with positive focal lengths (e.g. 718.856,718.856,607.19,185.22)")
    return values  # type: ignore[return-value]


_SLICE = re.compile(r"^\s*(-?\d*)\s*:\s*(-?\d*)\s*(?::\s*(-?\d*)\s*)?$")
_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
_INDEX = re.compile(r"^\s*(\d+)\s*$")


def select_frames(text: str | None, count: int) -> list[int]:
    """Positions of the kept frames among ``count``: ``None`` all of them, ``A:B:S`` a
    Python slice (``1::2`` every odd frame), ``A-B`` the frames A to B inclusive, ``N``
    one frame. For KITTI the positions are the frame numbers of ``poses.txt``.

    A bound past the end is an error, not a silent clip: ``0-159`` of a 51-frame folder is
    a mistake about the folder, not a wish for 51 frames."""
    if text is None:
        return list(range(count))
    what = f"--frames {text!r}"
    if (match := _RANGE.match(text)) is not None:
        first, last = int(match.group(1)), int(match.group(2))
        if first > last:
            raise ConversionError(f"{what}: the range runs backwards; give FIRST-LAST with FIRST <= LAST")
        highest, chosen = last, list(range(first, last + 1))
    elif (match := _INDEX.match(text)) is not None:
        highest = int(match.group(1))
        chosen = [highest]
    elif (match := _SLICE.match(text)) is not None:
        start, stop, step = (int(g) if g else None for g in match.groups())
        if any(v is not None and v < 0 for v in (start, stop, step)):
            raise ConversionError(f"{what}: frame numbers count from 0 and the step is positive; negative ones are not taken")
        if step == 0:
            raise ConversionError(f"{what}: the step of a slice cannot be 0")
        # the highest frame the slice names: its start, or the one before its stop
        highest = max(start or 0, (stop or 0) - 1)
        chosen = list(range(count))[slice(start, stop, step)]
    else:
        raise ConversionError(f"{what}: give a slice START:STOP[:STEP] (e.g. 1::2), a range FIRST-LAST "
                              "(e.g. 0-159) or one frame number")
    if highest >= count:
        raise ConversionError(f"{what} is out of range: there are {count} frame(s) to choose from, "
                              f"numbered 0-{count - 1}")
    if not chosen:
        raise ConversionError(f"{what} selects none of the {count} frame(s)")
    return chosen


def _image_header(path: Path) -> tuple[tuple[int, int], str]:
    """((width, height), Pillow mode) from an image file's header, without decoding it."""
    try:
        with Image.open(path) as image:
            return image.size, image.mode
    except FileNotFoundError:
        raise ConversionError(f"image file is missing: {path}") from None
    except (OSError, Image.DecompressionBombError) as exc:
        raise ConversionError(f"image file is unreadable: {path} ({exc})") from None


def _written_mode(mode: str, path: Path) -> str:
    """The Pillow mode an image of ``mode`` is written in (L or RGB)."""
    written = mode if mode in _ENCODING_OF_MODE else _CONVERTED_MODES.get(mode)
    if written is None:
        raise ConversionError(f"{path}: Pillow mode {mode} (16-bit or float) is not an 8-bit camera "
                              "image; convert the images to 8 bits first")
    return written


def check_images(dataset: PoseDataset, progress: bool = False) -> tuple[tuple[int, int], str]:
    """The one (width, height) and encoding of the selected images, from their headers.

    Why before writing: one ``camera_info`` describes one size, and a replay that meets an
    image of another size mid-bag would scale the network's input differently for it. A
    folder of grey and colour frames mixed is refused for the same reason (one encoding)."""
    first_path = dataset.items[0][0]
    size, mode = _image_header(first_path)
    mode = _written_mode(mode, first_path)
    for item in tqdm(dataset.items[1:], desc=f"{PROG}: checking images", unit="image",
                     disable=not progress, leave=False):
        path = item[0]
        other_size, other_mode = _image_header(path)
        if other_size != size:
            raise ConversionError(f"{path}: image is {other_size[0]}x{other_size[1]}, but {first_path} is "
                                  f"{size[0]}x{size[1]}; one camera_info describes one size: resize the "
                                  "images or convert a selection of one size (--frames)")
        other_mode = _written_mode(other_mode, path)
        if other_mode != mode:
            raise ConversionError(f"{path}: image is {_ENCODING_OF_MODE[other_mode]}, but {first_path} is "
                                  f"{_ENCODING_OF_MODE[mode]}; a bag's image topic has one encoding")
    return size, _ENCODING_OF_MODE[mode]


def read_image(path: Path, encoding: str) -> np.ndarray:
    """An image file as the array written in ``encoding``: (H, W) for mono8, (H, W, 3) rgb8."""
    try:
        with Image.open(path) as image:
            image.load()
            return np.asarray(image.convert("L" if encoding == "mono8" else "RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise ConversionError(f"image file is missing: {path}") from None
    except (OSError, Image.DecompressionBombError) as exc:
        raise ConversionError(f"image file is unreadable: {path} ({exc})") from None


def frame_stamps_ns(dataset: PoseDataset, rate: float | None) -> np.ndarray:
    """Stamps of the kept frames in ns: the dataset's own, or ``1/rate`` apart, from START_NS."""
    if rate is not None:
        seconds = np.arange(len(dataset)) / float(rate)
    else:
        seconds = dataset.stamps()
        seconds = seconds - seconds[0]
    stamps = START_NS + np.round(seconds * 1e9).astype(np.int64)
    steps = np.diff(stamps)
    if np.any(steps <= 0):
        k = int(np.argmax(steps <= 0)) + 1
        raise ConversionError(f"the dataset's stamps do not increase at {dataset.items[k][0]} "
                              f"({seconds[k - 1]:.6f} s, then {seconds[k]:.6f} s); pass --rate HZ to "
                              "space the frames evenly")
    return stamps


def _camera(dataset: PoseDataset, kind: str, size: tuple[int, int], intrinsics) -> tuple[dict, str]:
    """The intrinsics of the images and where they came from (module docstring's order)."""
    width, height = size
    if intrinsics is not None:
        fx, fy, cx, cy = intrinsics
        return check_camera(dict(fx=fx, fy=fy, cx=cx, cy=cy, width=width, height=height)), "--intrinsics"
    root = dataset_root(dataset)
    found = next((str(root / name) for name in ("scene.json", "calib.txt") if (root / name).is_file()), None)
    if found is None and kind != "7scenes":
        fix = ("Cambridge Landmarks' listings carry no intrinsics" if kind == "cambridge"
               else "no calib.txt beside poses.txt")
        raise ConversionError(f"no camera intrinsics for {root} ({fix}); pass --intrinsics fx,fy,cx,cy "
                              "in pixels of the stored images")
    try:
        camera = dataset_camera(dataset)
    except (CameraError, ValueError, OSError) as exc:
        raise ConversionError(f"cannot read the intrinsics of {root}: {exc}; pass --intrinsics fx,fy,cx,cy") from None
    camera_from = found or "7-Scenes' published camera (585 px at 640x480)"
    if (camera["width"], camera["height"]) != (width, height):
        raise ConversionError(f"the intrinsics from {camera_from} are for {camera['width']}x{camera['height']} "
                              f"images, but the images of {root} are {width}x{height}; pass --intrinsics "
                              "fx,fy,cx,cy for the stored size")
    return camera, camera_from


def open_recording(folder, kind: str | None = None, split: str | None = None, frames: str | None = None,
                   intrinsics=None, rate: float | None = None, progress: bool = False) -> Recording:
    """The frames of ``folder`` to write, checked: kind, split, selection, images, stamps and
    intrinsics. Every problem is a :class:`ConversionError` before a byte is written."""
    folder = Path(folder)
    if not folder.exists():
        raise ConversionError(f"dataset folder {folder} does not exist")
    if not folder.is_dir():
        raise ConversionError(f"{folder} is a file; give the dataset's folder")
    if kind is None:
        kind = dataset_kind(folder)
    elif kind not in KINDS:
        raise ConversionError(f"unknown --kind {kind!r}; give one of {', '.join(KINDS)}")
    if kind not in SPLIT_KINDS and split is not None:
        raise ConversionError(f"--split applies to {' and '.join(SPLIT_KINDS)} folders; select KITTI frames "
                              "with --frames (e.g. --frames 1::2 for the odd ones)")
    if kind in SPLIT_KINDS:
        split = split or DEFAULT_SPLIT
    if rate is not None and not (np.isfinite(rate) and rate > 0):
        raise ConversionError(f"--rate {rate!r}: give a positive number of frames a second")
    try:
        dataset = open_dataset(kind, folder, **({"split": split} if split else {}))
    except DatasetError as exc:
        raise ConversionError(str(exc)) from None
    if not len(dataset):
        raise ConversionError(f"{folder}: the {split or 'dataset'} split has no frames")
    dataset.items = [dataset.items[i] for i in select_frames(frames, len(dataset))]
    size, encoding = check_images(dataset, progress)
    stamps = frame_stamps_ns(dataset, rate)
    camera, camera_from = _camera(dataset, kind, size, intrinsics)
    return Recording(dataset, kind, split, stamps, camera, camera_from, encoding)


# --------------------------------------------------------------------------- writing

def base_poses(t_camera: np.ndarray, q_camera: np.ndarray):
    """``base_link`` in ``map`` of camera-to-world poses: camera pose * mount^-1."""
    t_inv, q_inv = geometry.pose_inverse(MOUNT_T, MOUNT_Q)
    return geometry.pose_compose(t_camera, q_camera, t_inv, q_inv)


def _write_frames(writer: BagWriter, recording: Recording, compressed: bool, progress: bool) -> None:
    types = messages.rosbags_types(writer.typestore)
    image_topic = TOPIC_COMPRESSED if compressed else TOPIC_IMAGE
    writer.add_topic(image_topic, "sensor_msgs/msg/CompressedImage" if compressed else "sensor_msgs/msg/Image")
    writer.add_topic(TOPIC_CAMERA_INFO, "sensor_msgs/msg/CameraInfo")
    writer.add_topic(TOPIC_GROUND_TRUTH, "geometry_msgs/msg/PoseStamped")
    writer.add_topic(TOPIC_TF_STATIC, "tf2_msgs/msg/TFMessage", latched=True)
    first = int(recording.stamps_ns[0])
    mount = messages.make_transform_stamped(types, messages.time_from_ns(types, first), FRAME_BASE,
                                            FRAME_CAMERA, MOUNT_T, MOUNT_Q)
    writer.write(TOPIC_TF_STATIC, first, messages.make_tf_message(types, [mount]))
    t_camera, q_camera = recording.dataset.poses()
    t_base, q_base = base_poses(t_camera, q_camera)
    cam = recording.camera
    for k in tqdm(range(len(recording)), desc=PROG, unit="frame", disable=not progress):
        ns = int(recording.stamps_ns[k])
        stamp = messages.time_from_ns(types, ns)
        pixels = read_image(recording.dataset.items[k][0], recording.encoding)
        if pixels.shape[:2] != (cam["height"], cam["width"]):  # the file changed since it was checked
            raise ConversionError(f"{recording.dataset.items[k][0]}: image is {pixels.shape[1]}x{pixels.shape[0]}, "
                                  f"not {cam['width']}x{cam['height']} as when it was checked")
        if compressed:
            image = messages.make_compressed_image(types, stamp, FRAME_CAMERA, pixels, "png")
        else:
            image = messages.make_image(types, stamp, FRAME_CAMERA, pixels, recording.encoding)
        writer.write(image_topic, ns, image)
        writer.write(TOPIC_CAMERA_INFO, ns, messages.make_camera_info(
            types, stamp, FRAME_CAMERA, cam["width"], cam["height"], cam["fx"], cam["fy"], cam["cx"], cam["cy"]))
        writer.write(TOPIC_GROUND_TRUTH, ns, messages.make_pose_stamped(types, stamp, FRAME_MAP, t_base[k], q_base[k]))


def is_rosbag2(path: Path) -> bool:
    """A rosbag2 folder (its ``metadata.yaml``), never a link: what ``--overwrite`` may replace."""
    return not path.is_symlink() and path.is_dir() and (path / "metadata.yaml").is_file()


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an output that exists (unless ``overwrite`` and it is a bag) before any work."""
    try:
        check_not_a_link(out, "--out")
    except OutputError as exc:
        raise ConversionError(str(exc)) from None
    if out.exists() and not overwrite:
        raise ConversionError(f"{out} exists; pass --overwrite to replace it")
    if out.exists() and not is_rosbag2(out):
        raise ConversionError(f"{out} exists and is not a rosbag2 (no metadata.yaml): refusing to replace it; "
                              "choose another --out")
    if not out.parent.is_dir():
        raise ConversionError(f"cannot write {out}: folder {out.parent} does not exist")


def write_bag(recording: Recording, out, compressed: bool = False, overwrite: bool = False,
              progress: bool = False) -> Path:
    """Write ``recording`` to the rosbag2 ``out``, whole or not at all (module docstring)."""
    out = Path(out)
    check_output(out, overwrite)
    with scratch_folder(out.with_name(out.name + ".work"), what=f"{PROG} output") as scratch:
        with BagWriter(scratch / out.name) as writer:
            _write_frames(writer, recording, compressed, progress)
        move_into_place(scratch / out.name, out, is_rosbag2 if overwrite else None, what=f"{PROG} output")
    return out


# --------------------------------------------------------------------------- CLI

class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, so the scratch folder is removed as for Ctrl-C."""


def _raise_terminated(_signum, _frame):
    raise Terminated()


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit 2, like the checks after it (not
    argparse's usage block): they are raised and said by :func:`main`."""

    def error(self, message):
        raise ConversionError(f"{message} (see {PROG} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Write a 7-Scenes, Cambridge Landmarks or KITTI odometry folder as a rosbag2 (MCAP) with "
                    "images, camera_info, ground-truth poses and the camera mount, laid out like vizloc-synth's "
                    "bags, so that vizloc-replay plays it.",
        epilog="Replay the result with: vizloc-replay BAG --no-fusion (the bag has no odometry; "
               "--odom-topic none fuses the network's poses alone).")
    parser.add_argument("folder", type=Path, help="the dataset folder")
    parser.add_argument("--out", type=Path, required=True, help="the rosbag2 folder to write (must not exist "
                                                               "unless --overwrite)")
    parser.add_argument("--kind", metavar="|".join(KINDS),
                        help="the dataset's layout (default: told from TrainSplit.txt, dataset_train.txt or poses.txt)")
    parser.add_argument("--split", choices=("train", "test"),
                        help=f"7-Scenes / Cambridge: the listed split to write (default {DEFAULT_SPLIT})")
    parser.add_argument("--frames", metavar="SELECTION",
                        help="frames to keep, counted from 0 within the split (KITTI: the frame numbers): a slice "
                             "START:STOP[:STEP] such as 1::2, a range FIRST-LAST such as 0-159, or one number")
    parser.add_argument("--intrinsics", type=str, metavar="FX,FY,CX,CY",
                        help="pinhole intrinsics in pixels of the stored images (default: scene.json, KITTI "
                             "calib.txt, or 7-Scenes' 585 px at 640x480; required for Cambridge)")
    parser.add_argument("--rate", type=positive(float), metavar="HZ",
                        help="space the kept frames 1/HZ seconds apart instead of the dataset's own times")
    parser.add_argument("--compressed", action="store_true",
                        help=f"write sensor_msgs/CompressedImage (png) on {TOPIC_COMPRESSED} instead of raw Image")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bag at --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except ConversionError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    progress = not args.no_progress
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        intrinsics = parse_intrinsics(args.intrinsics) if args.intrinsics is not None else None
        check_output(args.out, args.overwrite)  # before reading a whole folder
        recording = open_recording(args.folder, args.kind, args.split, args.frames, intrinsics, args.rate,
                                   progress=progress)
        out = write_bag(recording, args.out, args.compressed, args.overwrite, progress)
    except (ConversionError, OutputError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a folder that cannot be written
        print(f"{PROG}: error: {exc}; no bag was written", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print(f"{PROG}: {'terminated' if terminated else 'interrupted'}; no bag was written", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    cam = recording.camera
    split = f" ({recording.split} split)" if recording.split else ""
    print(f"{PROG}: wrote {len(recording)} frames of the {recording.kind} folder {args.folder}{split} to {out}: "
          f"{cam['width']}x{cam['height']} {recording.encoding}, fx {cam['fx']:g} fy {cam['fy']:g} "
          f"cx {cam['cx']:g} cy {cam['cy']:g} (from {recording.camera_from}), "
          f"{(recording.stamps_ns[-1] - recording.stamps_ns[0]) / 1e9:.1f} s", file=sys.stderr)
    topic = f" --image-topic {TOPIC_COMPRESSED}" if args.compressed else ""
    print(f"{PROG}: replay it with: vizloc-replay {out} --no-fusion{topic}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
