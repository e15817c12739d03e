"""Pose regressors (PoseNet, MapNet, MapNet+, LSTM-PoseNet, VidLoc, VLocNet, DSAC++, ACE), their registry
and checkpoint I/O.

Importing this package registers every built-in architecture::

    from vizloc_ros.localize.models import build_model, load_checkpoint
    model = build_model("mapnet", feat_dim=2048)
    model, meta = load_checkpoint("weights/chess_mapnet")
"""
from vizloc_ros.localize.models.base import PoseRegressor
from vizloc_ros.localize.models.registry import available_models, build_model, register_model
from vizloc_ros.localize.models import posenet as _posenet  # noqa: F401  (registers posenet*)
from vizloc_ros.localize.models import mapnet as _mapnet  # noqa: F401  (registers mapnet, mapnet_plus)
from vizloc_ros.localize.models import lstm_posenet as _lstm_posenet  # noqa: F401  (registers lstm_posenet)
from vizloc_ros.localize.models import vidloc as _vidloc  # noqa: F401  (registers vidloc)
from vizloc_ros.localize.models import vlocnet as _vlocnet  # noqa: F401  (registers vlocnet)
from vizloc_ros.localize.models import dsac as _dsac  # noqa: F401  (registers dsac)
from vizloc_ros.localize.models import ace as _ace  # noqa: F401  (registers ace)
from vizloc_ros.localize.models import netvlad as _netvlad  # noqa: F401  (registers netvlad)
from vizloc_ros.localize.models import allocentric as _allocentric  # noqa: F401  (registers allocentric)
from vizloc_ros.localize.models.posenet import PoseNet
from vizloc_ros.localize.models.mapnet import MapNet, MapNetPlus
from vizloc_ros.localize.models.lstm_posenet import LSTMPoseNet
from vizloc_ros.localize.models.vidloc import VidLoc
from vizloc_ros.localize.models.vlocnet import VLocNet
from vizloc_ros.localize.models.sequence import FrameStream
from vizloc_ros.localize.models.backbones import available_backbones
from vizloc_ros.localize.models.checkpoint import (
    FORMAT as CHECKPOINT_FORMAT,
    CheckpointError,
    checkpoint_paths,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)

__all__ = [
    "PoseRegressor", "PoseNet", "MapNet", "MapNetPlus", "LSTMPoseNet", "VidLoc", "VLocNet",
    "FrameStream", "available_models", "build_model", "register_model",
    "available_backbones", "CHECKPOINT_FORMAT", "CheckpointError", "checkpoint_paths",
    "load_checkpoint", "read_checkpoint_meta", "save_checkpoint",
]
