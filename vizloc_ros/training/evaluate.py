"""`vizloc-eval`: a checkpoint on a dataset split -> median errors, threshold shares and the
NEES of the covariance the estimator publishes with each pose.

Runs the images through :class:`~vizloc_ros.localize.estimator.PoseEstimator`, the class the
node and the replay use, so the figures are those of the deployed path (same
preprocessing, same device handling). Prints a table and writes JSON (``--json``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from vizloc_ros import geometry
from vizloc_ros.files import sweep_stale, write_text
from vizloc_ros.localize.models import checkpoint_paths
from vizloc_ros.localize.models.checkpoint import floor_singular_covariance, is_singular
from vizloc_ros.metrics import (THRESHOLDS, evaluate_poses, nees_summary, planar_errors, scored_frames_warning,
                                threshold_key)
from vizloc_ros.pipeline.regressor import load_estimator
from vizloc_ros.training.datasets import KittiOdometry, open_dataset

LOG = logging.getLogger(__name__)


def estimate_dataset(weights, dataset, device: str = "auto", batch_size: int = 16,
                     progress: bool = True) -> dict:
    """Every frame of ``dataset`` through the deployed estimator, in the dataset's order:
    ``{"t", "q", "cov"}`` arrays ((N, 3), (N, 4), (N, 6, 6)), ``seconds`` and ``device``.

    One function for ``vizloc-eval`` and the model zoo's table, so a figure of the table
    is what ``vizloc-eval`` prints for the same checkpoint and frames (issue #18).
    """
    from tqdm import tqdm

    estimator = load_estimator(weights, device=device)  # a bad file: ValueError naming it
    t_est, q_est, cov = [], [], []
    started = time.perf_counter()
    bar = tqdm(total=len(dataset), desc="evaluating", unit="frame", disable=not progress,
               dynamic_ncols=True)
    for start in range(0, len(dataset), batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        by_shape: dict = {}
        for k, sample in enumerate(samples):  # estimate_batch wants one image size per call
            by_shape.setdefault(sample["image"].shape, []).append(k)
        results = [None] * len(samples)
        for indices in by_shape.values():
            # sequence models read the frames in the dataset's order; stamps split recordings
            stamps = [samples[k]["stamp"] for k in indices] if estimator.sequential else None
            batch = estimator.estimate_batch([samples[k]["image"] for k in indices], stamps=stamps)
            for k, result in zip(indices, batch):
                results[k] = result
        t_est.extend(r.t for r in results)
        q_est.extend(r.q for r in results)
        cov.extend(r.cov for r in results)
        bar.update(len(samples))
    bar.close()
    return {"t": np.array(t_est, dtype=float).reshape(-1, 3), "q": np.array(q_est, dtype=float).reshape(-1, 4),
            "cov": np.array(cov, dtype=float).reshape(-1, 6, 6), "seconds": time.perf_counter() - started,
            "device": str(estimator.device)}


def evaluate_checkpoint(weights, dataset, device: str = "auto", batch_size: int = 16,
                        progress: bool = True) -> dict:
    """Metrics of ``weights`` on every frame of ``dataset`` (any PoseDataset): the errors
    of :func:`~vizloc_ros.metrics.evaluate_poses` and the honesty of the published
    covariance (:func:`~vizloc_ros.metrics.nees_summary`, NEES per dof near 1 when honest)."""
    estimates = estimate_dataset(weights, dataset, device, batch_size, progress)
    t_gt, q_gt = dataset.poses()
    metrics = evaluate_poses(estimates["t"], estimates["q"], t_gt, q_gt)
    metrics.update(planar_errors(estimates["t"], estimates["q"], t_gt, q_gt))
    metrics.update(nees_summary(estimates["t"], estimates["q"], t_gt, q_gt, estimates["cov"]))
    elapsed = estimates["seconds"]
    metrics["frames_per_second"] = len(dataset) / elapsed if elapsed > 0 else None
    metrics["frames_left_out"] = {why: int(n) for why, n in getattr(dataset, "left_out", {}).items() if n}
    metrics["device"] = estimates["device"]
    return metrics


def validation_covariance(t_est, q_est, t_gt, q_gt) -> list | None:
    """6x6 ROS-order covariance of validation errors (translation in map, left rotation
    vector), the estimator's uncertainty when MC dropout is off; None when it cannot be
    measured (no frame, or no error at all), so the checkpoint gets none and the
    estimator its pessimistic default.

    With fewer frames than dimensions (6), or errors that span fewer, the sample
    covariance is singular: the network would be trusted exactly along the directions
    the frames missed. It is then floored
    (:func:`~vizloc_ros.localize.models.checkpoint.floor_singular_covariance`) and a
    warning says so.
    """
    dt = np.asarray(t_gt, float) - np.asarray(t_est, float)
    if len(dt) == 0:
        return None
    dr = geometry.so3_log(geometry.quat_to_matrix(q_gt) @ np.swapaxes(geometry.quat_to_matrix(q_est), -1, -2))
    err = np.concatenate([dt, dr], axis=1)
    cov = err.T @ err / len(err)
    if not np.all(np.isfinite(cov)) or not np.any(np.diag(cov) > 0):
        return None
    if is_singular(cov):
        LOG.warning("the validation errors of %d frame(s) give a singular covariance (fewer frames than "
                    "its 6 dimensions?): each block floored with its mean variance; validate on more frames",
                    len(err))
        cov = floor_singular_covariance(cov)
        if is_singular(cov):  # no translation or no rotation error at all: nothing measured there
            return None
    return cov.tolist()


#: chains of this many consecutive steps measure a relative head's drift (10 Hz: up to 2 s,
#: about how long the fusion integrates it between the network's absolute poses that it
#: can trust as independent)
DRIFT_HORIZONS = (1, 2, 5, 10, 20)


def drift_covariance(t_rel, q_rel, gt_t_rel, gt_q_rel, horizons=DRIFT_HORIZONS) -> tuple[list | None, dict]:
    """Per-step covariance (6x6, ROS order, as :func:`validation_covariance`) of a relative
    (odometry) head that accounts for how its errors add up, and what was measured.

    The fusion integrates the head's steps as independent, so their covariance must be
    the one whose sum over K steps matches the drift of K chained steps. A learned
    head's step errors are not independent (it misjudges a turn or a sideways shift for
    many frames alike): on the demo validation walk, VLocNet's drift over 10-20 steps
    was 5-11 times what the single steps' spread predicts. So the single-step covariance
    is scaled, translation and rotation apart (its shape across the axes kept), by the
    largest ratio of "drift over K steps / K" to it among ``horizons``. Steps are
    ``(N, 3)`` translations and ``(N, 4)`` quaternions between consecutive frames; a
    non-finite step breaks the chains through it.
    """
    t_rel, q_rel = np.asarray(t_rel, float), np.asarray(q_rel, float)
    gt_t_rel, gt_q_rel = np.asarray(gt_t_rel, float), np.asarray(gt_q_rel, float)
    finite = (np.all(np.isfinite(t_rel), axis=1) & np.all(np.isfinite(q_rel), axis=1)
              & np.all(np.isfinite(gt_t_rel), axis=1) & np.all(np.isfinite(gt_q_rel), axis=1))
    single = validation_covariance(t_rel[finite], q_rel[finite], gt_t_rel[finite], gt_q_rel[finite])
    info = {"steps": int(finite.sum())}
    if single is None:
        return None, info
    single = np.asarray(single)
    base = {"translation": float(np.trace(single[:3, :3])), "rotation": float(np.trace(single[3:, 3:]))}
    ratio = {"translation": 1.0, "rotation": 1.0}
    horizon = {"translation": 1, "rotation": 1}
    for k in horizons:
        k = int(k)
        starts = [s for s in range(len(t_rel) - k + 1) if finite[s:s + k].all()]
        if k < 2 or len(starts) < 10:
            continue
        errors = []
        for s in starts:
            tp, qp = _chain(t_rel[s:s + k], q_rel[s:s + k])
            tg, qg = _chain(gt_t_rel[s:s + k], gt_q_rel[s:s + k])
            rot = geometry.so3_log(geometry.quat_to_matrix(qg) @ geometry.quat_to_matrix(qp).T)
            errors.append(np.concatenate([tg - tp, rot]))
        errors = np.asarray(errors)
        per_step = errors.T @ errors / (len(errors) * k)
        for part, block in (("translation", slice(0, 3)), ("rotation", slice(3, 6))):
            if base[part] > 0:
                r = float(np.trace(per_step[block, block]) / base[part])
                if r > ratio[part]:
                    ratio[part], horizon[part] = r, k
    scale = np.sqrt(np.array([ratio["translation"]] * 3 + [ratio["rotation"]] * 3))
    cov = single * np.outer(scale, scale)
    info.update({"inflation": {part: round(ratio[part], 3) for part in ratio},
                 "horizon_steps": horizon, "horizons": [int(k) for k in horizons]})
    return cov.tolist(), info


def _chain(t_steps, q_steps):
    """Compose consecutive relative poses into the motion from the first frame to the last."""
    t, q = np.zeros(3), np.array([1.0, 0.0, 0.0, 0.0])
    for t_step, q_step in zip(t_steps, q_steps):
        t, q = geometry.pose_compose(t, q, t_step, q_step)
    return t, q


def format_table(metrics: dict, title: str = "") -> str:
    """The table vizloc-eval prints: how many frames were scored (of how many, and why
    not the others), the median errors and threshold shares, the speed; a warning line
    when few frames could be scored."""
    left_out = metrics.get("frames_left_out") or {}
    total = metrics["frames"] + sum(left_out.values())
    why_not = ", ".join(f"{n} {why}" for why, n in left_out.items())
    scored = f"{metrics['frames']}" + (f" of {total} ({why_not})" if left_out else "")
    rows = [("frames scored", scored),
            ("median translation", f"{metrics['median_translation_m']:.3f} m"),
            ("median rotation", f"{metrics['median_rotation_deg']:.2f} deg")]
    for metres, degrees in THRESHOLDS:
        rows.append((f"within {metres * 100:g} cm, {degrees:g} deg",
                     f"{100 * metrics[threshold_key(metres, degrees)]:.1f} %"))
    if metrics.get("median_planar_translation_m") is not None:  # what a ground robot is judged by
        rows.append(("median in the plane", f"{metrics['median_planar_translation_m']:.3f} m (x, y), "
                                            f"{metrics['median_heading_deg']:.2f} deg (heading)"))
        rows.append(("plane: within 25 cm, 5 deg", f"{100 * metrics['planar_within_25cm_5deg']:.1f} %"))
    if metrics.get("nees_per_dof") is not None:  # 1 when the published covariance is honest
        rows.append(("NEES per dof", f"{metrics['nees_per_dof']:.2f} ({metrics['nees_frames']} frames)"))
    if metrics.get("frames_per_second"):
        rows.append(("frames/s", f"{metrics['frames_per_second']:.1f} ({metrics.get('device')})"))
    width = max(len(r[0]) for r in rows)
    lines = [title] if title else []
    lines += [f"  {name.ljust(width)}  {value}" for name, value in rows]
    warning = scored_frames_warning(metrics["frames"], total, why_not)
    return "\n".join(lines + ([warning] if warning else []))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vizloc-eval",
        description="Evaluate a checkpoint on a dataset split: median translation / rotation "
                    "error and the shares of frames within DESIGN.md's thresholds.")
    parser.add_argument("weights", help="checkpoint (X.safetensors with X.json), or X.onnx")
    parser.add_argument("data", help="dataset folder (7-Scenes, Cambridge, KITTI) or a bag")
    parser.add_argument("--kind", default="7scenes", choices=("7scenes", "cambridge", "kitti", "bag"),
                        help="dataset layout (default 7scenes)")
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parser.add_argument("--frames", default=None,
                        help="KITTI only: frame selection 'even', 'odd' or 'a:b[:step]'")
    parser.add_argument("--image-topic", default="/camera/image_raw", help="bag only")
    parser.add_argument("--gt-topic", "--ground-truth", dest="gt_topic", default="/ground_truth/pose",
                        help="bag only: a pose topic or tf:PARENT->CHILD, as vizloc-replay's --ground-truth")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", dest="json_out", help="write the metrics here as JSON")
    parser.add_argument("--record", metavar="NAME",
                        help="also store the metrics in the checkpoint's JSON sidecar under "
                             "metrics.NAME (e.g. test), with the dataset path")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def parse_frames(spec: str | None, count: int):
    """'even' | 'odd' | 'a:b[:step]' -> list of frame indices below ``count`` (None: all)."""
    if spec is None:
        return None
    if spec in ("even", "odd"):
        return list(range(0 if spec == "even" else 1, count, 2))
    try:
        parts = [int(p) if p else None for p in spec.split(":")]
        selection = list(range(count)[slice(*parts)])
    except (ValueError, TypeError):
        raise ValueError(f"--frames must be even, odd or a:b[:step], got {spec!r}") from None
    return selection


def _open(args):
    if args.kind == "kitti":
        poses = Path(args.data) / "poses.txt"
        count = sum(1 for line in open(poses) if line.strip()) if poses.is_file() else 0
        return KittiOdometry(args.data, frames=parse_frames(args.frames, count))
    if args.kind == "bag":
        return open_dataset("bag", args.data, image_topic=args.image_topic, gt_topic=args.gt_topic)
    return open_dataset(args.kind, args.data, split=args.split)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        print("vizloc-eval: --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        if args.json_out:  # before minutes of evaluation, not after
            _check_json_target(Path(args.json_out))
        dataset = _open(args)
        metrics = evaluate_checkpoint(args.weights, dataset, args.device, args.batch_size,
                                      progress=not args.no_progress)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"vizloc-eval: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # weights that give NaN on some images only
        print(f"vizloc-eval: {exc} (NaN or inf in the weights? a diverged training?)", file=sys.stderr)
        return 2
    print(format_table(metrics, f"{args.weights} on {args.data} ({args.split})"))
    try:
        if args.json_out:
            _write_json_atomically(Path(args.json_out), metrics)
        if args.record:
            record_metrics(args.weights, args.record, {**metrics, "dataset": str(args.data),
                                                       "kind": args.kind, "split": args.split})
    except OSError as exc:
        print(f"vizloc-eval: cannot write the metrics: {exc}", file=sys.stderr)
        return 2
    return 0


def _check_json_target(path: Path) -> None:
    if path.is_symlink():  # said now, not after minutes of evaluation
        raise ValueError(f"--json {path} is a symbolic link (to {os.readlink(path)}); give the real path")
    if path.is_dir():
        raise ValueError(f"--json {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise ValueError(f"--json {path}: folder {path.parent} does not exist")
    sweep_stale(path, "--json file")  # a killed run's temporary goes; a live writer is refused


def _write_json_atomically(path: Path, document: dict) -> None:
    write_text(path, json.dumps(document, indent=2) + "\n", what="metrics file")


def record_metrics(weights, name: str, metrics: dict) -> Path:
    """Store ``metrics`` under ``metrics.<name>`` of the checkpoint's JSON sidecar."""
    _, json_path = checkpoint_paths(weights)
    meta = json.loads(json_path.read_text())
    meta.setdefault("metrics", {})[name] = metrics
    _write_json_atomically(json_path, meta)
    return json_path


if __name__ == "__main__":
    sys.exit(main())
