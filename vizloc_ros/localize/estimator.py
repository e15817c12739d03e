"""PoseEstimator: image -> camera pose in ``map`` + 6x6 covariance, on CPU, CUDA or TensorRT.

The regressor node and ``vizloc-replay`` both go through this class, so a pose seen in
a replay report is the pose the robot would have published.

Why the pieces are here:

* one adapter (:mod:`vizloc_ros.localize.runners`) is chosen when the weights are loaded:
  a pose regressor, a sequence model, a model that localizes itself, or an exported
  ONNX / TensorRT network; every frame then takes that one path;
* preprocessing (resize, crop, normalise) runs on the inference device through
  :mod:`vizloc_ros.localize.preprocess`, the same code the training data loader uses;
* on CUDA the host images are stacked into a pinned buffer and uploaded without
  blocking; the model runs in fp16 / channels_last, and preprocessing, network and
  decoding are replayed from one CUDA graph per input shape and sample count (captured
  on first use);
* on the CPU the model runs under ``inference_mode`` in channels_last with one core
  left free for ROS callbacks;
* uncertainty: with ``mc_dropout_samples = N > 1`` the N dropout samples run as one batch
  and their spread gives the covariance; otherwise the covariance measured on the
  validation split (stored in the checkpoint JSON) is used. Either way the result is
  symmetric positive definite, finite, and never below a floor;
* sequence models (VidLoc's clip, VLocNet's relative head) keep the last frames in a
  :class:`~vizloc_ros.localize.models.sequence.FrameStream`: images must then come in time order
  (``stamps`` lets the stream start a new clip at a gap), and a model with a relative head
  also returns the camera motion since the previous frame (:class:`RelativeEstimate`).

Covariance convention (ROS order x, y, z, rot_x, rot_y, rot_z): the translation block is
in the ``map`` frame; the rotation block is that of a small rotation vector applied on
the left (in ``map``): R_true = exp(delta) * R_est.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vizloc_ros import geometry
from vizloc_ros.localize.models import CheckpointError, load_checkpoint, read_checkpoint_meta
from vizloc_ros.localize.models.checkpoint import check_stored_covariance
from vizloc_ros.localize.preprocess import InputSpec, to_rgb_array
from vizloc_ros.localize.runners import exported_runner, is_exported, model_runner

LOG = logging.getLogger(__name__)

#: default standard deviations used when a checkpoint carries no validation errors:
#: deliberately pessimistic so the fusion does not over-trust an unknown network.
DEFAULT_SIGMA_T = 0.5
DEFAULT_SIGMA_R = np.deg2rad(10.0)
#: covariance floor (variances): 1 cm and 0.2 deg standard deviation.
FLOOR_VAR_T = 0.01 ** 2
FLOOR_VAR_R = np.deg2rad(0.2) ** 2


@dataclass
class RelativeEstimate:
    """Camera motion from the previous frame to this one: the pose of this camera in the
    previous camera's optical frame (metres, (w, x, y, z)), 6x6 ROS-order covariance in
    that frame."""

    t: np.ndarray
    q: np.ndarray
    cov: np.ndarray


@dataclass
class PoseEstimate:
    """One camera pose in ``map``: translation (3,), quaternion (w,x,y,z) with w >= 0,
    6x6 covariance in ROS order, and the wall-clock latency of producing it; ``relative``
    for models with a relative (odometry) head, when the frame had a predecessor."""

    t: np.ndarray
    q: np.ndarray
    cov: np.ndarray
    latency_s: float
    relative: RelativeEstimate | None = None


def resolve_device(device: str = "auto", require: bool = False) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> torch.device.

    A CUDA request on a machine without CUDA falls back to the CPU with one warning,
    unless ``require`` is set, in which case it fails with a clear RuntimeError.
    """
    device = (device or "auto").strip().lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if torch.cuda.is_available():
            return torch.device(device)
        if require:
            raise RuntimeError(f"device {device!r} was required but CUDA is not available "
                               f"(torch {torch.__version__}, cuda build: {torch.version.cuda})")
        LOG.warning("device %r requested but CUDA is not available: running on the CPU", device)
        return torch.device("cpu")
    raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


def make_psd(cov: np.ndarray, floor_t: float = FLOOR_VAR_T, floor_r: float = FLOOR_VAR_R) -> np.ndarray:
    """Symmetric positive definite 6x6 covariance with per-block variance floors.

    Non-finite input is replaced by the pessimistic default. Eigenvalues are clipped so the
    matrix stays invertible however degenerate the samples were.
    """
    cov = np.asarray(cov, dtype=float)
    if cov.shape != (6, 6) or not np.all(np.isfinite(cov)):
        return default_covariance()
    cov = 0.5 * (cov + cov.T)
    floors = np.array([floor_t] * 3 + [floor_r] * 3)
    cov = cov + np.diag(np.maximum(floors - np.diag(cov), 0.0))
    vals, vecs = np.linalg.eigh(cov)
    vals = np.maximum(vals, min(floor_t, floor_r))
    cov = (vecs * vals) @ vecs.T
    return 0.5 * (cov + cov.T)


def default_covariance() -> np.ndarray:
    return np.diag([DEFAULT_SIGMA_T ** 2] * 3 + [DEFAULT_SIGMA_R ** 2] * 3)


#: per-step relative-pose sigmas used when a checkpoint has no relative validation errors
DEFAULT_REL_SIGMA_T = 0.05
DEFAULT_REL_SIGMA_R = np.deg2rad(2.0)


def relative_covariance_from_meta(meta: dict, source: str = "checkpoint") -> np.ndarray:
    """Per-step covariance of a relative head (``validation_errors.relative_cov_ros``);
    the default when the checkpoint has none, ``CheckpointError`` when it is not a
    covariance (see :func:`stored_covariance`)."""
    cov = stored_covariance(meta, "relative_cov_ros", source)
    if cov is None:
        return np.diag([DEFAULT_REL_SIGMA_T ** 2] * 3 + [DEFAULT_REL_SIGMA_R ** 2] * 3)
    return make_psd(cov, floor_t=1e-3 ** 2, floor_r=np.deg2rad(0.05) ** 2)


def covariance_from_meta(meta: dict, source: str = "checkpoint") -> np.ndarray:
    """Covariance from the checkpoint's validation errors (``validation_errors.cov_ros``);
    a pessimistic default, with a warning, when the checkpoint has none."""
    cov = stored_covariance(meta, "cov_ros", source)
    if cov is None:
        LOG.warning("%s has no validation covariance: using a pessimistic default "
                    "(%.2f m, %.0f deg)", source, DEFAULT_SIGMA_T, np.rad2deg(DEFAULT_SIGMA_R))
        return default_covariance()
    return make_psd(cov)


def stored_covariance(meta: dict, key: str, source: str) -> np.ndarray | None:
    """``validation_errors[key]`` checked as a covariance, None when absent.

    Why not :func:`make_psd` alone: it turns anything into a matrix, and a sidecar of -I
    came out as the floor, a fully confident network. What is not a covariance is a
    ``CheckpointError`` naming ``source``; a repairable one (rounding asymmetry, singular
    from too few validation frames) is repaired with one warning each.
    """
    value = ((meta or {}).get("validation_errors") or {}).get(key)
    if value is None:
        return None
    cov, repairs = check_stored_covariance(value, f"{source}: validation_errors.{key}")
    for repair in repairs:
        LOG.warning(repair)
    return cov


def mean_and_covariance(t_samples: np.ndarray, q_samples: np.ndarray):
    """Mean pose and ROS-order sample covariance of N pose samples.

    The mean rotation is the normalised sign-aligned quaternion average (exact enough for
    the few-degree spread of dropout samples); rotation deviations are left rotation
    vectors log(R_i * R_mean^T), matching the module's covariance convention.

    A sample whose quaternion is zero (a dropout mask that silenced the rotation head:
    about 2 in 100000 for a small head) says nothing about the rotation and is left out;
    ``ValueError`` when fewer than half the samples remain, or when they spread over all
    rotations so that they have no mean.
    """
    usable = np.linalg.norm(q_samples, axis=-1) > _MIN_SAMPLE_QUATERNION_NORM
    if usable.sum() < max(2, len(q_samples) / 2):
        raise ValueError(f"MC dropout: only {int(usable.sum())} of {len(q_samples)} samples gave a "
                         "rotation (the others a zero quaternion)")
    t_samples, q_samples = t_samples[usable], q_samples[usable]
    t_mean = t_samples.mean(axis=0)
    q = q_samples * np.sign(np.sum(q_samples * q_samples[:1], axis=1, keepdims=True) + 1e-12)
    q_sum = q.mean(axis=0)
    if np.linalg.norm(q_sum) < _MIN_SAMPLE_QUATERNION_NORM * np.linalg.norm(q, axis=-1).mean():
        raise ValueError(f"MC dropout: the {len(q)} samples spread over all rotations: no mean rotation")
    q_mean = geometry.quat_hemisphere(geometry.quat_normalize(q_sum))
    rot_dev = geometry.so3_log(geometry.quat_to_matrix(q_samples)
                               @ geometry.quat_to_matrix(q_mean).T)
    dev = np.concatenate([t_samples - t_mean, rot_dev], axis=1)
    cov = dev.T @ dev / max(len(dev) - 1, 1)
    return t_mean, q_mean, cov


#: a sample quaternion shorter than this is a silenced head, not a rotation
_MIN_SAMPLE_QUATERNION_NORM = 1e-6

#: the most MC-dropout samples per image: each runs the network once more on every image
#: of a batch (memory and time grow with it; 30 to 100 give a usable spread)
MAX_MC_DROPOUT_SAMPLES = 1000


def check_mc_dropout_samples(samples) -> int:
    """``mc_dropout_samples`` checked (an integer in 0 ... :data:`MAX_MC_DROPOUT_SAMPLES`);
    ``ValueError`` naming the setting, before any weights are read."""
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 0:
        raise ValueError(f"mc_dropout_samples must be an integer >= 0, got {samples!r}")
    if samples > MAX_MC_DROPOUT_SAMPLES:
        raise ValueError(f"mc_dropout_samples = {samples} is more than {MAX_MC_DROPOUT_SAMPLES}: each "
                         "sample runs the network once more for every image (30 to 100 give a usable spread)")
    return int(samples)


class PoseEstimator:
    """Image -> camera pose in ``map`` with covariance.

    Args:
        weights: a checkpoint (``X.safetensors`` + ``X.json``), or an exported ``X.onnx`` /
            ``X.engine`` with the checkpoint's ``X.json`` beside it.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        precision: ``fp32`` | ``fp16`` (fp16 only on CUDA).
        mc_dropout_samples: N > 1 runs N dropout samples per image; 0 or 1 uses the
            validation covariance of the checkpoint.
        require_device: fail instead of falling back to the CPU when CUDA is missing.
        cuda_graphs, compile_model: GPU fast-path switches (graphs on by default).
        cpu_threads: torch threads on the CPU; default leaves one core for ROS callbacks.
        warmup: run one dummy frame at construction so the first real frame is not slow.
    """

    def __init__(self, weights, device: str = "auto", precision: str = "fp32",
                 mc_dropout_samples: int = 0, require_device: bool = False,
                 cuda_graphs: bool = True, compile_model: bool = False,
                 cpu_threads: int | None = None, warmup: bool = True):
        if precision not in ("fp32", "fp16"):
            raise ValueError(f"precision must be fp32 or fp16, got {precision!r}")
        mc_dropout_samples = check_mc_dropout_samples(mc_dropout_samples)
        self.device = resolve_device(device, require=require_device)
        if self.device.type == "cpu":
            threads = cpu_threads or max(1, (os.cpu_count() or 2) - 1)
            torch.set_num_threads(threads)
        path = Path(weights)
        self.mc_dropout_samples = mc_dropout_samples
        # the adapter is chosen here, once: every frame then takes the same path
        if is_exported(path):
            if not path.is_file():
                raise CheckpointError(f"exported network not found: {path}")
            if not path.with_suffix(".json").is_file():
                raise CheckpointError(f"{path} needs the checkpoint's JSON sidecar beside it, "
                                      f"{path.with_suffix('.json')} (vizloc-export writes it)")
            self.meta = read_checkpoint_meta(path.with_suffix(".json"))
            self.spec = InputSpec.from_meta(self.meta.get("input"))
            self._runner = exported_runner(path, self.spec)
            if mc_dropout_samples > 1:
                LOG.warning("MC dropout is not available in exported networks: "
                            "using the validation covariance")
                self.mc_dropout_samples = 0
        else:
            model, self.meta = load_checkpoint(path, device="cpu")
            self.spec = InputSpec.from_meta(self.meta.get("input"))
            self._runner = model_runner(model, self.spec, self.device, precision,
                                        use_graphs=cuda_graphs, compile_model=compile_model)
        self.map_frame = self.meta.get("map_frame", "map")
        self._validation_cov = covariance_from_meta(self.meta, str(path))
        self._relative_cov = relative_covariance_from_meta(self.meta, str(path)) if self.has_relative_head else None
        self._mc_scale = float((self.meta.get("validation_errors") or {}).get("mc_dropout_scale", 1.0))
        # calibration of a model's own covariances (DSAC, NetVLAD, ...) on the validation split
        self._model_cov_scale = float((self.meta.get("validation_errors") or {}).get("model_cov_scale", 1.0))
        if warmup:
            crop_h, crop_w = self.spec.crop
            dummy = np.zeros((max(crop_h, 1), max(crop_w, 1), 3), dtype=np.uint8)
            self.estimate(dummy)
            self.reset()

    @property
    def input_spec(self) -> InputSpec:
        return self.spec

    @property
    def sequential(self) -> bool:
        """The output depends on earlier frames (a sequence model): give images in time
        order, with their stamps."""
        return self._runner.stream is not None

    @property
    def has_relative_head(self) -> bool:
        """Estimates carry the camera motion since the previous frame (visual odometry)."""
        stream = self._runner.stream
        return stream is not None and stream.model.has_relative_head

    def reset(self) -> None:
        """Forget earlier frames (sequence models); nothing to do for single-image ones."""
        if self._runner.stream is not None:
            self._runner.stream.reset()

    def estimate(self, image: np.ndarray, encoding: str = "rgb8", stamp: float | None = None) -> PoseEstimate:
        """One image (HxWx3 or HxW uint8) -> :class:`PoseEstimate`. Bad input: ValueError."""
        return self.estimate_batch([image], encoding, None if stamp is None else [stamp])[0]

    def estimate_batch(self, images, encoding: str = "rgb8", stamps=None) -> list[PoseEstimate]:
        """Many images of one size at once (replay, GPU throughput). Bad input: ValueError.

        Sequence models (:attr:`sequential`) take the images as consecutive frames in
        time order; ``stamps`` (seconds) start a new clip at a gap or a jump back.
        """
        if len(images) == 0:
            return []
        start = time.perf_counter()
        arrays = [to_rgb_array(img, encoding, min_size=self.spec.crop) for img in images]
        shape = arrays[0].shape
        if any(a.shape != shape for a in arrays):
            raise ValueError("estimate_batch needs images of one size; got "
                             f"{sorted({a.shape for a in arrays})}")
        if stamps is not None and len(stamps) != len(arrays):
            raise ValueError(f"{len(arrays)} images but {len(stamps)} stamps")
        raw = self._runner(arrays, self.mc_dropout_samples, stamps)
        t, q, relative = raw.t, raw.q, raw.relative
        if not (np.all(np.isfinite(t)) and np.all(np.isfinite(q))):
            raise FloatingPointError("the network produced a non-finite pose")
        latency = (time.perf_counter() - start) / len(arrays)
        if t.shape[0] > 1:
            poses = []
            for i in range(len(arrays)):
                t_i, q_i, cov = mean_and_covariance(t[:, i], q[:, i])
                poses.append((t_i, q_i, make_psd(cov * self._mc_scale)))
        else:  # one vectorised normalisation for the whole batch
            q_all = geometry.quat_hemisphere(geometry.quat_normalize(q[0]))
            model_cov = raw.cov  # the model's own uncertainty, when it has one
            poses = [(t[0, i], q_all[i], self._validation_cov if model_cov is None
                      else make_psd(model_cov[i] * self._model_cov_scale)) for i in range(len(arrays))]
        # mean_and_covariance already returns a unit, w >= 0 quaternion
        return [PoseEstimate(t=np.array(t_i, dtype=float), q=np.array(q_i, dtype=float), cov=cov.copy(),
                             latency_s=latency, relative=self._relative(relative, i))
                for i, (t_i, q_i, cov) in enumerate(poses)]

    def _relative(self, relative, i: int) -> RelativeEstimate | None:
        if relative is None or not relative[2][i]:
            return None
        t_rel, q_rel, _ = relative
        if t_rel.shape[0] > 1:
            t_i, q_i, cov = mean_and_covariance(t_rel[:, i], q_rel[:, i])
            cov = make_psd(cov * self._mc_scale, floor_t=1e-3 ** 2, floor_r=np.deg2rad(0.05) ** 2)
        else:
            t_i, q_i, cov = t_rel[0, i], q_rel[0, i], self._relative_cov
        if not (np.all(np.isfinite(t_i)) and np.all(np.isfinite(q_i))):
            return None
        return RelativeEstimate(t=np.asarray(t_i, dtype=float),
                                q=geometry.quat_hemisphere(geometry.quat_normalize(q_i)), cov=cov.copy())
