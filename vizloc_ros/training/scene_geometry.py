"""Camera intrinsics, depth and scene coordinates of a dataset, for training the geometric models.

Scene coordinate regression (DSAC), and the ground-plane projection of the allocentric
localizer, need what a pose regressor does not: the pinhole intrinsics of the images and,
where the dataset has it, per-pixel depth. This module finds both in a dataset and maps
them through the network-input geometry of :mod:`vizloc_ros.localize.camera` (the same
resize + centre crop as inference), so targets line up with the network input pixel for
pixel.

Where intrinsics come from (first found):

* ``scene.json`` at the dataset root (the synthetic world: ``camera.fx, fy, cx, cy,
  width, height``);
* ``calib.txt`` at a KITTI root (the first projection matrix, with or without ``P0:``);
* ``camera: {fx, fy, cx, cy, width, height}`` given by the caller (model args);
* Microsoft 7-Scenes' published 585 px at 640x480 for a 7-Scenes folder without either.

Depth: ``frame-XXXXXX.depth.png`` beside the colour image, uint16 millimetres along the
optical axis, 0 and 65535 invalid (7-Scenes convention, also the synthetic world's).
Pixel coordinates are pixel centres: pixel (u, v) spans [u - 0.5, u + 0.5].
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from vizloc_ros import geometry
from vizloc_ros.localize.camera import CameraError, cell_centres, check_camera, crop_geometry
from vizloc_ros.localize.preprocess import InputSpec

LOG = logging.getLogger(__name__)

#: 7-Scenes (Kinect v1) colour camera as published with the dataset
SEVENSCENES_CAMERA = {"fx": 585.0, "fy": 585.0, "cx": 320.0, "cy": 240.0, "width": 640, "height": 480}


def dataset_root(dataset) -> Path | None:
    """The folder of a file-based dataset (7-Scenes: above seq-XX; KITTI: above image_X)."""
    items = getattr(dataset, "items", None)
    if not items:
        return None
    return Path(items[0][0]).parent.parent


def read_kitti_calib(path) -> tuple[float, float, float, float]:
    """fx, fy, cx, cy of the first projection matrix of a KITTI ``calib.txt``."""
    for line in Path(path).read_text().splitlines():
        parts = line.replace(":", " ").split()
        numbers = [p for p in parts if not p[0].isalpha()]
        if len(numbers) == 12:
            P = np.asarray([float(v) for v in numbers]).reshape(3, 4)
            return float(P[0, 0]), float(P[1, 1]), float(P[0, 2]), float(P[1, 2])
    raise CameraError(f"{path}: no 3x4 projection matrix found")


def dataset_camera(dataset, override: dict | None = None) -> dict:
    """Intrinsics of the images of ``dataset`` (see the module docstring for the order)."""
    if override:
        return check_camera(override)
    root = dataset_root(dataset)
    if root is not None and (root / "scene.json").is_file():
        block = json.loads((root / "scene.json").read_text()).get("camera") or {}
        return check_camera(block)
    if root is not None and (root / "calib.txt").is_file():
        fx, fy, cx, cy = read_kitti_calib(root / "calib.txt")
        height, width = np.asarray(dataset[0]["image"]).shape[:2]
        return check_camera({"fx": fx, "fy": fy, "cx": cx, "cy": cy, "width": width, "height": height})
    if getattr(dataset, "name", "") == "7scenes":
        LOG.warning("no scene.json at %s: using the 7-Scenes intrinsics (585 px at 640x480)", root)
        return dict(SEVENSCENES_CAMERA)
    raise CameraError(f"cannot find camera intrinsics for {type(dataset).__name__} at {root}: "
                      "give model.args.camera = {fx, fy, cx, cy, width, height}")


def depth_path(image_path) -> Path:
    image_path = Path(image_path)
    return image_path.with_name(image_path.name.replace(".color.png", ".depth.png"))


def load_depth(path) -> np.ndarray:
    """Depth PNG (uint16 mm) -> float32 metres, NaN where invalid (0 or 65535)."""
    try:
        with Image.open(path) as img:
            raw = np.asarray(img, dtype=np.float64)
    except OSError as exc:
        raise FileNotFoundError(f"depth image unreadable: {path} ({exc})") from None
    depth = (raw / 1000.0).astype(np.float32)
    depth[(raw <= 0) | (raw >= 65535)] = np.nan
    return depth


def grid_scene_coordinates(depth, camera: dict, spec: InputSpec, t, q, out_hw, stride: int,
                           constant_depth: float | None = None) -> np.ndarray:
    """World coordinates (out_h, out_w, 3) float32 of the surface seen at each output cell
    centre, NaN where the depth is invalid.

    The depth is read at the original pixel nearest to the cell centre and the point is
    back-projected through that pixel's ray. ``constant_depth`` replaces the depth map
    (DSAC++'s heuristic targets for datasets without depth)."""
    centres = cell_centres(out_hw[0], out_hw[1], stride)
    return scene_coordinates_at(depth, camera, spec, t, q, centres, constant_depth)


def scene_coordinates_at(depth, camera: dict, spec: InputSpec, t, q, pixels,
                         constant_depth: float | None = None) -> np.ndarray:
    """World coordinates (..., 3) float32 of the surface seen at network-input ``pixels``
    (..., 2) (any positions, e.g. the cells of an augmented copy mapped back), NaN where
    the depth is invalid. Same reading rule as :func:`grid_scene_coordinates`."""
    camera = check_camera(camera)
    sx, sy, left, top = crop_geometry(camera["width"], camera["height"], spec)
    pixels = np.asarray(pixels, dtype=np.float64)
    u = np.clip(np.rint((pixels[..., 0] + left + 0.5) / sx - 0.5), 0, camera["width"] - 1).astype(int)
    v = np.clip(np.rint((pixels[..., 1] + top + 0.5) / sy - 0.5), 0, camera["height"] - 1).astype(int)
    if constant_depth is not None:
        d = np.full(u.shape, float(constant_depth))
    else:
        depth = np.asarray(depth)
        if depth.shape != (camera["height"], camera["width"]):
            raise CameraError(f"depth map {depth.shape[1]}x{depth.shape[0]} does not match the camera "
                              f"{camera['width']}x{camera['height']}")
        d = depth[v, u].astype(np.float64)
    cam = np.stack([(u - camera["cx"]) / camera["fx"] * d, (v - camera["cy"]) / camera["fy"] * d, d], -1)
    world = cam @ geometry.quat_to_matrix(np.asarray(q, dtype=float)).T + np.asarray(t, dtype=float)
    return world.astype(np.float32)


def neighbours_within(points: np.ndarray, radius: float, chunk: int = 1024, keep=None) -> list[np.ndarray]:
    """For each point (N, D), the indices of the points within ``radius`` (itself included),
    computed in row chunks so 20k frames need megabytes, not gigabytes. ``keep(rows, d)``
    may refine the mask of a chunk (rows: the chunk's indices, d: its (n, N) distances)."""
    points = np.asarray(points, dtype=float)
    out = []
    for start in range(0, len(points), chunk):
        rows = np.arange(start, min(start + chunk, len(points)))
        d = np.linalg.norm(points[rows, None] - points[None], axis=-1)
        mask = d <= radius
        if keep is not None:
            mask &= keep(rows, d)
        out.extend(np.flatnonzero(m) for m in mask)
    return out


def farthest_distance(points: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Distance from each point to the farthest other one (chunked)."""
    points = np.asarray(points, dtype=float)
    out = np.zeros(len(points))
    for start in range(0, len(points), chunk):
        rows = slice(start, min(start + chunk, len(points)))
        out[rows] = np.linalg.norm(points[rows, None] - points[None], axis=-1).max(axis=1)
    return out
