"""The mapping buffer: every mapping frame encoded once by the frozen encoder, kept as
(feature, pixel, camera) samples that the head is trained on in shuffled batches.

Why a buffer (ACE's key idea): the encoder is the expensive part and never changes while
a map is made, so each frame goes through it exactly once; the head then trains on
random samples across all frames, which decorrelates its batches far better than whole
images would, and each step costs only the small MLP. Memory is bounded by
``max_samples``: with more cells than that, each frame keeps an equal random share.

A sample row holds its feature (fp16, 128 values), the network-input pixel of its cell,
the index of its frame (whose world-to-camera pose is stored once per frame) and, where
the recording has depth, the true scene point (else NaN).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from vizloc_ros import geometry
from vizloc_ros.localize.camera import cell_centres
from vizloc_ros.localize.models.ace import SceneEncoder
from vizloc_ros.localize.preprocess import InputSpec, preprocess

#: bytes per buffered sample: 128 fp16 features + 2 float32 pixel + int32 frame + 3 float32 target
BYTES_PER_SAMPLE = 128 * 2 + 2 * 4 + 4 + 3 * 4


@dataclass
class FeatureBuffer:
    features: torch.Tensor  # (N, C) float16
    pixels: torch.Tensor  # (N, 2) float32, network-input pixels (u, v)
    frames: torch.Tensor  # (N,) int64, index into the per-frame poses
    targets: torch.Tensor  # (N, 3) float32, true scene point or NaN
    R_cw: torch.Tensor  # (F, 3, 3) float32, world -> camera rotation of each frame
    t_cw: torch.Tensor  # (F, 3) float32
    K: torch.Tensor  # (3, 3) float32, network-input intrinsics

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(int(t.element_size() * t.numel()) for t in
                   (self.features, self.pixels, self.frames, self.targets, self.R_cw, self.t_cw))

    @property
    def has_depth(self) -> bool:
        return bool(torch.isfinite(self.targets).all(dim=1).any())

    def camera_centres(self) -> np.ndarray:
        """(F, 3) camera positions in map."""
        R = self.R_cw.double().numpy()
        t = self.t_cw.double().numpy()
        return -np.einsum("fji,fj->fi", R, t)


def samples_per_frame(frames: int, cells: int, max_samples: int) -> int:
    """How many of a frame's ``cells`` the buffer keeps so ``frames`` fit in ``max_samples``."""
    if frames <= 0:
        return 0
    return int(min(cells, max(1, math.floor(max_samples / frames))))


class BufferBuilder:
    """Encodes frames one at a time into preallocated arrays (no growth, no copies)."""

    def __init__(self, encoder: SceneEncoder, spec: InputSpec, K_input: np.ndarray, frames: int,
                 max_samples: int, seed: int = 0):
        self.encoder = encoder.eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.spec = spec
        h, w = math.ceil(spec.crop[0] / encoder.stride), math.ceil(spec.crop[1] / encoder.stride)
        self.cells = h * w
        self.pixel_grid = torch.from_numpy(cell_centres(h, w, encoder.stride).reshape(-1, 2).astype(np.float32))
        self.keep = samples_per_frame(frames, self.cells, max_samples)
        n = frames * self.keep
        c = encoder.feature_dim
        self.features = torch.empty((n, c), dtype=torch.float16)
        self.pixels = torch.empty((n, 2), dtype=torch.float32)
        self.frame_of = torch.empty(n, dtype=torch.int64)
        self.targets = torch.full((n, 3), float("nan"), dtype=torch.float32)
        self.R_cw = torch.empty((frames, 3, 3), dtype=torch.float32)
        self.t_cw = torch.empty((frames, 3), dtype=torch.float32)
        self.K = torch.as_tensor(K_input, dtype=torch.float32)
        self.rng = np.random.default_rng(seed)
        self.count = 0
        self.frame_count = 0
        self.capacity_frames = frames

    @torch.no_grad()
    def add(self, image: np.ndarray, t_map_cam, q_map_cam, cell_targets: np.ndarray | None = None) -> None:
        """One frame: uint8 (H, W, 3) image, its camera pose in map, optional (h, w, 3) true points."""
        if self.frame_count >= self.capacity_frames:
            raise RuntimeError("buffer is full: more frames than announced")
        x = preprocess(torch.from_numpy(np.ascontiguousarray(image))[None], self.spec)
        feats = self.encoder(x)[0].flatten(1).T  # (cells, C)
        if feats.shape[0] != self.cells:
            raise ValueError(f"encoder gave {feats.shape[0]} cells, expected {self.cells}")
        if self.keep < self.cells:
            pick = torch.from_numpy(np.sort(self.rng.choice(self.cells, self.keep, replace=False)))
        else:
            pick = torch.arange(self.cells)
        a, b = self.count, self.count + len(pick)
        self.features[a:b] = feats[pick].half()
        self.pixels[a:b] = self.pixel_grid[pick]
        self.frame_of[a:b] = self.frame_count
        if cell_targets is not None:
            self.targets[a:b] = torch.from_numpy(np.asarray(cell_targets, np.float32).reshape(-1, 3))[pick]
        R_wc = geometry.quat_to_matrix(np.asarray(q_map_cam, dtype=float))  # camera -> map
        self.R_cw[self.frame_count] = torch.from_numpy(R_wc.T.astype(np.float32))
        self.t_cw[self.frame_count] = torch.from_numpy((-R_wc.T @ np.asarray(t_map_cam, float)).astype(np.float32))
        self.count = b
        self.frame_count += 1

    def finish(self) -> FeatureBuffer:
        n, f = self.count, self.frame_count
        return FeatureBuffer(self.features[:n], self.pixels[:n], self.frame_of[:n], self.targets[:n],
                             self.R_cw[:f], self.t_cw[:f], self.K)


__all__ = ["BYTES_PER_SAMPLE", "BufferBuilder", "FeatureBuffer", "samples_per_frame"]
