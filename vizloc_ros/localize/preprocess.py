"""Image preprocessing shared by training, evaluation and inference.

One implementation so a checkpoint sees at run time exactly the pixels it was trained
on: uint8 images (B, H, W, 3) -> resize (shorter side to ``resize``) -> centre crop to
``crop`` -> float in [0, 1] -> normalise with the checkpoint's mean/std. It runs on
whatever device the input tensor lives on (the GPU in the estimator's fast path).
"""
from __future__ import annotations

import functools

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: encodings accepted by :func:`to_rgb_array`, the subset of sensor_msgs/image_encodings
#: that carries 8-bit colour or grey pixels.
SUPPORTED_ENCODINGS = ("rgb8", "bgr8", "mono8", "8UC1", "8UC3")


@dataclass(frozen=True)
class InputSpec:
    """What a checkpoint expects as input (its JSON ``input`` block)."""

    resize: int = 256
    crop: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def from_meta(cls, block: dict | None) -> "InputSpec":
        block = block or {}
        try:
            crop = block.get("crop", cls.crop)
            if isinstance(crop, int):
                crop = (crop, crop)
            spec = cls(resize=int(block.get("resize", cls.resize)),
                       crop=(int(crop[0]), int(crop[1])),
                       mean=tuple(float(v) for v in block.get("mean", cls.mean)),
                       std=tuple(float(v) for v in block.get("std", cls.std)))
        except (TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"checkpoint input block is malformed: {block!r} ({exc})") from None
        if spec.resize <= 0 or min(spec.crop) <= 0 or len(spec.mean) != 3 or len(spec.std) != 3 \
                or min(spec.std) <= 0:
            raise ValueError(f"checkpoint input block is invalid: {block!r}")
        return spec

    def to_meta(self) -> dict:
        return {"resize": self.resize, "crop": list(self.crop), "mean": list(self.mean),
                "std": list(self.std)}


def to_rgb_array(image, encoding: str = "rgb8", min_size: tuple[int, int] | None = None) -> np.ndarray:
    """Validate an image array and return it as HxWx3 uint8 RGB.

    Accepts HxW or HxWx1 (mono, replicated to three channels) and HxWx3 (rgb8 / bgr8).
    Raises ``ValueError`` with the reason for anything else: empty arrays, a dtype other
    than uint8, 2 or 4 channels, unknown encodings, and images smaller than ``min_size``
    (height, width), which could only be up-sampled into meaningless pixels.
    """
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.size == 0:
        raise ValueError(f"image is empty (shape {image.shape})")
    if image.dtype != np.uint8:
        raise ValueError(f"image dtype must be uint8, got {image.dtype}")
    if encoding not in SUPPORTED_ENCODINGS:
        raise ValueError(f"unsupported image encoding {encoding!r}; "
                         f"supported: {', '.join(SUPPORTED_ENCODINGS)}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        if encoding not in ("mono8", "8UC1"):
            raise ValueError(f"a single-channel image cannot have encoding {encoding!r}")
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 3:
        if encoding in ("mono8", "8UC1"):
            raise ValueError(f"a 3-channel image cannot have encoding {encoding!r}")
        if encoding == "bgr8":
            image = image[:, :, ::-1]
    else:
        raise ValueError(f"image must be HxW or HxWx3, got shape {image.shape}")
    if min_size is not None and (image.shape[0] < min_size[0] or image.shape[1] < min_size[1]):
        raise ValueError(f"image {image.shape[1]}x{image.shape[0]} is smaller than the "
                         f"network's input crop {min_size[1]}x{min_size[0]}")
    return np.ascontiguousarray(image)


def resized_shape(height: int, width: int, resize: int) -> tuple[int, int]:
    """Size after scaling the shorter side to ``resize`` (torchvision's Resize(int) rule)."""
    if height <= width:
        return resize, max(1, int(resize * width / height))
    return max(1, int(resize * height / width)), resize


def preprocess(images: torch.Tensor, spec: InputSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, H, W, 3) tensor -> normalised float (B, 3, crop_h, crop_w) on the same device."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected a (B, H, W, 3) tensor, got {tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    h, w = x.shape[-2:]
    new_h, new_w = resized_shape(h, w, spec.resize)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False,
                          antialias=True)
    crop_h, crop_w = spec.crop
    if crop_h > new_h or crop_w > new_w:
        raise ValueError(f"crop {crop_w}x{crop_h} does not fit the resized image {new_w}x{new_h}")
    top = (new_h - crop_h) // 2
    left = (new_w - crop_w) // 2
    x = x[:, :, top:top + crop_h, left:left + crop_w]
    mean, std = _normalisation(tuple(spec.mean), tuple(spec.std), x.device)
    return ((x - mean) / std).to(dtype)


@functools.lru_cache(maxsize=16)
def _normalisation(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean / std as (1, 3, 1, 1) tensors on ``device``, made once: a host-to-device copy
    per call would cost time and is not allowed inside CUDA-graph capture."""
    with torch.inference_mode(False):  # ordinary tensors, usable in training as well
        return (torch.tensor(mean, device=device, dtype=torch.float32).view(1, 3, 1, 1),
                torch.tensor(std, device=device, dtype=torch.float32).view(1, 3, 1, 1))
