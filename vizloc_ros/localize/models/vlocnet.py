"""VLocNet-style multitask network (Valada et al., "Deep Auxiliary Learning for Visual
Localization and Odometry", ICRA 2018): absolute pose and visual odometry from one
Siamese ResNet, trained jointly.

::

    frame t-1 ─┐  shared trunk (Siamese: one set of weights for both frames):
    frame t   ─┴─ ResNet stem, layer1, layer2[, layer3]  -> maps m_{t-1}, m_t
                     (``odom_from``: the streams part after layer2, as in the paper, or
                     after layer3, as the first checkpoints did)
    global stream:   [layer3] layer4(m_t) -> pool -> FC(feat_dim) -> ReLU -> dropout
                     -> FC(3) translation, FC(3) log-quaternion: absolute pose of frame t
    odometry stream, ``odom_head="correlation"`` (the CPU recipe's):
                     p = normalise(conv1x1(m)) for both frames; local correlation of
                     p_{t-1} with p_t over +-odom_radius cells, beside both p
                     -> conv3x3 -> conv3x3/2 -> conv3x3/2 -> pool to 3x4 (kept apart)
                     -> FC(odom_dim) -> ReLU -> dropout -> FC(3) translation
                     (x rel_t_scale metres), FC(3) log-quaternion: pose of camera t in
                     camera t-1 (a^-1 b)
    odometry stream, ``odom_head="pooled"`` (the first checkpoints'): concat(m_{t-1},
                     m_t) -> conv1x1 -> conv3x3/2 -> global average pool -> FC(odom_dim)
                     -> the same outputs

As in VLocNet, the two streams share the early layers (hard parameter sharing up to res3,
torchvision's layer2, with ``odom_from="layer2"``) and the odometry stream fuses the two
frames' maps before its last block. The
paper's backbone is ResNet-50; the default here is ResNet-18 (with a compact odometry
block) so the checkpoint stays under 25 MB in fp16.

Why the correlation head: the camera's motion is in where each part of the image went,
so the stream compares the two maps cell by cell (a FlowNet-style cost volume) and keeps
the cells' layout up to the last layer, where the pooled head averaged it away. On the
demo validation walk (5 cm / 4 deg steps at 10 Hz, the same CPU recipe) it gets the
turns better (0.61 against 0.71 deg a step; a yaw bias of 0.09 against 0.28 deg a step),
not the sideways shifts (18 mm a step either way, and 18 mm / 0.83 deg at epoch 3 of 10
when the streams part after layer2): telling a sideways shift from a turn takes parallax
that these frozen absolute-pose features barely keep.

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
ODOM_HEADS = ("pooled", "correlation")
#: where the streams part: after layer3 (stride 16; the first checkpoints) or after layer2
#: (stride 8, as in the paper: its odometry stream sees motion at twice the resolution)
ODOM_SOURCES = ("layer3", "layer2")
_ODOM_GRID = (3, 4)  # cells the correlation head keeps apart before its FC (rows, columns)


def local_correlation(a: torch.Tensor, b: torch.Tensor, radius: int) -> torch.Tensor:
    """Cost volume: (N, C, H, W) maps ``a``, ``b`` -> (N, (2r+1)^2, H, W), channel k the
    mean product of ``a`` at each cell with ``b`` shifted by the k-th offset (dy, dx) in
    [-r, r]^2, row-major; zero where the shifted cell falls outside ``b``."""
    if a.shape != b.shape:
        raise ValueError(f"maps of one shape expected, got {tuple(a.shape)} and {tuple(b.shape)}")
    h, w = a.shape[-2:]
    padded = F.pad(b, (radius, radius, radius, radius))
    span = 2 * radius + 1
    return torch.stack([(a * padded[:, :, dy:dy + h, dx:dx + w]).mean(dim=1)
                        for dy in range(span) for dx in range(span)], dim=1)


class VLocNet(PoseRegressor):
    rotation_format = "logq"
    architecture = "vlocnet"
    has_relative_head = True

    def __init__(self, backbone: str = "resnet18", feat_dim: int = 1024, odom_dim: int = 256,
                 odom_channels: int = 128, rel_t_scale: float = 0.1, dropout: float = 0.2,
                 odom_head: str = "pooled", odom_radius: int = 3, odom_from: str = "layer3",
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
        if odom_head not in ODOM_HEADS:
            raise ValueError(f"odom_head must be one of {', '.join(ODOM_HEADS)}, got {odom_head!r}")
        if isinstance(odom_radius, bool) or int(odom_radius) != odom_radius or not 1 <= int(odom_radius) <= 8:
            raise ValueError(f"odom_radius must be a whole number of cells in [1, 8], got {odom_radius!r}")
        if odom_from not in ODOM_SOURCES:
            raise ValueError(f"odom_from must be one of {', '.join(ODOM_SOURCES)}, got {odom_from!r}")
        self.odom_head, self.odom_radius, self.odom_from = str(odom_head), int(odom_radius), str(odom_from)
        self._backbone_name = str(backbone)
        self.feat_dim, self.odom_dim, self.odom_channels = feat_dim, odom_dim, odom_channels
        self.rel_t_scale = float(rel_t_scale)
        self.dropout_rate = float(dropout)
        self.pretrained = None if pretrained is None else str(pretrained)
        net, backbone_dim = build_backbone(self._backbone_name, pretrained)
        if self.odom_from == "layer3":
            self.trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2,
                                       net.layer3)
            self.global_block = net.layer4
            trunk_channels = backbone_dim // 2  # layer3 has half of layer4's channels
        else:  # the paper's split: shared to res3 (layer2); the global stream's layer3 and
            # layer4 on one side, the odometry stream's cost volume on the layer2 maps on the other
            self.trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2)
            self.global_block = nn.Sequential(net.layer3, net.layer4)
            trunk_channels = backbone_dim // 4
        self.fc_feat = nn.Linear(backbone_dim, feat_dim)
        self.dropout = nn.Dropout(p=self.dropout_rate)
        self.fc_t = nn.Linear(feat_dim, 3)
        self.fc_q = nn.Linear(feat_dim, 3)
        c = odom_channels
        if self.odom_head == "pooled":
            self.odom_block = nn.Sequential(
                nn.Conv2d(2 * trunk_channels, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                nn.Conv2d(c, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
            self.fc_odom = nn.Linear(c, odom_dim)
        else:
            p = max(c // 2, 1)
            self.odom_project = nn.Sequential(nn.Conv2d(trunk_channels, p, 1, bias=False), nn.BatchNorm2d(p))
            volume = (2 * self.odom_radius + 1) ** 2
            self.odom_block = nn.Sequential(
                nn.Conv2d(volume + 2 * p, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                nn.Conv2d(c, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                nn.Conv2d(c, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
            self.fc_odom = nn.Linear(c * _ODOM_GRID[0] * _ODOM_GRID[1], odom_dim)
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
                "dropout": self.dropout_rate, "odom_head": self.odom_head, "odom_radius": self.odom_radius,
                "odom_from": self.odom_from}

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
        if self.odom_head == "pooled":
            fused = self.odom_block(torch.cat([maps_a, maps_b], dim=1))
            pooled = torch.flatten(F.adaptive_avg_pool2d(fused, 1), 1)
        else:
            a = F.normalize(self.odom_project(maps_a), dim=1)
            b = F.normalize(self.odom_project(maps_b), dim=1)
            # the mean over channels of unit vectors: scaled up so a match reads about 1
            volume = local_correlation(a, b, self.odom_radius) * a.shape[1]
            fused = self.odom_block(torch.cat([volume, a, b], dim=1))
            pooled = torch.flatten(F.adaptive_avg_pool2d(fused, _ODOM_GRID), 1)
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
