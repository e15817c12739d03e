"""``TrainingRecipe``: what ``vizloc-train`` needs to know about one architecture.

Models (:mod:`vizloc_ros.localize.models`) are inference only. How one is trained (its
loss, the samples that loss reads, and anything built from the mapping images before
validation and saving, such as a retrieval database) is its recipe, registered under the
model's registry name::

    @register_recipe("my_net")
    class MyNetRecipe(TrainingRecipe):
        def loss(self, model, config):
            return MyLoss(**own_loss_options("my_net", MY_OPTIONS, config["loss"]))

Pose regressors need no more than :class:`TrainingRecipe` itself: the pose losses of
:mod:`vizloc_ros.training.losses`, built from the config's ``loss`` block.
"""
from __future__ import annotations

from torch import nn

from vizloc_ros.localize.models.registry import trained_by

#: keys of the pose-regression loss block (train.py DEFAULTS) that recipes with their own
#: loss (DSAC, NetVLAD, allocentric) ignore
POSE_LOSS_KEYS = ("translation", "rotation", "combine", "s_t", "s_q", "relative", "beta")


def own_loss_options(model: str, defaults: dict, block: dict) -> dict:
    """``defaults`` updated from a config's ``loss`` block; a key that is neither one of
    ``defaults`` nor a pose-loss key is a ValueError naming the model's options."""
    unknown = [k for k in block if k not in defaults and k not in POSE_LOSS_KEYS]
    if unknown:
        raise ValueError(f"unknown {model} loss option(s) {unknown}; options: {', '.join(defaults)}")
    return {**defaults, **{k: v for k, v in block.items() if k in defaults}}


def require_fixed_crop(model: str, config: dict, why: str) -> None:
    """Models whose targets are aligned with the network input pixel for pixel cannot
    train on randomly shifted crops."""
    if config["augment"].get("random_crop"):
        raise ValueError(f"{model} needs augment.random_crop: false ({why})")


class TrainingRecipe:
    """How to train one registered architecture; the default trains a pose regressor."""

    #: training needs clips of consecutive frames even when the loss is absolute-only
    #: (VidLoc's clip LSTM, VLocNet's pairs); MapNet-style losses ask for clips themselves.
    trains_on_clips: bool = False
    #: training needs unlabeled sequences with odometry (the ``unlabeled`` config block):
    #: MapNet+.
    needs_unlabeled: bool = False
    #: the recipe's own samples can carry a frozen trunk's cached output (``feature``) in
    #: place of the images: :meth:`samples` then gets ``trunk_features`` (``trunk.cache``).
    reads_cached_trunk: bool = False

    def loss(self, model, config: dict) -> nn.Module | None:
        """A module called as ``loss(net, x, batch)`` (``x`` the prepared images, ``batch``
        the collated extras on the device) returning the scalar loss, or None for the
        pose-regression losses of :mod:`vizloc_ros.training.losses` built from ``config["loss"]``."""
        return None

    def samples(self, model, dataset, config: dict, spec):
        """The samples :meth:`loss` needs (depth targets, triplets, ...), built from the
        training split; may set what the model learns from the data (intrinsics, mount).
        Only called when :meth:`loss` is not None. A recipe that :attr:`reads_cached_trunk`
        also gets ``trunk_features``, a function from a dataset (the split or part of it)
        to the cached trunk output of its frames, when the config caches the trunk."""
        return dataset

    def prepare(self, model, dataset, spec, device, config: dict | None = None) -> None:
        """Called before validation and saving, with the training split and the config:
        e.g. build a retrieval database or a map from the mapping images."""


_RECIPES: dict[str, TrainingRecipe] = {}


def register_recipe(*names: str):
    """Class decorator: one instance of the recipe serves every model name given."""
    def decorator(cls):
        for name in names:
            if name in _RECIPES:
                raise ValueError(f"a training recipe is already registered for {name!r}")
            _RECIPES[name] = cls()
        return cls

    return decorator


def available_recipes() -> list[str]:
    return sorted(_RECIPES)


def recipe_for(architecture: str) -> TrainingRecipe:
    """The recipe registered under a model's registry name."""
    try:
        return _RECIPES[architecture]
    except KeyError:
        maker = trained_by(architecture)
        if maker != "vizloc-train":
            raise ValueError(f"model {architecture!r} is not trained by vizloc-train: make it with {maker} "
                             "(see docs/MAPPING.md)") from None
        raise ValueError(f"no training recipe for model {architecture!r}: register one with "
                         "vizloc_ros.training.recipes.register_recipe") from None
