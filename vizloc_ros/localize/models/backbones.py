"""ImageNet backbones from torchvision, as feature extractors (B, 3, H, W) -> (B, C).

Networks are always constructed with ``weights=None``: nothing is ever downloaded
(DESIGN.md, "No downloads at run time"). ImageNet initialisation is opt-in through
``pretrained``:

* a path to a local file: a torchvision ``.pth`` state dict (read with
  ``torch.load(weights_only=True)``, the restricted loader that runs no code) or a
  ``.safetensors`` file;
* ``"torch-cache"`` (or ``True``): the file torchvision would have downloaded, taken
  from the torch hub cache (``$TORCH_HOME/hub/checkpoints``) if it is already there.

A missing file is a ``FileNotFoundError`` that says where the file was expected and
where it can be fetched by hand.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn

TORCH_CACHE = "torch-cache"


@dataclass(frozen=True)
class BackboneSpec:
    constructor: Callable[..., nn.Module]
    weights_enum: str          # torchvision weights enum name, only used to find the URL
    feature_dim: int
    kwargs: tuple = ()


_SPECS: dict[str, BackboneSpec] = {
    # transform_input=True: torchvision's GoogLeNet weights were ported from TensorFlow
    # and expect that conversion from ImageNet normalisation. Set always, so the network
    # computes the same function whether or not it was ImageNet-initialised.
    "googlenet": BackboneSpec(torchvision.models.googlenet, "GoogLeNet_Weights", 1024,
                              (("aux_logits", False), ("transform_input", True),
                               ("init_weights", True))),
    "resnet18": BackboneSpec(torchvision.models.resnet18, "ResNet18_Weights", 512),
    "resnet34": BackboneSpec(torchvision.models.resnet34, "ResNet34_Weights", 512),
    "resnet50": BackboneSpec(torchvision.models.resnet50, "ResNet50_Weights", 2048),
}


def available_backbones() -> list[str]:
    return sorted(_SPECS)


def _spec(name: str) -> BackboneSpec:
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; available backbones: "
                         f"{', '.join(available_backbones())}") from None


def imagenet_weights_url(name: str) -> str:
    """Where torchvision publishes the ImageNet weights of ``name`` (for the error message
    and the cache file name; never fetched by this package)."""
    return getattr(torchvision.models, _spec(name).weights_enum).IMAGENET1K_V1.url


def torch_cache_path(name: str) -> Path:
    """The path torchvision's downloader would have stored the weights of ``name`` at."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(imagenet_weights_url(name))


def build_backbone(name: str, pretrained: str | os.PathLike | bool | None = None):
    """Return ``(module, feature_dim)``: the torchvision network with its classifier
    replaced by identity, so that ``module(images)`` is the globally pooled feature."""
    spec = _spec(name)
    net = spec.constructor(weights=None, **dict(spec.kwargs))
    if pretrained:
        load_imagenet_weights(net, name, pretrained)
    # The classifier (and GoogLeNet's pre-classifier dropout) belong to ImageNet
    # classification; the pose head has its own dropout.
    net.fc = nn.Identity()
    if hasattr(net, "dropout"):
        net.dropout = nn.Identity()
    return net, spec.feature_dim


def _resolve_pretrained(name: str, pretrained) -> Path:
    if pretrained is True or pretrained == TORCH_CACHE:
        path = torch_cache_path(name)
        if not path.is_file():
            raise FileNotFoundError(
                f"ImageNet weights for backbone {name!r} are not in the torch cache: expected "
                f"{path}. vizloc_ros never downloads; fetch {imagenet_weights_url(name)} into "
                "that folder yourself, pass a local file path, or use pretrained=None.")
        return path
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ImageNet weights file for backbone {name!r} not found: {path}")
    return path


def load_imagenet_weights(net: nn.Module, name: str, pretrained) -> Path:
    """Load a torchvision ImageNet state dict into ``net`` (before its classifier is
    removed). Returns the file used. Raises ``ValueError`` if the file does not fit."""
    path = _resolve_pretrained(name, pretrained)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__})")
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches are raised even with strict=False
        raise ValueError(f"{path} does not fit backbone {name!r}: {exc}") from None
    # GoogLeNet's ImageNet file also carries the auxiliary classifiers that we do not build.
    unexpected = [k for k in result.unexpected_keys if not k.startswith(("aux1.", "aux2."))]
    if result.missing_keys or unexpected:
        raise ValueError(f"{path} does not fit backbone {name!r}: missing "
                         f"{result.missing_keys[:5]}, unexpected {unexpected[:5]}")
    return path
