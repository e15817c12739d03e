"""The ``allocentric`` training recipe: query + memory-frame samples, the map-matching
loss, and the allocentric memory built from the mapping images.

Training (after Henriques & Vedaldi, CVPR 2018): a query and a few nearby memory frames;
the memory frames build a local map (ground-truth depth and poses), the query's view
(nominal mount) is matched against it, and the loss is the negative log-likelihood of the
true (cell, heading) plus an L1 depth term. The match is trained as the localizer runs it
(:meth:`AllocentricLocalizer.localize`): the global search on ``search_factor`` times
coarser cells over every coarse heading of the local map, and the full-resolution
refinement on a window of cells and headings around the truth, each with its own
temperature. (The paper's one match at full resolution over every cell and heading costs
seconds a step on a CPU: 36 headings x 48 channels of 171 x 171 FFTs per query.) Before
validation and saving, the memory of the whole scene is built from the mapping images at
their known poses.

On a CPU (config/train_allocentric_demo.yaml): the trunk may be a frozen copy of a shipped
one whose output is computed once per frame (``trunk.cache``: :attr:`reads_cached_trunk`),
and ``frame_stride`` thins the frames of 10 Hz walks (centimetres apart) that serve as
queries, memory frames and mapping images.

The recipe also fixes what the model learns from the data unless given: the intrinsics of
the network input and the camera mount (mean height, pitch and roll of the training
cameras), which :class:`~vizloc_ros.localize.models.allocentric.AllocentricLocalizer`
needs at inference.
"""
from __future__ import annotations

import copy
import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vizloc_ros.localize.camera import input_camera
from vizloc_ros.localize.models.allocentric import (AllocentricLocalizer, camera_level_attitude, correlate_valid,
                                                    cell_table, crop_spectrum, fft_length, mean_grid, observed_cells,
                                                    pool_grid, rotate_view_cells, rotate_views, rotated_support,
                                                    unit_cells, window_scores_at)
from vizloc_ros.localize.preprocess import preprocess
from vizloc_ros.training.recipes.base import TrainingRecipe, own_loss_options, register_recipe, require_fixed_crop
from vizloc_ros.training.scene_geometry import (dataset_camera, depth_path, grid_scene_coordinates, load_depth,
                                                neighbours_within)

LOG = logging.getLogger(__name__)


def ensure_mount(model: AllocentricLocalizer, dataset, spec) -> None:
    """Intrinsics of the network input and the mount (mean height, pitch, roll of the
    training cameras) unless already known."""
    if model.input_camera is None:
        model.input_camera = input_camera(dataset_camera(dataset), spec)
    if model.camera_height is None:
        t, q = dataset.poses()
        attitude = camera_level_attitude(q)
        model.camera_height = float(np.mean(t[:, 2]))
        model.camera_pitch = float(np.mean(attitude[:, 1]))
        model.camera_roll = float(np.mean(attitude[:, 2]))


def every_nth_frame(dataset, stride: int):
    """The dataset with every ``stride``-th frame only (a shallow copy; the same one for 1)."""
    if stride == 1:
        return dataset
    thinned = copy.copy(dataset)
    kept = range(0, len(dataset), stride)
    thinned.items = [dataset.items[i] for i in kept]
    if getattr(dataset, "_cache", None) is not None:   # preloaded images, by frame index
        thinned._cache = {new: dataset._cache[old] for new, old in enumerate(kept) if old in dataset._cache}
    return thinned


def build_memory(model: AllocentricLocalizer, dataset, spec, device, batch_size: int = 16) -> None:
    """Build the memory from the mapping images (depth images when the dataset has them,
    else the network's depth) at their ground-truth poses, frame after frame; the search
    region is the mapping poses' extent and the model's ``search_margin`` around it."""
    ensure_mount(model, dataset, spec)
    t, q = dataset.poses()
    margin = model.max_range + model.resolution
    lo = t[:, :2].min(axis=0) - margin
    hi = t[:, :2].max(axis=0) + margin
    size = tuple(int(v) for v in np.ceil((hi - lo) / model.resolution)[::-1])   # (H rows=y, W cols=x)
    camera = dataset_camera(dataset)
    items = getattr(dataset, "items", [])
    has_depth = bool(items) and all(depth_path(it[0]).is_file() for it in items)
    was_training = model.training
    model.eval()
    sums = counts = None
    origin = torch.as_tensor(lo, dtype=torch.float32, device=device)
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            idx = list(range(start, min(start + batch_size, len(dataset))))
            samples = [dataset[i] for i in idx]
            x = preprocess(torch.from_numpy(np.stack([s["image"] for s in samples])).to(device), spec)
            out = model.forward(x).float()
            if has_depth:
                depth = torch.as_tensor(np.stack([
                    depth_grid(depth_path(items[i][0]), camera, spec, out.shape[-2:], model.stride)
                    for i in idx]), device=device)
            else:
                depth = out[:, -1]
            s, c = model.allocentric_splat(out, depth, torch.as_tensor(t[idx], device=device),
                                          torch.as_tensor(q[idx], device=device),
                                          origin.expand(len(idx), 2), size)
            s, c = s.sum(0), c.sum(0)
            sums, counts = (s, c) if sums is None else (sums + s, counts + c)
    model.train(was_training)
    region = np.concatenate([t[:, :2].min(axis=0) - model.search_margin, t[:, :2].max(axis=0) + model.search_margin])
    model.set_memory(sums, counts, lo, region)
    LOG.info("allocentric memory: %dx%d cells of %.2f m, %.0f%% observed", size[1], size[0],
             model.resolution, 100.0 * float((counts.sum(0) > 0).float().mean()))


def depth_grid(path, camera, spec, out_hw, stride) -> np.ndarray:
    """Depth along the optical axis at the output cells (NaN where invalid)."""
    depth = load_depth(path)
    # identity pose: the camera-frame coordinates, whose z is the depth
    coords = grid_scene_coordinates(depth, camera, spec, np.zeros(3), np.array([1.0, 0, 0, 0]), out_hw, stride)
    return coords[..., 2].astype(np.float32)


LOSS_OPTIONS = {"memory_frames": 4, "memory_radius": 1.5, "min_separation": 15, "local_map": None,
                "map_jitter": 0.5, "train_rotations": None, "depth_weight": 1.0, "teacher_depth": True,
                "fine_window": 4, "fine_weight": 1.0, "coarse_window": 5, "frame_stride": 1}


def loss_options(block: dict) -> dict:
    options = own_loss_options("allocentric", LOSS_OPTIONS, block)
    for key in ("memory_frames", "min_separation", "fine_window", "coarse_window", "frame_stride"):
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "min_separation" else 1):
            raise ValueError(f"loss.{key} must be a positive integer, got {value!r}")
    return options


def windowed_match_scores(memory: torch.Tensor, view: torch.Tensor, view_counts: torch.Tensor,
                          angles: torch.Tensor, bands: int, centre: torch.Tensor, w: int,
                          half_turns: bool = False) -> torch.Tensor:
    """:func:`~vizloc_ros.localize.models.allocentric.match_scores` (B, R, 2w + 1, 2w + 1)
    at the cells within ``w`` of ``centre`` (B, 2: column, row) only, through a valid FFT
    correlation of a crop around them: the FFTs are the window plus the view wide, not the
    local map plus the view. ``half_turns``: ``angles`` are the first half of R evenly
    spaced headings (:func:`~vizloc_ros.localize.models.allocentric.correlate_valid`)."""
    memory, view = unit_cells(memory, bands), unit_cells(view, bands)
    half = view.shape[-1] // 2
    size = 2 * w + 1
    span = size + 2 * half
    # window cell i (map row r - w + i) is crop row i + half: map row r - w - half starts the
    # crop, which is row r of the map padded by half + w
    crops = torch.stack([m[:, r:r + span, c:c + span]
                         for m, (c, r) in zip(F.pad(memory, (half + w,) * 4).unbind(0), centre.tolist())])
    fft_hw = (fft_length(span),) * 2
    scores = correlate_valid(crop_spectrum(crops, fft_hw), rotate_views(view, angles), fft_hw, (size, size),
                             half_turns=half_turns)
    return scores / observed_cells(view_counts).to(scores.dtype)[:, None, None, None]


class AllocentricLoss(nn.Module):
    """The two matches of the localizer, trained on a query and the local map of its
    memory frames: the NLL of the true (heading, coarse cell) in the global match (every
    coarse cell of the local map, ``train_rotations`` headings at fixed steps, as at run
    time, so that the truth lies anywhere in its bin) and the NLL of the true (heading,
    cell) in a full-resolution window of ``2 fine_window + 1`` cells (placed at random
    around the truth) and the refinement's headings, plus an L1 depth term. Batch:
    ``image`` (or the cached trunk output) holds the query then ``memory_frames`` memory
    frames per sample; ``depth`` (B, 1 + M, h, w), ``poses_t`` (B, 1 + M, 3), ``poses_q``
    (B, 1 + M, 4)."""

    def __init__(self, model: AllocentricLocalizer, memory_frames: int = 4, local_map: float | None = None,
                 map_jitter: float = 0.5, train_rotations: int | None = None, depth_weight: float = 1.0,
                 teacher_depth: bool = True, fine_window: int = 4, fine_weight: float = 1.0,
                 coarse_window: int = 5, **_):
        super().__init__()
        object.__setattr__(self, "_model", model)
        self.memory_frames, self.map_jitter = int(memory_frames), float(map_jitter)
        self.teacher_depth = bool(teacher_depth)
        # side of the local map (m): by default everything the memory frames can see
        # around the query, wherever the jitter puts it
        self.local_map = float(local_map) if local_map is not None else \
            2.0 * (model.max_range + self.map_jitter + 0.5 * model.resolution)
        self.train_rotations = int(train_rotations or model.coarse_rotations)
        self.depth_weight, self.fine_weight = float(depth_weight), float(fine_weight)
        self.fine_window, self.coarse_window = int(fine_window), int(coarse_window)

    def forward(self, net, x: torch.Tensor, batch: dict) -> torch.Tensor:
        model = self._model
        per = 1 + self.memory_frames
        out = net(x)
        if x.dim() == 5:  # clips (B, 1 + M, 3, H, W) give (B, 1 + M, C + 1, h, w)
            out = out.flatten(0, 1)
        B = out.shape[0] // per
        h, w = out.shape[-2:]
        out = out.reshape(B, per, *out.shape[1:])
        depth_gt = batch["depth"].to(out)
        valid = torch.isfinite(depth_gt)
        depth_loss = (out[:, :, -1][valid] - depth_gt[valid]).abs().mean() if valid.any() else out.sum() * 0
        t, q = batch["poses_t"].to(out), batch["poses_q"].to(out)
        # local maps from the memory frames, placed so that the query's true position is in
        # a cell near the middle (jittered by whole cells, and anywhere within its cell)
        res, factor = model.resolution, model.search_factor
        cells = factor * int(math.ceil(self.local_map / res / factor))
        shift = int(round(self.map_jitter / res))
        target_cell = cells // 2 + torch.randint(-shift, shift + 1, (B, 2), device=out.device)
        within = torch.rand(B, 2, device=out.device, dtype=out.dtype)
        origin = t[:, 0, :2] - (target_cell.to(out.dtype) + within) * res
        mem = out[:, 1:].reshape(B * self.memory_frames, *out.shape[2:])
        sums, counts = model.allocentric_splat(
            mem, depth_gt[:, 1:].reshape(B * self.memory_frames, h, w), t[:, 1:].reshape(-1, 3),
            q[:, 1:].reshape(-1, 4), origin.repeat_interleave(self.memory_frames, 0), (cells, cells))
        sums = sums.reshape(B, self.memory_frames, *sums.shape[1:]).sum(1)
        counts = counts.reshape(B, self.memory_frames, *counts.shape[1:]).sum(1)
        # the query's view with the true depth where known (teacher forcing: the features learn
        # from clean geometry while the depth head learns), else the network's depth
        query_depth = out[:, 0, -1].detach()
        if self.teacher_depth:
            query_depth = torch.where(torch.isfinite(depth_gt[:, 0]), depth_gt[:, 0], query_depth)
        yaw = torch.as_tensor(camera_level_attitude(q[:, 0].detach().double().cpu().numpy())[:, 0],
                              device=out.device, dtype=out.dtype)
        coarse = self._coarse_nll(model, out[:, 0], query_depth, sums, counts, yaw, target_cell // factor)
        fine = self._fine_nll(model, out[:, 0], query_depth, sums, counts, yaw, target_cell)
        return coarse + self.fine_weight * fine + self.depth_weight * depth_loss

    def _coarse_nll(self, model, query, depth, sums, counts, yaw, target) -> torch.Tensor:
        """The global match: coarse local map, coarse view, headings at fixed steps, every
        coarse cell within ``coarse_window`` cells of the truth (where the memory frames
        overlap the query's view; farther cells of a local map are mostly empty)."""
        factor, R, w = model.search_factor, self.train_rotations, self.coarse_window
        memory = mean_grid(*pool_grid(sums, counts, factor))
        view, view_counts = model.egocentric_view(query, depth, resolution=factor * model.resolution)
        half = R % 2 == 0   # the headings of the second half turn from the first's spectra
        scores = windowed_match_scores(memory, view, view_counts, model.headings(R, query.device)[:R // 2 if half else R],
                                       model.bands, target, w, half_turns=half)
        logp = torch.log_softmax(scores.flatten(1) / model.log_temperature_coarse.exp(), dim=1)
        k = torch.round(yaw / (2 * math.pi / R)).long() % R
        size = 2 * w + 1
        index = (k * size + w) * size + w                                  # the truth: the window's middle
        return -logp.gather(1, index[:, None]).mean()

    def _fine_nll(self, model, query, depth, sums, counts, yaw, target) -> torch.Tensor:
        """The refinement: full-resolution local map and view, a window of cells placed at
        random around the truth, the refinement's headings around a heading within half a
        bin of the truth (at run time the coarse heading is anywhere near it)."""
        memory = unit_cells(mean_grid(sums, counts), model.bands)
        view, view_counts = model.egocentric_view(query, depth)
        view = unit_cells(view, model.bands)
        observed = observed_cells(view_counts).to(view.dtype)
        step = 2 * math.pi / model.rotations
        span = max(int(math.ceil(2 * math.pi / self.train_rotations / step - 1e-9)), 1)
        half, w = view.shape[-1] // 2, self.fine_window
        offsets = torch.randint(-(w // 2), w // 2 + 1, (len(yaw), 2))
        slip = torch.rand(len(yaw)) - 0.5
        nll = []
        for b, m in enumerate(memory.unbind(0)):
            col0, row0 = (int(v) for v in target[b].cpu() + offsets[b] - w)
            angles = yaw[b] + step * (torch.arange(-span, span + 1, device=yaw.device, dtype=yaw.dtype) + float(slip[b]))
            cells = rotated_support(view[b].detach(), angles)
            values = rotate_view_cells(view[b], angles, cells)
            scores = window_scores_at(cell_table(F.pad(m, (half,) * 4), model.bands), m.shape[-2:], values, cells,
                                      view.shape[-1], range(row0, row0 + 2 * w + 1),
                                      range(col0, col0 + 2 * w + 1)) / observed[b]
            logp = torch.log_softmax(scores.flatten() / model.log_temperature.exp(), dim=0)
            row, col = int(target[b, 1]) - row0, int(target[b, 0]) - col0   # the nearest heading: the middle one
            nll.append(-logp[(span * (2 * w + 1) + row) * (2 * w + 1) + col])
        return torch.stack(nll).mean()


class MemorySamples:
    """A query and ``memory_frames`` frames within ``memory_radius`` m of it, at least
    ``min_separation`` frames away in the sequence (so the map is not the query itself),
    with depth on the output grid and all poses. With ``features`` (the cached trunk
    output of every frame) a sample carries ``feature`` in place of ``image``."""

    def __init__(self, base, camera, spec, out_hw, stride: int, memory_frames: int, memory_radius: float,
                 min_separation: int, seed: int = 0, features: np.ndarray | None = None):
        self.base, self.camera, self.spec, self.out_hw, self.stride = base, camera, spec, tuple(out_hw), stride
        self.memory_frames = int(memory_frames)
        items = getattr(base, "items", [])
        if not items or not all(depth_path(it[0]).is_file() for it in items):
            raise ValueError("allocentric training needs depth images beside the colour images "
                             "(frame-*.depth.png, e.g. from vizloc-synth)")
        if features is not None and len(features) != len(items):
            raise ValueError(f"{len(features)} cached trunk outputs for {len(items)} frames")
        self.features = features
        t, _ = base.poses()
        index = np.arange(len(t))
        self.near = neighbours_within(t[:, :2], memory_radius,
                                      keep=lambda rows, _: np.abs(rows[:, None] - index[None]) >= min_separation)
        self.queries = [i for i in range(len(t)) if len(self.near[i])]
        if not self.queries:
            raise ValueError(f"no training frame has another frame within {memory_radius} m and "
                             f"{min_separation} frames away: adjust loss.memory_radius / min_separation")
        self.rng = np.random.default_rng(seed)
        self._depth: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.queries)

    def depth(self, i: int) -> np.ndarray:
        if i not in self._depth:
            self._depth[i] = depth_grid(depth_path(self.base.items[i][0]), self.camera, self.spec,
                                         self.out_hw, self.stride)
        return self._depth[i]

    def __getitem__(self, index: int) -> dict:
        i = self.queries[index]
        memory = self.rng.choice(self.near[i], self.memory_frames, replace=len(self.near[i]) < self.memory_frames)
        ids = [i, *(int(j) for j in memory)]
        poses = [self.base.items[j][1:3] for j in ids]
        sample = {"t": poses[0][0].copy(), "q": poses[0][1].copy(), "depth": np.stack([self.depth(j) for j in ids]),
                  "poses_t": np.stack([p[0] for p in poses]), "poses_q": np.stack([p[1] for p in poses]),
                  "index": index}
        if self.features is not None:
            sample["feature"] = np.stack([self.features[j] for j in ids])
        else:
            sample["image"] = np.stack([self.base[j]["image"] for j in ids])
        return sample


@register_recipe("allocentric")
class AllocentricRecipe(TrainingRecipe):
    """Query + memory-frame samples with depth, the map-matching loss, the memory build."""

    reads_cached_trunk = True

    def loss(self, model, config: dict):
        return AllocentricLoss(model, **loss_options(config.get("loss") or {}))

    def samples(self, model, dataset, config: dict, spec, trunk_features=None):
        require_fixed_crop("allocentric", config,
                           "depth and features are aligned with the network input pixel for pixel")
        ensure_mount(model, dataset, spec)
        options = loss_options(config.get("loss") or {})
        h, w = (math.ceil(v / model.stride) for v in spec.crop)
        stride = options["frame_stride"]
        frames = every_nth_frame(dataset, stride)
        features = trunk_features(frames) if trunk_features is not None else None
        return MemorySamples(frames, dataset_camera(dataset), spec, (h, w), model.stride, options["memory_frames"],
                             options["memory_radius"], int(math.ceil(options["min_separation"] / stride)),
                             int(config.get("seed", 0)), features)

    def prepare(self, model, dataset, spec, device, config: dict | None = None) -> None:
        stride = loss_options((config or {}).get("loss") or {})["frame_stride"]
        build_memory(model, every_nth_frame(dataset, stride), spec, device)
