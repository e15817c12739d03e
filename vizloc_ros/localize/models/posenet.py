"""PoseNet (Kendall et al., ICCV 2015) and its ResNet variants.

backbone -> global average pool -> FC(feat_dim) -> ReLU -> dropout -> two linear heads:
translation (3, normalised units) and rotation (4, quaternion w, x, y, z). The same
head with a log-quaternion rotation is MapNet's (:mod:`vizloc_ros.localize.models.mapnet`), as
in the geomapnet reference implementation.

Registered as ``posenet`` (GoogLeNet, as in the paper) and ``posenet_resnet18``,
``posenet_resnet34``, ``posenet_resnet50``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vizloc_ros.localize.models.backbones import build_backbone
from vizloc_ros.localize.models.base import PoseRegressor
from vizloc_ros.localize.models.registry import register_model


class PoseNet(PoseRegressor):
    rotation_format = "quat"
    architecture = "posenet"

    def __init__(self, backbone: str = "googlenet", feat_dim: int = 2048, dropout: float = 0.5,
                 pretrained: str | None = None):
        super().__init__()
        if int(feat_dim) <= 0:
            raise ValueError(f"feat_dim must be positive, got {feat_dim}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self._backbone_name = str(backbone)
        self.feat_dim = int(feat_dim)
        self.dropout_rate = float(dropout)
        #: the ImageNet initialisation used, if any; informational (not part of config(),
        #: since a checkpoint carries its own weights and must load without that file).
        self.pretrained = None if pretrained is None else str(pretrained)
        self.backbone, backbone_dim = build_backbone(self._backbone_name, pretrained)
        self.fc_feat = nn.Linear(backbone_dim, self.feat_dim)
        self.dropout = nn.Dropout(p=self.dropout_rate)
        self.fc_t = nn.Linear(self.feat_dim, 3)
        self.fc_q = nn.Linear(self.feat_dim, self.rotation_dim)
        for layer in (self.fc_feat, self.fc_t, self.fc_q):
            # geomapnet's initialisation of the new layers
            nn.init.kaiming_normal_(layer.weight)
            nn.init.zeros_(layer.bias)

    def config(self) -> dict:
        return {"backbone": self._backbone_name, "feat_dim": self.feat_dim,
                "dropout": self.dropout_rate}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.dropout(F.relu(self.fc_feat(self.backbone(images))))
        return torch.cat([self.fc_t(features), self.fc_q(features)], dim=-1)

    def forward_samples(self, images: torch.Tensor, samples: int) -> torch.Tensor:
        """Dropout sits only after ``fc_feat``: run the backbone once and only the dropout
        and heads ``samples`` times (MC dropout at the cost of one forward pass)."""
        hidden = F.relu(self.fc_feat(self.backbone(images)))
        features = self.dropout(hidden.repeat(samples, 1))
        return torch.cat([self.fc_t(features), self.fc_q(features)], dim=-1)


def preset(cls, backbone: str, allow_other_backbone: bool):
    """Factory building ``cls`` with ``backbone`` unless kwargs say otherwise.

    Rebuilding from a checkpoint passes the stored ``backbone`` back in, so the factory
    must accept it; a contradicting backbone is refused for names that spell it out.
    """
    def factory(**kwargs):
        chosen = kwargs.setdefault("backbone", backbone)
        if chosen != backbone and not allow_other_backbone:
            raise ValueError(f"this architecture uses backbone {backbone!r}, got backbone={chosen!r}")
        return cls(**kwargs)

    factory.__name__ = f"{cls.__name__.lower()}_{backbone}"
    factory.__doc__ = f"{cls.__name__} with a {backbone} backbone."
    return factory


register_model("posenet")(preset(PoseNet, "googlenet", allow_other_backbone=True))
for _depth in (18, 34, 50):
    register_model(f"posenet_resnet{_depth}")(preset(PoseNet, f"resnet{_depth}", allow_other_backbone=False))
