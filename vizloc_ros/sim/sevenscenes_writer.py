"""Write frames in the layout of Microsoft 7-Scenes, so the 7-Scenes loader reads the
synthetic world like a real scene.

Layout under a scene root::

    TrainSplit.txt, TestSplit.txt     one "sequenceN" per line
    seq-NN/frame-XXXXXX.color.png     RGB, 8 bit
    seq-NN/frame-XXXXXX.depth.png     uint16 millimetres along the optical axis (z),
                                      65535 = invalid (7-Scenes' own convention)
    seq-NN/frame-XXXXXX.pose.txt      4x4 camera-to-world (optical frame in the world)

Unlike real 7-Scenes, depth here is registered to the colour image and the intrinsics
are those in the root's ``scene.json`` (not 7-Scenes' 585 px at 640x480).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vizloc_ros.geometry import pose_to_matrix
from vizloc_ros.sim.render import depth_to_millimetres


def sequence_dir_name(number: int) -> str:
    return f"seq-{int(number):02d}"


def frame_stem(index: int) -> str:
    return f"frame-{int(index):06d}"


def write_frame(sequence_dir, index: int, rgb: np.ndarray, depth_m: np.ndarray, t_wc, q_wc) -> None:
    """Write one frame's colour, depth and camera-to-world pose."""
    sequence_dir = Path(sequence_dir)
    stem = frame_stem(index)
    # compress_level 1: a little larger, several times faster than the default
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(
        sequence_dir / f"{stem}.color.png", compress_level=1)
    Image.fromarray(depth_to_millimetres(depth_m)).save(sequence_dir / f"{stem}.depth.png", compress_level=1)
    np.savetxt(sequence_dir / f"{stem}.pose.txt", pose_to_matrix(t_wc, q_wc), fmt="%.9e", delimiter="\t")


def write_splits(root, train_numbers, test_numbers) -> None:
    """TrainSplit.txt / TestSplit.txt listing ``sequenceN`` lines as in 7-Scenes."""
    root = Path(root)
    for name, numbers in (("TrainSplit.txt", train_numbers), ("TestSplit.txt", test_numbers)):
        (root / name).write_text("".join(f"sequence{int(n)}\n" for n in sorted(numbers)), encoding="utf-8")


def read_pose(path) -> np.ndarray:
    """A 7-Scenes pose file -> 4x4 camera-to-world."""
    matrix = np.loadtxt(path, dtype=float)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise ValueError(f"{path}: expected a finite 4x4 matrix, got shape {matrix.shape}")
    return matrix
