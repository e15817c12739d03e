"""ImageNet backbones from torchvision, as feature extractors (B, 3, H, W) -> (B, C).

Networks are always constructed with ``weights=None``, so building or loading a model
never touches the network (DESIGN.md, "No downloads at run time"). ImageNet
initialisation (for training) is opt-in through ``pretrained``:

* a path to a local file: a torchvision ``.pth`` state dict (read with
  ``torch.load(weights_only=True)``, the restricted loader that runs no code) or a
  ``.safetensors`` file;
* ``"torch-cache"`` (or ``True``): the file torchvision would have downloaded, taken
  from the torch hub cache (``$TORCH_HOME/hub/checkpoints``) if it is already there;
  never downloads;
* ``"imagenet"``: the same file, fetched from torchvision's URL into that cache first
  when it is not there yet (``torch.hub.download_url_to_file``: a temporary beside the
  target, checked against the hash prefix in torchvision's file name, then moved into
  place), the user's explicit opt-in that DESIGN.md allows. The file is then read with
  the same restricted loader as a local one (``torch.hub.load_state_dict_from_url``
  would unpickle it without that restriction).

A missing file, or one that cannot be fetched (offline), is a ``FileNotFoundError`` in
one line that says which URL and where to put the file by hand.
"""
from __future__ import annotations

import logging
import os
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn

TORCH_CACHE = "torch-cache"
#: the opt-in that fetches torchvision's ImageNet weights into the torch cache
IMAGENET = "imagenet"

LOG = logging.getLogger(__name__)


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
    """Where torchvision publishes the ImageNet weights of ``name`` (the cache file name,
    the error messages, and the download of ``pretrained="imagenet"``)."""
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


def fetch_imagenet_weights(name: str) -> Path:
    """The torch-cache file of ``name``'s ImageNet weights, downloaded from torchvision's
    URL first when it is not there (``pretrained="imagenet"``). Offline, or a download that
    fails its hash check, is a one-line ``FileNotFoundError`` naming the URL and where to
    put the file by hand."""
    path = torch_cache_path(name)
    if path.is_file():
        return path
    url = imagenet_weights_url(name)
    LOG.info("pretrained: imagenet: fetching %s into %s", url, path)
    # torchvision's file names carry the first digits of the file's sha256 (resnet18-f37072fd.pth)
    stem = path.name.split(".")[0]
    hash_prefix = stem.rsplit("-", 1)[1] if "-" in stem else None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), hash_prefix=hash_prefix, progress=True)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:  # offline, HTTP error, bad hash
        reason = getattr(exc, "reason", None) or exc
        raise FileNotFoundError(
            f"pretrained: imagenet could not fetch {url} ({str(reason).splitlines()[0] if str(reason) else type(exc).__name__}); "
            f"download it by hand into {path.parent} (keeping the name {path.name}), "
            "or give pretrained a local file path") from None
    return path


def _resolve_pretrained(name: str, pretrained) -> Path:
    if pretrained == IMAGENET:
        return fetch_imagenet_weights(name)
    if pretrained is True or pretrained == TORCH_CACHE:
        path = torch_cache_path(name)
        if not path.is_file():
            raise FileNotFoundError(
                f"ImageNet weights for backbone {name!r} are not in the torch cache: expected "
                f"{path}. pretrained=torch-cache never downloads: use pretrained=imagenet to fetch "
                f"{imagenet_weights_url(name)} into that folder, fetch it yourself, pass a local "
                "file path, or use pretrained=None.")
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
