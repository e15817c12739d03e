"""Training recipes of the pose regressors: the pose losses of :mod:`vizloc_ros.training.losses`
(PoseNet's, MapNet's relative terms, VLocNet's odometry term), chosen by the config's
``loss`` block; what differs between the networks is only the data they need."""
from __future__ import annotations

from vizloc_ros.training.recipes.base import TrainingRecipe, register_recipe


@register_recipe("posenet", "posenet_resnet18", "posenet_resnet34", "posenet_resnet50", "mapnet",
                 "lstm_posenet")
class PoseRegressionRecipe(TrainingRecipe):
    """Single images (or tuples when the loss has relative terms)."""


@register_recipe("mapnet_plus")
class UnlabeledSequenceRecipe(TrainingRecipe):
    """MapNet+: labeled tuples plus unlabeled sequences with their odometry."""

    needs_unlabeled = True


@register_recipe("vidloc", "vlocnet")
class ClipRecipe(TrainingRecipe):
    """Networks that read clips (VidLoc's clip LSTM, VLocNet's frame pairs) train on clips."""

    trains_on_clips = True
