"""LSTM-PoseNet (Walch et al., "Image-based localization using LSTMs for structured
feature correlation", ICCV 2017).

PoseNet's 2048-d feature vector is too large for the pose heads to use well; LSTM-PoseNet
reshapes it into a 32 x 64 grid and lets four LSTMs (32 hidden units each) read the grid
in four directions, then feeds their final hidden states, concatenated (128-d), to the
translation and quaternion heads::

    backbone -> pool -> FC(2048) -> ReLU -> reshape (32 rows, 64 columns)
        left -> right : the 64 columns in order, one 32-d column per step
        right -> left : the 64 columns in reverse order
        top -> down   : the 32 rows in order, one 64-d row per step
        bottom -> up  : the 32 rows in reverse order
    -> concat(4 x 32) -> dropout -> FC(3) translation, FC(4) quaternion

Registered as ``lstm_posenet`` (GoogLeNet backbone, as in the paper; any backbone of
:mod:`vizloc_ros.localize.models.backbones` through ``backbone=``). Single image in, single pose
out: it runs everywhere PoseNet runs (estimator, export, replay).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vizloc_ros.localize.models.backbones import build_backbone
from vizloc_ros.localize.models.base import PoseRegressor
from vizloc_ros.localize.models.posenet import preset
from vizloc_ros.localize.models.registry import register_model

#: the four reading orders, in the order their states are concatenated
DIRECTIONS = ("left_right", "right_left", "top_down", "bottom_up")


class LSTMPoseNet(PoseRegressor):
    rotation_format = "quat"
    architecture = "lstm_posenet"

    def __init__(self, backbone: str = "googlenet", feat_dim: int = 2048, grid_rows: int = 32,
                 hidden: int = 32, dropout: float = 0.5, pretrained: str | None = None):
        super().__init__()
        feat_dim, grid_rows, hidden = int(feat_dim), int(grid_rows), int(hidden)
        if feat_dim <= 0 or grid_rows <= 0 or hidden <= 0:
            raise ValueError(f"feat_dim, grid_rows and hidden must be positive, got "
                             f"{feat_dim}, {grid_rows}, {hidden}")
        if feat_dim % grid_rows:
            raise ValueError(f"feat_dim {feat_dim} is not divisible into grid_rows={grid_rows} rows")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self._backbone_name = str(backbone)
        self.feat_dim, self.grid_rows, self.hidden = feat_dim, grid_rows, hidden
        self.grid_cols = feat_dim // grid_rows
        self.dropout_rate = float(dropout)
        self.pretrained = None if pretrained is None else str(pretrained)
        self.backbone, backbone_dim = build_backbone(self._backbone_name, pretrained)
        self.fc_feat = nn.Linear(backbone_dim, feat_dim)
        # horizontal readers take a column (grid_rows values) per step, vertical ones a row
        self.lstm_left_right = nn.LSTM(self.grid_rows, hidden, batch_first=True)
        self.lstm_right_left = nn.LSTM(self.grid_rows, hidden, batch_first=True)
        self.lstm_top_down = nn.LSTM(self.grid_cols, hidden, batch_first=True)
        self.lstm_bottom_up = nn.LSTM(self.grid_cols, hidden, batch_first=True)
        self.dropout = nn.Dropout(p=self.dropout_rate)
        self.fc_t = nn.Linear(4 * hidden, 3)
        self.fc_q = nn.Linear(4 * hidden, self.rotation_dim)
        for layer in (self.fc_feat, self.fc_t, self.fc_q):
            nn.init.kaiming_normal_(layer.weight)
            nn.init.zeros_(layer.bias)

    def config(self) -> dict:
        return {"backbone": self._backbone_name, "feat_dim": self.feat_dim,
                "grid_rows": self.grid_rows, "hidden": self.hidden, "dropout": self.dropout_rate}

    # ------------------------------------------------------------------ the four readers
    def grid(self, images: torch.Tensor) -> torch.Tensor:
        """images -> the feature grid (B, grid_rows, grid_cols)."""
        feature = F.relu(self.fc_feat(self.backbone(images)))
        return feature.reshape(-1, self.grid_rows, self.grid_cols)

    def read_grid(self, grid: torch.Tensor) -> dict:
        """(B, rows, cols) -> final hidden state (B, hidden) of each reading direction."""
        columns = grid.transpose(1, 2)  # (B, cols, rows): step k is column k
        sequences = {"left_right": (self.lstm_left_right, columns),
                     "right_left": (self.lstm_right_left, columns.flip(1)),
                     "top_down": (self.lstm_top_down, grid),
                     "bottom_up": (self.lstm_bottom_up, grid.flip(1))}
        out = {}
        for name in DIRECTIONS:
            lstm, sequence = sequences[name]
            _, (h_n, _) = lstm(sequence)
            out[name] = h_n[-1]
        return out

    def _summary(self, images: torch.Tensor) -> torch.Tensor:
        states = self.read_grid(self.grid(images))
        return torch.cat([states[name] for name in DIRECTIONS], dim=-1)

    def _heads(self, summary: torch.Tensor) -> torch.Tensor:
        features = self.dropout(summary)
        return torch.cat([self.fc_t(features), self.fc_q(features)], dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._heads(self._summary(images))

    def forward_samples(self, images: torch.Tensor, samples: int) -> torch.Tensor:
        """Dropout sits after the LSTMs: run everything before it once."""
        return self._heads(self._summary(images).repeat(samples, 1))


register_model("lstm_posenet")(preset(LSTMPoseNet, "googlenet", allow_other_backbone=True))
