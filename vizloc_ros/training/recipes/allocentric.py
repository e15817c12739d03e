"""The ``allocentric`` training recipe: query + memory-frame samples, the map-matching
loss, and the allocentric memory built from the mapping images.

Training (after Henriques & Vedaldi, CVPR 2018): a query and a few nearby memory frames;
the memory frames build a local map (ground-truth depth and poses), the query's view (its
predicted depth, nominal mount) is matched against it, and the loss is the negative
log-likelihood of the true (cell, heading) plus an L1 depth term. Before validation and
saving, the memory of the whole scene is built from every mapping image at its known pose.

The recipe also fixes what the model learns from the data unless given: the intrinsics of
the network input and the camera mount (mean height, pitch and roll of the training
cameras), which :class:`~vizloc_ros.localize.models.allocentric.AllocentricLocalizer`
needs at inference.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import nn

from vizloc_ros.localize.camera import input_camera
from vizloc_ros.localize.models.allocentric import (AllocentricLocalizer, camera_level_attitude, match_scores,
                                                    mean_grid)
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


def build_memory(model: AllocentricLocalizer, dataset, spec, device, batch_size: int = 16) -> None:
    """Build the memory from the mapping images (depth images when the dataset has them,
    else the network's depth) at their ground-truth poses, frame after frame."""
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
                "map_jitter": 0.5, "train_rotations": 36, "depth_weight": 1.0, "teacher_depth": True}


def loss_options(block: dict) -> dict:
    return own_loss_options("allocentric", LOSS_OPTIONS, block)


class AllocentricLoss(nn.Module):
    """NLL of the true (heading, cell) in the match of the query's view against a local
    map built from its memory frames, plus an L1 depth term. Batch: ``image`` holds the
    query then ``memory_frames`` memory images per sample; ``depth`` (B, 1 + M, h, w),
    ``poses_t`` (B, 1 + M, 3), ``poses_q`` (B, 1 + M, 4)."""

    def __init__(self, model: AllocentricLocalizer, memory_frames: int = 4, local_map: float | None = None,
                 map_jitter: float = 0.5, train_rotations: int = 36, depth_weight: float = 1.0,
                 teacher_depth: bool = True, **_):
        super().__init__()
        object.__setattr__(self, "_model", model)
        self.memory_frames, self.map_jitter = int(memory_frames), float(map_jitter)
        self.teacher_depth = bool(teacher_depth)
        # side of the local map (m): by default everything the memory frames can see
        # around the query, wherever the jitter puts it
        self.local_map = float(local_map) if local_map is not None else \
            2.0 * (model.max_range + self.map_jitter + 0.5 * model.resolution)
        self.train_rotations, self.depth_weight = int(train_rotations), float(depth_weight)

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
        # local maps from the memory frames, placed so that the query's true position is the
        # centre of a cell near the middle (jittered by whole cells)
        res = model.resolution
        cells = int(math.ceil(self.local_map / res))
        shift = int(round(self.map_jitter / res))
        target_cell = cells // 2 + torch.randint(-shift, shift + 1, (B, 2), device=out.device)
        origin = t[:, 0, :2] - (target_cell.to(out.dtype) + 0.5) * res
        mem = out[:, 1:].reshape(B * self.memory_frames, *out.shape[2:])
        sums, counts = model.allocentric_splat(
            mem, depth_gt[:, 1:].reshape(B * self.memory_frames, h, w), t[:, 1:].reshape(-1, 3),
            q[:, 1:].reshape(-1, 4), origin.repeat_interleave(self.memory_frames, 0), (cells, cells))
        sums = sums.reshape(B, self.memory_frames, *sums.shape[1:]).sum(1)
        counts = counts.reshape(B, self.memory_frames, *counts.shape[1:]).sum(1)
        memory = mean_grid(sums, counts)
        # the query's view with the true depth where known (teacher forcing: the features learn
        # from clean geometry while the depth head learns), else the network's depth
        query_depth = out[:, 0, -1].detach()
        if self.teacher_depth:
            query_depth = torch.where(torch.isfinite(depth_gt[:, 0]), depth_gt[:, 0], query_depth)
        view, view_counts = model.egocentric_view(out[:, 0], query_depth)
        R = self.train_rotations
        yaw = torch.as_tensor(camera_level_attitude(q[:, 0].detach().double().cpu().numpy())[:, 0],
                              device=out.device, dtype=out.dtype)
        step = 2 * math.pi / R
        k = torch.round(yaw / step).long() % R
        # headings offset by the true yaw's remainder, so the true heading is exactly a bin
        angles = model.headings(R, out.device)[None] + (yaw - torch.round(yaw / step) * step)[:, None]
        scores = match_scores(memory, view, view_counts, angles, model.bands)
        logp = torch.log_softmax(scores.flatten(1) / model.log_temperature.exp(), dim=1)
        row, col = target_cell[:, 1], target_cell[:, 0]
        target = (k * cells + row) * cells + col
        nll = -logp.gather(1, target[:, None]).mean()
        return nll + self.depth_weight * depth_loss


class MemorySamples:
    """A query and ``memory_frames`` frames within ``memory_radius`` m of it, at least
    ``min_separation`` frames away in the sequence (so the map is not the query itself),
    with depth on the output grid and all poses."""

    def __init__(self, base, camera, spec, out_hw, stride: int, memory_frames: int, memory_radius: float,
                 min_separation: int, seed: int = 0):
        self.base, self.camera, self.spec, self.out_hw, self.stride = base, camera, spec, tuple(out_hw), stride
        self.memory_frames = int(memory_frames)
        items = getattr(base, "items", [])
        if not items or not all(depth_path(it[0]).is_file() for it in items):
            raise ValueError("allocentric training needs depth images beside the colour images "
                             "(frame-*.depth.png, e.g. from vizloc-synth)")
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
        frames = [self.base[j] for j in ids]
        return {"image": np.stack([f["image"] for f in frames]), "t": frames[0]["t"], "q": frames[0]["q"],
                "depth": np.stack([self.depth(j) for j in ids]),
                "poses_t": np.stack([f["t"] for f in frames]), "poses_q": np.stack([f["q"] for f in frames]),
                "index": index}


@register_recipe("allocentric")
class AllocentricRecipe(TrainingRecipe):
    """Query + memory-frame samples with depth, the map-matching loss, the memory build."""

    def loss(self, model, config: dict):
        return AllocentricLoss(model, **loss_options(config.get("loss") or {}))

    def samples(self, model, dataset, config: dict, spec):
        require_fixed_crop("allocentric", config,
                           "depth and features are aligned with the network input pixel for pixel")
        ensure_mount(model, dataset, spec)
        options = loss_options(config.get("loss") or {})
        h, w = (math.ceil(v / model.stride) for v in spec.crop)
        return MemorySamples(dataset, dataset_camera(dataset), spec, (h, w), model.stride, options["memory_frames"],
                             options["memory_radius"], options["min_separation"], int(config.get("seed", 0)))

    def prepare(self, model, dataset, spec, device) -> None:
        build_memory(model, dataset, spec, device)
