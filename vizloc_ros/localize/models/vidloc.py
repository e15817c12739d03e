"""VidLoc (Clark et al., "VidLoc: A Deep Spatio-Temporal Model for 6-DoF Video-Clip
Relocalization", CVPR 2017): a CNN per frame and a bidirectional LSTM over a clip, one
pose per frame.

::

    every frame: backbone -> pool -> FC(feat_dim) -> ReLU            (encode_frames)
    the clip:    bidirectional LSTM (hidden per direction) -> dropout
                 -> FC(3) translation, FC(4) quaternion for every frame

Offline, a clip (B, T, 3, H, W) gives T poses (:meth:`VidLoc.forward_clips`; training
uses clips of ``clip_length`` consecutive frames). Online (the regressor node, and
``vizloc-replay`` in stamp order), the estimator keeps the last ``clip_length`` frames'
CNN features in a :class:`~vizloc_ros.localize.models.sequence.FrameStream` and publishes the
pose of the newest frame: the output of the clip that ends with it. A single image on its
own (:meth:`forward` with (B, 3, H, W)) is a clip of one frame.

Registered as ``vidloc`` (GoogLeNet backbone, as in the paper; other backbones through
``backbone=``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vizloc_ros.localize.models.backbones import build_backbone
from vizloc_ros.localize.models.base import PoseRegressor
from vizloc_ros.localize.models.posenet import preset
from vizloc_ros.localize.models.registry import register_model


class VidLoc(PoseRegressor):
    rotation_format = "quat"
    architecture = "vidloc"

    def __init__(self, backbone: str = "googlenet", feat_dim: int = 1024, hidden: int = 256,
                 clip_length: int = 8, dropout: float = 0.5, pretrained: str | None = None):
        super().__init__()
        feat_dim, hidden, clip_length = int(feat_dim), int(hidden), int(clip_length)
        if feat_dim <= 0 or hidden <= 0:
            raise ValueError(f"feat_dim and hidden must be positive, got {feat_dim}, {hidden}")
        if clip_length < 2:
            raise ValueError(f"clip_length must be >= 2 (a clip), got {clip_length}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self._backbone_name = str(backbone)
        self.feat_dim, self.hidden, self.clip_length = feat_dim, hidden, clip_length
        self.dropout_rate = float(dropout)
        self.pretrained = None if pretrained is None else str(pretrained)
        self.backbone, backbone_dim = build_backbone(self._backbone_name, pretrained)
        self.fc_feat = nn.Linear(backbone_dim, feat_dim)
        self.lstm = nn.LSTM(feat_dim, hidden, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(p=self.dropout_rate)
        self.fc_t = nn.Linear(2 * hidden, 3)
        self.fc_q = nn.Linear(2 * hidden, self.rotation_dim)
        for layer in (self.fc_feat, self.fc_t, self.fc_q):
            nn.init.kaiming_normal_(layer.weight)
            nn.init.zeros_(layer.bias)

    def config(self) -> dict:
        return {"backbone": self._backbone_name, "feat_dim": self.feat_dim, "hidden": self.hidden,
                "clip_length": self.clip_length, "dropout": self.dropout_rate}

    @property
    def context_frames(self) -> int:
        return self.clip_length

    @property
    def pose_depends_on_history(self) -> bool:
        return True

    # ------------------------------------------------------------------ pieces
    def encode_frames(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> per-frame CNN features (N, feat_dim)."""
        return F.relu(self.fc_feat(self.backbone(images)))

    def temporal(self, features: torch.Tensor) -> torch.Tensor:
        """Clip features (B, T, feat_dim) -> raw poses (B, T, 7) for every frame."""
        out, _ = self.lstm(features)
        out = self.dropout(out)
        return torch.cat([self.fc_t(out), self.fc_q(out)], dim=-1)

    # ------------------------------------------------------------------ interface
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W): each image a clip of one frame -> (B, 7); (B, T, 3, H, W) -> (B, T, 7)."""
        if images.dim() == 5:
            return self.forward_clips(images)["pose"]
        return self.temporal(self.encode_frames(images).unsqueeze(1))[:, 0]

    def forward_clips(self, clips: torch.Tensor) -> dict:
        b, t = clips.shape[:2]
        features = self.encode_frames(clips.flatten(0, 1)).unflatten(0, (b, t))
        return {"pose": self.temporal(features)}

    def decode_window(self, states: torch.Tensor) -> dict:
        return {"pose": self.temporal(states)[:, -1]}

    def forward_samples(self, images: torch.Tensor, samples: int) -> torch.Tensor:
        features = self.encode_frames(images).unsqueeze(1)
        return self.temporal(features.repeat(samples, 1, 1))[:, 0]


register_model("vidloc")(preset(VidLoc, "googlenet", allow_other_backbone=True))
