"""Make a map: frames with poses -> a scene-coordinate checkpoint (``ace``) that every
entry point runs.

The steps, each timed for the summary: load the frozen encoder; split the frames into
mapping and validation (contiguous blocks of ``validation_block`` frames, every
``1 / validation_share``-th block held out, so validation frames are not the direct
neighbours of mapping frames); encode the mapping frames once into the buffer; train the
head; localize the validation frames (encoder + head + PnP-RANSAC, as at run time) and
calibrate the covariance on their errors, and measure how long those errors stay alike
(the fusion's correlation time, :func:`fusion_noise`); write the checkpoint atomically
(safetensors + JSON with the intrinsics, the encoder's name and sha256, the training
summary, the validation metrics, the covariance scale and the fusion's noise figures).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from vizloc_ros.localize.camera import check_camera, input_camera, intrinsic_matrix
from vizloc_ros.localize.models.ace import AceLocalizer, SceneEncoder
from vizloc_ros.localize.models.checkpoint import save_checkpoint
from vizloc_ros.localize.pnp import FAILED_COVARIANCE, PnpSettings, localize_from_coordinates
from vizloc_ros.localize.preprocess import InputSpec, preprocess
from vizloc_ros.localize.weights import shipped_weights
from vizloc_ros.mapping.buffer import BYTES_PER_SAMPLE, Augmentation, BufferBuilder
from vizloc_ros.mapping.head_training import HeadTrainingConfig, coordinate_frame, train_head
from vizloc_ros.mapping.triangulation import TriangulationOptions, cell_radius, triangulate_frames
from vizloc_ros.metrics import bias_share, correlation_time, nees, pose_error_vectors, pose_errors
from vizloc_ros.training.evaluate import validation_covariance
from vizloc_ros.training.scene_geometry import scene_coordinates_at

LOG = logging.getLogger("vizloc_ros.mapping")

ENCODER_NAME = "scene_encoder.safetensors"
#: default buffer bound: 8 M samples (~2.2 GB), a 24 GB machine keeps most of its memory
DEFAULT_MAX_SAMPLES = 8_000_000


class MappingError(ValueError):
    """The frames cannot make a map (too few, no poses, bad intrinsics, ...)."""


@dataclass
class MapFrame:
    """One mapping frame: RGB uint8 (H, W, 3), camera pose in map (t, q w x y z), and
    optionally depth (H, W) metres (NaN invalid)."""

    image: np.ndarray
    t: np.ndarray
    q: np.ndarray
    depth: np.ndarray | None = None
    stamp: float = 0.0


@dataclass
class MapOptions:
    minutes: float = 6.0  # head training budget (wall clock): with encoding, under 10 min for 1,200 frames
    steps: int | None = None  # a fixed number of head steps instead (reproducible)
    input_height: int = 240
    max_samples: int = DEFAULT_MAX_SAMPLES
    validation_share: float = 0.1
    validation_block: int = 20
    init_depth: float | None = None  # None: from the cameras' spread (3 m indoors, up to 10 m)
    encoder: Path | None = None
    threads: int = 2
    seed: int = 0
    #: the map's head: 512 wide fits and generalises better than 256 in the same time
    #: (demo walk, 16 min on one busy thread: 0.086 m against 0.119 m with 3x the steps)
    head_width: int = 512
    head_layers: int = 3
    head: HeadTrainingConfig = field(default_factory=HeadTrainingConfig)
    #: no copies by default: 3 scaled and rolled copies helped the demo's 4-walk map
    #: (7,000 head steps: 0.071 m against 0.090 m, relit 0.164 against 0.220 m) but not
    #: room:3001 (0.174 against 0.182 m at 7,000 steps, worse at 4,000), double the peak
    #: memory and add 1.5 minutes of encoding; spreading the frames over more walks
    #: (--every) helped every scene 2-3.6x (benchmarks/README.md), and on that recipe the
    #: copies added nothing (demo, 20 walks: 0.056 m either way). `--augment 3` turns them on
    augmentation: Augmentation = field(default_factory=Augmentation)
    pnp: PnpSettings = field(default_factory=PnpSettings)
    scene: str = ""
    command: str = ""  # the command line that made the map (recorded in its JSON)
    # without depth in the recording: triangulate keypoints of the mapping frames with their
    # poses and use them as sparse depth targets (mapping/triangulation.py)
    triangulate: bool = True
    triangulation: TriangulationOptions = field(default_factory=TriangulationOptions)


def load_encoder(path: Path | None = None) -> tuple[SceneEncoder, dict]:
    """The frozen generic encoder and its reference (file name, sha256, how it was made)."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else shipped_weights(ENCODER_NAME)
    if not path.is_file():
        raise MappingError(f"encoder {path} not found")
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    encoder = SceneEncoder(int(meta.get("feature_dim", 128)))
    try:
        tensors = load_file(str(path))
        encoder.load_state_dict({k: v.float() for k, v in tensors.items()})
    except Exception as exc:  # noqa: BLE001 - any unreadable / mismatching file is the same error
        raise MappingError(f"encoder {path} cannot be loaded: {exc}") from None
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    reference = {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                 "made_by": meta.get("made_by")}
    return encoder, reference


def input_spec_for(camera: dict, height: int, stride: int = 8) -> InputSpec:
    """Resize the shorter side to ``height`` and centre-crop the width to a multiple of the
    stride (the whole image, less a few columns)."""
    camera = check_camera(camera)
    w, h = camera["width"], camera["height"]
    short = min(w, h)
    height = min(int(height), short)  # never upsample: the estimator refuses images smaller than its input
    new_w, new_h = round(w * height / short), round(h * height / short)
    crop = (new_h // stride * stride, new_w // stride * stride)
    return InputSpec(resize=int(height), crop=crop)


def split_frames(count: int, share: float, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of mapping and validation frames: contiguous blocks, every k-th held out."""
    if share <= 0 or count < 2 * block:
        return np.arange(count), np.arange(0)
    every = max(2, round(1.0 / share))
    blocks = np.arange(count) // block
    held = (blocks % every) == (every // 2)
    return np.flatnonzero(~held), np.flatnonzero(held)


def _targets_at(frame: MapFrame, camera: dict, spec: InputSpec):
    """``pixels (N, 2) -> true points (N, 3)`` from the frame's depth (NaN where none), with
    the training code's own back-projection (DSAC++ builds its targets the same way);
    None without depth."""
    if frame.depth is None:
        return None
    depth = np.asarray(frame.depth, dtype=np.float32)
    depth = np.where(depth > 0, depth, np.nan)  # 0 = no reading: no target, not a point at the camera
    return lambda pixels: scene_coordinates_at(depth, camera, spec, frame.t, frame.q, pixels)


class _Selected:
    """The frames at ``indices`` of ``frames``, still read one at a time on demand."""

    def __init__(self, frames, indices):
        self.frames, self.indices = frames, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> MapFrame:
        return self.frames[int(self.indices[k])]


def covariance_scale(errors: np.ndarray, covariances: np.ndarray, trim: float = 0.02) -> tuple[float, dict]:
    """Factor on the PnP covariances that makes their average NEES 6 on the validation
    frames, the top ``trim`` share of NEES left out (gross failures that their own
    covariance already flags are not what the scale should chase)."""
    values = nees(errors, covariances)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return 1.0, {"frames": 0}
    kept = np.sort(values)[:max(1, int(math.ceil(len(values) * (1.0 - trim))))]
    scale = float(np.clip(kept.mean() / 6.0, 1e-3, 1e6))
    return scale, {"frames": int(len(values)), "nees_mean_before": float(values.mean()),
                   "nees_median_before": float(np.median(values)), "trimmed_share": trim}


#: s: consecutive validation frames further apart than this are separate runs
_RUN_GAP_S = 1.0


def fusion_noise(stamps, indices, errors, covariances) -> dict | None:
    """What the fusion needs to know about a map's errors besides their covariance, from
    its validation frames: ``abs_correlation_time`` (s; how long an error stays alike:
    fused as independent, 15 correlated poses a second would shrink the fused covariance
    as if each were a new look). Lags are taken only inside a run of consecutive frames
    (a held-out block); None with fewer than 3 frames or no two consecutive ones. The
    fusion takes it in place of its parameter's value (``noise_from_weights``), so that a
    map whose errors pass in a fraction of a second is not fused as if they lasted the
    default second.

    The share of the errors common to a whole walk is recorded (``validation_bias_share``)
    but not handed to the fusion: held-out blocks lie between mapping frames of the same
    walks, so they cannot show the bias a map has along a walk it was not made from (on
    five such walks of the demo room: 1-40 %, against 4 % on the blocks). The parameter
    file's ``abs_bias_share`` stays in charge of that."""
    stamps, indices = np.asarray(stamps, float), np.asarray(indices, int)
    if len(stamps) < 3:
        return None
    steps = np.diff(stamps)
    new_run = (np.diff(indices) != 1) | ~(steps > 0) | (steps > _RUN_GAP_S)
    if np.all(new_run):
        return None
    runs = np.concatenate([[0], np.cumsum(new_run)])
    return {"abs_correlation_time": round(correlation_time(stamps, errors, covariances, segments=runs), 4),
            "validation_bias_share": round(bias_share(errors, covariances), 4),
            "frames": int(len(stamps)), "runs": int(runs[-1] + 1),
            "measured_on": "the map's validation frames (held-out blocks of the mapping walks)"}


def validate_map(model: AceLocalizer, frames, validation_idx, spec: InputSpec, report=None) -> tuple[dict, dict]:
    """Localize the held-out frames through the run-time path (encoder + head + PnP-RANSAC)
    and calibrate the covariance on their errors: ``(metrics, validation_errors)`` for
    the checkpoint's JSON. Also used to recalibrate an existing map."""
    report = report or (lambda *a, **k: None)
    t_est, q_est, covs, t_gt, q_gt, stamps, failed = [], [], [], [], [], [], 0
    for done, i in enumerate(validation_idx):
        frame = frames[int(i)]
        stamps.append(frame.stamp)
        x = preprocess(torch.from_numpy(np.ascontiguousarray(frame.image))[None], spec)
        t, q, cov = model.localize(x)
        t_est.append(t[0].double().numpy())
        q_est.append(q[0].double().numpy())
        covs.append(cov[0].numpy())
        failed += int(np.allclose(cov[0].numpy(), FAILED_COVARIANCE))
        t_gt.append(frame.t)
        q_gt.append(frame.q)
        report("validate", done + 1, len(validation_idx), None)
    metrics, validation_errors = {"validation_frames": int(len(validation_idx))}, {}
    if len(validation_idx):
        t_est, q_est, t_gt, q_gt = map(np.stack, (t_est, q_est, t_gt, q_gt))
        trans, rot = pose_errors(t_est, q_est, t_gt, q_gt)
        ok = np.array([not np.allclose(c, FAILED_COVARIANCE) for c in covs])
        # the localized frames' errors, ROS order: the covariance scale and the fusion's figures
        errors, ok_covs = pose_error_vectors(t_est[ok], q_est[ok], t_gt[ok], q_gt[ok]), np.stack(covs)[ok]
        scale_factor, calib = covariance_scale(errors, ok_covs) if ok.any() else (1.0, {"frames": 0})
        metrics["validation"] = {
            "median_translation_m": float(np.median(trans)), "median_rotation_deg": float(np.median(rot)),
            "within_5cm_5deg": float(np.mean((trans < 0.05) & (rot < 5.0))), "failed_frames": int(failed)}
        validation_errors["model_cov_scale"] = scale_factor
        spread = validation_covariance(t_est[ok], q_est[ok], t_gt[ok], q_gt[ok]) if ok.sum() >= 2 else None
        if spread is not None:  # the spread of the validation errors, for tools that read cov_ros
            validation_errors["cov_ros"] = spread
        validation_errors["calibration"] = calib
        noise = fusion_noise(np.asarray(stamps)[ok], np.asarray(validation_idx)[ok], errors,
                             ok_covs) if ok.any() else None
        if noise is not None:
            validation_errors["fusion_noise"] = noise
    return metrics, validation_errors


def make_map(frames, camera: dict, out, options: MapOptions = MapOptions(), progress=None) -> dict:
    """Map ``frames`` (a sequence of :class:`MapFrame`, indexable, with ``len``) seen by
    ``camera`` (fx, fy, cx, cy, width, height) into the checkpoint ``out``. ``progress``
    (optional) is called as ``progress(stage, done, total, info)``. Runs on
    ``options.threads`` threads and gives the caller its own thread count back."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, options.threads))
    try:
        return _make_map(frames, camera, out, options, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _make_map(frames, camera: dict, out, options: MapOptions, progress) -> dict:
    camera = check_camera(camera)
    count = len(frames)
    if count < 10:
        raise MappingError(f"{count} frames with poses: a map needs at least 10")
    report = progress or (lambda *a, **k: None)
    timings = {}
    started = time.monotonic()
    encoder, encoder_ref = load_encoder(options.encoder)
    spec = input_spec_for(camera, options.input_height, encoder.stride)
    fx, fy, cx, cy = input_camera(camera, spec)
    K = intrinsic_matrix(fx, fy, cx, cy)
    mapping_idx, validation_idx = split_frames(count, options.validation_share, options.validation_block)

    triangulated = None  # sparse depth of each mapping frame, where the recording has none
    if options.triangulate and len(mapping_idx) and frames[int(mapping_idx[0])].depth is None:
        tri_started = time.monotonic()
        triangulated = triangulate_frames(_Selected(frames, mapping_idx), camera, options.triangulation,
                                          lambda stage, done, total: report(stage, done, total, None),
                                          threads=options.threads)
        timings["triangulate_s"] = round(time.monotonic() - tri_started, 1)
    encode_started = time.monotonic()
    builder = BufferBuilder(encoder, spec, K, len(mapping_idx), options.max_samples, options.seed,
                            options.augmentation)
    radius = cell_radius(camera, spec, encoder.stride)
    for done, i in enumerate(mapping_idx):
        frame = frames[int(i)]
        if triangulated is not None:
            frame = replace(frame, depth=triangulated.depths[done].image(camera["height"], camera["width"], radius))
        builder.add(frame.image, frame.t, frame.q, _targets_at(frame, camera, spec))
        report("encode", done + 1, len(mapping_idx), None)
    buffer = builder.finish()
    timings["encode_s"] = round(time.monotonic() - encode_started, 1)

    centres = buffer.camera_centres()
    spread = float(np.ptp(centres, axis=0).max()) if len(centres) > 1 else 0.0
    init_depth = options.init_depth if options.init_depth is not None else float(np.clip(spread / 3.0, 2.0, 10.0))
    head_config = HeadTrainingConfig(**{**asdict(options.head), "init_depth": init_depth,
                                        "threads": options.threads, "seed": options.seed})
    centre, scale = coordinate_frame(buffer, init_depth)
    model = AceLocalizer(input_camera=[fx, fy, cx, cy], camera=camera, feature_dim=encoder.feature_dim,
                         head_width=options.head_width, head_layers=options.head_layers, encoder=encoder_ref,
                         inlier_threshold=options.pnp.inlier_threshold,
                         ransac_iterations=options.pnp.iterations, min_inliers=options.pnp.min_inliers,
                         refine_iterations=options.pnp.refine_iterations, confidence=options.pnp.confidence,
                         seed=options.pnp.seed, inlier_power=options.pnp.inlier_power)
    model.encoder.load_state_dict(encoder.state_dict())
    model.set_coordinate_frame(centre, scale)
    head_started = time.monotonic()
    result = train_head(model.head, buffer, torch.as_tensor(centre), scale,
                        steps=options.steps, seconds=None if options.steps else options.minutes * 60.0,
                        config=head_config, on_step=lambda s, total, info: report("head", s, total, info))
    timings["head_s"] = round(time.monotonic() - head_started, 1)
    model.eval()
    t_all = np.stack([frames[int(i)].t for i in mapping_idx])
    model.set_pose_stats(t_all.mean(axis=0), np.maximum(t_all.std(axis=0), 1e-3))

    val_started = time.monotonic()
    metrics, validation_errors = validate_map(model, frames, validation_idx, spec, report)
    metrics["mapping_frames"] = int(len(mapping_idx))
    timings["validate_s"] = round(time.monotonic() - val_started, 1)
    timings["total_s"] = round(time.monotonic() - started, 1)
    meta = {
        "input": spec.to_meta(), "scene": options.scene, "map_frame": "map",
        "training": {"method": "ace mapping (vizloc-map)", "frames": count, "buffer_samples": len(buffer),
                     "buffer_bytes": int(len(buffer) * BYTES_PER_SAMPLE), "depth_supervised": buffer.has_depth,
                     "head_steps": result.steps, "head_config": result.config, "init_depth_m": init_depth,
                     "augmentation": asdict(options.augmentation),
                     "coordinate_centre": [float(v) for v in centre], "coordinate_scale": scale,
                     "history": result.history[-20:], "timings": timings, "encoder": encoder_ref,
                     **({"command": options.command} if options.command else {})},
        "metrics": metrics, "validation_errors": validation_errors,
    }
    if triangulated is not None:
        meta["training"]["triangulation"] = {
            **triangulated.summary, "seconds": timings["triangulate_s"],
            "buffer_rows_with_target": float(torch.isfinite(buffer.targets).all(dim=1).float().mean())}
    path = save_checkpoint(out, model, meta, dtype="fp16")
    return {"checkpoint": str(path), **meta}


__all__ = ["MapFrame", "MapOptions", "MappingError", "fusion_noise", "load_encoder", "make_map", "validate_map"]
