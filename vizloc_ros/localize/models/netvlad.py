"""NetVLAD place recognition as a relocalizer (Arandjelovic et al., CVPR 2016).

* :class:`NetVLAD`, the layer: local features x_i (L2-normalised per location) are softly
  assigned to K learned clusters, a_k(x_i) = softmax_k(w_k . x_i + b_k); the residuals to
  the cluster centres are aggregated, V_k = sum_i a_k(x_i) (x_i - c_k), each V_k is
  L2-normalised (intra-normalisation) and the flattened K x D vector is L2-normalised.
  A sum over locations: the descriptor does not depend on the order of the local features.
* :class:`NetVLADRetrieval`, the relocalizer (registry ``netvlad``): CNN trunk (ResNet
  stem to layer3, as the paper crops VGG at conv5) -> 1x1 reduction to ``feat_dim`` ->
  NetVLAD. A database of descriptors and poses of mapping images is built after training
  (``prepare_inference``) and saved beside the checkpoint (``X.database.safetensors``).
  A query retrieves its ``top_k`` nearest database images (cosine similarity); the pose
  is the similarity-weighted mean of those that agree with the best one (within
  ``consistency_m`` and ``consistency_deg``), the covariance their spread, floored by the
  database spacing (the resolution retrieval can give).
* training: the weakly supervised triplet ranking loss of the paper. For a query q, its
  potential positives are images within ``pos_radius`` metres (and, indoors, facing within
  ``pos_angle_deg``), its negatives are images beyond ``neg_radius`` metres; the loss is
  sum_j max(0, m + min_i d(q, p_i)^2 - d(q, n_j)^2), the best potential positive taken
  by descriptor distance (which one truly shows the same place is not known).

The database is spatially thinned when built: an image joins only if no image already
in it lies within ``database_spacing`` metres and ``database_angle_deg`` degrees.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vizloc_ros import geometry
from vizloc_ros.localize.models.backbones import build_backbone
from vizloc_ros.localize.models.base import PoseRegressor, own_loss_options
from vizloc_ros.localize.models.registry import register_model

LOG = logging.getLogger(__name__)


class NetVLAD(nn.Module):
    """NetVLAD pooling: (B, D, H, W) or (B, D, N) local features -> (B, K * D) descriptors."""

    def __init__(self, clusters: int = 32, dim: int = 128, alpha: float = 100.0):
        super().__init__()
        self.clusters, self.dim, self.alpha = int(clusters), int(dim), float(alpha)
        self.assign = nn.Conv1d(self.dim, self.clusters, 1, bias=True)
        self.centroids = nn.Parameter(torch.rand(self.clusters, self.dim))
        self._tie_assignment()

    @torch.no_grad()
    def _tie_assignment(self) -> None:
        """The paper's initialisation: w_k = 2 alpha c_k, b_k = -alpha ||c_k||^2, i.e. the
        soft assignment starts as a softmax over -alpha ||x - c_k||^2."""
        c = self.centroids
        self.assign.weight.copy_(2.0 * self.alpha * c[:, :, None])
        self.assign.bias.copy_(-self.alpha * (c * c).sum(dim=1))

    @torch.no_grad()
    def init_clusters(self, features: torch.Tensor, iterations: int = 20, seed: int = 0) -> None:
        """k-means (spherical, on L2-normalised features) of local features (N, D)."""
        x = F.normalize(features.float(), dim=1)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        pick = torch.randperm(len(x), generator=generator)[:self.clusters].to(x.device)
        if len(pick) < self.clusters:  # fewer features than clusters: repeat some
            pick = pick.repeat(math.ceil(self.clusters / max(len(pick), 1)))[:self.clusters]
        centres = x[pick].clone()
        for _ in range(iterations):
            label = (x @ centres.T).argmax(dim=1)
            for k in range(self.clusters):
                members = x[label == k]
                if len(members):
                    centres[k] = F.normalize(members.mean(dim=0), dim=0)
        self.centroids.copy_(centres.to(self.centroids))
        self._tie_assignment()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.flatten(2) if features.dim() == 4 else features  # (B, D, N)
        x = F.normalize(x, dim=1)
        soft = torch.softmax(self.assign(x), dim=1)                    # (B, K, N)
        residual = torch.einsum("bkn,bdn->bkd", soft, x) - soft.sum(dim=2)[..., None] * self.centroids[None]
        vlad = F.normalize(residual, dim=2)                            # intra-normalisation
        return F.normalize(vlad.flatten(1), dim=1)


def _trunk(name: str, pretrained) -> tuple[nn.Module, int]:
    if name == "small":
        layers, channels = [], 3
        for out in (32, 64, 128, 128):
            layers += [nn.Conv2d(channels, out, 3, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        return nn.Sequential(*layers), channels
    if name not in ("resnet18", "resnet34"):
        raise ValueError(f"netvlad backbones: small, resnet18, resnet34; got {name!r}")
    net, _ = build_backbone(name, pretrained)
    return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3), 256


def _angle_deg(q_a: np.ndarray, q_b: np.ndarray) -> np.ndarray:
    return np.degrees(geometry.rotation_angle(q_a, q_b))


def thin_database(t: np.ndarray, q: np.ndarray, spacing: float, angle_deg: float) -> np.ndarray:
    """Greedy spatial thinning: indices of frames kept so that no two kept frames are
    within ``spacing`` metres *and* ``angle_deg`` degrees of each other."""
    kept: list[int] = []
    for i in range(len(t)):
        if kept:
            close = np.linalg.norm(t[kept] - t[i], axis=1) < spacing
            if close.any() and (_angle_deg(q[kept][close], q[i][None]) < angle_deg).any():
                continue
        kept.append(i)
    return np.asarray(kept, dtype=np.int64)


class NetVLADRetrieval(PoseRegressor):
    """Image retrieval relocalizer: query -> top-k database images -> pose + covariance."""

    rotation_format = "quat"
    architecture = "netvlad"
    custom_inference = True

    def __init__(self, backbone: str = "resnet18", feat_dim: int = 64, clusters: int = 32,
                 alpha: float = 100.0, top_k: int = 5, consistency_m: float = 0.5,
                 consistency_deg: float = 30.0, temperature: float = 0.02,
                 database_spacing: float = 0.25, database_angle_deg: float = 15.0,
                 pretrained: str | None = None):
        super().__init__()
        self._backbone_name = str(backbone)
        self.feat_dim, self.clusters, self.alpha = int(feat_dim), int(clusters), float(alpha)
        self.top_k = int(top_k)
        self.consistency_m, self.consistency_deg = float(consistency_m), float(consistency_deg)
        self.temperature = float(temperature)
        self.database_spacing, self.database_angle_deg = float(database_spacing), float(database_angle_deg)
        if self.top_k < 1 or self.temperature <= 0 or self.database_spacing < 0:
            raise ValueError("top_k must be >= 1, temperature > 0 and database_spacing >= 0")
        self.trunk, channels = _trunk(self._backbone_name, pretrained)
        self.reduce = nn.Conv2d(channels, self.feat_dim, 1)
        self.vlad = NetVLAD(self.clusters, self.feat_dim, self.alpha)
        # the database: not part of the network's tensors (it is a side file)
        self.register_buffer("db_descriptors", torch.zeros(0, self.descriptor_dim), persistent=False)
        self.db_t = np.zeros((0, 3))
        self.db_q = np.zeros((0, 4))

    @property
    def descriptor_dim(self) -> int:
        return self.clusters * self.feat_dim

    def config(self) -> dict:
        return {"backbone": self._backbone_name, "feat_dim": self.feat_dim, "clusters": self.clusters,
                "alpha": self.alpha, "top_k": self.top_k, "consistency_m": self.consistency_m,
                "consistency_deg": self.consistency_deg, "temperature": self.temperature,
                "database_spacing": self.database_spacing, "database_angle_deg": self.database_angle_deg}

    # ------------------------------------------------------------------ network
    def local_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.trunk(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> L2-normalised global descriptors (B, clusters * feat_dim)."""
        return self.vlad(self.local_features(images))

    # ------------------------------------------------------------------ database
    @property
    def database_size(self) -> int:
        return int(self.db_descriptors.shape[0])

    def set_database(self, descriptors, t, q) -> None:
        descriptors = torch.as_tensor(descriptors, dtype=torch.float32)
        t = np.asarray(t, dtype=np.float64).reshape(-1, 3)
        q = np.asarray(q, dtype=np.float64).reshape(-1, 4)
        if descriptors.dim() != 2 or descriptors.shape[1] != self.descriptor_dim or \
                not (len(descriptors) == len(t) == len(q)):
            raise ValueError(f"database needs descriptors (N, {self.descriptor_dim}) and N poses; got "
                             f"{tuple(descriptors.shape)}, {t.shape}, {q.shape}")
        device = self.db_descriptors.device
        self.db_descriptors = descriptors.to(device=device, dtype=self.db_descriptors.dtype)
        self.db_t, self.db_q = t, geometry.quat_hemisphere(geometry.quat_normalize(q))

    @torch.no_grad()
    def describe_dataset(self, dataset, spec, device, indices=None, batch_size: int = 32) -> torch.Tensor:
        from vizloc_ros.localize.preprocess import preprocess

        was_training = self.training
        self.eval()
        indices = list(range(len(dataset))) if indices is None else list(indices)
        out = []
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            images = torch.from_numpy(np.stack([dataset[i]["image"] for i in chunk])).to(device)
            out.append(self.forward(preprocess(images, spec)).float().cpu())
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.descriptor_dim)

    def prepare_inference(self, dataset, spec, device, batch_size: int = 32) -> None:
        """Build the database from the mapping images (the training split)."""
        t, q = dataset.poses()
        keep = thin_database(t, q, self.database_spacing, self.database_angle_deg)
        descriptors = self.describe_dataset(dataset, spec, device, keep, batch_size)
        self.set_database(descriptors, t[keep], q[keep])
        LOG.info("netvlad database: %d of %d mapping images (spacing %.2f m, %.0f deg)",
                 len(keep), len(t), self.database_spacing, self.database_angle_deg)

    def side_tensors(self) -> dict:
        if self.database_size == 0:
            return {}
        return {"database": {"descriptors": self.db_descriptors.detach().cpu().half(),
                             "t": torch.as_tensor(self.db_t), "q": torch.as_tensor(self.db_q)}}

    def load_side_tensors(self, tensors: dict) -> None:
        unknown = set(tensors) - {"database"}
        if unknown:
            raise ValueError(f"netvlad has no side file {sorted(unknown)}")
        if "database" in tensors:
            db = tensors["database"]
            missing = {"descriptors", "t", "q"} - set(db)
            if missing:
                raise ValueError(f"database lacks {sorted(missing)}")
            self.set_database(db["descriptors"].float(), db["t"].double().numpy(), db["q"].double().numpy())

    # ------------------------------------------------------------------ inference
    def decode(self, raw):
        raise TypeError("netvlad outputs global descriptors, not a pose: use localize()")

    @torch.no_grad()
    def retrieve(self, descriptors: torch.Tensor, k: int | None = None):
        """Top-k database indices and cosine similarities (B, k) for query descriptors."""
        if self.database_size == 0:
            raise RuntimeError("netvlad has no database: build it with prepare_inference() (vizloc-train "
                               "does) or load a checkpoint with its .database.safetensors")
        k = min(k or self.top_k, self.database_size)
        sims = descriptors.float() @ self.db_descriptors.float().T
        values, index = sims.topk(k, dim=1)
        return index.cpu().numpy(), values.cpu().numpy()

    def pose_from_neighbours(self, index: np.ndarray, sims: np.ndarray):
        """Pose and ROS-order covariance from the retrieved neighbours of one query."""
        t_nb, q_nb = self.db_t[index], self.db_q[index]
        agree = (np.linalg.norm(t_nb - t_nb[0], axis=1) <= self.consistency_m) & \
                (_angle_deg(q_nb, q_nb[0][None]) <= self.consistency_deg)
        w = np.exp((sims[agree] - sims[0]) / self.temperature)
        w = w / w.sum()
        t_mean = w @ t_nb[agree]
        q_al = q_nb[agree] * np.sign(q_nb[agree] @ q_nb[0] + 1e-12)[:, None]
        q_mean = geometry.quat_hemisphere(geometry.quat_normalize(w @ q_al))
        # spread of all k neighbours about the estimate: disagreeing neighbours mean an
        # ambiguous place, which the covariance must say
        dev_t = t_nb - t_mean
        dev_r = geometry.so3_log(geometry.quat_to_matrix(q_nb) @ geometry.quat_to_matrix(q_mean).T)
        dev = np.concatenate([dev_t, dev_r], axis=1)
        cov = dev.T @ dev / len(dev)
        floor_t = max(self.database_spacing, 0.05) ** 2
        floor_r = math.radians(max(self.database_angle_deg, 2.0)) ** 2
        cov += np.diag([floor_t] * 3 + [floor_r] * 3)
        return t_mean, q_mean, cov

    @torch.no_grad()
    def localize(self, images: torch.Tensor):
        index, sims = self.retrieve(self.forward(images))
        ts, qs, covs = zip(*(self.pose_from_neighbours(i, s) for i, s in zip(index, sims)))
        device = images.device
        return (torch.as_tensor(np.stack(ts), dtype=torch.float32, device=device),
                torch.as_tensor(np.stack(qs), dtype=torch.float32, device=device),
                torch.as_tensor(np.stack(covs), dtype=torch.float64))

    # ------------------------------------------------------------------ training hooks
    def training_loss(self, config: dict):
        return TripletLoss(**loss_options(config.get("loss") or {}))

    def training_dataset(self, dataset, config: dict, spec):
        options = loss_options(config.get("loss") or {})
        if options["init_clusters"]:
            device = next(self.parameters()).device
            sample = np.random.default_rng(int(config.get("seed", 0))).permutation(len(dataset))[:64]
            with torch.no_grad():
                from vizloc_ros.localize.preprocess import preprocess

                was_training = self.training
                self.eval()
                feats = []
                for start in range(0, len(sample), 16):
                    images = torch.from_numpy(np.stack([dataset[int(i)]["image"] for i in sample[start:start + 16]]))
                    f = self.local_features(preprocess(images.to(device), spec))
                    feats.append(f.flatten(2).transpose(1, 2).reshape(-1, self.feat_dim))
                self.train(was_training)
                self.vlad.init_clusters(torch.cat(feats), seed=int(config.get("seed", 0)))
        return TripletSamples(dataset, options["positives"], options["negatives"], options["pos_radius"],
                              options["neg_radius"], options["pos_angle_deg"], int(config.get("seed", 0)))


LOSS_OPTIONS = {"margin": 0.1, "positives": 4, "negatives": 6, "pos_radius": 0.5, "neg_radius": 2.0,
                "pos_angle_deg": None, "init_clusters": True}


def loss_options(block: dict) -> dict:
    options = own_loss_options("netvlad", LOSS_OPTIONS, block)
    if options["neg_radius"] < options["pos_radius"]:
        raise ValueError("loss.neg_radius must be >= loss.pos_radius")
    if int(options["positives"]) < 1 or int(options["negatives"]) < 1:
        raise ValueError("loss.positives and loss.negatives must be >= 1")
    return options


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
    negatives are left out."""

    def __init__(self, base, positives: int, negatives: int, pos_radius: float, neg_radius: float,
                 pos_angle_deg: float | None = None, seed: int = 0):
        from vizloc_ros.training.scene_geometry import farthest_distance, neighbours_within

        self.base = base
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

    def _negatives(self, i: int) -> np.ndarray:
        """Random frames beyond neg_radius (rejection sampling: no N x N table)."""
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
        return len(self.queries)

    def __getitem__(self, index: int) -> dict:
        i = self.queries[index]
        pos = self.rng.choice(self.pos[i], self.positives, replace=len(self.pos[i]) < self.positives)
        neg = self._negatives(i)
        frames = [self.base[int(j)] for j in (i, *pos, *neg)]
        return {"image": np.stack([f["image"] for f in frames]), "t": frames[0]["t"], "q": frames[0]["q"],
                "index": index}


register_model("netvlad")(NetVLADRetrieval)
