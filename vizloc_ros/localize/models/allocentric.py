"""Allocentric spatial memory localizer for ground robots (after Henriques & Vedaldi,
"MapNet: An Allocentric Spatial Memory for Mapping Environments", CVPR 2018).

The camera moves in the plane at a known height (and nominal pitch/roll of its mount).
A CNN gives per-cell features and a depth estimate at stride 8; every feature is lifted to
3D with its depth and dropped onto a ground-plane grid (``resolution`` metres per cell),
in ``len(height_edges) + 1`` height bands above the floor (the known camera height turns
a point's height in the camera's level frame into its height above the floor).

* **memory**: the allocentric map, the running mean of the ground-projected features of
  every mapping image at its known pose (built after training by the ``allocentric``
  training recipe, saved beside the checkpoint as ``X.memory.safetensors``). With ``online_update`` a
  localised view is also integrated into it (the memory updated over time).
* **localisation**: the current image's features are projected into an egocentric grid
  (camera at the centre, its forward direction along +x) and matched against the memory
  over all ``rotations`` headings and all translations at once: the view is rotated, and
  each rotation is cross-correlated with the map (a convolution, done with FFTs). A
  softmax over the score volume (learned temperature) gives a distribution over (x, y,
  yaw); the pose is its mean around the best cell and the 3x3 covariance its spread,
  inflated when the probability mass is not concentrated there.
* output: a planar pose, camera at (x, y, camera_height) with orientation
  yaw * nominal mount; its 6x6 covariance is the (x, y, yaw) covariance with
  ``height_sigma`` on z and ``tilt_sigma_deg`` on roll and pitch, so the fusion treats it
  as a planar measurement.
* training (query + memory-frame samples, the map-matching loss, the memory build): the
  ``allocentric`` recipe, :mod:`vizloc_ros.training.recipes.allocentric`.

Registered as ``allocentric``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vizloc_ros import geometry
from vizloc_ros.localize.camera import cell_centres
from vizloc_ros.localize.models.backbones import build_backbone
from vizloc_ros.localize.models.base import PoseRegressor
from vizloc_ros.localize.models.registry import register_model

#: optical frame axes in a level, forward-x / left-y / up-z frame (camera looking along +x)
OPTICAL_IN_LEVEL = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


# --------------------------------------------------------------------------- geometry helpers

def euler_zyx(R: np.ndarray) -> np.ndarray:
    """(..., 3, 3) -> (..., 3) yaw, pitch, roll with R = Rz(yaw) Ry(pitch) Rx(roll)."""
    yaw = np.arctan2(R[..., 1, 0], R[..., 0, 0])
    pitch = -np.arcsin(np.clip(R[..., 2, 0], -1.0, 1.0))
    roll = np.arctan2(R[..., 2, 1], R[..., 2, 2])
    return np.stack([yaw, pitch, roll], -1)


def rot_zyx(yaw, pitch, roll) -> np.ndarray:
    cy, sy, cp, sp, cr, sr = (np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch),
                              np.cos(roll), np.sin(roll))
    Rz = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1.0]])
    Ry = np.array([[cp, 0, sp], [0, 1.0, 0], [-sp, 0, cp]])
    Rx = np.array([[1.0, 0, 0], [0, cr, -sr], [0, sr, cr]])
    return Rz @ Ry @ Rx


def camera_level_attitude(q_cw: np.ndarray) -> np.ndarray:
    """yaw, pitch, roll (..., 3) of the level body frame of camera orientations (w, x, y, z):
    R_cw = Rz(yaw) Ry(pitch) Rx(roll) OPTICAL_IN_LEVEL."""
    R = geometry.quat_to_matrix(q_cw) @ OPTICAL_IN_LEVEL.T
    return euler_zyx(R)


def camera_points(depth: torch.Tensor, pixels: torch.Tensor, K) -> torch.Tensor:
    """Depth (B, N) at pixels (N, 2) -> points (B, N, 3) in the camera optical frame."""
    fx, fy, cx, cy = K
    x = (pixels[:, 0] - cx) / fx
    y = (pixels[:, 1] - cy) / fy
    return torch.stack([x[None] * depth, y[None] * depth, depth], dim=-1)


def splat(points: torch.Tensor, features: torch.Tensor, valid: torch.Tensor, origin: torch.Tensor,
          resolution: float, size: tuple[int, int], height_edges) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop features onto ground grids, one per batch element.

    points (B, N, 3): (x, y, height above the floor) in the grid's frame; features (B, N, C);
    valid (B, N) bool; origin (B, 2): (x, y) of the grid's low corner; cell (row r, col c)
    covers x in [x0 + c res, x0 + (c + 1) res), y likewise with r. Returns the feature
    sums (B, bands * C, H, W) (band-major channels) and the point counts (B, bands, H, W).
    Differentiable with respect to the features.
    """
    B, N, C = features.shape
    H, W = size
    edges = torch.as_tensor(list(height_edges), dtype=points.dtype, device=points.device)
    bands = len(edges) + 1
    col = torch.floor((points[..., 0] - origin[:, None, 0]) / resolution).long()
    row = torch.floor((points[..., 1] - origin[:, None, 1]) / resolution).long()
    band = torch.bucketize(points[..., 2].contiguous(), edges) if len(edges) else torch.zeros_like(col)
    inside = valid & (col >= 0) & (col < W) & (row >= 0) & (row < H) & torch.isfinite(points).all(-1)
    batch = torch.arange(B, device=points.device)[:, None].expand(B, N)
    flat = ((batch * bands + band) * H + row) * W + col
    flat = flat[inside]
    sums = features.new_zeros(B * bands * H * W, C).index_add(0, flat, features[inside])
    counts = features.new_zeros(B * bands * H * W).index_add(
        0, flat, torch.ones_like(flat, dtype=features.dtype))
    sums = sums.reshape(B, bands, H, W, C).permute(0, 1, 4, 2, 3).reshape(B, bands * C, H, W)
    return sums, counts.reshape(B, bands, H, W)


def mean_grid(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-cell mean features (B, bands * C, H, W) from :func:`splat`'s sums and counts."""
    B, bands, H, W = counts.shape
    C = sums.shape[1] // bands
    mean = sums.reshape(B, bands, C, H, W) / counts.clamp_min(1.0)[:, :, None]
    return mean.reshape(B, bands * C, H, W)


def unit_cells(grid: torch.Tensor, bands: int) -> torch.Tensor:
    """Each observed (cell, band) feature scaled to unit length (empty ones stay zero), so
    a match score is a sum of cosine similarities."""
    B, BC, H, W = grid.shape
    return F.normalize(grid.reshape(B, bands, BC // bands, H, W), dim=2, eps=1e-6).reshape(B, BC, H, W)


def match_scores(memory: torch.Tensor, view: torch.Tensor, view_counts: torch.Tensor, angles: torch.Tensor,
                 bands: int) -> torch.Tensor:
    """Mean cosine similarity (B, R, H, W) between the unit-cell view, rotated to each
    heading and placed at each cell, and the unit-cell memory (empty cells count zero)."""
    views = rotate_views(unit_cells(view, bands), angles)
    observed = (view_counts > 0).flatten(1).sum(1).clamp_min(1).to(views.dtype)
    memory = unit_cells(memory if memory.dim() == 4 else memory[None], bands)
    return correlate(memory, views) / observed[:, None, None, None]


def rotate_views(view: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Egocentric grids (B, C, S, S) (camera at the centre cell, forward +x along columns,
    left +y along rows) -> their world-aligned versions for each heading (B, R, C, S, S):
    rotated[k] at offset d holds the view at Rot(-angle_k) d (bilinear). ``angles`` is
    (R,) shared by the batch or (B, R)."""
    B, C, S, _ = view.shape
    angles = angles.to(view)
    angles = angles[None].expand(B, -1) if angles.dim() == 1 else angles
    R = angles.shape[1]
    h = (S - 1) / 2.0
    idx = torch.arange(S, dtype=view.dtype, device=view.device) - h
    dy, dx = torch.meshgrid(idx, idx, indexing="ij")                 # offsets in cells
    cos, sin = torch.cos(angles)[..., None, None], torch.sin(angles)[..., None, None]
    src_x = cos * dx + sin * dy                                      # Rot(-a) (dx, dy)
    src_y = -sin * dx + cos * dy
    grid = torch.stack([src_x / h, src_y / h], dim=-1) if h > 0 else torch.zeros(B, R, S, S, 2).to(view)
    grid = grid.reshape(B * R, S, S, 2)
    src = view[:, None].expand(B, R, C, S, S).reshape(B * R, C, S, S)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.reshape(B, R, C, S, S)


def correlate(memory: torch.Tensor, views: torch.Tensor, chunk_elements: float = 2 ** 24) -> torch.Tensor:
    """Scores (B, R, H, W): score[k, r, c] = sum over channels and cells of
    memory[:, r - h + i, c - h + j] * views[k, :, i, j] (zero outside the map), i.e. the
    match of the view with the robot at cell (r, c) and heading k. Computed with FFTs.

    memory (B, C, H, W) or (C, H, W) shared; views (B, R, C, S, S)."""
    if memory.dim() == 3:
        memory = memory[None].expand(views.shape[0], -1, -1, -1)
    B, C, H, W = memory.shape
    R, S = views.shape[1], views.shape[-1]
    h = S // 2
    P, Q = H + S - 1, W + S - 1
    A = torch.fft.rfft2(memory.float(), s=(P, Q))                    # (B, C, P, Q')
    # headings in chunks: the spectra of all rotated views at once can take gigabytes
    chunk = max(1, int(chunk_elements // max(B * C * P * (Q // 2 + 1), 1)))
    parts = []
    for start in range(0, R, chunk):
        V = torch.fft.rfft2(views[:, start:start + chunk].float(), s=(P, Q))   # (B, r, C, P, Q')
        prod = torch.einsum("bcpq,brcpq->brpq", A, V.conj())
        parts.append(torch.fft.irfft2(prod, s=(P, Q)))               # circular cross-correlation
    full = torch.roll(torch.cat(parts, dim=1), shifts=(h, h), dims=(-2, -1))
    return full[..., :H, :W].to(memory.dtype)


def correlate_direct(memory: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """The same as :func:`correlate` with conv2d (reference for tests)."""
    if memory.dim() == 3:
        memory = memory[None].expand(views.shape[0], -1, -1, -1)
    S = views.shape[-1]
    return torch.stack([F.conv2d(memory[b:b + 1], views[b], padding=S // 2)[0] for b in range(len(memory))])


def pose_from_scores(scores: torch.Tensor, temperature: float, origin, resolution: float, window: int = 2):
    """Planar pose and covariance from one score volume (R, H, W).

    Returns (x, y, yaw, cov (3, 3), best (k, r, c), mass): the argmax cell, the
    probability-weighted mean and covariance of (x, y, yaw) over the cells within
    ``window`` cells and bins of it (yaw wrapped), floored by the grid's quantisation, and
    divided by the probability mass of that neighbourhood (an ambiguous match is uncertain).
    """
    R, H, W = scores.shape
    logp = torch.log_softmax(scores.double().flatten() / temperature, dim=0).reshape(R, H, W)
    best = int(torch.argmax(logp))
    k0, r0, c0 = best // (H * W), (best // W) % H, best % W
    ks = (torch.arange(-window, window + 1) + k0) % R
    rs = torch.arange(max(r0 - window, 0), min(r0 + window + 1, H))
    cs = torch.arange(max(c0 - window, 0), min(c0 + window + 1, W))
    p = logp[ks][:, rs][:, :, cs].exp()
    mass = float(p.sum())
    p = p / p.sum()
    step = 2 * math.pi / R
    yaw = (torch.arange(-window, window + 1, dtype=torch.float64) * step)[:, None, None]
    x = (origin[0] + (cs.double() + 0.5) * resolution)[None, None, :]
    y = (origin[1] + (rs.double() + 0.5) * resolution)[None, :, None]
    X = torch.stack(torch.broadcast_tensors(x, y, yaw), dim=-1).reshape(-1, 3)
    w = p.reshape(-1)
    mean = w @ X
    dev = X - mean
    cov = (dev * w[:, None]).T @ dev
    cov += torch.diag(torch.tensor([resolution ** 2 / 12, resolution ** 2 / 12, step ** 2 / 12],
                                   dtype=torch.float64))
    cov = cov / max(mass, 0.01)
    yaw_mean = float(mean[2]) + k0 * step
    yaw_mean = math.atan2(math.sin(yaw_mean), math.cos(yaw_mean))
    return float(mean[0]), float(mean[1]), yaw_mean, cov.numpy(), (k0, r0, c0), mass


# --------------------------------------------------------------------------- network

def _trunk(name: str, pretrained) -> tuple[nn.Module, int]:
    if name == "small":
        layers, channels = [], 3
        for out, stride in ((32, 2), (64, 2), (64, 2), (64, 1)):
            layers += [nn.Conv2d(channels, out, 3, stride, 1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True)]
            channels = out
        return nn.Sequential(*layers), channels
    if name not in ("resnet18", "resnet34"):
        raise ValueError(f"allocentric backbones: small, resnet18, resnet34; got {name!r}")
    net, _ = build_backbone(name, pretrained)
    return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2), 128


class AllocentricLocalizer(PoseRegressor):
    """Ground-projected CNN features matched against an allocentric memory -> x, y, yaw.

    Args:
        backbone: ``resnet18`` / ``resnet34`` (stem to layer2, stride 8) or ``small``.
        feat_dim: feature channels per height band.
        resolution: metres per grid cell; max_range: depth beyond which points are dropped
            (the egocentric view is 2 * max_range / resolution + 1 cells wide).
        rotations: heading bins of the match (72: 5 degrees).
        height_edges: heights above the floor (m) separating the height bands.
        input_camera: [fx, fy, cx, cy] of the network input (set by training).
        camera_height, camera_pitch, camera_roll: the known mount (m, rad; set by training
            from the mean of the training poses unless given).
        height_sigma, tilt_sigma_deg: covariance given to z and roll / pitch.
        online_update: integrate each localised view into the memory.
        search_factor: the global search runs on cells and heading bins this many times
            coarser (FFT correlation), then a direct search at full resolution refines it
            around the best coarse match (1: one full-resolution search).
    """

    rotation_format = "quat"
    architecture = "allocentric"
    stride = 8

    def __init__(self, backbone: str = "resnet18", feat_dim: int = 16, resolution: float = 0.1,
                 max_range: float = 4.0, rotations: int = 72, height_edges=(0.6, 1.6),
                 input_camera=None, camera_height: float | None = None, camera_pitch: float = 0.0,
                 camera_roll: float = 0.0, height_sigma: float = 0.15, tilt_sigma_deg: float = 5.0,
                 online_update: bool = False, search_factor: int = 2, pretrained: str | None = None):
        super().__init__()
        self._backbone_name = str(backbone)
        self.feat_dim = int(feat_dim)
        self.resolution, self.max_range = float(resolution), float(max_range)
        self.rotations = int(rotations)
        self.height_edges = [float(e) for e in height_edges]
        if self.resolution <= 0 or self.max_range <= self.resolution or self.rotations < 1:
            raise ValueError("need resolution > 0, max_range > resolution and rotations >= 1")
        self.input_camera = None if input_camera is None else [float(v) for v in input_camera]
        self.camera_height = None if camera_height is None else float(camera_height)
        self.camera_pitch, self.camera_roll = float(camera_pitch), float(camera_roll)
        self.height_sigma, self.tilt_sigma_deg = float(height_sigma), float(tilt_sigma_deg)
        self.online_update = bool(online_update)
        self.search_factor = int(search_factor)
        self.trunk, channels = _trunk(self._backbone_name, pretrained)
        self.feature_head = nn.Sequential(nn.Conv2d(channels, 128, 3, 1, 1), nn.ReLU(inplace=True),
                                          nn.Conv2d(128, self.feat_dim, 1))
        self.depth_head = nn.Sequential(nn.Conv2d(channels, 64, 3, 1, 1), nn.ReLU(inplace=True),
                                        nn.Conv2d(64, 1, 1))
        nn.init.zeros_(self.depth_head[-1].bias)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(0.05)))
        # the memory: a side file, not part of the network's tensors
        self.register_buffer("memory_sum", torch.zeros(0), persistent=False)
        self.register_buffer("memory_count", torch.zeros(0), persistent=False)
        self.map_origin = np.zeros(2)

    def config(self) -> dict:
        return {"backbone": self._backbone_name, "feat_dim": self.feat_dim, "resolution": self.resolution,
                "max_range": self.max_range, "rotations": self.rotations, "height_edges": self.height_edges,
                "input_camera": self.input_camera, "camera_height": self.camera_height,
                "camera_pitch": self.camera_pitch, "camera_roll": self.camera_roll,
                "height_sigma": self.height_sigma, "tilt_sigma_deg": self.tilt_sigma_deg,
                "online_update": self.online_update, "search_factor": self.search_factor}

    @property
    def bands(self) -> int:
        return len(self.height_edges) + 1

    @property
    def view_size(self) -> int:
        return 2 * int(math.ceil(self.max_range / self.resolution)) + 1

    # ------------------------------------------------------------------ network
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images -> (B, feat_dim + 1, ceil(H/8), ceil(W/8)): features, then depth (m)."""
        x = self.trunk(images)
        depth = torch.exp(self.depth_head(x).clamp(-5.0, 5.0)) * 2.0
        return torch.cat([self.feature_head(x), depth], dim=1)

    def _pixels(self, h: int, w: int, device, dtype) -> torch.Tensor:
        return torch.as_tensor(cell_centres(h, w, self.stride).reshape(-1, 2), dtype=dtype, device=device)

    def _require_mount(self):
        if self.input_camera is None or self.camera_height is None:
            raise RuntimeError("this allocentric model has no camera intrinsics / mount: train it with "
                               "vizloc-train or pass input_camera and camera_height")

    def mount_rotation(self) -> np.ndarray:
        """Optical frame -> level frame (forward x, left y, up z) of the nominal mount."""
        return rot_zyx(0.0, self.camera_pitch, self.camera_roll) @ OPTICAL_IN_LEVEL

    def egocentric_view(self, out: torch.Tensor, depth: torch.Tensor | None = None,
                        resolution: float | None = None):
        """Network output (B, C + 1, h, w) -> egocentric ground grids (B, bands*C, S, S) and
        counts, with the network's depth unless ``depth`` (B, h, w) is given (cells of
        ``resolution``, by default the model's)."""
        self._require_mount()
        B, _, h, w = out.shape
        feats = out[:, :-1].flatten(2).transpose(1, 2)
        depth = (out[:, -1] if depth is None else depth).reshape(B, -1)
        pixels = self._pixels(h, w, out.device, out.dtype)
        pts = camera_points(depth, pixels, self.input_camera)
        R = torch.as_tensor(self.mount_rotation(), dtype=out.dtype, device=out.device)
        level = pts @ R.T
        level = torch.stack([level[..., 0], level[..., 1], level[..., 2] + self.camera_height], -1)
        valid = torch.isfinite(depth) & (depth > 0.1) & (depth < self.max_range)
        res = resolution or self.resolution
        S = 2 * int(math.ceil(self.max_range / res)) + 1
        origin = torch.full((B, 2), -(S / 2.0) * res, dtype=out.dtype, device=out.device)
        sums, counts = splat(level, feats, valid, origin, res, (S, S), self.height_edges)
        return mean_grid(sums, counts), counts

    def allocentric_splat(self, out: torch.Tensor, depth: torch.Tensor, t_cw: torch.Tensor, q_cw: torch.Tensor,
                          origin: torch.Tensor, size: tuple[int, int]):
        """Features of images with known poses into world grids: sums and counts."""
        self._require_mount()
        B, _, h, w = out.shape
        feats = out[:, :-1].flatten(2).transpose(1, 2)
        depth = depth.reshape(B, -1).to(out.dtype)
        pixels = self._pixels(h, w, out.device, out.dtype)
        pts = camera_points(depth, pixels, self.input_camera)
        R = geometry.torch_quat_to_matrix(q_cw.to(out.dtype))
        world = pts @ R.transpose(-1, -2) + t_cw.to(out.dtype)[:, None]
        valid = torch.isfinite(depth) & (depth > 0.1) & (depth < self.max_range)
        return splat(world, feats, valid, origin.to(out.dtype), self.resolution, size, self.height_edges)

    def headings(self, count: int | None = None, device=None) -> torch.Tensor:
        count = count or self.rotations
        return torch.arange(count, dtype=torch.float32, device=device) * (2 * math.pi / count)

    # ------------------------------------------------------------------ memory
    @property
    def has_memory(self) -> bool:
        return self.memory_sum.numel() > 0

    def memory(self) -> torch.Tensor:
        return mean_grid(self.memory_sum[None], self.memory_count[None])[0]

    def coarse_memory(self, factor: int) -> torch.Tensor:
        """The memory summed over factor x factor blocks (same origin, cells factor times
        larger): the grid of the coarse search."""
        H, W = self.memory_count.shape[1:]
        pad = (0, (-W) % factor, 0, (-H) % factor)
        sums = F.avg_pool2d(F.pad(self.memory_sum, pad)[None], factor)[0]
        counts = F.avg_pool2d(F.pad(self.memory_count, pad)[None], factor)[0]
        return mean_grid(sums[None], counts[None])[0]

    def set_memory(self, sums: torch.Tensor, counts: torch.Tensor, origin) -> None:
        if sums.dim() != 3 or counts.dim() != 3 or counts.shape[0] != self.bands or \
                sums.shape[0] != self.bands * self.feat_dim or sums.shape[1:] != counts.shape[1:]:
            raise ValueError(f"memory needs sums ({self.bands * self.feat_dim}, H, W) and counts "
                             f"({self.bands}, H, W); got {tuple(sums.shape)}, {tuple(counts.shape)}")
        device = self.log_temperature.device
        self.memory_sum = sums.detach().float().to(device)
        self.memory_count = counts.detach().float().to(device)
        self.map_origin = np.asarray(origin, dtype=np.float64).reshape(2)

    def side_tensors(self) -> dict:
        if not self.has_memory:
            return {}
        return {"memory": {"sum": self.memory_sum.detach().cpu().half(),
                           "count": self.memory_count.detach().cpu(),
                           "origin": torch.as_tensor(self.map_origin)}}

    def load_side_tensors(self, tensors: dict) -> None:
        m = self.side_group(tensors, "memory", ("sum", "count", "origin"))
        if m is not None:
            self.set_memory(m["sum"].float(), m["count"].float(), m["origin"].double().numpy())

    def integrate(self, view_sums: torch.Tensor, view_counts: torch.Tensor, x: float, y: float, yaw: float) -> None:
        """Add an egocentric view (sums, counts) localised at (x, y, yaw) to the memory."""
        S = view_sums.shape[-1]
        rotated = rotate_views(torch.cat([view_sums, view_counts], 0)[None], torch.tensor([yaw]))[0, 0]
        H, W = self.memory_count.shape[1:]
        c0 = int(math.floor((x - self.map_origin[0]) / self.resolution)) - S // 2
        r0 = int(math.floor((y - self.map_origin[1]) / self.resolution)) - S // 2
        rs, cs = slice(max(r0, 0), min(r0 + S, H)), slice(max(c0, 0), min(c0 + S, W))
        vr = slice(rs.start - r0, rs.stop - r0)
        vc = slice(cs.start - c0, cs.stop - c0)
        n = view_sums.shape[0]
        self.memory_sum[:, rs, cs] += rotated[:n, vr, vc].to(self.memory_sum)
        self.memory_count[:, rs, cs] += rotated[n:, vr, vc].to(self.memory_count)

    # ------------------------------------------------------------------ inference
    def decode(self, raw):
        raise TypeError("allocentric outputs ground features, not a pose: use localize()")

    def pose_matrix(self, x: float, y: float, yaw: float):
        """Camera-to-world (t, q) of a planar pose with the nominal mount."""
        R = rot_zyx(yaw, self.camera_pitch, self.camera_roll) @ OPTICAL_IN_LEVEL
        return np.array([x, y, self.camera_height]), geometry.quat_hemisphere(geometry.matrix_to_quat(R))

    def planar_covariance(self, cov3: np.ndarray) -> np.ndarray:
        cov = np.zeros((6, 6))
        idx = [0, 1, 5]
        cov[np.ix_(idx, idx)] = cov3
        cov[2, 2] = self.height_sigma ** 2
        cov[3, 3] = cov[4, 4] = math.radians(self.tilt_sigma_deg) ** 2
        return cov

    @torch.no_grad()
    def localize(self, images: torch.Tensor):
        if not self.has_memory:
            raise RuntimeError("allocentric has no memory: build it from the mapping images (vizloc-train's "
                               "allocentric recipe does) or load a checkpoint with its .memory.safetensors")
        out = self.forward(images).float()
        view, counts = self.egocentric_view(out)
        factor = max(int(self.search_factor), 1)
        coarse_view, coarse_counts = self.egocentric_view(out, resolution=factor * self.resolution)
        memory = self.memory().to(view)
        coarse = self.coarse_memory(factor).to(view)
        temperature = float(self.log_temperature.exp())
        coarse_rotations = max(self.rotations // factor, 1)
        ts, qs, covs = [], [], []
        for b in range(len(images)):  # one image at a time: the rotated views take ~100 MB each
            # coarse: every heading and cell at factor x the resolution (FFT correlation)
            scores = match_scores(coarse, coarse_view[b:b + 1], coarse_counts[b:b + 1],
                                  self.headings(coarse_rotations, view.device), self.bands)[0]
            _, _, _, _, (k, r, c), mass = pose_from_scores(scores, temperature, self.map_origin,
                                                           factor * self.resolution, window=1)
            # fine: around the coarse peak, at the full resolution and heading step
            x, y, yaw, cov3 = self._refine(memory, view[b], counts[b], k * 2 * math.pi / coarse_rotations,
                                           (r + 0.5) * factor, (c + 0.5) * factor, factor, temperature)
            cov3 = cov3 / max(mass, 0.01)
            t, q = self.pose_matrix(x, y, yaw)
            ts.append(t)
            qs.append(q)
            covs.append(self.planar_covariance(cov3))
            if self.online_update:  # the memory updated over time with the localised view
                self.integrate(view[b] * counts[b].repeat_interleave(self.feat_dim, 0), counts[b], x, y, yaw)
        device = images.device
        return (torch.as_tensor(np.stack(ts), dtype=torch.float32, device=device),
                torch.as_tensor(np.stack(qs), dtype=torch.float32, device=device),
                torch.as_tensor(np.stack(covs), dtype=torch.float64))

    def _refine(self, memory, view, counts, yaw0: float, row0: float, col0: float, factor: int,
                temperature: float):
        """Fine search around a coarse match (yaw0, fine-cell position row0/col0): headings
        within one coarse bin, cells within factor + 1 of it; direct correlation.
        Returns x, y, yaw and the 3x3 covariance of the fine distribution."""
        step = 2 * math.pi / self.rotations
        span = max(factor, 1)
        yaws = yaw0 + step * torch.arange(-span, span + 1, dtype=torch.float32, device=view.device)
        H, W = memory.shape[1:]
        S = view.shape[-1]
        h = S // 2
        r_lo, r_hi = int(math.floor(row0)) - span - 1, int(math.ceil(row0)) + span
        c_lo, c_hi = int(math.floor(col0)) - span - 1, int(math.ceil(col0)) + span
        r_lo, c_lo = max(r_lo, 0), max(c_lo, 0)
        r_hi, c_hi = min(r_hi, H - 1), min(c_hi, W - 1)
        unit_memory = unit_cells(memory[None], self.bands)[0]
        # the memory around the window, zero beyond the map, so that a valid conv gives the window
        crop = F.pad(unit_memory, (h, h, h, h))[:, r_lo:r_hi + 1 + 2 * h, c_lo:c_hi + 1 + 2 * h]
        views = rotate_views(unit_cells(view[None], self.bands), yaws)[0]       # (K, C, S, S)
        observed = float((counts > 0).sum().clamp_min(1))
        scores = F.conv2d(crop[None], views)[0] / observed                      # (K, h_w, w_w)
        logp = torch.log_softmax(scores.double().flatten() / temperature, dim=0).reshape(scores.shape)
        p = logp.exp()
        xs = self.map_origin[0] + (torch.arange(c_lo, c_hi + 1, dtype=torch.float64) + 0.5) * self.resolution
        ys = self.map_origin[1] + (torch.arange(r_lo, r_hi + 1, dtype=torch.float64) + 0.5) * self.resolution
        offsets = (yaws.double().cpu() - yaw0)
        X = torch.stack(torch.broadcast_tensors(xs[None, None, :], ys[None, :, None],
                                                offsets[:, None, None]), dim=-1).reshape(-1, 3)
        w = p.reshape(-1).cpu()
        mean = w @ X
        dev = X - mean
        cov = (dev * w[:, None]).T @ dev
        cov += torch.diag(torch.tensor([self.resolution ** 2 / 12] * 2 + [step ** 2 / 12], dtype=torch.float64))
        yaw = math.atan2(math.sin(yaw0 + float(mean[2])), math.cos(yaw0 + float(mean[2])))
        return float(mean[0]), float(mean[1]), yaw, cov.numpy()

register_model("allocentric")(AllocentricLocalizer)
