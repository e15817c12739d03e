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

**Augmentation** (ACE's, :class:`Augmentation`): a query seldom sees a surface from the
distance and roll it was mapped from, and a CNN feature is neither scale- nor
rotation-invariant. So each frame can also be encoded as ``copies`` randomly scaled and
rolled versions of itself. Scaling and rolling the image about the principal point is
exactly what a camera with a longer focal length or a rolled camera at the same place
would see, so each augmented cell is stored at the *original* pixel it maps back to:
the loss and the frame's pose stay the same, and no per-copy intrinsics are needed.
"""
from __future__ import annotations

import math
from collections.abc import Callable
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


@dataclass(frozen=True)
class Augmentation:
    """Extra encoded copies of each mapping frame: scale drawn log-uniformly in
    [scale_min, scale_max], roll uniformly in +-rotation_deg.

    The scales are wider than ACE's 2/3..3/2: a query walk comes closer to the walls than
    the mapping walks did (on the demo's held-out walk a fifth of the cells are under
    1 m away, against 7 % of the mapping cells, and those cells were 0.6 m off at the
    median), and a copy zoomed by 2 is what a camera at half the distance would see.
    Measured on the demo walks (4,000 steps, 512 wide, every held-out frame): 1/2..2
    gave 0.082 m against 0.092 m with 2/3..3/2 and 0.106 m without copies
    (``benchmarks/README.md``, "Head experiments for held-out accuracy")."""

    copies: int = 0
    scale_min: float = 0.5
    scale_max: float = 2.0
    rotation_deg: float = 15.0

    def __post_init__(self):
        if self.copies < 0 or not (0 < self.scale_min <= self.scale_max) or not (0 <= self.rotation_deg < 90):
            raise ValueError(f"augmentation needs copies >= 0, 0 < scale_min <= scale_max and "
                             f"0 <= rotation_deg < 90, got {self}")


def _warp(x: torch.Tensor, scale: float, angle: float, centre: tuple[float, float], stride: int):
    """The network input ``x`` (1, 3, H, W) scaled by ``scale`` and rolled by ``angle``
    (radians) about ``centre`` (the principal point); returns the warped image (its size a
    multiple of ``stride``) and ``back(p)``, which maps its pixels (N, 2) to ``x``'s."""
    import torch.nn.functional as F

    _, _, h, w = x.shape
    out_h = max(stride, int(round(h * scale / stride)) * stride)
    out_w = max(stride, int(round(w * scale / stride)) * stride)
    cu, cv = centre
    c, s_ = math.cos(angle), math.sin(angle)

    def back(p: np.ndarray) -> np.ndarray:  # warped pixel -> original pixel: p = R(-a) (p' - s c) / s + c
        du, dv = (p[:, 0] - scale * cu) / scale, (p[:, 1] - scale * cv) / scale
        return np.stack([c * du + s_ * dv + cu, -s_ * du + c * dv + cv], axis=1)

    # grid_sample wants, for every output pixel, the input position in [-1, 1] (align_corners=False)
    vv, uu = np.meshgrid(np.arange(out_h, dtype=np.float64), np.arange(out_w, dtype=np.float64), indexing="ij")
    src = back(np.stack([uu.ravel(), vv.ravel()], axis=1))
    grid = np.stack([(src[:, 0] + 0.5) / w * 2 - 1, (src[:, 1] + 0.5) / h * 2 - 1], axis=1)
    grid_t = torch.from_numpy(grid.reshape(1, out_h, out_w, 2).astype(np.float32))
    warped = F.grid_sample(x, grid_t, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped, back


def samples_per_frame(frames: int, cells: int, max_samples: int) -> int:
    """How many of a frame's ``cells`` the buffer keeps so ``frames`` fit in ``max_samples``."""
    if frames <= 0:
        return 0
    return int(min(cells, max(1, math.floor(max_samples / frames))))


class BufferBuilder:
    """Encodes frames one at a time into preallocated arrays (no growth, no copies).

    ``frames`` is the number of frames that will be added; with ``augmentation.copies``
    extra views each, the per-view share of cells is set so that everything fits in
    ``max_samples``."""

    def __init__(self, encoder: SceneEncoder, spec: InputSpec, K_input: np.ndarray, frames: int,
                 max_samples: int, seed: int = 0, augmentation: Augmentation = Augmentation()):
        self.encoder = encoder.eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.spec = spec
        self.stride = encoder.stride
        h, w = math.ceil(spec.crop[0] / encoder.stride), math.ceil(spec.crop[1] / encoder.stride)
        self.cells = h * w
        self.pixel_grid = torch.from_numpy(cell_centres(h, w, encoder.stride).reshape(-1, 2).astype(np.float32))
        self.augmentation = augmentation
        views = frames * (1 + augmentation.copies)
        self.keep = samples_per_frame(views, self.cells, max_samples)
        n = views * self.keep
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

    def _store(self, feats: torch.Tensor, pixels: np.ndarray, targets_at) -> None:
        """Keep up to ``self.keep`` of a view's cells (features (n, C), original pixels (n, 2))."""
        if len(pixels) > self.keep:
            pick = np.sort(self.rng.choice(len(pixels), self.keep, replace=False))
            feats, pixels = feats[torch.from_numpy(pick)], pixels[pick]
        a, b = self.count, self.count + len(pixels)
        self.features[a:b] = feats.half()
        self.pixels[a:b] = torch.from_numpy(pixels.astype(np.float32))
        self.frame_of[a:b] = self.frame_count
        if targets_at is not None:
            self.targets[a:b] = torch.from_numpy(np.asarray(targets_at(pixels), np.float32).reshape(-1, 3))
        self.count = b

    @torch.no_grad()
    def add(self, image: np.ndarray, t_map_cam, q_map_cam,
            targets_at: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        """One frame: uint8 (H, W, 3) image, its camera pose in map, and optionally
        ``targets_at(pixels)``: the true points (N, 3) seen at network-input pixels (N, 2)
        (from the recording's depth; NaN where none)."""
        if self.frame_count >= self.capacity_frames:
            raise RuntimeError("buffer is full: more frames than announced")
        x = preprocess(torch.from_numpy(np.ascontiguousarray(image))[None], self.spec)
        feats = self.encoder(x)[0].flatten(1).T  # (cells, C)
        if feats.shape[0] != self.cells:
            raise ValueError(f"encoder gave {feats.shape[0]} cells, expected {self.cells}")
        self._store(feats, self.pixel_grid.numpy().astype(np.float64), targets_at)
        aug = self.augmentation
        if aug.copies:
            _, _, h, w = x.shape
            centre = (float(self.K[0, 2]), float(self.K[1, 2]))
            for _ in range(aug.copies):
                scale = float(np.exp(self.rng.uniform(math.log(aug.scale_min), math.log(aug.scale_max))))
                angle = math.radians(float(self.rng.uniform(-aug.rotation_deg, aug.rotation_deg)))
                warped, back = _warp(x, scale, angle, centre, self.stride)
                f = self.encoder(warped)[0]
                grid = cell_centres(f.shape[1], f.shape[2], self.stride).reshape(-1, 2)
                original = back(grid)
                # a cell whose centre maps outside the image saw the zero padding: not a place
                inside = ((original[:, 0] >= 0) & (original[:, 0] <= w - 1)
                          & (original[:, 1] >= 0) & (original[:, 1] <= h - 1))
                if inside.any():
                    self._store(f.flatten(1).T[torch.from_numpy(inside)], original[inside], targets_at)
        R_wc = geometry.quat_to_matrix(np.asarray(q_map_cam, dtype=float))  # camera -> map
        self.R_cw[self.frame_count] = torch.from_numpy(R_wc.T.astype(np.float32))
        self.t_cw[self.frame_count] = torch.from_numpy((-R_wc.T @ np.asarray(t_map_cam, float)).astype(np.float32))
        self.frame_count += 1

    def finish(self) -> FeatureBuffer:
        n, f = self.count, self.frame_count
        return FeatureBuffer(self.features[:n], self.pixels[:n], self.frame_of[:n], self.targets[:n],
                             self.R_cw[:f], self.t_cw[:f], self.K)


__all__ = ["BYTES_PER_SAMPLE", "Augmentation", "BufferBuilder", "FeatureBuffer", "samples_per_frame"]
