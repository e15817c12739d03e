"""Checkpoints: ``X.safetensors`` (tensors) + ``X.json`` (everything needed to use them).

Tensors are stored with safetensors only: loading a checkpoint never unpickles, so a
checkpoint cannot run code. A pickle / ``torch.save`` file is refused, not "tried".

JSON sidecar schema, ``"format": "vizloc_ros/checkpoint-v1"`` (stable: the estimator,
the exporter, the trainer and the weights README read it)::

    {
      "format": "vizloc_ros/checkpoint-v1",
      "architecture": "mapnet",               # registry name, see build_model()
      "backbone": "resnet34",                  # informational copy of model_config.backbone
      "model_config": {"backbone": "resnet34", "feat_dim": 2048, "dropout": 0.5},
      "rotation_format": "logq",               # "quat" | "logq": raw output layout
      "input": {"resize": 256,                 # shorter image side after resizing (px)
                "crop": [224, 224],            # centre crop [H, W] (px)
                "mean": [0.485, 0.456, 0.406], # normalisation of RGB in [0, 1]
                "std": [0.229, 0.224, 0.225]},
      "pose_stats": {"t_mean": [x, y, z],      # metres, map frame; the network regresses
                     "t_std": [x, y, z]},      # (t - t_mean) / t_std
      "scene": "chess",                        # dataset / scene the map frame belongs to
      "map_frame": "map",                      # TF frame the predicted poses live in
      "storage_dtype": "fp32",                 # "fp32" | "fp16" (tensors; loaded as fp32)
      "training": {...},                       # free-form: data, epochs, loss config, ...
      "metrics": {...},                        # free-form: validation / test-split metrics
      "validation_errors": {...},              # free-form: per-frame / summary errors
      "side_files": {"database": "X.database.safetensors"},  # only for models with
                                               # side tensors (PoseRegressor.side_tensors)
      "frozen_tensors": {"file": "mapnet_demo.safetensors",    # only for models trained
                         "sha256": "...",      # with a frozen part copied from another
                         "prefixes": {"backbone.": "backbone."},  # checkpoint, which is
                         "count": 122}         # referenced instead of stored again
    }

Keys the trainer writes and the estimator reads: ``validation_errors.cov_ros`` (6x6 ROS-order
covariance of the validation errors, the estimator's uncertainty) and, for networks with a
relative-pose head (``vlocnet``), ``validation_errors.relative_cov_ros`` (the same for one
frame-to-frame step, in the earlier camera's frame: the visual odometry's uncertainty)
with ``metrics.validation_relative`` (its per-step errors); for models that give each
frame its own covariance (``dsac``, ``netvlad``, ``allocentric``),
``validation_errors.model_cov_scale``, the factor that calibrates those covariances. Sequence models need nothing
extra: ``model_config`` holds their clip length. Read by the fusion, not the estimator:
``validation_errors.fusion_noise.abs_correlation_time`` (and ``abs_bias_share`` where
present), the fusion parameters a checkpoint measured for its own errors (``vizloc-map``
writes the correlation time of its validation blocks; read without torch by
:func:`vizloc_ros.localize.weights.network_noise`, taken while ``noise_from_weights``).

Required on load: ``format``, ``architecture``, ``model_config``, ``rotation_format``,
``input`` (with ``resize``, ``crop``, ``mean``, ``std``) and ``pose_stats`` (with
``t_mean``, ``t_std``). Others get the defaults above. Extra keys are kept verbatim.
The stored uncertainty is checked on load (:func:`check_stored_covariance`): a
covariance that is not one (negative or zero variances, clearly asymmetric, not positive
semi-definite) or a scale that is not a positive number is refused, because the fusion
would trust the network without limit; rounding-level asymmetry and a singular matrix
(from fewer validation frames than dimensions) are repaired, and the repair is said.
The tensors are authoritative for the pose statistics (they are buffers of the model);
the JSON copy is there for readers that do not load the network.

A checkpoint whose model was trained with a frozen part copied from another checkpoint
(``vizloc-train``'s ``trunk`` block: a shipped trunk, frozen) may store only what it
trained: ``frozen_tensors`` names the source file, its sha256 and the tensor-name prefixes
(ours -> the source's) that come from it. ``load_checkpoint`` finds that file beside the
checkpoint or among the shipped weights (:mod:`vizloc_ros.localize.weights`), refuses it
when its sha256 differs (another file, or a retrained trunk), and loads the tensors from
it. This keeps several heads on one shipped trunk from each carrying a copy.

Writing is atomic per file: both files are written completely under temporary names,
then renamed, the JSON last, so a reader that finds the JSON finds complete tensors.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from vizloc_ros.files import staged_files
from vizloc_ros.localize.models.base import PoseRegressor
from vizloc_ros.localize.models.registry import available_models, build_model, is_registered

FORMAT = "vizloc_ros/checkpoint-v1"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
DEFAULT_INPUT = {"resize": 256, "crop": [224, 224], "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
REQUIRED_KEYS = ("format", "architecture", "model_config", "rotation_format", "input", "pose_stats")
REQUIRED_SUBKEYS = {"input": ("resize", "crop", "mean", "std"), "pose_stats": ("t_mean", "t_std")}
#: keys derived from the model by save_checkpoint; a caller's meta may not contradict them
MODEL_KEYS = ("format", "architecture", "backbone", "model_config", "rotation_format",
              "pose_stats", "storage_dtype", "side_files", "frozen_tensors")
# Kept in fp32 in fp16 checkpoints: metres of translation offset do not survive fp16.
_KEEP_FP32 = ("t_mean", "t_std")
_SUFFIX = ".safetensors"


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded; the message names the file and the problem."""


# --------------------------------------------------------------------------- stored uncertainty

#: the 6x6 covariances of ``validation_errors`` (ROS order)
STORED_COVARIANCES = ("cov_ros", "relative_cov_ros")
#: the factors of ``validation_errors`` that scale a covariance (positive numbers)
STORED_COVARIANCE_SCALES = ("mc_dropout_scale", "model_cov_scale")
#: asymmetry (max |C - C^T| over the largest entry) above which a stored covariance is
#: refused: rounding leaves ~1e-16, a hand edit or a transposed block far more
MAX_REPAIRABLE_ASYMMETRY = 1e-3
#: a correlation-matrix eigenvalue at most this is zero: the matrix is singular (the
#: network would be trusted exactly along that direction); one below minus this is not rounding
SINGULAR_EIGENVALUE = 1e-9
_AXES = ("x", "y", "z", "rot_x", "rot_y", "rot_z")


def floor_singular_covariance(cov) -> np.ndarray:
    """A singular ROS-order covariance made definite: each 3x3 block (translation,
    rotation) gets its mean variance added on its diagonal.

    Why this floor: a covariance measured on fewer validation frames than it has
    dimensions has no spread at all along the directions those frames missed; the
    block's mean variance is the only honest guess there, and adding it (rather than a
    fixed centimetre) keeps the scale of the errors that were seen. Used by the trainer
    (too few validation frames) and on load (an older checkpoint saved without it).
    """
    cov = np.asarray(cov, dtype=float).reshape(6, 6)
    cov = 0.5 * (cov + cov.T)
    floor = np.repeat([np.trace(cov[:3, :3]) / 3.0, np.trace(cov[3:, 3:]) / 3.0], 3)
    return cov + np.diag(np.maximum(floor, 0.0))


def correlation_eigenvalues(cov) -> np.ndarray:
    """Eigenvalues of the correlation matrix of the symmetric ``cov`` (zeros when a
    variance is not positive). Why the correlations: metres and radians differ by orders
    of magnitude, so the eigenvalues of the covariance itself cannot tell a singular
    matrix from a precise rotation; those of D^-1/2 C D^-1/2 can (1 each for independent
    axes, 0 for a direction without spread, below 0 for a correlation above 1)."""
    cov = np.asarray(cov, dtype=float)
    variances = np.diag(cov)
    if variances.min() <= 0.0:
        return np.zeros(len(variances))
    scale = 1.0 / np.sqrt(variances)
    return np.linalg.eigvalsh(cov * scale[:, None] * scale[None, :])


def is_singular(cov) -> bool:
    """True when the symmetric ``cov`` has no spread along some direction (a correlation
    eigenvalue of numerically zero or less, or a variance that is not positive)."""
    return bool(correlation_eigenvalues(cov).min() <= SINGULAR_EIGENVALUE)


def check_stored_covariance(value, where: str) -> tuple[np.ndarray, list[str]]:
    """A covariance read from a sidecar -> ``(usable 6x6 matrix, repairs made)``.

    ``CheckpointError`` (naming ``where``: the file and key) for what is not a covariance:
    not 6x6 finite numbers, a negative or zero variance (a sidecar ``cov_ros`` of -I once
    loaded as a fully confident network), an asymmetry above
    :data:`MAX_REPAIRABLE_ASYMMETRY`, a clearly negative eigenvalue (a correlation above
    1). Repaired, each with a line in ``repairs`` for the caller's warning: rounding-level
    asymmetry (symmetrised), a singular matrix (:func:`floor_singular_covariance`).
    """
    try:
        cov = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise CheckpointError(f"{where} must be a 6x6 matrix of numbers, got {_short(value)}") from None
    if cov.size != 36:
        raise CheckpointError(f"{where} must be a 6x6 matrix (36 numbers), got shape {cov.shape}")
    cov = cov.reshape(6, 6)
    if not np.all(np.isfinite(cov)):
        raise CheckpointError(f"{where} holds NaN, inf or null: not a covariance (a diverged validation?)")
    diagonal = np.diag(cov)
    if diagonal.min() <= 0.0:
        bad = [f"{axis} {v:g}" for axis, v in zip(_AXES, diagonal) if v <= 0.0]
        kind = "negative" if diagonal.min() < 0.0 else "zero"
        raise CheckpointError(f"{where} has {kind} variances ({', '.join(bad)}): not a covariance; "
                              "it would make the network fully trusted")
    repairs = []
    scale = float(np.abs(cov).max())
    asymmetry = float(np.abs(cov - cov.T).max()) / scale
    if asymmetry > MAX_REPAIRABLE_ASYMMETRY:
        raise CheckpointError(f"{where} is not symmetric (max |C - C^T| is {asymmetry:.3g} of its "
                              "largest entry): not a covariance")
    if asymmetry > 0.0:
        repairs.append(f"{where} is slightly asymmetric ({asymmetry:.2g} of its largest entry): symmetrised")
    cov = 0.5 * (cov + cov.T)
    eigenvalues = correlation_eigenvalues(cov)
    if eigenvalues.min() < -SINGULAR_EIGENVALUE:
        raise CheckpointError(f"{where} is not positive semi-definite (its correlation matrix has the "
                              f"eigenvalue {eigenvalues.min():.3g}: a correlation above 1): not a covariance")
    if is_singular(cov):
        rank = int(np.sum(eigenvalues > SINGULAR_EIGENVALUE))
        cov = floor_singular_covariance(cov)
        repairs.append(f"{where} is singular (rank {rank} of 6: measured on fewer validation frames "
                       "than dimensions?): each block floored with its mean variance")
    return cov, repairs


def check_stored_scale(value, where: str) -> float:
    """A covariance factor read from a sidecar: a finite number > 0, else ``CheckpointError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise CheckpointError(f"{where} must be a finite number > 0 (it scales the covariance), "
                              f"got {_short(value)}")
    return float(value)


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, np.ndarray) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_stored_uncertainty(meta: dict, json_path: Path) -> None:
    """Refuse a sidecar whose ``validation_errors`` hold a covariance or a scale that is
    not one (see :func:`check_stored_covariance`); ``null`` is "not measured"."""
    block = meta["validation_errors"]
    for key in STORED_COVARIANCES:
        if block.get(key) is not None:
            check_stored_covariance(block[key], f"JSON sidecar {json_path}: validation_errors.{key}")
    for key in STORED_COVARIANCE_SCALES:
        if block.get(key) is not None:
            check_stored_scale(block[key], f"JSON sidecar {json_path}: validation_errors.{key}")


# --------------------------------------------------------------------------- paths

def checkpoint_paths(path) -> tuple[Path, Path]:
    """``(tensor_file, json_file)`` for ``X``, ``X.safetensors`` or ``X.json``."""
    path = Path(os.fspath(path)).expanduser()
    if path.suffix == _SUFFIX:
        return path, path.with_suffix(".json")
    if path.suffix == ".json":
        return path.with_suffix(_SUFFIX), path
    candidate = path.with_name(path.name + _SUFFIX)
    if not candidate.exists() and path.is_file():
        # e.g. "model.pt" handed over by mistake: inspect it so the error can say what it is
        return path, path.with_suffix(".json")
    return candidate, path.with_name(path.name + ".json")


# --------------------------------------------------------------------------- saving

def _jsonable(value):
    """Plain JSON types; NaN/inf become null so the file stays strict JSON."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    raise TypeError(f"checkpoint meta value {value!r} ({type(value).__name__}) is not JSON-able")


def build_meta(model: PoseRegressor, meta: dict | None = None, dtype: str = "fp32") -> dict:
    """The JSON sidecar for ``model``: model-derived keys + the caller's ``meta`` + defaults."""
    meta = dict(meta or {})
    architecture = model.architecture or type(model).__name__.lower()
    if not is_registered(architecture):
        # refuse to write a checkpoint that load_checkpoint could not rebuild
        raise ValueError(f"model architecture {architecture!r} is not registered; available "
                         f"models: {', '.join(available_models())} (see register_model)")
    derived = {
        "format": FORMAT,
        "architecture": architecture,
        "backbone": model.backbone_name,
        "model_config": _jsonable(model.config()),
        "rotation_format": model.rotation_format,
        "pose_stats": {"t_mean": _jsonable(model.t_mean), "t_std": _jsonable(model.t_std)},
        "storage_dtype": dtype,
    }
    for key in MODEL_KEYS:
        if key in meta and key in derived and _jsonable(meta[key]) != derived[key]:
            raise ValueError(f"meta[{key!r}] = {meta[key]!r} contradicts the model ({derived[key]!r}); "
                             "it is derived from the model, leave it out")
    input_block = dict(DEFAULT_INPUT)
    input_block.update(meta.pop("input", None) or {})
    out = dict(derived)
    out.update({"input": input_block, "scene": "", "map_frame": "map",
                "training": {}, "metrics": {}, "validation_errors": {}})
    out.update({k: v for k, v in meta.items() if k not in MODEL_KEYS})
    return _jsonable(out)


def save_checkpoint(path, model: PoseRegressor, meta: dict | None = None,
                    dtype: str = "fp32", frozen: "FrozenTensors | None" = None) -> Path:
    """Write ``X.safetensors`` + ``X.json`` for ``model``; returns the tensor file path.

    ``meta`` supplies ``input``, ``scene``, ``training``, ``metrics``,
    ``validation_errors`` (and any extra keys); see the module docstring for the schema.
    ``dtype="fp16"`` halves the file (floating tensors except the pose statistics).
    ``frozen``: tensors that are left out and referenced instead; each must still equal
    its source exactly (a ValueError otherwise: the reference would load other weights).
    """
    from safetensors.torch import save

    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    if not isinstance(model, PoseRegressor):
        raise TypeError(f"save_checkpoint needs a PoseRegressor, got {type(model).__name__}")
    document = build_meta(model, meta, dtype)
    side = model.side_tensors()

    state = model.state_dict()
    if frozen is not None:
        referenced = frozen.check_unchanged(state)
        state = {k: v for k, v in state.items() if k not in referenced}
        document["frozen_tensors"] = frozen.to_meta(len(referenced))
    tensors = {}
    for name, tensor in state.items():
        tensor = tensor.detach().to("cpu")
        if tensor.is_floating_point() and not name.endswith(_KEEP_FP32):
            tensor = tensor.to(STORAGE_DTYPES[dtype])
        tensors[name] = tensor.contiguous().clone()

    st_path = Path(os.fspath(path)).expanduser()
    if st_path.suffix == ".json":
        st_path = st_path.with_suffix(_SUFFIX)
    elif st_path.suffix != _SUFFIX:
        st_path = st_path.with_name(st_path.name + _SUFFIX)
    json_path = st_path.with_suffix(".json")
    side_paths = {name: st_path.with_name(f"{st_path.name[:-len(_SUFFIX)]}.{name}{_SUFFIX}")
                  for name in side}
    if side_paths:
        document["side_files"] = {name: path.name for name, path in side_paths.items()}
    text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    # serialised here, written by vizloc_ros.files (locked .NAME.partial-PID temporaries,
    # umask respected, a dead writer's swept by the next save; safetensors' own save_file
    # leaves a mode-0600 .tmpXXXX behind when killed). All are written before any is
    # renamed, the JSON last, so a loader never sees a JSON without its tensors.
    blobs = [save(tensors, metadata={"format": FORMAT, "architecture": document["architecture"]})]
    blobs += [save({k: v.detach().to("cpu").contiguous().clone() for k, v in side[name].items()},
                   metadata={"format": FORMAT, "side_file": name}) for name in side_paths]
    blobs.append(text.encode("utf-8"))
    with staged_files([st_path, *side_paths.values(), json_path], what="checkpoint file") as partials:
        for partial, blob in zip(partials, blobs):
            with open(partial, "wb") as handle:
                handle.write(blob)
    return st_path
    return st_path


# --------------------------------------------------------------------------- loading

_PICKLE_PROTOCOLS = tuple(bytes([0x80, p]) for p in range(2, 6))


def _inspect_tensor_file(path: Path) -> dict:
    """Validate the safetensors framing ourselves so errors are specific, and refuse
    pickles before anything could unpickle them. Returns the parsed header."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if head[:2] in _PICKLE_PROTOCOLS or head[:4] == b"PK\x03\x04":
            raise CheckpointError(
                f"{path} is a pickle/torch file (torch.save or pickle output), not safetensors: "
                "refusing to unpickle it, since unpickling can run arbitrary code. Convert it "
                "once in a trusted environment, e.g. with safetensors.torch.save_file().")
        if size < 8:
            raise CheckpointError(f"{path} is truncated: {size} bytes, too short for a "
                                  "safetensors header")
        header_len = int.from_bytes(head, "little")
        if header_len > size - 8:
            raise CheckpointError(f"{path} is truncated or not safetensors: header claims "
                                  f"{header_len} bytes but the file has {size - 8} after the length")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt or not safetensors: unreadable header ({exc})") from None
    try:
        data_end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                       default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise CheckpointError(f"{path} is corrupt: malformed tensor entries in the header") from None
    available = size - 8 - header_len
    if data_end > available:
        raise CheckpointError(f"{path} is truncated: tensors need {data_end} bytes of data, "
                              f"the file holds {available}")
    return header


def _read_json(json_path: Path, st_path: Path) -> dict:
    if not json_path.is_file():
        raise CheckpointError(f"JSON sidecar missing for {st_path}: expected {json_path} "
                              "(architecture, input and pose statistics are read from it)")
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"JSON sidecar {json_path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"JSON sidecar {json_path} must hold an object, got {type(meta).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    for key, subkeys in REQUIRED_SUBKEYS.items():
        if isinstance(meta.get(key), dict):
            missing += [f"{key}.{s}" for s in subkeys if s not in meta[key]]
        elif key in meta:
            missing.append(f"{key} (must be an object)")
    if missing:
        raise CheckpointError(f"JSON sidecar {json_path} lacks required keys: {', '.join(missing)}")
    if meta["format"] != FORMAT:
        raise CheckpointError(f"JSON sidecar {json_path} has format {meta['format']!r}; "
                              f"this version reads {FORMAT!r}")
    if not isinstance(meta["model_config"], dict):
        raise CheckpointError(f"JSON sidecar {json_path}: model_config must be an object")
    if not isinstance(meta["architecture"], str) or not is_registered(meta["architecture"]):
        raise CheckpointError(f"JSON sidecar {json_path} names unknown architecture "
                              f"{meta['architecture']!r}; available models: {', '.join(available_models())}")
    defaults = {"backbone": meta["model_config"].get("backbone", ""), "scene": "",
                "map_frame": "map", "storage_dtype": "fp32", "training": {}, "metrics": {},
                "validation_errors": {}}
    for key, value in defaults.items():
        meta.setdefault(key, value)
    wrong = [f"{key} (must be {type(value).__name__ if not isinstance(value, dict) else 'an object'}, "
             f"got {type(meta[key]).__name__})"
             for key, value in defaults.items() if not isinstance(meta[key], type(value))]
    if wrong:
        raise CheckpointError(f"JSON sidecar {json_path} has keys of the wrong type: {', '.join(wrong)}")
    _check_stored_uncertainty(meta, json_path)
    return meta


def read_checkpoint_meta(path) -> dict:
    """The validated JSON sidecar of a checkpoint, without touching the tensors."""
    st_path, json_path = checkpoint_paths(path)
    return _read_json(json_path, st_path)


def describe_tensors(shapes: dict) -> str:
    """A guess at the network a set of tensors belongs to, for mismatch messages."""
    keys = set(shapes)
    parts = []
    if any(k.startswith("backbone.inception") for k in keys):
        parts.append("backbone googlenet")
    elif any(k.startswith("backbone.layer") for k in keys):
        blocks = tuple(len({m.group(1) for k in keys if (m := re.match(rf"backbone\.layer{i}\.(\d+)\.", k))})
                       for i in range(1, 5))
        bottleneck = any(k.startswith("backbone.layer1.0.conv3.") for k in keys)
        known = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
                 ((3, 4, 6, 3), True): "resnet50", ((3, 4, 23, 3), True): "resnet101"}
        parts.append(f"backbone {known.get((blocks, bottleneck), f'resnet with blocks {blocks}')}")
    if "fc_q.weight" in shapes:
        rot = tuple(shapes["fc_q.weight"])[0]
        parts.append(f"rotation head of {rot} outputs ({ {4: 'quat', 3: 'logq'}.get(rot, '?') })")
    if "fc_feat.weight" in shapes:
        parts.append(f"feat_dim {tuple(shapes['fc_feat.weight'])[0]}")
    if not parts:
        parts.append(f"an unknown network ({len(keys)} tensors, e.g. {sorted(keys)[:3]})")
    return ", ".join(parts)


def _check_fit(model: PoseRegressor, shapes: dict, meta: dict, st_path: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [f"{k}: file {shapes[k]} vs model {expected[k]}"
             for k in sorted(set(expected) & set(shapes)) if shapes[k] != expected[k]]
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            problems.append(f"{len(wrong)} with other shapes (e.g. {wrong[:2]})")
        raise CheckpointError(
            f"architecture mismatch in {st_path}: the JSON says architecture "
            f"{meta['architecture']!r} with model_config {meta['model_config']}, but the tensors "
            f"look like {describe_tensors(shapes)}; tensors {'; '.join(problems)}")


def load_checkpoint(path, device="cpu"):
    """Rebuild the network from the JSON sidecar, load the tensors, return ``(model, meta)``.

    The model is in eval mode, float32, on ``device``. Every failure is a
    :class:`CheckpointError` naming the file and the problem.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    st_path, json_path = checkpoint_paths(path)
    if not st_path.is_file():
        raise CheckpointError(f"checkpoint file not found: {st_path}")
    header = _inspect_tensor_file(st_path)
    meta = _read_json(json_path, st_path)
    try:
        model = build_model(meta["architecture"], **meta["model_config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"JSON sidecar {json_path}: cannot build architecture "
                              f"{meta['architecture']!r} from model_config {meta['model_config']}: {exc}") from None
    if model.rotation_format != meta["rotation_format"]:
        raise CheckpointError(f"JSON sidecar {json_path}: rotation_format {meta['rotation_format']!r} "
                              f"does not match architecture {meta['architecture']!r} "
                              f"({model.rotation_format!r})")
    shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    frozen_tensors = _load_frozen_tensors(meta, st_path)
    overlap = sorted(set(frozen_tensors) & set(shapes))
    if overlap:
        raise CheckpointError(f"{st_path} stores tensors that its frozen_tensors reference too "
                              f"(e.g. {overlap[:3]})")
    shapes.update({k: tuple(v.shape) for k, v in frozen_tensors.items()})
    _check_fit(model, shapes, meta, st_path)
    try:
        tensors = load_file(str(st_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{st_path} is corrupt: safetensors could not read it ({exc})") from None
    tensors.update(frozen_tensors)
    reference = model.state_dict()
    # fp16 storage comes back as the model's own dtypes (fp32)
    tensors = {k: v.to(reference[k].dtype) for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=True)
    json_stats = meta["pose_stats"]
    try:
        consistent = (np.allclose(json_stats["t_mean"], model.t_mean.numpy(), rtol=1e-5, atol=1e-6)
                      and np.allclose(json_stats["t_std"], model.t_std.numpy(), rtol=1e-5, atol=1e-6))
    except (TypeError, ValueError):
        consistent = False
    if not consistent:
        warnings.warn(f"{json_path}: pose_stats differ from the tensors' t_mean/t_std; "
                      "using the tensors", stacklevel=2)
    _load_side_files(model, meta, st_path)
    return model.to(device).eval(), copy.deepcopy(meta)


def file_sha256(path) -> str:
    """sha256 of a file's bytes (hex), read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FrozenTensors:
    """Tensors of a model that came, unchanged, from another checkpoint's tensor file.

    ``prefixes`` maps a prefix of our tensor names to the prefix of the same tensors in
    ``source`` (``{"backbone.": "backbone."}``, or ``{"trunk.0.": "backbone.conv1."}``
    where the two networks name a module differently).
    """

    def __init__(self, source, prefixes: dict[str, str]):
        from safetensors.torch import load_file

        self.source = Path(source)
        self.prefixes = {str(k): str(v) for k, v in prefixes.items()}
        if not self.prefixes:
            raise ValueError("frozen tensors need at least one prefix")
        self.sha256 = file_sha256(self.source)
        self.tensors = _renamed(load_file(str(self.source), device="cpu"), self.prefixes)
        if not self.tensors:
            raise ValueError(f"{self.source} has no tensor under {sorted(self.prefixes.values())}")

    def check_unchanged(self, state: dict) -> set[str]:
        """The names of ``state`` that are referenced; ValueError when one differs from
        its source (beyond the source's own storage precision)."""
        names = {name for name in state if any(name.startswith(p) for p in self.prefixes)}
        missing = sorted(set(self.tensors) - names)
        if missing or names - set(self.tensors):
            raise ValueError(f"the model's tensors under {sorted(self.prefixes)} do not match those of "
                             f"{self.source} (e.g. {(missing or sorted(names - set(self.tensors)))[:3]})")
        for name in names:
            ours, theirs = state[name].detach().cpu(), self.tensors[name]
            if ours.shape != theirs.shape or not torch.equal(ours.to(theirs.dtype), theirs):
                raise ValueError(f"tensor {name} was changed after it was copied from {self.source}: "
                                 "it cannot be referenced (was it frozen?)")
        return names

    def to_meta(self, count: int) -> dict:
        return {"file": self.source.name, "sha256": self.sha256, "prefixes": dict(self.prefixes),
                "count": int(count)}


def _renamed(tensors: dict, prefixes: dict[str, str]) -> dict:
    """Source tensors under the prefixes' values, renamed to the prefixes' keys."""
    out = {}
    for ours, theirs in prefixes.items():
        for name, tensor in tensors.items():
            if name.startswith(theirs):
                out[ours + name[len(theirs):]] = tensor
    return out


def _find_referenced_file(name: str, st_path: Path) -> Path | None:
    """A referenced tensor file: beside the checkpoint first, then the shipped weights."""
    from vizloc_ros.localize.weights import weight_folders  # same stage; weights imports nothing of ours

    for folder in [st_path.parent, *weight_folders()]:
        if (folder / name).is_file():
            return folder / name
    return None


def _load_frozen_tensors(meta: dict, st_path: Path) -> dict:
    """The tensors ``frozen_tensors`` references, renamed to ours; {} when there is none."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    block = meta.get("frozen_tensors")
    if not block:
        return {}
    json_path = st_path.with_suffix(".json")
    if (not isinstance(block, dict) or not isinstance(block.get("file"), str)
            or not isinstance(block.get("sha256"), str) or not isinstance(block.get("prefixes"), dict)
            or not block["prefixes"]):
        raise CheckpointError(f"JSON sidecar {json_path}: frozen_tensors needs file, sha256 and prefixes")
    name = Path(block["file"]).name
    path = _find_referenced_file(name, st_path)
    if path is None:
        raise CheckpointError(f"{st_path} references the frozen tensors of {name}, which is neither beside "
                              "it nor among the shipped weights: put that file beside the checkpoint")
    digest = file_sha256(path)
    if digest != block["sha256"]:
        raise CheckpointError(f"{st_path} references {name} with sha256 {block['sha256'][:12]}..., but {path} "
                              f"has sha256 {digest[:12]}...: not the file this checkpoint was trained on")
    _inspect_tensor_file(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt: safetensors could not read it ({exc})") from None
    renamed = _renamed(tensors, {str(k): str(v) for k, v in block["prefixes"].items()})
    if not renamed:
        raise CheckpointError(f"{path} has no tensor under the prefixes {sorted(block['prefixes'].values())} "
                              f"that {json_path} references")
    return renamed


def _load_side_files(model: PoseRegressor, meta: dict, st_path: Path) -> None:
    """Read the ``side_files`` the JSON names (beside the checkpoint) into the model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    side_files = meta.get("side_files") or {}
    if not isinstance(side_files, dict):
        raise CheckpointError(f"{st_path.with_suffix('.json')}: side_files must be an object")
    side = {}
    for name, file_name in side_files.items():
        path = st_path.parent / Path(str(file_name)).name
        if not path.is_file():
            raise CheckpointError(f"side file {name!r} of {st_path} is missing: expected {path}")
        _inspect_tensor_file(path)
        try:
            side[name] = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is corrupt: safetensors could not read it ({exc})") from None
    try:
        model.load_side_tensors(side)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"side files of {st_path} do not fit architecture "
                              f"{meta['architecture']!r}: {exc}") from None
