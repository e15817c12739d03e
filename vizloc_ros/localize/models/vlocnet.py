"""VLocNet-style multitask network (Valada et al., "Deep Auxiliary Learning for Visual
Localization and Odometry", ICRA 2018): absolute pose and visual odometry from one
Siamese ResNet, trained jointly.

::

    frame t-1 ─┐  shared trunk (Siamese: one set of weights for both frames):
    frame t   ─┴─ ResNet stem, layer1, layer2, layer3  -> maps m_{t-1}, m_t
    global stream:   layer4(m_t) -> pool -> FC(feat_dim) -> ReLU -> dropout
                     -> FC(3) translation, FC(3) log-quaternion: absolute pose of frame t
    odometry stream: concat(m_{t-1}, m_t) -> conv1x1 -> conv3x3/2 -> pool -> FC(odom_dim)
                     -> ReLU -> dropout -> FC(3) translation (x rel_t_scale metres),
                     FC(3) log-quaternion: pose of camera t in camera t-1 (a^-1 b)

As in VLocNet, the two streams share the early layers (hard parameter sharing up to
layer3) and the odometry stream fuses the two frames' maps before its last block. The
paper's backbone is ResNet-50; the default here is ResNet-18 (with a compact odometry
block) so the checkpoint stays under 25 MB in fp16.

A single image gives the absolute pose (:meth:`forward`), so the model runs everywhere a
single-image model does. With ``context_frames`` = 2 the estimator's
:class:`~vizloc_ros.localize.models.sequence.FrameStream` keeps the previous frame's trunk maps and
also returns the relative pose, which the pipeline integrates into visual odometry for
the fusion (``vizloc-replay --visual-odom``, launch ``visual_odom:=true``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vizloc_ros.geometry import torch_quat_exp, torch_quat_hemisphere
from vizloc_ros.localize.models.backbones import build_backbone
from vizloc_ros.localize.models.base import PoseRegressor
from vizloc_ros.localize.models.posenet import preset
from vizloc_ros.localize.models.registry import register_model

_RESNETS = ("resnet18", "resnet34", "resnet50")


class VLocNet(PoseRegressor):
    rotation_format = "logq"
    architecture = "vlocnet"
    has_relative_head = True

    def __init__(self, backbone: str = "resnet18", feat_dim: int = 1024, odom_dim: int = 256,
                 odom_channels: int = 128, rel_t_scale: float = 0.1, dropout: float = 0.2,
                 pretrained: str | None = None):
        super().__init__()
        if backbone not in _RESNETS:
            raise ValueError(f"VLocNet needs a ResNet backbone ({', '.join(_RESNETS)}), got {backbone!r}")
        feat_dim, odom_dim, odom_channels = int(feat_dim), int(odom_dim), int(odom_channels)
        if min(feat_dim, odom_dim, odom_channels) <= 0:
            raise ValueError("feat_dim, odom_dim and odom_channels must be positive")
        if not float(rel_t_scale) > 0:
            raise ValueError(f"rel_t_scale must be > 0 (metres per output unit), got {rel_t_scale}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self._backbone_name = str(backbone)
        self.feat_dim, self.odom_dim, self.odom_channels = feat_dim, odom_dim, odom_channels
        self.rel_t_scale = float(rel_t_scale)
        self.dropout_rate = float(dropout)
        self.pretrained = None if pretrained is None else str(pretrained)
        net, backbone_dim = build_backbone(self._backbone_name, pretrained)
        self.trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2,
                                   net.layer3)
        self.global_block = net.layer4
        trunk_channels = backbone_dim // 2  # layer3 has half of layer4's channels
        self.fc_feat = nn.Linear(backbone_dim, feat_dim)
        self.dropout = nn.Dropout(p=self.dropout_rate)
        self.fc_t = nn.Linear(feat_dim, 3)
        self.fc_q = nn.Linear(feat_dim, 3)
        c = odom_channels
        self.odom_block = nn.Sequential(
            nn.Conv2d(2 * trunk_channels, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
            nn.Conv2d(c, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        self.fc_odom = nn.Linear(c, odom_dim)
        self.odom_dropout = nn.Dropout(p=self.dropout_rate)
        self.fc_t_rel = nn.Linear(odom_dim, 3)
        self.fc_q_rel = nn.Linear(odom_dim, 3)
        for layer in (self.fc_feat, self.fc_t, self.fc_q, self.fc_odom, self.fc_t_rel, self.fc_q_rel):
            nn.init.kaiming_normal_(layer.weight)
            nn.init.zeros_(layer.bias)
        # start the odometry output near "no motion": small steps are the common case
        for layer in (self.fc_t_rel, self.fc_q_rel):
            layer.weight.data.mul_(0.1)

    def config(self) -> dict:
        return {"backbone": self._backbone_name, "feat_dim": self.feat_dim, "odom_dim": self.odom_dim,
                "odom_channels": self.odom_channels, "rel_t_scale": self.rel_t_scale,
                "dropout": self.dropout_rate}

    @property
    def context_frames(self) -> int:
        return 2

    # ------------------------------------------------------------------ streams
    def encode_frames(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> shared trunk maps (N, C, h, w)."""
        return self.trunk(images)

    def absolute(self, maps: torch.Tensor) -> torch.Tensor:
        pooled = torch.flatten(F.adaptive_avg_pool2d(self.global_block(maps), 1), 1)
        features = self.dropout(F.relu(self.fc_feat(pooled)))
        return torch.cat([self.fc_t(features), self.fc_q(features)], dim=-1)

    def relative(self, maps_a: torch.Tensor, maps_b: torch.Tensor) -> torch.Tensor:
        """Trunk maps of the earlier and the later frame -> raw relative pose (B, 6):
        translation in metres, log-quaternion."""
        fused = self.odom_block(torch.cat([maps_a, maps_b], dim=1))
        pooled = torch.flatten(F.adaptive_avg_pool2d(fused, 1), 1)
        features = self.odom_dropout(F.relu(self.fc_odom(pooled)))
        return torch.cat([self.fc_t_rel(features) * self.rel_t_scale, self.fc_q_rel(features)], dim=-1)

    # ------------------------------------------------------------------ interface
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.absolute(self.trunk(images))

    def forward_clips(self, clips: torch.Tensor) -> dict:
        b, t = clips.shape[:2]
        maps = self.trunk(clips.flatten(0, 1))
        pose = self.absolute(maps).unflatten(0, (b, t))
        maps = maps.unflatten(0, (b, t))
        out = {"pose": pose}
        if t >= 2:
            rel = self.relative(maps[:, :-1].flatten(0, 1), maps[:, 1:].flatten(0, 1))
            out["relative"] = rel.unflatten(0, (b, t - 1))
        return out

    def decode_window(self, states: torch.Tensor) -> dict:
        out = {"pose": self.absolute(states[:, -1])}
        if states.shape[1] >= 2:
            out["relative"] = self.relative(states[:, -2], states[:, -1])
        return out

    def decode_relative(self, raw: torch.Tensor):
        if raw.shape[-1] != 6:
            raise ValueError(f"relative output must have 6 values, got shape {tuple(raw.shape)}")
        return raw[..., :3], torch_quat_hemisphere(torch_quat_exp(raw[..., 3:]))


register_model("vlocnet")(preset(VLocNet, "resnet18", allow_other_backbone=True))
