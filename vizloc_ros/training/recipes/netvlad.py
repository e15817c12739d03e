"""The ``netvlad`` training recipe: the weakly supervised triplet ranking loss of
Arandjelovic et al. (CVPR 2016), and the retrieval database built from the mapping images.

For a query q, its potential positives are images within ``pos_radius`` metres (and,
indoors, facing within ``pos_angle_deg``), its negatives are images beyond ``neg_radius``
metres; the loss is sum_j max(0, m + min_i d(q, p_i)^2 - d(q, n_j)^2), the best potential
positive taken by descriptor distance (which one truly shows the same place is not known).

Hard negatives (the paper mines them too): random ones beyond ``neg_radius`` are so easy
that almost no triplet is active (2 % of those of 16 queries on the demo with the frozen
MapNet trunk, 20 % with mined ones). With ``hard_pool`` n > 0 the negatives are drawn
among the n database images beyond ``neg_radius`` most similar to the query's place, i.e.
the images retrieval would wrongly return there. The query's place is the database image
covering it (within the database spacing and angle, which every training frame has by
construction), so mining needs only the database descriptors: computed once before the
first epoch and refreshed with every database build (one epoch stale at most, as the
paper's cache).

An epoch draws one query per ``query_stride`` consecutive eligible frames (a different
one each time): frames of a walk at 10 Hz lie centimetres apart, so on a CPU an epoch of
every frame as a query repeats itself while it costs ``1 + positives + negatives`` trunk
passes per query.

The database is spatially thinned when built: an image joins only if no image already
in it lies within ``database_spacing`` metres and ``database_angle_deg`` degrees.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vizloc_ros.localize.models.netvlad import NetVLADRetrieval, angle_deg
from vizloc_ros.localize.preprocess import preprocess
from vizloc_ros.training.recipes.base import TrainingRecipe, own_loss_options, register_recipe
from vizloc_ros.training.scene_geometry import farthest_distance, neighbours_within

LOG = logging.getLogger(__name__)

LOSS_OPTIONS = {"margin": 0.1, "positives": 4, "negatives": 6, "pos_radius": 0.5, "neg_radius": 2.0,
                "pos_angle_deg": None, "init_clusters": True, "query_stride": 1,
                "hard_pool": 0}


def loss_options(block: dict) -> dict:
    options = own_loss_options("netvlad", LOSS_OPTIONS, block)
    if options["neg_radius"] < options["pos_radius"]:
        raise ValueError("loss.neg_radius must be >= loss.pos_radius")
    if int(options["positives"]) < 1 or int(options["negatives"]) < 1:
        raise ValueError("loss.positives and loss.negatives must be >= 1")
    for key in ("query_stride", "hard_pool"):
        value, least = options[key], 1 if key == "query_stride" else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"loss.{key} must be an integer >= {least}, got {value!r}")
    if 0 < options["hard_pool"] < int(options["negatives"]):
        raise ValueError("loss.hard_pool must be 0 (random negatives) or >= loss.negatives")
    return options


def thin_database(t: np.ndarray, q: np.ndarray, spacing: float, max_angle_deg: float) -> np.ndarray:
    """Greedy spatial thinning: indices of frames kept so that no two kept frames are
    within ``spacing`` metres *and* ``max_angle_deg`` degrees of each other."""
    kept: list[int] = []
    for i in range(len(t)):
        if kept:
            close = np.linalg.norm(t[kept] - t[i], axis=1) < spacing
            if close.any() and (angle_deg(q[kept][close], q[i][None]) < max_angle_deg).any():
                continue
        kept.append(i)
    return np.asarray(kept, dtype=np.int64)


@torch.no_grad()
def describe_dataset(model: NetVLADRetrieval, dataset, spec, device, indices=None,
                     batch_size: int = 32) -> torch.Tensor:
    """Global descriptors (N, clusters * feat_dim) of dataset frames (all, or ``indices``)."""
    was_training = model.training
    model.eval()
    indices = list(range(len(dataset))) if indices is None else list(indices)
    out = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        images = torch.from_numpy(np.stack([dataset[i]["image"] for i in chunk])).to(device)
        out.append(model.forward(preprocess(images, spec)).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, model.descriptor_dim)


def build_database(model: NetVLADRetrieval, dataset, spec, device, batch_size: int = 32) -> np.ndarray:
    """The retrieval database from the mapping images (the training split), thinned;
    returns the indices of the frames it holds."""
    t, q = dataset.poses()
    keep = thin_database(t, q, model.database_spacing, model.database_angle_deg)
    descriptors = describe_dataset(model, dataset, spec, device, keep, batch_size)
    model.set_database(descriptors, t[keep], q[keep])
    LOG.info("netvlad database: %d of %d mapping images (spacing %.2f m, %.0f deg)",
             len(keep), len(t), model.database_spacing, model.database_angle_deg)
    return keep


@torch.no_grad()
def init_clusters(model: NetVLADRetrieval, dataset, spec, seed: int, frames: int = 64) -> None:
    """The paper's initialisation of the NetVLAD centres: k-means of the local features of
    ``frames`` random training images."""
    device = next(model.parameters()).device
    sample = np.random.default_rng(seed).permutation(len(dataset))[:frames]
    was_training = model.training
    model.eval()
    feats = []
    for start in range(0, len(sample), 16):
        images = torch.from_numpy(np.stack([dataset[int(i)]["image"] for i in sample[start:start + 16]]))
        f = model.local_features(preprocess(images.to(device), spec))
        feats.append(f.flatten(2).transpose(1, 2).reshape(-1, model.feat_dim))
    model.train(was_training)
    model.vlad.init_clusters(torch.cat(feats), seed=seed)


def triplet_loss(query: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                 margin: float = 0.1) -> torch.Tensor:
    """Weakly supervised ranking loss: query (B, D), positives (B, P, D), negatives (B, N, D).

    sum over negatives of max(0, margin + min_p ||q - p||^2 - ||q - n||^2), batch mean."""
    d_pos = ((query[:, None] - positives) ** 2).sum(-1).min(dim=1).values   # (B,)
    d_neg = ((query[:, None] - negatives) ** 2).sum(-1)                    # (B, N)
    return F.relu(margin + d_pos[:, None] - d_neg).sum(dim=1).mean()


class TripletLoss(nn.Module):
    """Called ``loss(net, x, batch)`` with x holding, per sample, the query, its potential
    positives and its negatives (``1 + P + N`` images, sample-major)."""

    def __init__(self, margin: float = 0.1, positives: int = 4, negatives: int = 6, **_):
        super().__init__()
        self.margin, self.positives, self.negatives = float(margin), int(positives), int(negatives)

    def forward(self, net, x: torch.Tensor, batch: dict) -> torch.Tensor:
        per = 1 + self.positives + self.negatives
        desc = net(x)
        if x.dim() == 5:  # clips (B, 1 + P + N, 3, H, W) give (B, 1 + P + N, D)
            desc = desc.flatten(0, 1)
        if desc.shape[0] % per:
            raise ValueError(f"netvlad training batches hold {per} images per sample, got {desc.shape[0]}")
        desc = desc.reshape(-1, per, desc.shape[-1])
        return triplet_loss(desc[:, 0], desc[:, 1:1 + self.positives], desc[:, 1 + self.positives:],
                            self.margin)


class TripletSamples:
    """Query, ``positives`` potential positives (within ``pos_radius`` m, and within
    ``pos_angle_deg`` if set, not the query itself) and ``negatives`` negatives (beyond
    ``neg_radius`` m) drawn at random each time. Queries without potential positives or
    negatives are left out. After :meth:`mine` the negatives are drawn among the
    ``hard_pool`` database images beyond ``neg_radius`` most similar to the query's place
    (the module docstring says why). With ``query_stride`` k, sample i is a query drawn at random
    from the eligible queries k*i .. k*i + k - 1 (an epoch has 1/k of them)."""

    def __init__(self, base, positives: int, negatives: int, pos_radius: float, neg_radius: float,
                 pos_angle_deg: float | None = None, seed: int = 0, query_stride: int = 1):
        self.base = base
        self.query_stride = int(query_stride)
        self.positives, self.negatives = int(positives), int(negatives)
        self.neg_radius = float(neg_radius)
        t, q = base.poses()
        self.t = t

        def facing(rows, _):
            if pos_angle_deg is None:
                return np.ones((len(rows), len(q)), dtype=bool)
            cosines = np.abs(q[rows] @ q.T).clip(0, 1)
            return np.degrees(2 * np.arccos(cosines)) <= float(pos_angle_deg)

        near = neighbours_within(t, pos_radius, keep=facing)
        self.pos = [row[row != i] for i, row in enumerate(near)]
        has_negative = farthest_distance(t) > self.neg_radius
        self.queries = [i for i in range(len(t)) if len(self.pos[i]) and has_negative[i]]
        if not self.queries:
            raise ValueError(f"no training image has both a potential positive within {pos_radius} m "
                             f"and a negative beyond {neg_radius} m: adjust loss.pos_radius / neg_radius")
        self.rng = np.random.default_rng(seed)
        self.hard_pool = 0
        self.db_frames = self.db_similarity = self.place_of = None

    def mine(self, descriptors: torch.Tensor, frames: np.ndarray, hard_pool: int,
             spacing: float, max_angle_deg: float) -> None:
        """Draw negatives among the ``hard_pool`` hardest from now on: ``descriptors`` (M, D)
        of the database images, training ``frames`` (M,). A query's place is the database
        image nearest to it within ``max_angle_deg``, within ``spacing`` when the database
        was thinned from these frames (the nearest at any angle if none faces its way)."""
        frames = np.asarray(frames, dtype=np.int64)
        if len(descriptors) != len(frames) or not len(frames):
            raise ValueError(f"mining needs one descriptor per database frame, got {len(descriptors)} "
                             f"for {len(frames)}")
        t, q = self.base.poses()
        db_t, db_q = t[frames], q[frames]
        queries = np.asarray(self.queries)
        place = np.empty(len(queries), dtype=np.int64)
        for start in range(0, len(queries), 1024):
            rows = queries[start:start + 1024]
            d = np.linalg.norm(t[rows, None] - db_t[None], axis=-1)
            facing = np.degrees(2 * np.arccos(np.abs(q[rows] @ db_q.T).clip(0, 1))) <= max_angle_deg
            place[start:start + len(rows)] = np.where(facing.any(axis=1), np.where(facing, d, np.inf).argmin(axis=1),
                                                      d.argmin(axis=1))
        far_place = np.linalg.norm(db_t[place] - t[queries], axis=1) > max(spacing, 1e-9) * 1.5
        if far_place.any():
            LOG.info("netvlad mining: %d of %d queries have no database image within the spacing "
                     "(the nearest stands for them)", int(far_place.sum()), len(queries))
        descriptors = descriptors.float().cpu()
        self.db_similarity = (descriptors @ descriptors.T).numpy()
        self.db_frames, self.hard_pool = frames, int(hard_pool)
        self.place_of = dict(zip(queries.tolist(), place.tolist()))

    def _hard_negatives(self, i: int) -> np.ndarray | None:
        """``negatives`` of the ``hard_pool`` database frames beyond neg_radius most similar
        to the query's place; None when fewer such frames exist than ``negatives``."""
        sims = self.db_similarity[self.place_of[i]]
        far = np.flatnonzero(np.linalg.norm(self.t[self.db_frames] - self.t[i], axis=1) > self.neg_radius)
        if len(far) < self.negatives:
            return None
        pool = far[np.argsort(-sims[far], kind="stable")[:self.hard_pool]]
        return self.db_frames[self.rng.choice(pool, self.negatives, replace=False)]

    def _negatives(self, i: int) -> np.ndarray:
        """Hard negatives once mined, else random frames beyond neg_radius (rejection
        sampling: no N x N table)."""
        if self.hard_pool:
            hard = self._hard_negatives(i)
            if hard is not None:
                return hard
        found: list[int] = []
        for _ in range(64):
            cand = self.rng.integers(0, len(self.t), 4 * self.negatives)
            far = cand[np.linalg.norm(self.t[cand] - self.t[i], axis=1) > self.neg_radius]
            found.extend(int(j) for j in far)
            if len(found) >= self.negatives:
                return np.asarray(found[:self.negatives])
        far = np.flatnonzero(np.linalg.norm(self.t - self.t[i], axis=1) > self.neg_radius)
        return self.rng.choice(far, self.negatives, replace=len(far) < self.negatives)

    def __len__(self) -> int:
        return -(-len(self.queries) // self.query_stride)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        first = index * self.query_stride
        i = self.queries[first + int(self.rng.integers(min(self.query_stride, len(self.queries) - first)))]
        pos = self.rng.choice(self.pos[i], self.positives, replace=len(self.pos[i]) < self.positives)
        neg = self._negatives(i)
        frames = [self.base[int(j)] for j in (i, *pos, *neg)]
        return {"image": np.stack([f["image"] for f in frames]), "t": frames[0]["t"], "q": frames[0]["q"],
                "index": index}


@register_recipe("netvlad")
class TripletRecipe(TrainingRecipe):
    """Triplets of query, potential positives and negatives; the database built before
    validation and saving."""

    def loss(self, model, config: dict):
        return TripletLoss(**loss_options(config.get("loss") or {}))

    def samples(self, model, dataset, config: dict, spec):
        options = loss_options(config.get("loss") or {})
        seed = int(config.get("seed", 0))
        if options["init_clusters"]:
            init_clusters(model, dataset, spec, seed)
        samples = TripletSamples(dataset, options["positives"], options["negatives"], options["pos_radius"],
                                 options["neg_radius"], options["pos_angle_deg"], seed,
                                 options["query_stride"])
        self._mining = (samples, dataset, options["hard_pool"]) if options["hard_pool"] else None
        if self._mining is not None:  # the first epoch's hard negatives: the database of the start
            self.prepare(model, dataset, spec, next(model.parameters()).device)
        return samples

    def prepare(self, model, dataset, spec, device, config: dict | None = None) -> None:
        """Build the database; with hard negatives, the next epoch mines it."""
        keep = build_database(model, dataset, spec, device)
        mining = getattr(self, "_mining", None)
        if mining is not None and mining[1] is dataset:
            samples, _, pool = mining
            samples.mine(model.db_descriptors, keep, pool, model.database_spacing, model.database_angle_deg)
