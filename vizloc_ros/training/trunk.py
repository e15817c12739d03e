"""Training a head on a shipped, frozen trunk: copy, freeze, cache once, reference.

Why: on a 2-core CPU a ResNet or GoogLeNet trunk costs ~20 ms per frame forward and
three times that with a backward pass, so a sequence model or a second head trained end
to end takes hours. Most of the seed family adds to a trunk what the demo's PoseNet and
MapNet already learned (LSTM-PoseNet reads PoseNet's feature, VidLoc an LSTM over the
per-frame features, VLocNet an odometry stream beside the absolute one, MapNet+ more
terms on MapNet's head). With the trunk copied and frozen, the trunk's output for a
training frame never changes: it is computed once (:func:`trunk_features`, kept on disk
under ``$XDG_CACHE_HOME/vizloc_ros/features`` keyed by the trunk's sha256, the input and
the frames), and the head trains on it in minutes.

The config's ``trunk`` block (``vizloc-train``)::

    trunk:
      from: weights/mapnet_demo.safetensors   # a vizloc checkpoint
      copy: [backbone, fc_feat]      # modules copied (or {ours: theirs} when named differently)
      freeze: [backbone]             # of those, the ones not trained (BN statistics kept too)
      cache: backbone                # a frozen module whose output is computed once per frame
      reference: true                # the checkpoint names `from` and its sha256 instead of
                                     # storing the frozen tensors again

What is not possible with a cached trunk: image augmentation (colour jitter, random crops)
changes the trunk's output, so it is refused rather than silently ignored.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vizloc_ros.files import write_bytes
from vizloc_ros.localize.models.checkpoint import FrozenTensors, file_sha256, load_checkpoint
from vizloc_ros.localize.preprocess import InputSpec, preprocess

LOG = logging.getLogger(__name__)

TRUNK_DEFAULTS = {"from": None, "copy": [], "freeze": [], "cache": None, "reference": True}


class TrunkError(ValueError):
    """The ``trunk`` block cannot be applied to the model (one line, names the key)."""


def _prefix(name: str) -> str:
    name = str(name).strip()
    if not name or name.startswith(".") or " " in name:
        raise TrunkError(f"trunk: {name!r} is not a module name")
    return name if name.endswith(".") else name + "."


@dataclass
class TrunkPlan:
    """The checked ``trunk`` block."""

    source: Path | None = None
    copy: dict[str, str] = field(default_factory=dict)  # our prefix -> the source's
    freeze: list[str] = field(default_factory=list)     # our prefixes
    cache: str | None = None                            # a module attribute of the model
    reference: bool = True

    @classmethod
    def from_config(cls, block: dict | None) -> "TrunkPlan":
        if block is not None and not isinstance(block, dict):
            raise TrunkError(f"trunk must be a mapping of options ({', '.join(TRUNK_DEFAULTS)}), got {block!r}")
        block = {**TRUNK_DEFAULTS, **(block or {})}
        unknown = sorted(set(block) - set(TRUNK_DEFAULTS))
        if unknown:
            raise TrunkError(f"unknown trunk option(s) {unknown}; options: {', '.join(TRUNK_DEFAULTS)}")
        source = block["from"]
        copy = block["copy"] or []
        if isinstance(copy, dict):
            copy = {_prefix(k): _prefix(v) for k, v in copy.items()}
        elif isinstance(copy, (list, tuple)):
            copy = {_prefix(k): _prefix(k) for k in copy}
        else:
            raise TrunkError(f"trunk.copy must be a list of module names or a mapping, got {copy!r}")
        freeze = block["freeze"] or []
        if not isinstance(freeze, (list, tuple)):
            raise TrunkError(f"trunk.freeze must be a list of module names, got {freeze!r}")
        freeze = [_prefix(k) for k in freeze]
        cache = block["cache"]
        if not isinstance(block["reference"], bool):
            raise TrunkError(f"trunk.reference must be true or false, got {block['reference']!r}")
        if source is None:
            if copy or freeze or cache:
                raise TrunkError("trunk.copy / freeze / cache need trunk.from (the checkpoint to copy from)")
            return cls()
        if not copy:
            raise TrunkError("trunk.from needs trunk.copy: the modules to take from it")
        not_copied = [p for p in freeze if not any(p.startswith(c) or c.startswith(p) for c in copy)]
        if not_copied:
            raise TrunkError(f"trunk.freeze {not_copied} are not copied: only copied modules can be frozen")
        if cache is not None:
            cache = str(cache)
            if not any(_prefix(cache).startswith(p) for p in freeze):
                raise TrunkError(f"trunk.cache {cache!r} must be frozen (in trunk.freeze): a trained module "
                                 "changes its output every step")
        return cls(Path(str(source)).expanduser(), copy, freeze, cache, bool(block["reference"]))

    @property
    def active(self) -> bool:
        return self.source is not None

    def is_frozen(self, name: str) -> bool:
        return any(name.startswith(p) for p in self.freeze)


def apply_trunk(model: nn.Module, plan: TrunkPlan) -> FrozenTensors | None:
    """Copy the planned tensors from ``plan.source`` into ``model`` and freeze the frozen
    ones. Returns the :class:`FrozenTensors` to reference when saving (None when nothing
    is frozen or ``reference`` is off)."""
    if not plan.active:
        return None
    if not plan.source.is_file():
        raise TrunkError(f"trunk.from {plan.source} does not exist")
    try:
        source_model, _ = load_checkpoint(plan.source)
    except ValueError as exc:
        raise TrunkError(f"trunk.from: {exc}") from None
    theirs = source_model.state_dict()
    ours = model.state_dict()
    copied = {}
    for our_prefix, their_prefix in plan.copy.items():
        names = [n for n in theirs if n.startswith(their_prefix)]
        if not names:
            raise TrunkError(f"trunk.copy: {plan.source} has no module {their_prefix[:-1]!r}")
        for name in names:
            target = our_prefix + name[len(their_prefix):]
            if target not in ours:
                raise TrunkError(f"trunk.copy: the model has no tensor {target} (from {plan.source}: {name})")
            if ours[target].shape != theirs[name].shape:
                raise TrunkError(f"trunk.copy: {target} is {tuple(ours[target].shape)} in the model but "
                                 f"{tuple(theirs[name].shape)} in {plan.source}")
            copied[target] = theirs[name]
        missing = [n for n in ours if n.startswith(our_prefix) and n not in copied]
        if missing:
            raise TrunkError(f"trunk.copy: {plan.source} lacks {missing[:3]} of the model's {our_prefix[:-1]!r}")
    model.load_state_dict(copied, strict=False)
    frozen = [n for n, p in model.named_parameters() if plan.is_frozen(n)]
    if plan.freeze and not frozen:
        raise TrunkError(f"trunk.freeze {[p[:-1] for p in plan.freeze]} names no parameter of the model")
    for name, parameter in model.named_parameters():
        if plan.is_frozen(name):
            parameter.requires_grad_(False)
    LOG.info("trunk: %d tensors copied from %s, %d parameters frozen", len(copied), plan.source, len(frozen))
    if not plan.freeze or not plan.reference:
        return None
    reference = {p: plan.copy[c] + p[len(c):] for p in plan.freeze for c in plan.copy if p.startswith(c)}
    reference.update({c: plan.copy[c] for p in plan.freeze for c in plan.copy if c.startswith(p)})
    return FrozenTensors(plan.source, reference)


def keep_frozen_in_eval(model: nn.Module, plan: TrunkPlan) -> None:
    """After ``model.train()``: frozen modules stay in eval mode, so their batch-norm
    statistics (which are not parameters) do not move either."""
    for name, module in model.named_modules():
        if name and plan.is_frozen(name + "."):
            module.eval()


@contextlib.contextmanager
def trunk_replaced(model: nn.Module, name: str | None):
    """While training on cached trunk outputs the model's trunk module is the identity:
    its input is the cached output. The real module is back for validation and saving."""
    if name is None:
        yield
        return
    real = getattr(model, name)
    setattr(model, name, nn.Identity())
    try:
        yield
    finally:
        setattr(model, name, real)


def cache_module(model: nn.Module, plan: TrunkPlan) -> nn.Module:
    module = getattr(model, plan.cache, None) if plan.cache else None
    if not isinstance(module, nn.Module):
        raise TrunkError(f"trunk.cache: {type(model).__name__} has no module {plan.cache!r}")
    return module


def _frames_key(dataset) -> str:
    """What identifies the frames of a dataset: its image paths, stamps and poses."""
    digest = hashlib.sha256()
    for path, t, q, stamp in dataset.items:
        digest.update(f"{os.path.abspath(path)}|{stamp:.6f}|".encode())
        digest.update(np.asarray(t, dtype=np.float64).tobytes())
    return digest.hexdigest()


def _cached_copy(plan: TrunkPlan) -> dict:
    """The copy entries that make the cached module (what its output depends on)."""
    cache = plan.cache + "."
    return {k: v for k, v in plan.copy.items() if k.startswith(cache) or cache.startswith(k)}


def features_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vizloc_ros" / "features"


def trunk_features(model: nn.Module, plan: TrunkPlan, dataset, spec: InputSpec, device,
                   batch_size: int = 32, progress: bool = True, cache_dir: Path | None = None) -> np.ndarray:
    """The frozen trunk's output (fp16) for every frame of ``dataset`` (a PoseDataset),
    computed once and kept on disk; later runs with the same trunk file, module, input
    and frames read it back."""
    return _cached_outputs(model, plan, len(dataset), lambda i: dataset[i]["image"], _frames_key(dataset),
                           spec, device, batch_size, progress, cache_dir)


def sequence_features(model: nn.Module, plan: TrunkPlan, sequence, spec: InputSpec, device,
                      batch_size: int = 32, progress: bool = True, cache_dir: Path | None = None) -> np.ndarray:
    """The same for the images of an unlabeled recording (``training.unlabeled``), keyed by
    the recording's name, stamps and image bytes' digest."""
    digest = hashlib.sha256(f"{sequence.name}|{len(sequence)}|".encode())
    digest.update(np.asarray(sequence.stamps, dtype=np.float64).tobytes())
    for image in sequence.images[:: max(len(sequence) // 16, 1)]:
        digest.update(np.ascontiguousarray(image).tobytes())
    return _cached_outputs(model, plan, len(sequence), lambda i: sequence.images[i], digest.hexdigest(),
                           spec, device, batch_size, progress, cache_dir)


@torch.inference_mode()
def _cached_outputs(model, plan: TrunkPlan, count: int, image, frames_key: str, spec: InputSpec, device,
                    batch_size: int, progress: bool, cache_dir: Path | None) -> np.ndarray:
    from tqdm import tqdm

    module = cache_module(model, plan)
    key = hashlib.sha256(json.dumps({
        "trunk": file_sha256(plan.source), "module": plan.cache, "copy": _cached_copy(plan),
        "input": spec.to_meta(), "frames": frames_key, "n": count}, sort_keys=True).encode()).hexdigest()[:24]
    folder = Path(cache_dir) if cache_dir is not None else features_cache_dir()
    path = folder / f"{plan.cache}-{key}.npy"
    if path.is_file():
        try:
            features = np.load(path)
            if len(features) == count:
                LOG.info("trunk features of %d frames read from %s", count, path)
                return features
        except (OSError, ValueError) as exc:
            LOG.warning("cached trunk features %s unreadable (%s): computing them again", path, exc)
    was_training = module.training
    module.eval()
    chunks = []
    try:
        bar = tqdm(range(0, count, batch_size), desc=f"trunk features ({plan.cache})",
                   disable=not progress, dynamic_ncols=True, leave=False)
        for start in bar:
            images = np.stack([image(i) for i in range(start, min(start + batch_size, count))])
            x = preprocess(torch.from_numpy(images).to(device), spec)
            chunks.append(module(x).to("cpu", torch.float16).numpy())
    finally:
        module.train(was_training)
    features = np.concatenate(chunks)
    buffer = io.BytesIO()
    np.save(buffer, features)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_bytes(path, buffer.getvalue(), what="trunk feature cache")
    except OSError as exc:  # a cache: training goes on without it (the next run recomputes)
        LOG.warning("trunk features not cached (%s): %s", path, exc)
    else:
        LOG.info("trunk features of %d frames (%s each) cached in %s", count, features.shape[1:], path)
    return features


class FeatureFrames:
    """A PoseDataset's frames with the cached trunk output in place of the image: samples
    carry ``feature`` and no ``image``; poses, stamps and length are the dataset's."""

    def __init__(self, base, features: np.ndarray):
        if len(features) != len(base):
            raise ValueError(f"{len(features)} features for {len(base)} frames")
        self.base, self.features = base, features

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        path, t, q, stamp = self.base.items[index]
        return {"feature": self.features[index], "t": t.copy(), "q": q.copy(), "stamp": float(stamp),
                "index": int(index)}

    def poses(self):
        return self.base.poses()

    def stamps(self):
        return self.base.stamps()
