"""Pinhole intrinsics of the network input, for the geometric models.

Scene coordinate regression (DSAC's PnP) and the allocentric localizer's ground
projection need the intrinsics of the *network input*: the camera's intrinsics mapped
through the same resize + centre crop as :mod:`vizloc_ros.localize.preprocess`, and the
network-input pixel at the centre of each output cell. Both run at inference, so they
live here; training (:mod:`vizloc_ros.training.scene_geometry`) builds its targets with
the same functions, so targets and inference line up pixel for pixel.

Pixel coordinates are pixel centres: pixel (u, v) spans [u - 0.5, u + 0.5].
"""
from __future__ import annotations

import math

import numpy as np

from vizloc_ros.localize.preprocess import InputSpec, resized_shape

CAMERA_KEYS = ("fx", "fy", "cx", "cy", "width", "height")


class CameraError(ValueError):
    """Intrinsics are missing or malformed."""


def check_camera(camera) -> dict:
    """A camera dict with the six keys, positive focal lengths and size."""
    if not isinstance(camera, dict) or any(k not in camera for k in CAMERA_KEYS):
        raise CameraError(f"a camera needs {', '.join(CAMERA_KEYS)}; got {camera!r}")
    out = {k: float(camera[k]) for k in ("fx", "fy", "cx", "cy")}
    out.update(width=int(camera["width"]), height=int(camera["height"]))
    if not all(math.isfinite(v) for v in out.values()) or min(out["fx"], out["fy"]) <= 0 \
            or min(out["width"], out["height"]) <= 0:
        raise CameraError(f"camera intrinsics are invalid: {camera!r}")
    return out


def crop_geometry(width: int, height: int, spec: InputSpec):
    """Per-axis scale and (left, top) offset of :func:`~vizloc_ros.localize.preprocess.preprocess`:
    a network-input pixel (uc, vc) sees the original pixel ((uc + left + 0.5) / sx - 0.5, ...)."""
    new_h, new_w = resized_shape(height, width, spec.resize)
    crop_h, crop_w = spec.crop
    if crop_h > new_h or crop_w > new_w:
        raise CameraError(f"crop {crop_w}x{crop_h} does not fit {width}x{height} resized to {new_w}x{new_h}")
    return new_w / width, new_h / height, (new_w - crop_w) // 2, (new_h - crop_h) // 2


def input_camera(camera: dict, spec: InputSpec) -> list[float]:
    """[fx, fy, cx, cy] of the network input (after resize and centre crop), in its pixels."""
    camera = check_camera(camera)
    sx, sy, left, top = crop_geometry(camera["width"], camera["height"], spec)
    return [camera["fx"] * sx, camera["fy"] * sy, (camera["cx"] + 0.5) * sx - 0.5 - left,
            (camera["cy"] + 0.5) * sy - 0.5 - top]


def intrinsic_matrix(fx, fy, cx, cy) -> np.ndarray:
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def cell_centres(out_h: int, out_w: int, stride: int) -> np.ndarray:
    """(out_h, out_w, 2) network-input pixel (u, v) at the centre of each output cell."""
    u = stride * np.arange(out_w) + (stride - 1) / 2.0
    v = stride * np.arange(out_h) + (stride - 1) / 2.0
    uu, vv = np.meshgrid(u, v)
    return np.stack([uu, vv], axis=-1)
