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
  over every heading and every position where the camera can be: the view is rotated,
  and each rotation is cross-correlated with the map. Coarse to fine: a global search on
  ``search_factor`` times larger cells over ``coarse_rotations`` headings (a valid FFT
  correlation over the memory's search region), then a direct search at the full
  resolution and ``rotations`` heading step around its ``candidates`` best matches
  (:meth:`AllocentricLocalizer.localize`; the tests check it finds the pose of one
  exhaustive full-resolution search). A softmax over the refined scores (learned
  temperature) gives a distribution over (x, y, yaw); the pose is its mean and the 3x3
  covariance its spread, inflated when the global match's probability mass is not
  concentrated around the winning candidate.
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
    memory = unit_cells(memory if memory.dim() == 4 else memory[None], bands)
    return correlate(memory, views) / observed_cells(view_counts).to(views.dtype)[:, None, None, None]


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
    match of the view with the robot at cell (r, c) and heading k. Computed with FFTs
    (of fast lengths, at least H + S - 1 so that nothing wraps around; the views'
    spectra in two passes as in :func:`correlate_valid`). Differentiable.

    memory (B, C, H, W) or (C, H, W) shared; views (B, R, C, S, S)."""
    if memory.dim() == 3:
        memory = memory[None].expand(views.shape[0], -1, -1, -1)
    B, C, H, W = memory.shape
    R, S = views.shape[1], views.shape[-1]
    h = S // 2
    P, Q = fft_length(H + S - 1), fft_length(W + S - 1)
    A = torch.fft.rfft2(memory.float(), s=(P, Q)).transpose(-1, -2)[:, None]   # (B, 1, C, Q', P)
    # headings in chunks: the spectra of all rotated views at once can take gigabytes
    chunk = max(1, int(chunk_elements // max(B * C * P * (Q // 2 + 1), 1)))
    parts = []
    for start in range(0, R, chunk):
        V = torch.fft.rfft(views[:, start:start + chunk].float(), n=Q, dim=-1).transpose(-1, -2)
        V = torch.fft.fft(V, n=P, dim=-1)                                       # (B, r, C, Q', P)
        prod = (A * V.conj()).sum(2).transpose(-1, -2)                          # (B, r, P, Q')
        parts.append(torch.fft.irfft2(prod, s=(P, Q)))               # circular cross-correlation
    full = torch.roll(torch.cat(parts, dim=1), shifts=(h, h), dims=(-2, -1))
    return full[..., :H, :W].to(memory.dtype)


def correlate_direct(memory: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """The same as :func:`correlate` with conv2d (reference for tests)."""
    if memory.dim() == 3:
        memory = memory[None].expand(views.shape[0], -1, -1, -1)
    S = views.shape[-1]
    return torch.stack([F.conv2d(memory[b:b + 1], views[b], padding=S // 2)[0] for b in range(len(memory))])


def observed_cells(view_counts: torch.Tensor) -> torch.Tensor:
    """(B,) the number of observed (band, cell) entries of each view (at least 1): what a
    match score is divided by, so that it is a mean cosine similarity."""
    return (view_counts > 0).flatten(1).sum(1).clamp_min(1)


def pool_grid(sums: torch.Tensor, counts: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid sums (B, bands * C, H, W) and counts (B, bands, H, W) added up over factor x
    factor blocks (same low corner, cells ``factor`` times larger, the grid padded with
    empty cells to a multiple of ``factor``): the grid of the coarse search."""
    if factor == 1:
        return sums, counts
    H, W = counts.shape[-2:]
    pad = (0, (-W) % factor, 0, (-H) % factor)
    area = float(factor * factor)
    return F.avg_pool2d(F.pad(sums, pad), factor) * area, F.avg_pool2d(F.pad(counts, pad), factor) * area


def fft_length(n: int) -> int:
    """The smallest even m >= n with no prime factor above 5: a length the real FFT
    transforms fast (a prime length such as 71 takes several times longer)."""
    m = max(int(n), 2)
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1 and m % 2 == 0:
            return m
        m += 1


def crop_spectrum(crop: torch.Tensor, fft_hw: tuple[int, int]) -> torch.Tensor:
    """The spectrum of a memory crop (C, L1, L2) that :func:`correlate_valid` reads: the
    complex conjugate of ``rfft2(crop, s=fft_hw)`` with its two frequency axes swapped,
    (C, Q', P) (conjugated once here, so that the product with each view's spectrum needs
    no conjugated copy of the larger one)."""
    return torch.fft.rfft2(crop.float(), s=fft_hw).transpose(-1, -2).conj().resolve_conj().contiguous()


def correlate_valid(spectrum: torch.Tensor, views: torch.Tensor, fft_hw: tuple[int, int],
                    out_hw: tuple[int, int], half_turns: bool = False) -> torch.Tensor:
    """Valid cross-correlation (..., R, h_out, w_out) of memory crops with rotated views.

    ``spectrum`` is :func:`crop_spectrum` of crops (..., C, L1, L2); views (..., R, C, S, S)
    (the same leading dimensions, e.g. none, or a batch); out[k, i, j] = sum over channels
    and view cells (a, b) of crop[:, i + a, j + b] * views[k, :, a, b], for
    i < h_out <= L1 - S + 1 (likewise j). Only outputs that never reach past the crop are
    asked for, so the FFT needs no zero padding beyond the crop (``fft_hw`` >= the crop's
    size): the circular wrap-around lands on outputs that are not returned. The views'
    spectra are the cost (R * C transforms): done in two passes, the real FFT along the S
    rows of each view, then (transposed, so that it runs along contiguous memory) the FFT
    along the columns, which transforms no zero-padded row. Differentiable.

    ``half_turns``: ``views`` are the first R headings of 2R evenly spaced ones (0 to pi),
    and the output has all 2R: a view turned by a further half turn is the same grid
    flipped about its centre cell (bilinear samples at the negated points), whose spectrum
    is the conjugate of the first one's times a phase, so the second half costs no FFT
    and the two share their products with the memory's spectrum (four real sums over the
    channels give both)."""
    P, Q = fft_hw
    V = torch.fft.rfft(views.float(), n=Q, dim=-1).transpose(-1, -2).contiguous()   # (..., R, C, Q', S)
    V = torch.fft.fft(V, n=P, dim=-1)                                               # (..., R, C, Q', P)
    if not half_turns:
        prod = (spectrum.unsqueeze(-4) * V).sum(-3).conj()                          # (..., R, Q', P)
    else:
        a, v = torch.view_as_real(spectrum).unsqueeze(-5), torch.view_as_real(V)
        rr, ii = (a[..., 0] * v[..., 0]).sum(-3), (a[..., 1] * v[..., 1]).sum(-3)
        ri, ir = (a[..., 0] * v[..., 1]).sum(-3), (a[..., 1] * v[..., 0]).sum(-3)
        first = torch.complex(rr - ii, -(ri + ir))        # conj(sum conj(A) V): the views as given
        S = views.shape[-1]
        kx = torch.arange(V.shape[-2], device=V.device, dtype=torch.float32)[:, None]
        ky = torch.arange(P, device=V.device, dtype=torch.float32)[None, :]
        turn = torch.polar(torch.ones(()), 2 * math.pi * (S - 1) * (kx / Q + ky / P))   # conj of the flip's phase
        second = torch.complex(rr + ii, ri - ir) * turn    # sum A V, times it: the views turned by pi
        prod = torch.cat([first, second], dim=-3)
    return torch.fft.irfft2(prod.transpose(-1, -2), s=fft_hw)[..., :out_hw[0], :out_hw[1]]


def window_scores(memory: torch.Tensor, views: torch.Tensor, rows: range, cols: range, bands: int = 1) -> torch.Tensor:
    """Direct correlation (K, len(rows), len(cols)) of views at a window of positions.

    memory (bands * C, H, W); views (K, bands * C, S, S), S odd; score[k, i, j] = sum over
    channels and view cells (a, b) of memory[:, rows[i] - h + a, cols[j] - h + b] *
    views[k, :, a, b] (h = S // 2; zero outside the memory): :func:`correlate` at those
    positions only. ``rows`` and ``cols`` must lie on the memory. Differentiable.
    """
    K, BC, S, _ = views.shape
    cells = views.detach().abs().sum((0, 1)).flatten().nonzero()[:, 0]
    return window_scores_at(cell_table(F.pad(memory, (S // 2,) * 4), bands), memory.shape[-2:],
                            views.flatten(2)[:, :, cells], cells, S, rows, cols)


def cell_table(memory: torch.Tensor, bands: int) -> torch.Tensor:
    """A grid (bands * C, H, W) as a table of (band, cell) rows of C features
    (bands * H * W, C): what :func:`window_scores_at` gathers from, one contiguous row
    (64 bytes for 16 fp32 channels) per entry."""
    BC, H, W = memory.shape
    return memory.reshape(bands, BC // bands, H, W).permute(0, 2, 3, 1).reshape(bands * H * W, BC // bands)


def window_scores_at(table: torch.Tensor, shape, values: torch.Tensor, cells: torch.Tensor, size: int,
                     rows: range, cols: range) -> torch.Tensor:
    """:func:`window_scores` of sparse views on a memory of ``shape`` (H, W), given as
    :func:`cell_table` of the memory zero-padded by size // 2 on every side: ``values``
    (K, bands * C, N) at the view cells ``cells`` (N,) (flat indices into size x size).

    A ground-projected view is sparse (the camera's wedge, and in a cell one or two height
    bands), so only the (band, cell) entries that some view uses are gathered from the
    memory, as rows of C features, and scored with one matrix product: milliseconds for
    64 positions x 5 headings, where a dense convolution with the S x S kernels takes tens."""
    K, BC, N = values.shape
    C = table.shape[1]
    bands = BC // C
    h = size // 2
    Hp, Wp = shape[0] + 2 * h, shape[1] + 2 * h                      # memory row r is padded row r + h
    values = values.reshape(K, bands, C, N)
    used = values.detach().abs().sum((0, 2)).flatten().nonzero()[:, 0]   # (band, cell) entries in use
    if len(used) == 0:
        return values.new_zeros(K, len(rows), len(cols))
    band, n = used // N, used % N
    a, b = cells[n] // size, cells[n] % size
    r = torch.as_tensor(list(rows), device=table.device)
    c = torch.as_tensor(list(cols), device=table.device)
    index = band * (Hp * Wp) + (r[:, None, None] + a) * Wp + (c[None, :, None] + b)   # (rows, cols, used)
    gathered = table.index_select(0, index.flatten()).reshape(len(r) * len(c), len(used) * C)
    scores = values.permute(0, 1, 3, 2)[:, band, n].reshape(K, len(used) * C) @ gathered.T
    return scores.reshape(K, len(r), len(c))


def rotated_support(view: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Flat indices (N,) of the cells of an S x S grid where :func:`rotate_views` of the
    egocentric grid ``view`` (C, S, S) can be non-zero at some heading of ``angles``: those
    whose source point lies within one cell of an observed cell."""
    C, S, _ = view.shape
    h = (S - 1) / 2.0
    near = F.max_pool2d((view.abs().sum(0) > 0).to(view.dtype)[None, None], 3, 1, 1)[0, 0] > 0
    idx = torch.arange(S, dtype=view.dtype, device=view.device) - h
    dy, dx = (v.flatten() for v in torch.meshgrid(idx, idx, indexing="ij"))
    cos, sin = torch.cos(angles.to(view))[:, None], torch.sin(angles.to(view))[:, None]
    col = torch.round(cos * dx + sin * dy + h).long()
    row = torch.round(-sin * dx + cos * dy + h).long()
    inside = (col >= 0) & (col < S) & (row >= 0) & (row < S)
    hit = torch.zeros_like(inside)
    hit[inside] = near[row[inside], col[inside]]
    return hit.any(0).nonzero()[:, 0]


def rotate_view_cells(view: torch.Tensor, angles: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """:func:`rotate_views` of one egocentric grid (C, S, S) at the cells ``cells`` (flat
    indices (N,)) only: (R, C, N), the same values without the empty rest of the grid."""
    C, S, _ = view.shape
    h = (S - 1) / 2.0
    dy = (cells // S).to(view.dtype) - h
    dx = (cells % S).to(view.dtype) - h
    cos, sin = torch.cos(angles.to(view))[:, None], torch.sin(angles.to(view))[:, None]
    src_x, src_y = cos * dx + sin * dy, -sin * dx + cos * dy           # Rot(-a) (dx, dy)
    grid = torch.stack([src_x / h, src_y / h], dim=-1)[None]            # (1, R, N, 2)
    out = F.grid_sample(view[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0].transpose(0, 1)


def peaks(logp: torch.Tensor, count: int, radius: int = 1) -> list[tuple[int, int, int]]:
    """Up to ``count`` local maxima (k, r, c) of a score volume (R, H, W), best first:
    each next one is the best cell farther than ``radius`` cells or heading bins (headings
    wrap) from those already taken, so the candidates are distinct places or headings."""
    R, H, W = logp.shape
    left = logp.clone()
    found = []
    for _ in range(max(int(count), 1)):
        best = int(torch.argmax(left))
        if not torch.isfinite(left.flatten()[best]):
            break
        k, r, c = best // (H * W), (best // W) % H, best % W
        found.append((k, r, c))
        ks = torch.arange(k - radius, k + radius + 1) % R
        left[ks, max(r - radius, 0):r + radius + 1, max(c - radius, 0):c + radius + 1] = -math.inf
    return found


def neighbourhood_mass(logp: torch.Tensor, cell: tuple[int, int, int], radius: int = 1) -> float:
    """Probability mass of a log-probability volume (R, H, W) within ``radius`` cells and
    heading bins (wrapped) of ``cell``: low when the match is ambiguous."""
    R = logp.shape[0]
    k, r, c = cell
    ks = torch.arange(k - radius, k + radius + 1) % R
    return float(logp[ks, max(r - radius, 0):r + radius + 1, max(c - radius, 0):c + radius + 1].exp().sum())


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


class ContextDepthHead(nn.Module):
    """Depth at each stride-8 cell from its 3 x 3 neighbourhood of trunk features, the
    image's mean feature (which part of the scene is in view, at what scale) and the
    cell's normalised image row and column (below the horizon, the row of a floor cell
    fixes its depth for a camera at a known height), then a dilated 3 x 3 layer.

    Why: the localizer's query view is placed with this depth, and a head that sees only
    a ResNet stage-2 neighbourhood (about 100 pixels) of a frozen trunk learned depth to
    0.6 m (median) in a short run, where the match with the true depth was already within
    0.1 m; the matching features were not the limit, the depth was."""

    def __init__(self, channels: int, hidden: int = 64):
        super().__init__()
        self.local = nn.Conv2d(channels, hidden, 3, 1, 1)
        self.mix = nn.Conv2d(hidden + channels + 2, hidden, 1)
        self.wide = nn.Conv2d(hidden, hidden, 3, 1, padding=2, dilation=2)
        self.out = nn.Conv2d(hidden, 1, 1)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, h, w = x.shape
        rows = torch.linspace(-1.0, 1.0, h, dtype=x.dtype, device=x.device)[:, None].expand(h, w)
        cols = torch.linspace(-1.0, 1.0, w, dtype=x.dtype, device=x.device)[None, :].expand(h, w)
        where = torch.stack([rows, cols])[None].expand(B, 2, h, w)
        scene = x.mean((2, 3), keepdim=True).expand(-1, -1, h, w)
        y = F.relu(self.mix(torch.cat([F.relu(self.local(x)), scene, where], 1)))
        return self.out(F.relu(self.wide(y)))


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
        search_factor: the global search runs on cells this many times larger (an FFT
            correlation over every heading of ``coarse_rotations`` and every cell of the
            observed part of the map); a direct search at the full resolution and heading
            step then refines the ``candidates`` best coarse matches, and the best refined
            one is the answer (1: the global search at full resolution).
        coarse_rotations: heading bins of the global search (default rotations // 2).
        candidates: coarse matches refined (distinct places or headings): a second or
            third peak can win at full resolution where coarse cells blur the first.
        search_margin: metres around the mapping poses' extent where the camera is
            searched for (the memory's ``search_region``, set when the memory is built).
        depth_context: the depth head sees the whole image's pooled features and each
            cell's image row and column besides its neighbourhood (:class:`ContextDepthHead`).

    Where the time goes (one CPU thread beside other jobs, a 180x240 input, 16 x 3
    channels, the 6 x 5 m demo room; 30-40 ms in all): the network about 15 ms; the
    global search at 0.4 m / 10 degrees (the spectra of 18 rotated 21 x 21 views of 48
    channels, the other 18 headings from them); each refinement about 3 ms (64 cells x 5
    headings, gathered where the view has features).
    """

    rotation_format = "quat"
    architecture = "allocentric"
    stride = 8

    def __init__(self, backbone: str = "resnet18", feat_dim: int = 16, resolution: float = 0.1,
                 max_range: float = 4.0, rotations: int = 72, height_edges=(0.6, 1.6),
                 input_camera=None, camera_height: float | None = None, camera_pitch: float = 0.0,
                 camera_roll: float = 0.0, height_sigma: float = 0.15, tilt_sigma_deg: float = 5.0,
                 online_update: bool = False, search_factor: int = 4, coarse_rotations: int | None = None,
                 candidates: int = 3, search_margin: float = 1.0, depth_context: bool = False,
                 pretrained: str | None = None):
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
        self.coarse_rotations = max(self.rotations // 2, 1) if coarse_rotations is None else int(coarse_rotations)
        self.candidates = int(candidates)
        self.search_margin = float(search_margin)
        if self.search_factor < 1 or self.coarse_rotations < 1 or self.candidates < 1:
            raise ValueError("need search_factor >= 1, coarse_rotations >= 1 and candidates >= 1")
        self.trunk, channels = _trunk(self._backbone_name, pretrained)
        self.feature_head = nn.Sequential(nn.Conv2d(channels, 128, 3, 1, 1), nn.ReLU(inplace=True),
                                          nn.Conv2d(128, self.feat_dim, 1))
        self.depth_context = bool(depth_context)
        if self.depth_context:
            self.depth_head = ContextDepthHead(channels)
        else:
            self.depth_head = nn.Sequential(nn.Conv2d(channels, 64, 3, 1, 1), nn.ReLU(inplace=True),
                                            nn.Conv2d(64, 1, 1))
            nn.init.zeros_(self.depth_head[-1].bias)
        # softmax temperatures of the full-resolution and of the global (coarse) match
        self.log_temperature = nn.Parameter(torch.tensor(math.log(0.05)))
        self.log_temperature_coarse = nn.Parameter(torch.tensor(math.log(0.05)))
        # the memory: a side file, not part of the network's tensors
        self.register_buffer("memory_sum", torch.zeros(0), persistent=False)
        self.register_buffer("memory_count", torch.zeros(0), persistent=False)
        self.map_origin = np.zeros(2)
        self.search_region: np.ndarray | None = None
        self._search: dict | None = None   # what every search reads of the memory (_search_index)

    def config(self) -> dict:
        return {"backbone": self._backbone_name, "feat_dim": self.feat_dim, "resolution": self.resolution,
                "max_range": self.max_range, "rotations": self.rotations, "height_edges": self.height_edges,
                "input_camera": self.input_camera, "camera_height": self.camera_height,
                "camera_pitch": self.camera_pitch, "camera_roll": self.camera_roll,
                "height_sigma": self.height_sigma, "tilt_sigma_deg": self.tilt_sigma_deg,
                "online_update": self.online_update, "search_factor": self.search_factor,
                "coarse_rotations": self.coarse_rotations, "candidates": self.candidates,
                "search_margin": self.search_margin, "depth_context": self.depth_context}

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

    def set_memory(self, sums: torch.Tensor, counts: torch.Tensor, origin, region=None) -> None:
        """The memory: feature sums (bands * feat_dim, H, W) and point counts (bands, H, W)
        of cells of ``resolution`` from ``origin`` (x, y of the low corner); ``region``
        (x_lo, y_lo, x_hi, y_hi) is where the camera can be, the window of the global
        search (the training recipe gives the mapping poses' extent and ``search_margin``
        around it); None: anywhere on the map."""
        if sums.dim() != 3 or counts.dim() != 3 or counts.shape[0] != self.bands or \
                sums.shape[0] != self.bands * self.feat_dim or sums.shape[1:] != counts.shape[1:]:
            raise ValueError(f"memory needs sums ({self.bands * self.feat_dim}, H, W) and counts "
                             f"({self.bands}, H, W); got {tuple(sums.shape)}, {tuple(counts.shape)}")
        device = self.log_temperature.device
        self.memory_sum = sums.detach().float().to(device)
        self.memory_count = counts.detach().float().to(device)
        self.map_origin = np.asarray(origin, dtype=np.float64).reshape(2)
        self.search_region = None if region is None else np.asarray(region, dtype=np.float64).reshape(4)
        self._search = None

    def side_tensors(self) -> dict:
        if not self.has_memory:
            return {}
        memory = {"sum": self.memory_sum.detach().cpu().half(), "count": self.memory_count.detach().cpu(),
                  "origin": torch.as_tensor(self.map_origin)}
        if self.search_region is not None:
            memory["region"] = torch.as_tensor(self.search_region)
        return {"memory": memory}

    def load_side_tensors(self, tensors: dict) -> None:
        m = self.side_group(tensors, "memory", ("sum", "count", "origin"))
        if m is not None:
            region = m["region"].double().numpy() if "region" in m else None   # older memories: none
            self.set_memory(m["sum"].float(), m["count"].float(), m["origin"].double().numpy(), region)

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
        self._search = None

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
        factor = self.search_factor
        view, counts = self.egocentric_view(out)
        coarse_view, coarse_counts = (view, counts) if factor == 1 else \
            self.egocentric_view(out, resolution=factor * self.resolution)
        ts, qs, covs = [], [], []
        for b in range(len(images)):  # one image at a time: the rotated views are the memory cost
            x, y, yaw, cov3 = self._search_one(self._search_index(), view[b], counts[b], coarse_view[b],
                                               coarse_counts[b])
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

    def _search_index(self) -> dict:
        """What every search reads of the memory, computed once per memory (set_memory and
        integrate drop it): the unit-cell memory at full resolution, and for the global
        search its window of positions (the coarse cells of ``search_region``: the map
        also keeps max_range around the mapping poses, so that what they see fits, but the
        camera is not there) with the spectrum of the coarse memory around that window.
        Searching that window, not every cell of the map, is what makes the FFTs small:
        their size is the window plus the view, not the map plus the view."""
        device = self.memory_sum.device
        if self._search is not None and self._search["device"] == device:
            return self._search
        factor = self.search_factor
        view_half = self.view_size // 2      # the fine memory padded once for the refinements
        fine = cell_table(F.pad(unit_cells(self.memory()[None], self.bands)[0], (view_half,) * 4), self.bands)
        sums, counts = pool_grid(self.memory_sum[None], self.memory_count[None], factor)
        coarse = unit_cells(mean_grid(sums, counts), self.bands)[0]
        Hc, Wc = counts.shape[-2:]
        r_lo, r_hi, c_lo, c_hi = 0, Hc - 1, 0, Wc - 1
        if self.search_region is not None:
            cell = factor * self.resolution
            x_lo, y_lo, x_hi, y_hi = self.search_region
            c_lo, c_hi = (min(max(int(math.floor((v - self.map_origin[0]) / cell)), 0), Wc - 1) for v in (x_lo, x_hi))
            r_lo, r_hi = (min(max(int(math.floor((v - self.map_origin[1]) / cell)), 0), Hc - 1) for v in (y_lo, y_hi))
        h = int(math.ceil(self.max_range / (factor * self.resolution)))   # coarse view: 2 h + 1 cells
        crop = F.pad(coarse, (h, h, h, h))[:, r_lo:r_hi + 1 + 2 * h, c_lo:c_hi + 1 + 2 * h]
        fft_hw = (fft_length(crop.shape[1]), fft_length(crop.shape[2]))
        self._search = {"device": device, "fine": fine, "fine_shape": tuple(self.memory_count.shape[1:]), "spectrum": crop_spectrum(crop, fft_hw),
                        "fft_hw": fft_hw, "out_hw": (r_hi - r_lo + 1, c_hi - c_lo + 1), "offset": (r_lo, c_lo)}
        return self._search

    def _search_one(self, index: dict, view, counts, coarse_view, coarse_counts):
        """One view: the global search, the refinement of its best candidates, the pose
        (x, y, yaw) and 3x3 covariance of the best refined one (inflated when the coarse
        probability is not concentrated around it)."""
        device = view.device
        R = self.coarse_rotations
        half = R % 2 == 0   # headings k + R/2 from the spectra of headings k (correlate_valid)
        angles = self.headings(R, device)[:R // 2 if half else R]
        views = rotate_views(unit_cells(coarse_view[None], self.bands), angles)[0]
        scores = correlate_valid(index["spectrum"], views, index["fft_hw"], index["out_hw"], half_turns=half)
        scores = scores / float(observed_cells(coarse_counts[None]))
        logp = torch.log_softmax(scores.double().flatten() / float(self.log_temperature_coarse.detach().exp()),
                                 dim=0).reshape(scores.shape)
        unit_view = unit_cells(view[None], self.bands)
        observed = float(observed_cells(counts[None]))
        r_lo, c_lo = index["offset"]
        best, best_score = None, -math.inf
        for k, r, c in peaks(logp, self.candidates):
            *pose, score = self._refine(index, unit_view, observed, k * 2 * math.pi / R, r + r_lo, c + c_lo)
            if score > best_score:
                best, best_score = (*pose, neighbourhood_mass(logp, (k, r, c))), score
        x, y, yaw, cov3, mass = best
        return x, y, yaw, cov3 / max(mass, 0.01)

    def _refine(self, index: dict, unit_view, observed: float, yaw0: float, row: int, col: int):
        """Full-resolution search around coarse cell (row, col) at heading yaw0: headings
        within one coarse bin either side, cells of the coarse cell and half a coarse cell
        around it; direct correlation. Returns x, y, yaw, the 3x3 covariance of the
        distribution over that window, and its best score (which candidate wins)."""
        factor = self.search_factor
        step = 2 * math.pi / self.rotations
        span = max(int(math.ceil(2 * math.pi / self.coarse_rotations / step - 1e-9)), 1)
        margin = max(factor // 2, 1)
        H, W = index["fine_shape"]
        rows = range(max(row * factor - margin, 0), min(row * factor + factor + margin, H))
        cols = range(max(col * factor - margin, 0), min(col * factor + factor + margin, W))
        offsets = step * torch.arange(-span, span + 1, dtype=torch.float64)
        angles = (yaw0 + offsets).float().to(unit_view.device)
        cells = rotated_support(unit_view[0], angles)
        values = rotate_view_cells(unit_view[0], angles, cells)                 # (K, C, N)
        scores = window_scores_at(index["fine"], (H, W), values, cells, unit_view.shape[-1], rows, cols) / observed
        logp = torch.log_softmax(scores.double().flatten() / float(self.log_temperature.detach().exp()), dim=0)
        w = logp.exp().cpu()
        xs = self.map_origin[0] + (torch.arange(cols.start, cols.stop, dtype=torch.float64) + 0.5) * self.resolution
        ys = self.map_origin[1] + (torch.arange(rows.start, rows.stop, dtype=torch.float64) + 0.5) * self.resolution
        X = torch.stack(torch.broadcast_tensors(xs[None, None, :], ys[None, :, None],
                                                offsets[:, None, None]), dim=-1).reshape(-1, 3)
        mean = w @ X
        dev = X - mean
        cov = (dev * w[:, None]).T @ dev
        cov += torch.diag(torch.tensor([self.resolution ** 2 / 12] * 2 + [step ** 2 / 12], dtype=torch.float64))
        yaw = math.atan2(math.sin(yaw0 + float(mean[2])), math.cos(yaw0 + float(mean[2])))
        return float(mean[0]), float(mean[1]), yaw, cov.numpy(), float(scores.max())


register_model("allocentric")(AllocentricLocalizer)
