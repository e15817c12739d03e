"""`vizloc-train`: train a pose regressor on a dataset, keep the best checkpoint.

Config is YAML (see ``config/train_mapnet_demo.yaml``) with command-line overrides
(``--set optim.lr=1e-4``). What a user gets:

* model and loss chosen by registry name; MapNet-family losses and sequence models
  (VidLoc, VLocNet) train on tuples of frames (``tuple.steps`` / ``tuple.skip``); MapNet+
  adds tuples of unlabeled recordings with their odometry (``unlabeled``), which only
  enter through relative-pose terms;
* a progress bar with the loss, and per epoch the validation median errors;
* the best checkpoint (by ``optim.select_by``, by default the validation medians each
  divided by the mean-pose predictor's: :mod:`vizloc_ros.training.selection`) written
  atomically as safetensors + JSON, the JSON carrying the validation metrics, the rule and
  score it was kept by, and the validation error covariance the estimator uses as its
  uncertainty;
* ``--resume`` continues from ``<out>.state.safetensors`` (model, optimiser, epoch; no
  pickle anywhere), ``--seed`` makes runs repeatable, CPU or CUDA, and multi-GPU with
  ``torchrun --nproc_per_node N -m vizloc_ros.training.train ...`` (DistributedDataParallel).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml

from vizloc_ros import geometry
from vizloc_ros.files import OutputError, check_not_a_link, sweep_stale, write_bytes
from vizloc_ros.localize.estimator import resolve_device
from vizloc_ros.localize.models import build_model, load_checkpoint, save_checkpoint
from vizloc_ros.localize.models.sequence import FrameStream
from vizloc_ros.localize.preprocess import InputSpec, preprocess
from vizloc_ros.metrics import evaluate_poses
from vizloc_ros.training.datasets import TupleDataset, open_dataset, translation_stats
from vizloc_ros.training.evaluate import drift_covariance, validation_covariance
from vizloc_ros.training.losses import build_loss, build_odometry_loss
from vizloc_ros.training.recipes import recipe_for
from vizloc_ros.training.selection import (DEFAULT_RULE, MEAN_POSE, check_rule, mean_pose_baseline,
                                           selection_score)
from vizloc_ros.training.trunk import (TRUNK_DEFAULTS, FeatureFrames, TrunkError, TrunkPlan, apply_trunk,
                                       keep_frozen_in_eval, sequence_features, trunk_features,
                                       trunk_replaced)
from vizloc_ros.training.unlabeled import open_unlabeled

LOG = logging.getLogger("vizloc-train")

DEFAULTS = {
    "model": {"name": "mapnet", "args": {}, "init_from": None},
    # a frozen trunk copied from a shipped checkpoint, its output cached (training/trunk.py)
    "trunk": dict(TRUNK_DEFAULTS),
    # learned weights start equal: geomapnet's s_q = -3 trains a from-scratch trunk for
    # rotation first and, where the heading hardly varies (a car on a road), never for
    # translation (issue #18; vizloc_ros.training.losses says why)
    "loss": {"translation": "l1", "rotation": "logq", "combine": "learned",
             "s_t": 0.0, "s_q": 0.0, "relative": True},
    "data": {"kind": "7scenes", "root": None, "train_split": "train", "val_split": "test",
             "val_root": None, "preload": True, "kwargs": {}},
    "input": {"resize": 256, "crop": [224, 224]},
    "augment": {"color_jitter": 0.2, "random_crop": True},
    "tuple": {"steps": 3, "skip": 10, "stride": 1},
    "optim": {"lr": 1e-4, "weight_decay": 5e-4, "epochs": 30, "batch_size": 16,
              "val_every": 1, "schedule": "cosine", "select_by": DEFAULT_RULE},
    "threads": 0,
    "scene": "unnamed",
    "seed": 0,
    "device": "auto",
    "workers": 0,
    "storage_dtype": "fp32",
    "amp": "none",
    "out": "weights/model",
    "max_steps": None,
    # unlabeled recordings with odometry (MapNet+): relative-pose terms only
    "unlabeled": {"kind": "bag", "root": None, "kwargs": {}, "steps": 3, "skip": 5, "stride": 1,
                  "batch_size": None,
                  "loss": {"translation": "l1", "rotation": "logq", "combine": "learned",
                           "s_t": 0.0, "s_q": -3.0}},
}


class ConfigError(ValueError):
    """A training configuration value is missing, unknown or of the wrong type."""


# ----------------------------------------------------------------------------- config

def _merge(base: dict, update: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        if key not in out:
            raise ConfigError(f"unknown config key {where}{key!r}; known: {', '.join(sorted(out))}")
        if isinstance(out[key], dict) and key not in ("args", "kwargs", "loss"):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {where}{key} must be a mapping, got {value!r}")
            out[key] = _merge(out[key], value, f"{where}{key}.")
        elif key == "loss":  # any build_loss() option; build_loss names the unknown ones
            if not isinstance(value, dict):
                raise ConfigError(f"config key loss must be a mapping, got {value!r}")
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def _set_override(config: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw)
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"unknown config key {key!r}")
        node = node[part]
    if parts[-1] not in node and not key.startswith(("model.args.", "data.kwargs.", "loss.",
                                                     "unlabeled.kwargs.", "unlabeled.loss.")):
        raise ConfigError(f"unknown config key {key!r}")
    node[parts[-1]] = value


def load_config(path=None, overrides=(), **flags) -> dict:
    """Defaults <- YAML file <- flags <- ``--set`` overrides, with type checks."""
    config = copy.deepcopy(DEFAULTS)
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping")
        config = _merge(config, loaded)
    for key, value in flags.items():
        if value is not None:
            _set_override(config, f"{key}={json.dumps(value)}")
    for assignment in overrides:
        _set_override(config, assignment)
    _check_types(config)
    return config


#: the scalar config keys and what each must hold: (kind, minimum, may be empty). An
#: empty YAML value (``threads:``, ``--set out=``) reads as None: it is an error naming
#: the key, not a traceback where the value is first used.
SCALARS = {
    "threads": ("int", 0, False), "seed": ("int", 0, False), "workers": ("int", 0, False),
    "device": ("str", None, False), "scene": ("str", None, False), "out": ("str", None, False),
    "max_steps": ("int", 1, True),
    "model.name": ("str", None, False), "model.init_from": ("str", None, True),
    "data.kind": ("str", None, False), "data.train_split": ("str", None, False),
    "data.val_split": ("str", None, False), "data.val_root": ("str", None, True),
    "data.preload": ("bool", None, False),
    "input.resize": ("int", 1, False),
    "augment.color_jitter": ("float", 0, False), "augment.random_crop": ("bool", None, False),
    "tuple.steps": ("int", 1, False), "tuple.skip": ("int", 1, False), "tuple.stride": ("int", 1, False),
    "unlabeled.kind": ("str", None, False), "unlabeled.root": ("str", None, True),
    "unlabeled.steps": ("int", 1, False), "unlabeled.skip": ("int", 1, False),
    "unlabeled.stride": ("int", 1, False), "unlabeled.batch_size": ("int", 1, True),
}
#: mapping blocks that a ``--set block=`` (or ``block:`` left empty) would replace by None
MAPPINGS = ("loss", "unlabeled.loss", "model.args", "data.kwargs", "unlabeled.kwargs")
_KINDS = {"int": "an integer", "float": "a finite number", "str": "a non-empty string", "bool": "true or false"}


def _lookup(config: dict, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _store(config: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[last] = value


def _scalar(key: str, value, kind: str, minimum, optional: bool):
    """``value`` of config ``key`` checked (and a number given as text converted), or a
    :class:`ConfigError` naming the key, the value and what it must be."""
    what = _KINDS[kind] + (f" >= {minimum}" if minimum is not None else "") + (" (or null)" if optional else "")
    if value is None or (kind == "str" and value == ""):
        if optional:
            return None
        raise ConfigError(f"{key} must be {what}, got an empty value")
    if kind in ("int", "float") and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    good = {"int": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and float(v).is_integer(),
            "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
            "str": lambda v: isinstance(v, str),
            "bool": lambda v: isinstance(v, bool)}[kind](value)
    if not good or (minimum is not None and value < minimum):
        raise ConfigError(f"{key} must be {what}, got {value!r}")
    return int(value) if kind == "int" else float(value) if kind == "float" else value


def _check_types(config: dict) -> None:
    optim = config["optim"]
    for key, kind in (("lr", "float"), ("weight_decay", "float"), ("epochs", "int"),
                      ("batch_size", "int"), ("val_every", "int")):
        # lr = inf or nan would train to NaN weights and fail far from the cause
        optim[key] = _scalar(f"optim.{key}", optim[key], kind, 0, False)
    if optim["schedule"] not in ("cosine", "none"):
        raise ConfigError(f"optim.schedule must be cosine or none, got {optim['schedule']!r}")
    try:
        check_rule(optim["select_by"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if optim["batch_size"] < 1 or optim["epochs"] < 1 or optim["val_every"] < 1:
        raise ConfigError("optim.batch_size, optim.epochs and optim.val_every must be >= 1")
    for key in MAPPINGS:
        value = _lookup(config, key)
        if value is None and key in ("model.args", "data.kwargs", "unlabeled.kwargs"):
            _store(config, key, {})
        elif not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of options, got "
                              f"{'an empty value' if value is None else repr(value)}")
    if not config["data"]["root"]:
        raise ConfigError("data.root is required (the dataset folder or bag)")
    config["data"]["root"] = str(config["data"]["root"])
    for key, (kind, minimum, optional) in SCALARS.items():
        _store(config, key, _scalar(key, _lookup(config, key), kind, minimum, optional))
    if config["storage_dtype"] not in ("fp32", "fp16"):
        raise ConfigError("storage_dtype must be fp32 or fp16")
    if config["amp"] not in ("none", "bf16"):
        raise ConfigError(f"amp must be none or bf16 (mixed precision on the GPU), got {config['amp']!r}")
    crop = config["input"]["crop"]
    if isinstance(crop, int) and not isinstance(crop, bool):
        crop = [crop, crop]
    if not (isinstance(crop, (list, tuple)) and len(crop) == 2):
        raise ConfigError(f"input.crop must be an integer or [height, width], got {crop!r}")
    config["input"]["crop"] = [_scalar("input.crop", v, "int", 1, False) for v in crop]
    try:
        InputSpec.from_meta(config["input"])  # mean / std, if given
    except ValueError:
        raise ConfigError(f"input must hold resize, crop and optionally mean / std (3 numbers each, "
                          f"std > 0), got {config['input']!r}") from None


# ----------------------------------------------------------------------------- data

def open_split(config: dict, split_key: str):
    data = config["data"]
    root = data["val_root"] if split_key == "val_split" and data["val_root"] else data["root"]
    dataset = open_dataset(data["kind"], root, split=data[split_key], **(data["kwargs"] or {}))
    if len(dataset) == 0:
        raise ConfigError(f"dataset {root} ({data[split_key]}) has no frames")
    if data["preload"]:
        dataset.preload()
    dataset.check_image_sizes()  # batches stack images: one odd size is named now, not mid-epoch
    return dataset


def _collate(samples):
    """Stack samples whose images share a size; images stay uint8 (preprocessed later).
    Poses (``t``, ``q``) and relative poses (``t_rel``, ``q_rel``) when the samples have them,
    and any other array a model's training samples carry (depth, scene coordinates, ...)."""
    out = {}
    for key in ("image", "feature"):  # images, or the cached trunk outputs (training.trunk)
        if key in samples[0]:
            out[key] = torch.from_numpy(np.stack([s[key] for s in samples]))
    for key in ("t", "q", "t_rel", "q_rel"):
        if key in samples[0]:
            out[key] = torch.from_numpy(np.stack([s[key] for s in samples])).float()
    for key, value in samples[0].items():
        if key not in out and isinstance(value, np.ndarray):
            out[key] = torch.from_numpy(np.stack([s[key] for s in samples]))
    return out


def augment_batch(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Colour jitter on a normalised batch: per-image brightness / contrast gains."""
    if strength <= 0:
        return x
    b = x.shape[0]
    gain = 1.0 + strength * (2 * torch.rand(b, 1, 1, 1, generator=generator) - 1)
    bias = strength * (2 * torch.rand(b, 3, 1, 1, generator=generator) - 1)
    return x * gain.to(x) + bias.to(x)


def prepare_images(images: torch.Tensor, spec: InputSpec, device, train: bool,
                   config: dict, generator: torch.Generator) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised (N, 3, crop) on ``device``; small random crops
    (a shift of up to 1/16 of the image) and colour jitter when training."""
    images = images.to(device, non_blocking=True)
    if train and config["augment"]["random_crop"]:
        h, w = images.shape[1:3]
        dy = int(torch.randint(0, max(h // 16, 1), (1,), generator=generator))
        dx = int(torch.randint(0, max(w // 16, 1), (1,), generator=generator))
        images = images[:, dy:h - (max(h // 16, 1) - dy), dx:w - (max(w // 16, 1) - dx)]
    x = preprocess(images, spec)
    if train:
        x = augment_batch(x, float(config["augment"]["color_jitter"]), generator)
    return x.contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- validation

@torch.inference_mode()
def predict_dataset(model, dataset, spec: InputSpec, device, batch_size: int = 32,
                    relative: bool = False, covariances: list | None = None):
    """Predicted (t, q) for every frame of a dataset, in its order.

    Sequence models run online, as deployed: a FrameStream in the dataset's order, a new
    window at every gap in its stamps. ``relative=True`` (models with a relative head)
    also returns (t_rel, q_rel) per frame, the motion from the previous frame (NaN where
    the frame starts a window).
    """
    model.eval()
    stream = None
    if model.streaming:
        stream = FrameStream(model)
        stamps = dataset.stamps()
    ts, qs, rel_ts, rel_qs = [], [], [], []
    for start in range(0, len(dataset), batch_size):
        stop = min(start + batch_size, len(dataset))
        batch = _collate([dataset[i] for i in range(start, stop)])
        x = preprocess(batch["image"].to(device), spec).contiguous(memory_format=torch.channels_last)
        if stream is None:  # regressors decode their output; DSAC, NetVLAD, ... localize their own way
            t, q, cov = model.localize(x)
            if covariances is not None and cov is not None:  # the model's own, per frame
                covariances.extend(np.asarray(torch.as_tensor(cov).double().cpu()))
        else:
            out = stream.push(x, stamps[start:stop])
            raw, raw_rel = out.pose[0], out.relative
            t, q = model.decode(raw)
        ts.append(t.double().cpu().numpy())
        qs.append(q.double().cpu().numpy())
        if relative:
            t_rel, q_rel = model.decode_relative(raw_rel[0].float())
            rel_ts.append(t_rel.double().cpu().numpy())
            rel_qs.append(q_rel.double().cpu().numpy())
    if relative:
        return np.concatenate(ts), np.concatenate(qs), np.concatenate(rel_ts), np.concatenate(rel_qs)
    return np.concatenate(ts), np.concatenate(qs)


def validate(model, dataset, spec, device) -> tuple[dict, list]:
    covariances: list = []
    t_est, q_est = predict_dataset(model, dataset, spec, device, covariances=covariances)
    t_gt, q_gt = dataset.poses()
    metrics = evaluate_poses(t_est, q_est, t_gt, q_gt)
    if len(covariances) == len(t_est) > 0:
        metrics["model_cov_scale"] = model_covariance_scale(t_est, q_est, t_gt, q_gt, covariances)
    return metrics, validation_covariance(t_est, q_est, t_gt, q_gt)


def model_covariance_scale(t_est, q_est, t_gt, q_gt, covariances) -> float:
    """Factor that calibrates a model's own covariances (DSAC's inliers, ...) on the
    validation errors: median NEES / median of chi-square(6), robust to gross failures.
    The estimator multiplies the model's covariances by it."""
    dr = geometry.so3_log(geometry.quat_to_matrix(q_gt) @ np.swapaxes(geometry.quat_to_matrix(q_est), -1, -2))
    err = np.concatenate([t_gt - t_est, dr], axis=1)
    nees = []
    for e, cov in zip(err, covariances):
        try:
            nees.append(float(e @ np.linalg.solve(np.asarray(cov, dtype=float), e)))
        except np.linalg.LinAlgError:
            continue
    nees = [v for v in nees if np.isfinite(v)]
    return float(np.clip(np.median(nees) / 5.348, 1e-3, 1e6)) if nees else 1.0


def validate_relative(model, dataset, spec, device) -> tuple[dict, list | None]:
    """Per-step errors of a relative (odometry) head between consecutive frames of the
    dataset, and their 6x6 ROS-order covariance (the estimator's visual-odometry
    uncertainty); also the step lengths, to compare with an odometry's drift per step, and
    how much faster than independent steps its errors add up (``drift``:
    :func:`~vizloc_ros.training.evaluate.drift_covariance`).

    The covariance handed on is the single steps' spread, not the drift-scaled one: fed
    the drift-scaled covariance (VLocNet, demo test walk at 10 Hz, its odometry alone),
    the fusion's translation got better (0.33 -> 0.26 m) and its NEES honest (2.7 -> 1.5)
    but its rotation much worse (7.7 -> 30 deg); the fusion has to handle a loose
    odometry first (weights/README.md, "VLocNet's odometry head")."""
    _, _, t_rel, q_rel = predict_dataset(model, dataset, spec, device, relative=True)
    t_gt, q_gt = dataset.poses()
    gt_t_rel, gt_q_rel = geometry.pose_relative(t_gt[:-1], q_gt[:-1], t_gt[1:], q_gt[1:])
    t_rel, q_rel = t_rel[1:], q_rel[1:]
    ok = np.all(np.isfinite(t_rel), axis=1) & np.all(np.isfinite(q_rel), axis=1)
    if not ok.any():
        return {"frames": 0}, None
    metrics = evaluate_poses(t_rel[ok], q_rel[ok], gt_t_rel[ok], gt_q_rel[ok])
    metrics["median_step_m"] = float(np.median(np.linalg.norm(gt_t_rel[ok], axis=1)))
    _, metrics["drift"] = drift_covariance(t_rel, q_rel, gt_t_rel, gt_q_rel)
    return metrics, validation_covariance(t_rel[ok], q_rel[ok], gt_t_rel[ok], gt_q_rel[ok])


# ----------------------------------------------------------------------------- resume state

def save_train_state(path: Path, model, optimizer, loss_fn, epoch: int, best: float,
                     selected_by: str = DEFAULT_RULE) -> None:
    """Model, loss and optimiser tensors in safetensors, scalars in JSON (no pickle);
    ``best`` is the best score so far under the rule ``selected_by``."""
    from safetensors.torch import save

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"loss.{k}": v.detach().cpu().contiguous() for k, v in loss_fn.state_dict().items()})
    scalars = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    info = {"epoch": epoch, "best": best, "selected_by": selected_by, "optim_scalars": scalars,
            "architecture": model.architecture,
            "param_groups": [{k: v for k, v in g.items() if k != "params"}
                             for g in optimizer.state_dict()["param_groups"]]}
    # serialised here and written by vizloc_ros.files: save_file's own temporary is a
    # mode-0600 .tmpXXXX that a kill -9 leaves behind for good
    write_bytes(path, save(tensors, metadata={"info": json.dumps(info)}), what="training state")


def load_train_state(path: Path, model, optimizer, loss_fn,
                     selected_by: str = DEFAULT_RULE) -> tuple[int, float]:
    """Restore what :func:`save_train_state` wrote; a state of another model or loss is a
    :class:`ConfigError` in one line (torch's own message lists every tensor). Returns
    (epoch, best score); a best score measured by another rule than ``selected_by`` is
    not comparable, so it comes back as inf (the next validation is kept)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            info = json.loads(handle.metadata()["info"])
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own types for damaged files
        raise ConfigError(f"--resume: cannot read the training state {path} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else 'damaged'})") from None
    saved = info.get("architecture")
    if saved is not None and saved != model.architecture:
        raise ConfigError(f"--resume: the training state {path} is of a {saved!r} model, not "
                          f"{model.architecture!r}; train into another --out, or resume with model.name={saved}")
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        loss_fn.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("loss.")})
    except RuntimeError as exc:
        first = str(exc).splitlines()[0].rstrip(":. ")
        raise ConfigError(f"--resume: the training state {path} does not fit this {model.architecture} "
                          f"model and loss (other model.args or loss settings?): {first}") from None
    state = optimizer.state_dict()
    new_state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            new_state.setdefault(int(index), {})[name] = value
    for key, value in info["optim_scalars"].items():
        index, name = key.split(".", 1)
        new_state.setdefault(int(index), {})[name] = value
    for group, saved_group in zip(state["param_groups"], info["param_groups"]):
        group.update(saved_group)
    state["state"] = new_state
    try:
        optimizer.load_state_dict(state)
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"--resume: the optimiser state in {path} does not fit this model: "
                          f"{str(exc).splitlines()[0]}") from None
    # states written before optim.select_by existed were scored by the old rule
    saved_rule = info.get("selected_by", "translation+rotation/10")
    if saved_rule != selected_by:
        LOG.warning("--resume: the best score so far was measured by %s, not optim.select_by=%s; "
                    "the next validated epoch replaces the checkpoint", saved_rule, selected_by)
        return int(info["epoch"]), math.inf
    return int(info["epoch"]), float(info["best"])


# ----------------------------------------------------------------------------- training

def _seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _distributed():
    """(rank, world_size, local_rank) under torchrun, else (0, 1, 0)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


class TrainingForward(torch.nn.Module):
    """One training forward pass: the labeled batch (frames (B, 3, H, W) or clips
    (B, T, 3, H, W)) and, for MapNet+, the unlabeled clips, in one call (one forward per
    backward, as DistributedDataParallel needs). Returns the model's clip outputs
    (``pose``, ``relative``) and ``unlabeled`` (raw poses of the unlabeled clips)."""

    def __init__(self, model, clips: bool | None = None):
        super().__init__()
        self.model = model
        #: the batches are clips; None: tell from the shape (images: 5-d clips). Cached trunk
        #: outputs have any shape, so the trainer says.
        self.clips = clips

    def forward(self, x: torch.Tensor, unlabeled: torch.Tensor | None = None) -> dict:
        clips = x.dim() == 5 if self.clips is None else self.clips
        out = dict(self.model.forward_clips(x)) if clips else {"pose": self.model(x)}
        if unlabeled is not None:
            out["unlabeled"] = self.model.forward_clips(unlabeled)["pose"]
        return out


def _prepare_batch_images(images: torch.Tensor, spec, device, config, generator) -> torch.Tensor:
    """uint8 (B, H, W, 3) or clips (B, T, H, W, 3) -> normalised (B[, T], 3, h, w)."""
    shape = images.shape
    x = prepare_images(images.reshape(-1, *shape[-3:]), spec, device, True, config, generator)
    return x.unflatten(0, tuple(shape[:2])) if len(shape) == 5 else x


def _batches(bar, model, trunk: TrunkPlan):
    """The epoch's batches; with a cached trunk the model's trunk module is the identity
    meanwhile (its input is the cached output), and is back for validation."""
    with trunk_replaced(model, trunk.cache):
        yield from bar


def _check_cacheable(config: dict, custom_loss, recipe) -> None:
    """A cached trunk output is computed once, from the plain image: anything that changes
    the image per step cannot be honoured, and is refused rather than ignored."""
    if float(config["augment"]["color_jitter"]) > 0 or config["augment"]["random_crop"]:
        raise ConfigError("trunk.cache computes the trunk's output once per frame: set augment.color_jitter: 0 "
                          "and augment.random_crop: false (augmentation would change it every step)")
    if custom_loss is not None and not recipe.reads_cached_trunk:
        raise ConfigError(f"trunk.cache is for pose-regression losses; {config['model']['name']} trains on its "
                          "own samples")


def _forever(loader):
    epoch = 0
    while True:
        if getattr(loader.sampler, "set_epoch", None):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def _check_relative_head(model, loss_fn) -> bool:
    """Whether the loss trains the model's relative (odometry) head; a loss that needs one
    the model lacks is a ConfigError."""
    wants = bool(getattr(loss_fn, "trains_relative_head", False))
    if wants and not model.has_relative_head:
        raise ConfigError(f"loss.odometry trains a relative-pose head, which {model.architecture!r} "
                          "does not have (vlocnet does)")
    if model.has_relative_head and not wants:
        LOG.warning("%s has a relative-pose head that this loss does not train (set loss.odometry: true)",
                    model.architecture)
    return wants


def _open_unlabeled(config: dict, model, recipe):
    """(unlabeled tuples, their odometry loss) when ``unlabeled.root`` is set, else (None, None)."""
    block = config["unlabeled"]
    if not block["root"]:
        if recipe.needs_unlabeled:
            raise ConfigError(f"{model.architecture} trains on unlabeled sequences with odometry: set "
                              "unlabeled.root (a bag or a folder of bags with images and an odometry topic)")
        return None, None
    dataset = open_unlabeled(block["kind"], block["root"], steps=int(block["steps"]),
                             skip=int(block["skip"]), stride=int(block["stride"]), **(block["kwargs"] or {}))
    if len(dataset) == 0:
        raise ConfigError(f"unlabeled data {block['root']} is too short for tuples of "
                          f"steps={block['steps']}, skip={block['skip']}")
    return dataset, build_odometry_loss(block["loss"])


def checkpoint_outputs(out) -> list[Path]:
    """What a training run into ``out`` writes: the checkpoint, its JSON, its resume state."""
    out = Path(out)
    return [out.with_name(out.name + suffix) for suffix in (".safetensors", ".json", ".state.safetensors")]


def check_out(config: dict, resume: bool, overwrite: bool) -> None:
    """Before any work: refuse to replace an existing checkpoint at ``out`` (the demo
    configs point at the shipped weights) unless ``--overwrite`` or ``--resume`` says so,
    and refuse a link or a second run writing it now."""
    out = Path(config["out"])
    existing = [p for p in checkpoint_outputs(out) if p.exists() or p.is_symlink()]
    try:
        for path in checkpoint_outputs(out):
            check_not_a_link(path, "checkpoint file")
            sweep_stale(path, "checkpoint file")
    except OutputError as exc:
        raise ConfigError(str(exc)) from None
    if existing and not (overwrite or resume):
        raise ConfigError(f"out {out}: {existing[0]} exists; pass --overwrite to replace it, --resume to "
                          "continue its training, or another --out")


def train(config: dict, resume: bool = False, progress: bool = True, overwrite: bool = False) -> dict:
    """Run training; returns the best validation metrics. Writes ``<out>.safetensors/.json``
    (refused where a checkpoint exists, unless ``overwrite`` or ``resume``).

    Denormals are flushed while training (fresh batch-norm statistics produce them and
    they make CPU kernels ~30x slower); the process-wide setting is restored afterwards.
    """
    check_out(config, resume, overwrite)
    torch.set_flush_denormal(True)
    try:
        return _train(config, resume, progress)
    finally:
        torch.set_flush_denormal(False)


def _train(config: dict, resume: bool, progress: bool) -> dict:
    from tqdm import tqdm

    rank, world, local_rank = _distributed()
    if int(config["threads"]) > 0:
        torch.set_num_threads(int(config["threads"]))
    generator = _seed_everything(int(config["seed"]) + rank)
    device = resolve_device(config["device"])
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: pick the fastest kernels once
    use_bf16 = config["amp"] == "bf16"
    spec = InputSpec.from_meta(config["input"])
    train_set = open_split(config, "train_split")
    val_set = open_split(config, "val_split")
    mean, std = translation_stats(train_set)

    model = build_model(config["model"]["name"], **(config["model"]["args"] or {}))
    if config["model"]["init_from"]:
        # fine-tuning (e.g. MapNet from a converged checkpoint); the architecture must match
        init, _ = load_checkpoint(config["model"]["init_from"])
        try:
            model.load_state_dict(init.state_dict())
        except RuntimeError as exc:
            raise ConfigError(f"model.init_from {config['model']['init_from']} does not fit "
                              f"{config['model']['name']}: {exc}") from None
    try:
        trunk = TrunkPlan.from_config(config["trunk"])
        frozen = apply_trunk(model, trunk)
    except TrunkError as exc:
        raise ConfigError(str(exc)) from None
    model.set_pose_stats(mean, std)
    model = model.to(device).to(memory_format=torch.channels_last)
    # the method's recipe: models that are not pose regressors bring their own loss and samples
    recipe = recipe_for(model.architecture)
    custom_loss = recipe.loss(model, config)
    loss_fn = (build_loss(dict(config["loss"])) if custom_loss is None else custom_loss).to(device)
    relative = custom_loss is None and bool(config["loss"].get("relative", False))
    # tuples of frames: MapNet-style losses, and models that read clips (VidLoc, VLocNet)
    clips = relative or recipe.trains_on_clips or getattr(loss_fn, "trains_relative_head", False)
    relative_head = _check_relative_head(model, loss_fn)
    if model.pose_depends_on_history and int(config["tuple"]["steps"]) != model.context_frames:
        LOG.warning("training clips of tuple.steps=%s frames, but %s reads the last %d at run time; "
                    "set them equal", config["tuple"]["steps"], model.architecture, model.context_frames)
    frames = train_set
    if trunk.cache:
        _check_cacheable(config, custom_loss, recipe)
    if trunk.cache and custom_loss is None:
        frames = FeatureFrames(train_set, trunk_features(model, trunk, train_set, spec, device,
                                                         progress=progress and rank == 0))
    source = TupleDataset(frames, config["tuple"]["steps"], config["tuple"]["skip"],
                          stride=int(config["tuple"]["stride"])) if clips else frames
    if custom_loss is not None:
        cached = {}
        if trunk.cache:  # the recipe's samples carry the cached trunk output of the frames it uses
            cached["trunk_features"] = lambda dataset: trunk_features(model, trunk, dataset, spec, device,
                                                                      progress=progress and rank == 0)
        source = recipe.samples(model, train_set, config, spec, **cached)
    if len(source) == 0:
        raise ConfigError("the training split is too short for the requested tuples "
                          f"(steps={config['tuple']['steps']}, skip={config['tuple']['skip']})")
    unlabeled_set, unlabeled_loss = _open_unlabeled(config, model, recipe)
    if unlabeled_set is not None and trunk.cache:
        for sequence in unlabeled_set.sequences:
            sequence.features = sequence_features(model, trunk, sequence, spec, device,
                                                  progress=progress and rank == 0)
            sequence.images = []  # the features stand for them; the memory is given back
    if unlabeled_loss is not None:
        unlabeled_loss = unlabeled_loss.to(device)
        loss_state = torch.nn.ModuleDict({"labeled": loss_fn, "unlabeled": unlabeled_loss})
    else:
        loss_state = loss_fn
    params = [p for p in model.parameters() if p.requires_grad] + list(loss_state.parameters())
    optimizer = torch.optim.Adam(params, lr=config["optim"]["lr"],
                                 weight_decay=config["optim"]["weight_decay"])
    epochs = config["optim"]["epochs"]
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=0.01 * config["optim"]["lr"]) \
        if config["optim"]["schedule"] == "cosine" else None
    out = Path(config["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    state_path = out.with_name(out.name + ".state.safetensors")
    start_epoch, best = 0, math.inf
    if resume:
        if not state_path.is_file():
            raise ConfigError(f"--resume: no training state at {state_path}")
        start_epoch, best = load_train_state(state_path, model, optimizer, loss_state,
                                             config["optim"]["select_by"])
        if schedule is not None:
            with warnings.catch_warnings():  # replaying the schedule, no optimiser step needed
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(start_epoch):
                    schedule.step()
        LOG.info("resumed from %s at epoch %d (best %.3f)", state_path, start_epoch, best)

    net = TrainingForward(model, clips=bool(clips) if custom_loss is None else None)
    sampler = unlabeled_sampler = None
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        from torch.utils.data.distributed import DistributedSampler

        net = DistributedDataParallel(net, device_ids=[local_rank] if device.type == "cuda" else None)
        sampler = DistributedSampler(source, seed=int(config["seed"]))
        if unlabeled_set is not None:
            unlabeled_sampler = DistributedSampler(unlabeled_set, seed=int(config["seed"]))
    loader = torch.utils.data.DataLoader(
        source, batch_size=config["optim"]["batch_size"], shuffle=sampler is None,
        sampler=sampler, collate_fn=_collate, num_workers=int(config["workers"]),
        drop_last=len(source) > config["optim"]["batch_size"], generator=generator,
        pin_memory=device.type == "cuda", persistent_workers=int(config["workers"]) > 0)
    unlabeled_batches = None
    if unlabeled_set is not None:
        size = int(config["unlabeled"]["batch_size"] or config["optim"]["batch_size"])
        unlabeled_batches = _forever(torch.utils.data.DataLoader(
            unlabeled_set, batch_size=size, shuffle=unlabeled_sampler is None,
            sampler=unlabeled_sampler, collate_fn=_collate, num_workers=int(config["workers"]),
            drop_last=len(unlabeled_set) > size, generator=generator,
            pin_memory=device.type == "cuda"))

    best_metrics: dict = {}
    select_by = config["optim"]["select_by"]
    baseline = mean_pose_baseline(*train_set.poses(), *val_set.poses()) if select_by == MEAN_POSE else None
    t_mean = torch.as_tensor(mean, dtype=torch.float32, device=device)
    t_std = torch.as_tensor(std, dtype=torch.float32, device=device)
    steps = 0
    started = time.time()
    for epoch in range(start_epoch, epochs):
        epoch_started = time.time()
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        keep_frozen_in_eval(model, trunk)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress or rank != 0,
                   dynamic_ncols=True, leave=False)
        running = None
        batches = _batches(bar, model, trunk)
        for batch in batches:
            x = (batch["feature"].to(device).float() if trunk.cache else
                 _prepare_batch_images(batch["image"], spec, device, config, generator))
            if custom_loss is not None:  # the model's own loss on its own samples
                loss = loss_fn(lambda images: net(images)["pose"], x,
                               {k: v.to(device) for k, v in batch.items() if k != "image"})
            else:
                unlabeled = next(unlabeled_batches) if unlabeled_batches is not None else None
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):  # fp32 loss
                    outputs = net(x, None if unlabeled is None else
                                  unlabeled["feature"].to(device).float() if trunk.cache else
                                  _prepare_batch_images(unlabeled["image"], spec, device, config, generator))
                outputs = {key: value.float() for key, value in outputs.items()}
                t_gt = ((batch["t"].to(device) - t_mean) / t_std)
                q_gt = batch["q"].to(device)
                extras = {}
                if relative_head:
                    extras = {"relative": outputs["relative"], "true_t_rel": batch["t_rel"].to(device),
                              "true_q_rel": batch["q_rel"].to(device)}
                loss = loss_fn(outputs["pose"], t_gt, q_gt, **extras)
                if unlabeled is not None:
                    loss = loss + unlabeled_loss.from_absolute(
                        outputs["unlabeled"], t_mean, t_std, unlabeled["t_rel"].to(device),
                        unlabeled["q_rel"].to(device), model.rotation_format)["loss"]
            if not torch.isfinite(loss):
                LOG.warning("non-finite loss at step %d: batch skipped", steps)
                optimizer.zero_grad(set_to_none=True)
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            optimizer.step()
            steps += 1
            value = float(loss.detach())
            running = value if running is None else 0.9 * running + 0.1 * value
            bar.set_postfix(loss=f"{running:.3f}")
            if config["max_steps"] and steps >= int(config["max_steps"]):
                break
        batches.close()  # the real trunk is back before validation
        if schedule is not None:
            schedule.step()
        last = epoch + 1 == epochs or (config["max_steps"] and steps >= int(config["max_steps"]))
        if rank == 0 and ((epoch + 1) % config["optim"]["val_every"] == 0 or last):
            recipe.prepare(model, train_set, spec, device, config)  # e.g. a retrieval database
            metrics, cov = validate(model, val_set, spec, device)
            score = selection_score(metrics, select_by, baseline)
            msg = (f"epoch {epoch + 1}/{epochs}: loss {running if running is not None else float('nan'):.3f}"
                   f"  val median {metrics['median_translation_m']:.3f} m "
                   f"{metrics['median_rotation_deg']:.2f} deg  score {score:.3f} ({select_by})"
                   f"  ({time.time() - epoch_started:.1f} s)")
            if score < best:
                best = score
                best_metrics = metrics
                meta = {
                    "input": spec.to_meta(), "scene": config["scene"],
                    "training": {"config": config, "epoch": epoch + 1, "steps": steps,
                                 "seconds": round(time.time() - started, 1),
                                 "train_frames": len(train_set), "device": str(device),
                                 "selected_by": {"rule": select_by, "score": score,
                                                 **({"mean_pose_baseline": baseline} if baseline else {})}},
                    "metrics": {"validation": metrics},
                    "validation_errors": {"cov_ros": cov, "frames": metrics["frames"],
                                          **({"model_cov_scale": metrics["model_cov_scale"]}
                                             if "model_cov_scale" in metrics else {})},
                }
                if unlabeled_set is not None:
                    meta["training"]["unlabeled_tuples"] = len(unlabeled_set)
                if model.has_relative_head:
                    rel_metrics, rel_cov = validate_relative(model, val_set, spec, device)
                    meta["metrics"]["validation_relative"] = rel_metrics
                    if rel_cov is not None:
                        meta["validation_errors"]["relative_cov_ros"] = rel_cov
                        msg += (f"  relative {rel_metrics['median_translation_m']:.3f} m "
                                f"{rel_metrics['median_rotation_deg']:.2f} deg per step")
                if trunk.active:
                    meta["training"]["trunk"] = {
                        "from": str(trunk.source), "copied": sorted(trunk.copy), "frozen": trunk.freeze,
                        "cached": trunk.cache, "referenced": frozen is not None}
                save_checkpoint(out, model, meta, dtype=config["storage_dtype"], frozen=frozen)
                msg += "  (best, saved)"
            (tqdm.write if progress else LOG.info)(msg)
            save_train_state(state_path, model, optimizer, loss_state, epoch + 1, best, select_by)
        if config["max_steps"] and steps >= int(config["max_steps"]):
            break
    if world > 1:
        torch.distributed.destroy_process_group()
    return best_metrics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vizloc-train", description="Train a camera pose regressor (PoseNet / MapNet family).")
    parser.add_argument("--config", help="YAML config (defaults are used for missing keys)")
    parser.add_argument("--model", help="registry name, e.g. posenet, posenet_resnet34, mapnet")
    parser.add_argument("--data", help="dataset folder or bag (data.root)")
    parser.add_argument("--data-kind", choices=("7scenes", "cambridge", "kitti", "bag"),
                        help="dataset layout (data.kind)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--out", help="checkpoint stem, e.g. weights/mapnet_demo")
    parser.add_argument("--resume", action="store_true", help="continue from <out>.state.safetensors")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing checkpoint at --out (refused otherwise)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set loss.combine=beta")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    flags = {"model.name": args.model, "data.root": args.data, "data.kind": args.data_kind,
             "optim.epochs": args.epochs, "optim.batch_size": args.batch_size,
             "optim.lr": args.lr, "device": args.device, "seed": args.seed, "out": args.out}
    try:
        config = load_config(args.config, args.set, **flags)
        metrics = train(config, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"vizloc-train: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the disk filled up while a checkpoint was written
        print(f"vizloc-train: cannot write {exc.filename or 'the checkpoint'}: {exc.strerror or exc}; "
              "the previous checkpoint (if any) is intact", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vizloc-train: interrupted; the last best checkpoint is intact", file=sys.stderr)
        return 130
    print(json.dumps({"best_validation": metrics, "checkpoint": f"{config['out']}.safetensors"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
