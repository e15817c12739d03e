"""NetVLAD place recognition as a relocalizer (Arandjelovic et al., CVPR 2016).

* :class:`NetVLAD`, the layer: local features x_i (L2-normalised per location) are softly
  assigned to K learned clusters, a_k(x_i) = softmax_k(w_k . x_i + b_k); the residuals to
  the cluster centres are aggregated, V_k = sum_i a_k(x_i) (x_i - c_k), each V_k is
  L2-normalised (intra-normalisation) and the flattened K x D vector is L2-normalised.
  A sum over locations: the descriptor does not depend on the order of the local features.
* :class:`NetVLADRetrieval`, the relocalizer (registry ``netvlad``): CNN trunk (ResNet
  stem to layer3, as the paper crops VGG at conv5) -> 1x1 reduction to ``feat_dim`` ->
  NetVLAD. A database of descriptors and poses of mapping images is built after training
  (by the ``netvlad`` training recipe) and saved beside the checkpoint
  (``X.database.safetensors``).
  A query retrieves its ``top_k`` nearest database images (cosine similarity); the pose
  is the similarity-weighted mean of those that agree with the best one (within
  ``consistency_m`` and ``consistency_deg``), the covariance their spread, floored by the
  database spacing (the resolution retrieval can give).
* training (the paper's weakly supervised triplet ranking loss, the database build): the
  ``netvlad`` recipe, :mod:`vizloc_ros.training.recipes.netvlad`.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vizloc_ros import geometry
from vizloc_ros.localize.models.backbones import build_backbone
from vizloc_ros.localize.models.base import PoseRegressor
from vizloc_ros.localize.models.registry import register_model


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


def angle_deg(q_a: np.ndarray, q_b: np.ndarray) -> np.ndarray:
    """Rotation angle (degrees) between orientations (w, x, y, z), broadcast."""
    return np.degrees(geometry.rotation_angle(q_a, q_b))


class NetVLADRetrieval(PoseRegressor):
    """Image retrieval relocalizer: query -> top-k database images -> pose + covariance."""

    rotation_format = "quat"
    architecture = "netvlad"

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

    def side_tensors(self) -> dict:
        if self.database_size == 0:
            return {}
        return {"database": {"descriptors": self.db_descriptors.detach().cpu().half(),
                             "t": torch.as_tensor(self.db_t), "q": torch.as_tensor(self.db_q)}}

    def load_side_tensors(self, tensors: dict) -> None:
        db = self.side_group(tensors, "database", ("descriptors", "t", "q"))
        if db is not None:
            self.set_database(db["descriptors"].float(), db["t"].double().numpy(), db["q"].double().numpy())

    # ------------------------------------------------------------------ inference
    def decode(self, raw):
        raise TypeError("netvlad outputs global descriptors, not a pose: use localize()")

    @torch.no_grad()
    def retrieve(self, descriptors: torch.Tensor, k: int | None = None):
        """Top-k database indices and cosine similarities (B, k) for query descriptors."""
        if self.database_size == 0:
            raise RuntimeError("netvlad has no database: build it from the mapping images (vizloc-train's "
                               "netvlad recipe does) or load a checkpoint with its .database.safetensors")
        k = min(k or self.top_k, self.database_size)
        sims = descriptors.float() @ self.db_descriptors.float().T
        values, index = sims.topk(k, dim=1)
        return index.cpu().numpy(), values.cpu().numpy()

    def pose_from_neighbours(self, index: np.ndarray, sims: np.ndarray):
        """Pose and ROS-order covariance from the retrieved neighbours of one query."""
        t_nb, q_nb = self.db_t[index], self.db_q[index]
        agree = (np.linalg.norm(t_nb - t_nb[0], axis=1) <= self.consistency_m) & \
                (angle_deg(q_nb, q_nb[0][None]) <= self.consistency_deg)
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


register_model("netvlad")(NetVLADRetrieval)
