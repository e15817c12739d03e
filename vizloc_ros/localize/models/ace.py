"""ACE: scene coordinate regression with a generic frozen encoder and a per-map head
(Brachmann et al., "Accelerated Coordinate Encoding", CVPR 2023), sized for a CPU.

Why this split: the encoder (image -> one 128-d feature per 8x8 block) is generic, trained
once across many procedural rooms (``vizloc_ros.mapping.pretrain``) and shipped in
``weights/scene_encoder.safetensors``; a place is mapped by training only the head (a
per-cell MLP, 1x1 convolutions) on features encoded once (``vizloc-map``). The head maps
a feature to the 3D point of ``map`` that the block sees; the camera pose follows from
those 2D-3D correspondences with OpenCV's PnP-RANSAC, refined on the inliers, with the
covariance of the inlier reprojections (:mod:`vizloc_ros.localize.pnp`).

A map checkpoint holds the encoder it was made with (about 1.5 MB in fp16) beside the
head, so one file relocalizes; its JSON names the encoder and its sha256. Registered as
``ace``; ``PoseEstimator``, ``vizloc-eval``, ``vizloc-replay`` and the nodes run it like
any other checkpoint.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from vizloc_ros.localize.camera import cell_centres, intrinsic_matrix
from vizloc_ros.localize.models.base import PoseRegressor
from vizloc_ros.localize.models.registry import register_model
from vizloc_ros.localize.pnp import FAILED_COVARIANCE, PnpSettings, localize_from_coordinates

#: channels of the encoder's feature (what the mapping buffer stores per cell)
FEATURE_DIM = 128


@functools.lru_cache(maxsize=1)
def native_bf16() -> bool:
    """Whether this CPU does bfloat16 matrix products natively (oneDNN says so: AVX512-BF16
    or AMX). Only then is the head's bf16 path faster than float32; elsewhere (older x86,
    most ARM cores) it would be slower, so it is not taken."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def _conv(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class _Residual(nn.Module):
    """Two 3x3 convolutions with a skip; ``dilation`` widens the receptive field for free."""

    def __init__(self, channels: int, dilation: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, 1, dilation, dilation=dilation, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, 1, dilation, dilation=dilation, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class SceneEncoder(nn.Module):
    """Stride-8 fully convolutional encoder: (B, 3, H, W) -> (B, 128, ceil(H/8), ceil(W/8)).

    About 0.74 M parameters and a 119-pixel receptive field; 16 ms for a 320x240 image on
    one CPU thread (benchmarks/bench_mapping.py). Its input is normalised like every
    network here (ImageNet mean / std of :mod:`vizloc_ros.localize.preprocess`).
    """

    stride = 8

    def __init__(self, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.feature_dim = int(feature_dim)
        self.layers = nn.Sequential(*_conv(3, 32, 2), *_conv(32, 64, 2), *_conv(64, 64), *_conv(64, 128, 2),
                                    _Residual(128), _Residual(128, dilation=2),
                                    nn.Conv2d(128, self.feature_dim, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


class CoordinateHead(nn.Module):
    """Per-cell MLP (1x1 convolutions): feature (B, 128, h, w) -> coordinates (B, 3, h, w)
    in units of the map's scale around its centre (the caller scales and offsets)."""

    def __init__(self, feature_dim: int = FEATURE_DIM, width: int = 256, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = []
        channels = int(feature_dim)
        for _ in range(int(layers)):
            blocks += [nn.Conv2d(channels, int(width), 1), nn.ReLU(inplace=True)]
            channels = int(width)
        blocks.append(nn.Conv2d(channels, 3, 1))
        self.mlp = nn.Sequential(*blocks)
        nn.init.zeros_(self.mlp[-1].bias)
        nn.init.normal_(self.mlp[-1].weight, std=1e-3)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)

    def forward_flat(self, features: torch.Tensor, low_precision: bool = False) -> torch.Tensor:
        """Features (N, C) -> (N, 3): the same MLP on buffer rows (mapping).

        The 1x1 convolutions run as matrix products (``F.linear`` on the same weights):
        on buffer rows that is 1.5x faster than a convolution over 1x1 images. With
        ``low_precision`` the hidden layers run in bfloat16 (2-3x faster again on CPUs with
        native bf16); the output layer stays float32, because bf16's 8-bit mantissa would
        round the coordinates to about a centimetre."""
        convs = [m for m in self.mlp if isinstance(m, nn.Conv2d)]
        x = features
        with torch.autocast(features.device.type, dtype=torch.bfloat16, enabled=low_precision):
            for conv in convs[:-1]:
                x = F.relu(F.linear(x, conv.weight.flatten(1), conv.bias))
        last = convs[-1]
        return F.linear(x.float(), last.weight.flatten(1), last.bias)


class AceLocalizer(PoseRegressor):
    """Frozen encoder + mapped head + PnP-RANSAC.

    Args:
        input_camera: [fx, fy, cx, cy] of the network input (set by ``vizloc-map`` from the
            recording's intrinsics and the input crop; needed to localize).
        camera: intrinsics of the mapping images (informational).
        head_width, head_layers: the head MLP.
        feature_dim: encoder channels.
        encoder: file name and sha256 of the encoder the map was made with (informational:
            the encoder's tensors are in the checkpoint).
        inlier_threshold: reprojection error of an inlier, network-input pixels.
        ransac_iterations, min_inliers, refine_iterations, confidence, inlier_power: PnP-RANSAC
            settings and the covariance's growth with disagreeing cells (:class:`~vizloc_ros.localize.pnp.PnpSettings`).
        seed: RANSAC seed (OpenCV's RNG is re-seeded per frame: inference is deterministic).
        feat_dim: the model zoo's common size knob; here the head's width (overrides head_width).
    """

    rotation_format = "quat"
    architecture = "ace"
    trained_by = "vizloc-map"  # a map is made from a recording, not trained by vizloc-train
    stride = SceneEncoder.stride

    def __init__(self, input_camera=None, camera=None, head_width: int = 256, head_layers: int = 3,
                 feature_dim: int = FEATURE_DIM, encoder: dict | None = None,
                 inlier_threshold: float = PnpSettings.inlier_threshold, ransac_iterations: int = PnpSettings.iterations,
                 min_inliers: int = PnpSettings.min_inliers, refine_iterations: int = PnpSettings.refine_iterations,
                 confidence: float = PnpSettings.confidence, seed: int = PnpSettings.seed,
                 inlier_power: float = PnpSettings.inlier_power, backbone: str = "ace_encoder",
                 feat_dim: int | None = None):
        super().__init__()
        if feat_dim is not None:  # the zoo's common knob (head width of DSAC, FC of PoseNet): the head's width
            head_width = int(feat_dim)
        self.input_camera = None if input_camera is None else [float(v) for v in input_camera]
        if self.input_camera is not None and (len(self.input_camera) != 4
                                              or not all(math.isfinite(v) for v in self.input_camera)
                                              or min(self.input_camera[:2]) <= 0):
            raise ValueError(f"input_camera is [fx, fy, cx, cy] with positive focal lengths, got {input_camera!r}")
        self.camera = None if camera is None else dict(camera)
        self.head_width, self.head_layers, self.feature_dim = int(head_width), int(head_layers), int(feature_dim)
        self.encoder_ref = None if encoder is None else dict(encoder)
        self.pnp = PnpSettings(inlier_threshold=float(inlier_threshold), iterations=int(ransac_iterations),
                               min_inliers=int(min_inliers), refine_iterations=int(refine_iterations),
                               confidence=float(confidence), seed=int(seed), inlier_power=float(inlier_power))
        self.encoder = SceneEncoder(self.feature_dim)
        self.head = CoordinateHead(self.feature_dim, self.head_width, self.head_layers)
        # centre and scale of the map's coordinates: the head regresses (X - centre) / scale
        self.register_buffer("coord_centre", torch.zeros(3))
        self.register_buffer("coord_scale", torch.ones(1))

    def config(self) -> dict:
        p = self.pnp
        return {"input_camera": self.input_camera, "camera": self.camera, "head_width": self.head_width,
                "head_layers": self.head_layers, "feature_dim": self.feature_dim, "encoder": self.encoder_ref,
                "inlier_threshold": p.inlier_threshold, "ransac_iterations": p.iterations,
                "min_inliers": p.min_inliers, "refine_iterations": p.refine_iterations,
                "confidence": p.confidence, "seed": p.seed, "inlier_power": p.inlier_power, "backbone": "ace_encoder"}

    # ------------------------------------------------------------------ network
    def set_coordinate_frame(self, centre, scale: float) -> None:
        """Where the map's points are (centre, metres) and how far they spread (scale)."""
        centre_t = torch.as_tensor(centre, dtype=torch.float32).reshape(3)
        if not torch.isfinite(centre_t).all() or not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"coordinate frame needs a finite centre and a positive scale, got {centre}, {scale}")
        with torch.no_grad():
            self.coord_centre.copy_(centre_t)
            self.coord_scale.fill_(float(scale))

    def coordinates_from_head(self, raw: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
        """Head output (normalised) -> metres in ``map``."""
        shape = [1] * raw.dim()
        shape[channel_dim] = 3
        return raw * self.coord_scale.to(raw.dtype) + self.coord_centre.to(raw.dtype).view(shape)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> scene coordinates (B, 3, ceil(H/8), ceil(W/8)), metres in map.

        On a CPU with native bf16 the head runs as it was trained (bf16 hidden layers,
        float32 output; :meth:`CoordinateHead.forward_flat`): a 512-wide head then costs
        about 6 ms a frame on one thread instead of 14."""
        features = self.encoder(images)
        if images.device.type == "cpu" and native_bf16():
            b, c, h, w = features.shape
            flat = features.permute(0, 2, 3, 1).reshape(-1, c)
            raw = self.head.forward_flat(flat, low_precision=True).reshape(b, h, w, 3).permute(0, 3, 1, 2)
        else:
            raw = self.head(features)
        return self.coordinates_from_head(raw)

    def intrinsics(self) -> np.ndarray:
        if self.input_camera is None:
            raise RuntimeError("this map has no input_camera (intrinsics of the network input): make it "
                               "with vizloc-map")
        return intrinsic_matrix(*self.input_camera)

    def decode(self, raw):
        raise TypeError("ace outputs scene coordinates, not a pose: use localize()")

    @torch.no_grad()
    def localize(self, images: torch.Tensor):
        coords = self.forward(images).float()
        b, _, h, w = coords.shape
        K = self.intrinsics()
        pixels = cell_centres(h, w, self.stride).reshape(-1, 2)
        ts, qs, covs = [], [], []
        for i in range(b):
            X = coords[i].reshape(3, -1).T.double().cpu().numpy()
            result = localize_from_coordinates(X, pixels, K, self.pnp)
            if result is None:  # no pose is supported by the coordinates: "somewhere in the map"
                ts.append(self.coord_centre.double().cpu().numpy())
                qs.append(np.array([1.0, 0.0, 0.0, 0.0]))
                covs.append(FAILED_COVARIANCE.copy())
                continue
            ts.append(result.t_map_cam)
            qs.append(result.q_map_cam)
            covs.append(result.covariance)
        device = images.device
        return (torch.as_tensor(np.stack(ts), dtype=torch.float32, device=device),
                torch.as_tensor(np.stack(qs), dtype=torch.float32, device=device),
                torch.as_tensor(np.stack(covs), dtype=torch.float64))


register_model("ace")(AceLocalizer)
