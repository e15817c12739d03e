"""Pose datasets: one sample type for every source.

A sample is a dict ``{"image": HxWx3 uint8 RGB, "t": (3,) float64, "q": (4,) float64
(w, x, y, z, w >= 0), "stamp": float seconds, "index": int}`` where (t, q) is the pose of
the camera (optical frame: x right, y down, z forward) in the dataset's world frame
(camera-to-world, DESIGN.md). Images stay uint8 here; resizing and normalisation happen
batched in :mod:`vizloc_ros.localize.preprocess`, the code the estimator runs too.

Every loader checks what it reads and raises :class:`DatasetError` naming the file and
the problem (missing or unreadable image, NaN pose, wrong column count): a bad folder
fails before training starts, not an hour into it.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from vizloc_ros import geometry
from vizloc_ros.training.bag_dataset import BagDataset
from vizloc_ros.training.pose_dataset import DatasetError, PoseDataset

LOG = logging.getLogger(__name__)


def _finite_pose(t, q, where: str):
    t = np.asarray(t, dtype=float)
    q = np.asarray(q, dtype=float)
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(q))):
        raise DatasetError(f"{where}: pose contains NaN or inf")
    try:
        q = geometry.quat_hemisphere(geometry.quat_normalize(q))
    except ValueError:
        raise DatasetError(f"{where}: zero quaternion") from None
    return t, q


def _matrix_pose(T, where: str):
    T = np.asarray(T, dtype=float)
    if not np.all(np.isfinite(T)):
        raise DatasetError(f"{where}: pose contains NaN or inf")
    R = T[:3, :3]
    if abs(np.linalg.det(R) - 1.0) > 1e-2 or np.abs(R @ R.T - np.eye(3)).max() > 1e-2:
        raise DatasetError(f"{where}: rotation block is not a rotation matrix")
    return _finite_pose(T[:3, 3], geometry.matrix_to_quat(R), where)


class SevenScenes(PoseDataset):
    """7-Scenes layout: ``seq-XX/frame-XXXXXX.color.png`` + ``.pose.txt`` (4x4 cam-to-world),
    sequences of each split listed in ``TrainSplit.txt`` / ``TestSplit.txt`` ("sequence1").

    The folder has no timestamps: frame k of sequence s is stamped ``s * 1e4 + k /
    frame_rate``; ``frame_rate`` None takes the camera rate that ``vizloc-synth`` writes in
    ``scene.json`` (``rates_hz.camera``) and else 7-Scenes' own 30 Hz (its Kinect). The
    stamps matter where time does: a map's error correlation time, sequence models' clips.
    """

    name = "7scenes"

    def __init__(self, root, split: str = "train", frame_rate: float | None = None):
        super().__init__()
        root = Path(root)
        if frame_rate is None:
            frame_rate = _synthetic_camera_rate(root) or 30.0
        split_file = root / {"train": "TrainSplit.txt", "test": "TestSplit.txt"}.get(split, "")
        if split not in ("train", "test"):
            raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
        if not split_file.is_file():
            raise DatasetError(f"{split_file} is missing (not a 7-Scenes folder?)")
        seqs = []
        for line in split_file.read_text().split():
            digits = "".join(ch for ch in line if ch.isdigit())
            if not digits:
                raise DatasetError(f"{split_file}: cannot read sequence name {line!r}")
            seqs.append(int(digits))
        for seq in seqs:
            folder = root / f"seq-{seq:02d}"
            poses = sorted(folder.glob("frame-*.pose.txt"))
            if not poses:
                raise DatasetError(f"{folder}: no frame-*.pose.txt files")
            for k, pose_file in enumerate(poses):
                try:
                    T = np.loadtxt(pose_file, dtype=float)
                except ValueError as exc:
                    raise DatasetError(f"{pose_file}: {exc}") from None
                if T.shape != (4, 4):
                    raise DatasetError(f"{pose_file}: expected a 4x4 matrix, got {T.shape}")
                t, q = _matrix_pose(T, str(pose_file))
                image = pose_file.with_name(pose_file.name.replace(".pose.txt", ".color.png"))
                if not image.is_file():
                    raise DatasetError(f"image file is missing: {image}")
                self.items.append((image, t, q, seq * 1e4 + k / frame_rate))


def _synthetic_camera_rate(root: Path) -> float | None:
    """The camera rate a ``vizloc-synth`` folder records in its ``scene.json``; None for
    any other folder, or a file that does not say it."""
    try:
        rate = json.loads((root / "scene.json").read_text())["rates_hz"]["camera"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(rate) if isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0 else None


class Cambridge(PoseDataset):
    """Cambridge Landmarks: ``dataset_train.txt`` / ``dataset_test.txt``, three header lines,
    then ``seqX/frameNNNNN.png X Y Z W P Q R`` (camera centre, quaternion w,x,y,z).

    The file's quaternion rotates world into camera (world-to-camera orientation, as
    the PoseNet release uses); it is inverted here to give camera-to-world.
    """

    name = "cambridge"

    def __init__(self, root, split: str = "train"):
        super().__init__()
        root = Path(root)
        if split not in ("train", "test"):
            raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
        listing = root / f"dataset_{split}.txt"
        if not listing.is_file():
            raise DatasetError(f"{listing} is missing (not a Cambridge Landmarks folder?)")
        lines = listing.read_text().splitlines()[3:]
        for number, line in enumerate(lines, start=4):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 8:
                raise DatasetError(f"{listing}:{number}: expected 8 columns, found {len(parts)}")
            try:
                values = np.array([float(v) for v in parts[1:]])
            except ValueError as exc:
                raise DatasetError(f"{listing}:{number}: {exc}") from None
            t, q_w2c = _finite_pose(values[:3], values[3:], f"{listing}:{number}")
            q = geometry.quat_hemisphere(geometry.quat_conjugate(q_w2c))
            image = root / parts[0]
            if not image.is_file():
                raise DatasetError(f"image file is missing: {image}")
            self.items.append((image, t, q, float(number)))


class KittiOdometry(PoseDataset):
    """KITTI odometry layout: ``image_0`` or ``image_l`` PNGs + ``poses.txt`` (one 3x4
    row-major camera-to-world per line, left camera) and optional ``times.txt``.

    Some tools write ``poses.txt`` with a timestamp in front of the 12 numbers: 13
    numbers a line are read as ``stamp r11 ... tz``, the stamp used where there is no
    ``times.txt``, and a note (logged once per file read) says the first column was
    taken as a timestamp, since nothing in the file says so. The first line sets the
    count for the file: a later line with another count is a broken line, not a
    change of format.

    ``frames`` selects frame indices (e.g. even ones for training).
    """

    name = "kitti"

    def __init__(self, root, frames=None, image_dir: str | None = None):
        super().__init__()
        root = Path(root)
        poses_file = root / "poses.txt"
        if not poses_file.is_file():
            raise DatasetError(f"{poses_file} is missing (not a KITTI odometry folder?)")
        rows, columns = [], None
        for number, line in enumerate(poses_file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split()
            if columns is None and len(parts) in (12, 13):
                columns = len(parts)
            if len(parts) != columns:
                expected = ("12 columns (a 3x4 pose) or 13 (a timestamp, then the pose)" if columns is None
                            else f"{columns} columns like the lines before")
                raise DatasetError(f"{poses_file}:{number}: expected {expected}, found {len(parts)}")
            try:
                rows.append([float(v) for v in parts])
            except ValueError as exc:
                raise DatasetError(f"{poses_file}:{number}: {exc}") from None
        stamps_in_poses = None
        if columns == 13:
            stamps_in_poses = [row.pop(0) for row in rows]
            bad = next((k for k, stamp in enumerate(stamps_in_poses) if not np.isfinite(stamp)), None)
            if bad is not None:
                raise DatasetError(f"{poses_file}: the timestamp (first column) of pose {bad + 1} is not finite")
        times_file = root / "times.txt"
        times = np.loadtxt(times_file).reshape(-1) if times_file.is_file() else None
        if stamps_in_poses is not None:
            if times is None:
                times = np.asarray(stamps_in_poses, dtype=float)
            LOG.info("%s has 13 numbers a line: the first column is taken as a timestamp%s",
                     poses_file, " (times.txt has the stamps used)" if times_file.is_file() else
                     " and used as the frame stamps")
        folder = root / image_dir if image_dir else next(
            (root / d for d in ("image_0", "image_l", "image_2") if (root / d).is_dir()), None)
        if folder is None or not folder.is_dir():
            raise DatasetError(f"{root}: no image_0 / image_l / image_2 folder")
        indices = range(len(rows)) if frames is None else frames
        for i in indices:
            if not 0 <= i < len(rows):
                raise DatasetError(f"frame {i} is out of range (poses.txt has {len(rows)})")
            T = np.eye(4)
            T[:3, :4] = np.asarray(rows[i]).reshape(3, 4)
            t, q = _matrix_pose(T, f"{poses_file}:{i + 1}")
            image = folder / f"{i:06d}.png"
            if not image.is_file():
                raise DatasetError(f"image file is missing: {image}")
            stamp = float(times[i]) if times is not None and i < len(times) else i * 0.1
            self.items.append((image, t, q, stamp))


class TupleDataset:
    """MapNet tuples: ``steps`` frames ``skip`` apart from one sequence of a dataset.

    A tuple starts every ``stride`` frames and never crosses a gap in time larger than ``max_gap`` seconds (a new sequence).
    Samples are dicts with stacked ``image`` (T, H, W, 3), ``t`` (T, 3), ``q`` (T, 4) and
    the relative poses between consecutive frames ``t_rel`` (T-1, 3), ``q_rel`` (T-1, 4).
    """

    def __init__(self, base: PoseDataset, steps: int = 3, skip: int = 10, max_gap: float = 5.0,
                 stride: int = 1):
        if steps < 2 or skip < 1 or stride < 1:
            raise ValueError("MapNet tuples need steps >= 2, skip >= 1 and stride >= 1")
        self.base, self.steps, self.skip = base, steps, skip
        stamps = base.stamps()
        span = (steps - 1) * skip
        self.starts = []
        for i in range(0, len(base) - span, stride):
            window = stamps[i:i + span + 1]
            if np.all(np.diff(window) > 0) and np.all(np.diff(window) <= max_gap):
                self.starts.append(i)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict:
        first = self.starts[index]
        frames = [self.base[first + k * self.skip] for k in range(self.steps)]
        t = np.stack([f["t"] for f in frames])
        q = np.stack([f["q"] for f in frames])
        t_rel, q_rel = geometry.pose_relative(t[:-1], q[:-1], t[1:], q[1:])
        # frames carry an image, or the cached output of a frozen trunk (training.trunk)
        key = "feature" if "feature" in frames[0] else "image"
        return {key: np.stack([f[key] for f in frames]), "t": t, "q": q,
                "t_rel": t_rel, "q_rel": q_rel, "index": index}


def translation_stats(dataset: PoseDataset) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of the camera positions (for normalising targets).

    The standard deviation is floored at 1 cm per axis so a planar dataset does not
    divide by zero.
    """
    t, _ = dataset.poses()
    if len(t) == 0:
        raise DatasetError("cannot compute translation statistics of an empty dataset")
    return t.mean(axis=0), np.maximum(t.std(axis=0), 0.01)


def open_dataset(kind: str, root, split: str = "train", **kwargs) -> PoseDataset:
    """Dataset by name: ``7scenes``, ``cambridge``, ``kitti`` (``bag`` lives in bag_dataset)."""
    kinds = {"7scenes": SevenScenes, "cambridge": Cambridge, "kitti": KittiOdometry}
    if kind == "bag":
        return BagDataset(root, split=split, **kwargs)
    if kind not in kinds:
        raise DatasetError(f"unknown dataset kind {kind!r}; known: bag, {', '.join(kinds)}")
    if kind == "kitti":
        return KittiOdometry(root, **kwargs)
    return kinds[kind](root, split=split, **kwargs)
