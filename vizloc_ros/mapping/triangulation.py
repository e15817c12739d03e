"""Sparse depth for recordings without depth: local features matched between mapping
frames and triangulated with the frames' known poses.

Why: without depth, the map's head learns each cell's 3D point from the reprojection
loss alone, and from a handful of views of a place it cannot tell how far away the
surface is (a point anywhere along the cell's ray reprojects well into views that barely
differ). A few thousand exactly placed points per frame remove that ambiguity where they
are, and the head spreads it to the cells around them. The poses are known (ground truth
or a good odometry), so nothing is estimated but the points themselves: this is the
cheap half of structure from motion.

The steps:

1. **Features**: SIFT keypoints and descriptors of each frame (grey image, at most
   ``features``). SIFT rather than ORB: on the synthetic rooms' smooth shading and on
   KITTI's grey street images it finds more repeatable, better localised (sub-pixel)
   points, which is what the depth's accuracy rests on; 320x240 takes ~10 ms a frame.
2. **Partners by pose**: for each frame, up to ``partners`` other frames that see the
   same place with enough parallax. The probes are points ``scene_depth`` metres deep
   along the frame's optical axis and along four rays towards its image's sides
   (``PROBE_OFFSETS``): a partner must see a probe inside its image, and the angle
   between the two rays to it must lie in [``min_parallax_deg``, ``max_parallax_deg``]
   (too little: the depth is noise; too much: the views look too different to match);
   the partners whose angle is nearest ``target_parallax_deg`` win. The side probes
   are for a camera that moves along its axis (a car on a straight road): the point
   ahead has no parallax at all, the roadside has plenty (KITTI 06: 17 points from the
   axis probe alone, in 5 of 26 frames). Each pair is matched once and gives points to
   both frames.
3. **Guided matching**: the relative pose of the two cameras is known, hence the
   fundamental matrix. A keypoint may only match keypoints within ``epipolar_px``
   (Sampson distance) of its epipolar line; among those the nearest descriptor must pass
   Lowe's ratio test against the second nearest and be the mutual nearest. Filtering by
   the known geometry *before* triangulating is what removes most wrong matches (a wrong
   match is seldom on the line), and searching only along the line keeps the ratio test
   from rejecting repeated texture elsewhere in the image.
4. **Triangulation** (``cv2.triangulatePoints`` with the two projection matrices): a
   point is kept only if it is in front of both cameras, reprojects within
   ``reprojection_px`` in both, and its own parallax angle is at least
   ``min_parallax_deg`` (a point near the epipole has almost none, whatever the pair's).
5. **Fusion per frame**: a keypoint triangulated with several partners keeps the median
   of the depths that agree with it within ``agreement`` (relative); with
   ``min_views`` >= 2 a keypoint needs that many agreeing partners (a third view's
   confirmation), else one pair suffices.

The result is a :class:`SparseDepth` per frame: keypoint pixels of the original image
and their depth along the optical axis, drawn into a depth image (NaN where unknown) by
:meth:`SparseDepth.image` for the mapping's usual depth targets.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import torch

from vizloc_ros import geometry
from vizloc_ros.localize.camera import check_camera, crop_geometry
from vizloc_ros.localize.preprocess import InputSpec


@dataclass(frozen=True)
class TriangulationOptions:
    """How frames are matched and which points are kept (see the module docstring)."""

    features: int = 1000  # SIFT keypoints per frame, at most
    # SIFT's contrast and edge thresholds: OpenCV's 0.04 and 10 find ~100 points on a smooth
    # 320x240 render; 0.002 and 30 find ~500, and more keypoints also mean more confirmed
    # by a second partner (every 8th frame of the demo walks: 16 % of cells with a target
    # instead of 2 %, and a lower error)
    contrast: float = 0.002
    edge: float = 30.0
    partners: int = 4  # other frames each frame is matched with, at most
    min_parallax_deg: float = 3.0  # per pair (at the probe) and per point
    target_parallax_deg: float = 10.0  # partners nearest this angle win
    max_parallax_deg: float = 40.0
    scene_depth: float | None = None  # probe distance (m); None: from the cameras' spread
    epipolar_px: float = 1.0  # Sampson distance of a match to the known epipolar geometry
    ratio: float = 0.8  # Lowe's ratio among the candidates near the epipolar line
    reprojection_px: float = 1.5
    agreement: float = 0.03  # relative depth difference of two views that agree
    # partners that must agree on a keypoint's depth: with one, 22 % of the demo walks'
    # points were off by more than 10 % (wrong matches that happen to lie near the
    # epipolar line); a second agreeing view leaves 2-3 %
    min_views: int = 2

    def __post_init__(self):
        if self.features < 2 or self.partners < 1 or self.min_views < 1 \
                or not 0 < self.min_parallax_deg <= self.target_parallax_deg <= self.max_parallax_deg < 180 \
                or self.epipolar_px <= 0 or not 0 < self.ratio <= 1 or self.reprojection_px <= 0 \
                or self.agreement <= 0 or self.contrast <= 0 or self.edge <= 0 \
                or (self.scene_depth is not None and not self.scene_depth > 0):
            raise ValueError(f"triangulation options out of range: {self}")


@dataclass
class SparseDepth:
    """Depths (metres along the optical axis) at keypoints (u, v) of one original image."""

    u: np.ndarray  # (n,) float32 pixel column
    v: np.ndarray  # (n,) float32 pixel row
    depth: np.ndarray  # (n,) float32 metres

    def __len__(self) -> int:
        return int(len(self.depth))

    def image(self, height: int, width: int, radius: int = 0) -> np.ndarray:
        """A (height, width) float32 depth image, NaN where unknown, each keypoint's depth
        drawn into the square of half-size ``radius`` around it; where squares overlap the
        nearest keypoint wins.

        Why a square and not the keypoint's pixel alone: the mapping reads the depth at
        the original pixel nearest to each cell's centre (one per 8x8 block of the network
        input), and a keypoint almost never falls on that pixel. With ``radius`` half a
        cell in original pixels (:func:`cell_radius`), every cell whose block holds a
        keypoint reads that keypoint's depth, back-projected along the cell centre's own
        ray: off by at most half a cell laterally, which is what the cell's one feature can
        tell apart anyway, while the depth (what the head cannot find alone) is exact."""
        out = np.full((int(height), int(width)), np.nan, dtype=np.float32)
        if not len(self):
            return out
        u = np.rint(self.u).astype(np.int64)
        v = np.rint(self.v).astype(np.int64)
        r = max(0, int(radius))
        offsets = [(du, dv) for dv in range(-r, r + 1) for du in range(-r, r + 1)]
        offsets.sort(key=lambda o: -(o[0] ** 2 + o[1] ** 2))  # farthest first: the nearest writes last
        for du, dv in offsets:
            uu, vv = u + du, v + dv
            inside = (uu >= 0) & (uu < width) & (vv >= 0) & (vv < height)
            out[vv[inside], uu[inside]] = self.depth[inside]
        return out


def cell_radius(camera: dict, spec: InputSpec, stride: int) -> int:
    """Half a network cell (``stride`` input pixels) in original pixels, rounded up: the
    square :meth:`SparseDepth.image` draws so that a keypoint reaches its cell's centre."""
    camera = check_camera(camera)
    sx, sy, _, _ = crop_geometry(camera["width"], camera["height"], spec)
    return int(math.ceil(stride / (2.0 * min(sx, sy))))


@dataclass
class _Features:
    points: np.ndarray  # (n, 2) float64 pixels
    descriptors: np.ndarray  # (n, 128) uint8 (SIFT's values are 0..255 integers in float)


def detect(image: np.ndarray, options: TriangulationOptions) -> _Features:
    """SIFT keypoints of an RGB (H, W, 3) or grey (H, W) uint8 image."""
    grey = image if image.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    keypoints, descriptors = cv2.SIFT_create(nfeatures=int(options.features), contrastThreshold=options.contrast,
                                                 edgeThreshold=options.edge).detectAndCompute(grey, None)
    if descriptors is None or not keypoints:
        return _Features(np.zeros((0, 2)), np.zeros((0, 128), np.uint8))
    points = np.array([k.pt for k in keypoints], dtype=np.float64)
    points, unique = np.unique(points, axis=0, return_index=True)  # SIFT repeats a point per orientation
    return _Features(points, np.clip(np.rint(descriptors[unique]), 0, 255).astype(np.uint8))


#: where a frame's probes lie, as offsets from the principal point in image widths and
#: heights: the optical axis first, then left, right, up and down
PROBE_OFFSETS = ((0.0, 0.0), (-0.3, 0.0), (0.3, 0.0), (0.0, -0.3), (0.0, 0.3))


def default_scene_depth(centres: np.ndarray) -> float:
    """The probe distance when none is given: a third of the cameras' spread, 2 to 10 m
    (the mapping's own guess of how far the surfaces are)."""
    spread = float(np.ptp(centres, axis=0).max()) if len(centres) > 1 else 0.0
    return float(np.clip(spread / 3.0, 2.0, 10.0))


def choose_partners(centres: np.ndarray, rotations: np.ndarray, camera: dict,
                    options: TriangulationOptions) -> list[np.ndarray]:
    """For each frame (camera centres (N, 3), camera->map rotations (N, 3, 3)), the indices
    of up to ``options.partners`` frames that see one of its probe points inside their
    image at a parallax angle within the options' range, nearest ``target_parallax_deg``
    first (each partner ranked by its best probe)."""
    camera = check_camera(camera)
    depth = options.scene_depth or default_scene_depth(centres)
    # the probes' rays in camera axes: the optical axis, then towards the image's sides
    pixels = np.array([[camera["cx"] + du * camera["width"], camera["cy"] + dv * camera["height"]]
                       for du, dv in PROBE_OFFSETS])
    rays_cam = np.column_stack([(pixels[:, 0] - camera["cx"]) / camera["fx"],
                                (pixels[:, 1] - camera["cy"]) / camera["fy"], np.ones(len(pixels))])
    margin = 0.1
    lo_u, hi_u = margin * camera["width"], (1 - margin) * camera["width"]
    lo_v, hi_v = margin * camera["height"], (1 - margin) * camera["height"]
    cos_lo = math.cos(math.radians(options.max_parallax_deg))
    cos_hi = math.cos(math.radians(options.min_parallax_deg))
    out = []
    for i in range(len(centres)):
        best = np.full(len(centres), np.inf)  # per partner: |log(angle / target)| of its best probe
        for ray in rays_cam:
            probe = centres[i] + depth * rotations[i] @ ray  # ``depth`` metres deep along the ray
            local = np.einsum("nji,nj->ni", rotations, probe - centres)  # the probe in each camera
            z = local[:, 2]
            with np.errstate(divide="ignore", invalid="ignore"):
                u = camera["fx"] * local[:, 0] / z + camera["cx"]
                v = camera["fy"] * local[:, 1] / z + camera["cy"]
            ray_i = probe - centres[i]
            rays = probe - centres
            cosine = rays @ ray_i / np.maximum(np.linalg.norm(rays, axis=1) * np.linalg.norm(ray_i), 1e-12)
            ok = (z > 0) & (u >= lo_u) & (u <= hi_u) & (v >= lo_v) & (v <= hi_v) \
                & (cosine >= cos_lo) & (cosine <= cos_hi)
            angle = np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0)))
            with np.errstate(divide="ignore"):
                score = np.where(ok, np.abs(np.log(np.maximum(angle, 1e-9) / options.target_parallax_deg)), np.inf)
            best = np.minimum(best, score)
        best[i] = np.inf
        candidates = np.flatnonzero(np.isfinite(best))
        order = np.argsort(best[candidates], kind="stable")
        out.append(candidates[order[:options.partners]])
    return out


def _fundamental(K: np.ndarray, R_a: np.ndarray, C_a: np.ndarray, R_b: np.ndarray, C_b: np.ndarray) -> np.ndarray:
    """F with x_b^T F x_a = 0 for cameras a and b (camera->map rotations, centres)."""
    R_ba = R_b.T @ R_a  # a's camera frame -> b's
    t_ba = R_b.T @ (C_a - C_b)
    E = geometry.hat(t_ba) @ R_ba
    K_inv = np.linalg.inv(K)
    return K_inv.T @ E @ K_inv


def match_guided(a: _Features, b: _Features, F: np.ndarray, options: TriangulationOptions):
    """Indices (ia, ib) of the matches of a's keypoints in b that lie within
    ``epipolar_px`` of their epipolar lines, pass the ratio test among those candidates
    and are mutual nearest neighbours."""
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if len(a.points) == 0 or len(b.points) == 0:
        return empty
    xa = torch.from_numpy(np.hstack([a.points, np.ones((len(a.points), 1))]).astype(np.float32))
    xb = torch.from_numpy(np.hstack([b.points, np.ones((len(b.points), 1))]).astype(np.float32))
    Ft = torch.from_numpy(F.astype(np.float32))
    lines_b = xa @ Ft.T  # (na, 3): epipolar lines of a's points in b
    lines_a = xb @ Ft  # (nb, 3): of b's points in a
    algebraic = lines_b @ xb.T  # (na, nb): x_b^T F x_a
    norm = (lines_b[:, :2] ** 2).sum(1)[:, None] + (lines_a[:, :2] ** 2).sum(1)[None, :]
    near = algebraic ** 2 <= options.epipolar_px ** 2 * norm  # Sampson distance
    da = torch.from_numpy(a.descriptors.astype(np.float32))
    db = torch.from_numpy(b.descriptors.astype(np.float32))
    d2 = ((da ** 2).sum(1)[:, None] + (db ** 2).sum(1)[None, :] - 2.0 * (da @ db.T)).clamp_min(0)
    d2 = torch.where(near, d2, torch.full_like(d2, float("inf")))
    k = min(2, d2.shape[1])
    best, col = torch.topk(d2, k, dim=1, largest=False)
    second = best[:, 1] if k == 2 else torch.full_like(best[:, 0], float("inf"))
    ok = torch.isfinite(best[:, 0]) & (best[:, 0] < options.ratio ** 2 * second)
    back = d2.argmin(dim=0)  # for each of b's points, its nearest of a's
    ia = torch.arange(d2.shape[0])
    ok &= back[col[:, 0]] == ia
    ia = ia[ok].numpy()
    return ia, col[ok, 0].numpy()


def triangulate_pair(pa: np.ndarray, pb: np.ndarray, K: np.ndarray, R_a: np.ndarray, C_a: np.ndarray,
                     R_b: np.ndarray, C_b: np.ndarray, options: TriangulationOptions):
    """Points seen at pixels ``pa`` in a and ``pb`` in b (N, 2): a mask of those kept and
    their depths in a and in b (see step 4 of the module docstring)."""
    P_a = K @ np.hstack([R_a.T, (-R_a.T @ C_a)[:, None]])
    P_b = K @ np.hstack([R_b.T, (-R_b.T @ C_b)[:, None]])
    homogeneous = cv2.triangulatePoints(P_a, P_b, pa.T.astype(np.float64), pb.T.astype(np.float64))
    w = homogeneous[3]
    with np.errstate(divide="ignore", invalid="ignore"):
        X = (homogeneous[:3] / w).T  # (N, 3) in map
    ok = np.isfinite(X).all(axis=1) & (np.abs(w) > 1e-12)
    X = np.where(ok[:, None], X, 0.0)
    depths = []
    for R, C, P, p in ((R_a, C_a, P_a, pa), (R_b, C_b, P_b, pb)):
        local = (X - C) @ R
        z = local[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            proj = (np.hstack([X, np.ones((len(X), 1))]) @ P.T)
            pixel = proj[:, :2] / proj[:, 2:3]
        error = np.linalg.norm(pixel - p, axis=1)
        ok &= (z > 0) & (error <= options.reprojection_px)
        depths.append(z)
    ray_a, ray_b = X - C_a, X - C_b
    cosine = (ray_a * ray_b).sum(1) / np.maximum(np.linalg.norm(ray_a, axis=1) * np.linalg.norm(ray_b, axis=1), 1e-12)
    ok &= cosine <= math.cos(math.radians(options.min_parallax_deg))
    return ok, depths[0], depths[1]


def _fuse(samples: list[tuple[np.ndarray, np.ndarray]], points: np.ndarray,
          options: TriangulationOptions) -> SparseDepth:
    """One frame's (keypoint index, depth) samples from all its pairs -> a depth per
    keypoint that at least ``min_views`` samples agree on (the median of those)."""
    index = np.concatenate([s[0] for s in samples]) if samples else np.zeros(0, np.int64)
    depth = np.concatenate([s[1] for s in samples]) if samples else np.zeros(0)
    if not len(index):  # no pair, or pairs that kept no point (numpy warned on the empty median)
        return SparseDepth(*(np.zeros(0, np.float32) for _ in range(3)))
    order = np.lexsort((depth, index))
    index, depth = index[order], depth[order]
    starts = np.flatnonzero(np.r_[True, index[1:] != index[:-1]])
    kept_index, kept_depth = [], []
    for start, stop in zip(starts, np.r_[starts[1:], len(index)]):
        group = depth[start:stop]
        centre = float(np.median(group))
        agree = group[np.abs(group - centre) <= options.agreement * centre]
        if len(agree) >= options.min_views:
            kept_index.append(index[start])
            kept_depth.append(float(np.median(agree)))
    kept_index = np.asarray(kept_index, dtype=np.int64)
    return SparseDepth(points[kept_index, 0].astype(np.float32), points[kept_index, 1].astype(np.float32),
                       np.asarray(kept_depth, dtype=np.float32))


@dataclass
class TriangulationResult:
    depths: list[SparseDepth]  # one per frame, in the order given
    summary: dict  # counts and seconds, for the map's training summary


def triangulate_frames(frames: Sequence, camera: dict, options: TriangulationOptions = TriangulationOptions(),
                       progress: Callable[[str, int, int], None] | None = None,
                       threads: int = 1) -> TriangulationResult:
    """Sparse depth for each of ``frames`` (indexable, each with ``image`` (H, W, 3) or
    (H, W) uint8 and its camera pose in map ``t``, ``q`` (w, x, y, z), camera->map) seen
    by ``camera`` (fx, fy, cx, cy, width, height of these images). Each frame is read
    once. ``progress(stage, done, total)``: stages ``features`` (per frame) and
    ``triangulate`` (per pair). A frame without a partner or without texture gets no
    points; nothing here raises on such frames. ``threads``: frames read and detected at
    once (OpenCV and the image decoders release the GIL); the matching runs on torch's
    threads."""
    camera = check_camera(camera)
    report = progress or (lambda *a: None)
    started = time.monotonic()
    count = len(frames)
    centres, rotations = np.zeros((count, 3)), np.zeros((count, 3, 3))

    def read(k: int) -> _Features:
        frame = frames[k]
        centres[k] = np.asarray(frame.t, dtype=float)
        rotations[k] = geometry.quat_to_matrix(np.asarray(frame.q, dtype=float))
        return detect(np.asarray(frame.image), options)

    features = []
    opencv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # one frame per worker: ``threads`` cores in all, not threads x OpenCV's pool
    try:
        with ThreadPoolExecutor(max_workers=max(1, int(threads))) as pool:
            for k, found in enumerate(pool.map(read, range(count))):
                features.append(found)
                report("features", k + 1, count)
    finally:
        cv2.setNumThreads(opencv_threads)
    features_s = time.monotonic() - started

    partners = choose_partners(centres, rotations, camera, options) if count > 1 else [np.zeros(0, int)] * count
    pairs = sorted({(min(i, int(j)), max(i, int(j))) for i in range(count) for j in partners[i]})
    K = np.array([[camera["fx"], 0.0, camera["cx"]], [0.0, camera["fy"], camera["cy"]], [0.0, 0.0, 1.0]])
    samples: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(count)]
    matched = 0
    for done, (a, b) in enumerate(pairs):
        F = _fundamental(K, rotations[a], centres[a], rotations[b], centres[b])
        ia, ib = match_guided(features[a], features[b], F, options)
        matched += len(ia)
        if len(ia):
            ok, depth_a, depth_b = triangulate_pair(features[a].points[ia], features[b].points[ib], K,
                                                    rotations[a], centres[a], rotations[b], centres[b], options)
            samples[a].append((ia[ok], depth_a[ok]))
            samples[b].append((ib[ok], depth_b[ok]))
        report("triangulate", done + 1, len(pairs))
    depths = [_fuse(samples[k], features[k].points, options) for k in range(count)]
    points = np.array([len(d) for d in depths])
    summary = {
        "frames": count, "pairs": len(pairs), "frames_without_partner": int(sum(len(p) == 0 for p in partners)),
        "keypoints_per_frame": float(np.mean([len(f.points) for f in features])) if count else 0.0,
        "matches": int(matched), "points": int(points.sum()),
        "points_per_frame_median": float(np.median(points)) if count else 0.0,
        "frames_with_points": int((points > 0).sum()),
        "features_s": round(features_s, 1), "total_s": round(time.monotonic() - started, 1),
        "options": asdict(options),
    }
    return TriangulationResult(depths, summary)


__all__ = ["SparseDepth", "TriangulationOptions", "TriangulationResult", "cell_radius", "choose_partners",
           "default_scene_depth", "detect", "match_guided", "triangulate_frames", "triangulate_pair"]
