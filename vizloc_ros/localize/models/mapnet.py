"""MapNet (Brahmbhatt et al., CVPR 2018): the PoseNet head on ResNet-34, regressing the
log-quaternion instead of the quaternion.

The log-quaternion is a minimal (3 numbers), unconstrained parametrisation, so the
L1 distance between logs behaves well without any normalisation. What makes MapNet
MapNet at training time (relative-pose terms between frames of a tuple) lives in
:class:`vizloc_ros.training.losses.MapNetLoss`; the network itself is single-image.
"""
from __future__ import annotations

from vizloc_ros.localize.models.posenet import PoseNet, preset
from vizloc_ros.localize.models.registry import register_model


class MapNet(PoseNet):
    rotation_format = "logq"
    architecture = "mapnet"

    def __init__(self, backbone: str = "resnet34", feat_dim: int = 2048, dropout: float = 0.5,
                 pretrained: str | None = None):
        super().__init__(backbone=backbone, feat_dim=feat_dim, dropout=dropout,
                         pretrained=pretrained)


register_model("mapnet")(preset(MapNet, "resnet34", allow_other_backbone=True))


class MapNetPlus(MapNet):
    """MapNet+ (Brahmbhatt et al. 2018, section 3.3): the MapNet network fine-tuned with
    unlabeled sequences. Besides MapNet's labeled tuples (absolute + relative terms), each
    training step draws tuples from recordings without ground truth and penalises only the
    difference between the relative poses of the predictions and the visual odometry
    measured between the same frames (:class:`vizloc_ros.training.losses.OdometryLoss`; the
    ``mapnet_plus`` training recipe asks for them). The network is MapNet's, so a MapNet
    checkpoint is a valid ``model.init_from``.
    """

    architecture = "mapnet_plus"


register_model("mapnet_plus")(preset(MapNetPlus, "resnet34", allow_other_backbone=True))
