"""`vizloc-replay`: run the live pipeline on a recording and report how well it localized.

The replay drives the same cores as the nodes (:mod:`vizloc_ros.pipeline`), split the
same way. This process reads the images and runs them through
:class:`~vizloc_ros.pipeline.regressor.RegressorCore` (batched: the estimator is stateless, so
batching changes speed, not results). The resulting ``/vizloc/absolute_pose`` poses go
to the fusion side (:mod:`vizloc_ros.replay.fusion_side`, a second process by default), which
reads the bag's odometry, IMU and ground truth itself, runs
:class:`~vizloc_ros.pipeline.fusion_core.FusionCore` on everything in header-stamp order and writes
whatever the fusion node would publish to an output bag. Ground truth is only read for
the report. Sequence models (VidLoc, VLocNet) get the images in stamp order, as the
node does. With ``--visual-odom`` a network with a relative head (VLocNet) is its own
odometry: the regressor core integrates its frame-to-frame motion into
``/vizloc/visual_odometry``, which the fusion uses instead of the bag's odometry (the
bag's is still reported).

Output folder (built under a temporary name, renamed when complete)::

    bag/                    rosbag2 (mcap): /vizloc/absolute_pose, /vizloc/pose, /vizloc/path, /tf
                            (+ /vizloc/visual_odometry)
    ground_truth.tum  absolute.tum  fused.tum  odometry.tum  (visual_odometry.tum)
    metrics.json  report.md  trajectories.png  errors.png  error_cdf.png  fused_error_band.png
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vizloc_ros import geometry
from vizloc_ros.files import OutputError, check_not_a_link, staged
from vizloc_ros.metrics import (nees_summary, pose_error_vectors, pose_errors, step_errors, summarize_errors,
                                trajectory_metrics, usable_covariances)
from vizloc_ros.pipeline.regressor import RegressorCore, load_estimator
from vizloc_ros.ros_io import messages
from vizloc_ros.ros_io.bag_io import list_topics, read_messages, require_messages, topic_message_counts
from vizloc_ros.ros_io.camera_mount import FROM_FIXED_TF, CameraMountResolver, resolve_in_bag
from vizloc_ros.ros_io.ground_truth import (GT_TYPES, TF_TYPES, GroundTruthError, GroundTruthReader,
                                          default_max_gap, held_index, interpolate_poses, previous_poses)
from vizloc_ros.ros_io.messages import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_TYPES
from vizloc_ros.localize.weights import network_noise, shipped_weights, sidecar_json
from vizloc_ros.replay.fusion_side import (ORDERS, FusionProcess, FusionSideSpec, InProcessFusion, ReplayError,
                                           bag_errors, fusion_settings_of)
from vizloc_ros.replay.params_file import read_params_file
from vizloc_ros.replay.report import format_table, write_report
from vizloc_ros.sim.synthetic import cached_demo_bag

LOG = logging.getLogger("vizloc-replay")

#: largest --batch-size: every image of a batch is decoded in memory at once
MAX_BATCH_SIZE = 1024


@dataclass
class ReplayOptions:
    """What one replay runs; ``vizloc-replay`` fills it from its flags and ``--params-file``
    (:mod:`vizloc_ros.replay.params_file`: the nodes' parameters, same names where they
    exist)."""

    bag: Path
    out: Path
    weights: Path | None = None
    image_topic: str = "/camera/image_raw"
    ground_truth: str = "/ground_truth/pose"
    odom_topic: str | None = "/odom"
    imu_topic: str | None = None
    fusion: bool = True
    device: str = "auto"
    precision: str = "fp32"  # fp16: the GPU path's half precision (the node's `precision`)
    batch_size: int = 16
    overwrite: bool = False
    progress: bool = True
    map_frame: str = "map"
    odom_frame: str = "odom"
    base_frame: str = "base_link"
    camera_extrinsic: tuple | None = None  # (t, q_wxyz) base -> camera, wins over the bag's TF
    # (t, q_wxyz) base -> camera used while the bag gives none (the node's camera_extrinsic)
    camera_extrinsic_fallback: tuple | None = None
    camera_frame: str = ""  # the camera's frame in TF; empty: the images' frame_id
    max_rate: float = 0.0  # frames per second of message time the network runs; 0: every frame
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # larger images are dropped undecoded
    fusion_params: dict = field(default_factory=dict)  # FusionConfig fields
    fusion_settings: dict = field(default_factory=dict)  # FusionSettings fields but frames and inputs
    mc_dropout_samples: int = 0
    visual_odometry: bool = False  # the network's relative head as the fusion's odometry
    prior_weights: Path | None = None  # coarse prior (e.g. NetVLAD): initialisation / kidnap only
    fusion_process: bool = True  # fuse in a child process, beside the network (else in this one)
    order: str = "stamp"  # feed the fusion in header-stamp order, or "receive": the bag's log order


# --------------------------------------------------------------------------- bag reading

def _check_topics(bag: Path, options: ReplayOptions) -> dict:
    try:
        topics = list_topics(bag)
    except FileNotFoundError:
        raise ReplayError(f"bag not found: {bag}") from None
    except Exception as exc:  # rosbags raises several types for corrupt bags
        raise ReplayError(f"cannot open bag {bag}: {exc}") from None
    listing = "\n".join(f"  {name}  [{kind}]" for name, kind in sorted(topics.items()))

    def need(topic, allowed, what, hint=""):
        if topic not in topics:
            raise ReplayError(f"{what} topic {topic!r} is not in {bag}{hint}. The bag has:\n{listing}")
        if topics[topic] not in allowed:
            raise ReplayError(f"{what} topic {topic!r} carries {topics[topic]}, expected one of "
                              f"{', '.join(allowed)}")

    candidates = sorted(name for name, kind in topics.items() if kind in IMAGE_TYPES)
    need(options.image_topic, IMAGE_TYPES, "image",
         f" (image topics there: {', '.join(candidates)}; pass one with --image-topic)" if candidates else "")
    if options.ground_truth.startswith("tf:"):
        need("/tf", TF_TYPES, "TF (ground truth)")
    else:
        poses = sorted(name for name, kind in topics.items() if kind in GT_TYPES)
        need(options.ground_truth, GT_TYPES, "ground-truth",
             (f" (pose topics there: {', '.join(poses)}; " if poses else " (")
             + "or --ground-truth tf:PARENT->CHILD for a TF chain)")
    try:  # a topic without messages: said now (an image topic: with those that have images)
        gt_topic = {} if options.ground_truth.startswith("tf:") else {options.ground_truth: "ground-truth"}
        require_messages(bag, {options.image_topic: "image", **gt_topic}, {options.image_topic: candidates},
                         hint=" (pass one with --image-topic)")
    except ValueError as exc:
        raise ReplayError(str(exc)) from None
    if options.fusion and options.odom_topic and not options.visual_odometry:
        need(options.odom_topic, ("nav_msgs/msg/Odometry",), "odometry", " (--odom-topic none to fuse without it)")
    if options.fusion and options.imu_topic:
        need(options.imu_topic, ("sensor_msgs/msg/Imu",), "IMU")
    return topics


def is_replay_report(path: Path) -> bool:
    """Whether ``path`` is a folder that ``--overwrite`` may replace: an earlier report
    (its ``metrics.json`` and ``report.md``) or an empty folder, never a link."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    return not any(path.iterdir()) or ((path / "metrics.json").is_file() and (path / "report.md").is_file())


def _check_output(out: Path, options: ReplayOptions, weights) -> None:
    """Refuse an output folder that cannot be written, or whose replacement would destroy
    something that is not an earlier report (``--overwrite`` with ``--out .``, or with
    the folder that holds the bag or the weights, is a typing slip, not a wish). Said
    before the run, not after it: a link, too."""
    try:
        check_not_a_link(out, "--out")
    except OutputError as exc:
        raise ReplayError(str(exc)) from None
    if not out.exists():
        return
    earlier_report = is_replay_report(out)
    if not options.overwrite:
        # --overwrite is suggested only where it would be accepted
        raise ReplayError(f"output folder {out} exists; " + ("pass --overwrite to replace it" if earlier_report else
                                                             "it is not a vizloc-replay report: choose another --out"))
    if not out.is_dir():
        raise ReplayError(f"--out {out} is a file, not a report folder; choose another --out")
    target = out.resolve()
    for what, path in (("the bag", options.bag), ("the weights", weights)):
        if path is None:
            continue
        resolved = Path(path).resolve()
        if resolved == target or target in resolved.parents:
            raise ReplayError(f"--out {out} holds {what} ({path}): refusing to replace it; "
                              "choose another --out")
    if not earlier_report:
        raise ReplayError(f"--out {out} is not a vizloc-replay report folder (no metrics.json and report.md): "
                          "refusing to replace it; choose another --out")


# --------------------------------------------------------------------------- the run

def run_replay(options: ReplayOptions) -> dict:
    """Replay a bag; returns metrics. Writes the output folder atomically."""
    bag, out = Path(options.bag), Path(options.out)
    if not 1 <= options.batch_size <= MAX_BATCH_SIZE:
        raise ReplayError(f"--batch-size must be between 1 and {MAX_BATCH_SIZE}, got {options.batch_size}")
    weights = options.weights or default_weights()
    _check_output(out, options, weights)
    topics = _check_topics(bag, options)
    use_odom = bool(options.fusion and (options.odom_topic or options.visual_odometry))
    use_imu = bool(options.fusion and options.imu_topic)
    spec = FusionSideSpec(
        bag=bag, out_bag=Path(), ground_truth=options.ground_truth,
        odom_topic=options.odom_topic if options.odom_topic in topics else None,
        imu_topic=options.imu_topic, read_tf_static="/tf_static" in topics, fusion=options.fusion,
        use_odom=use_odom, use_imu=use_imu, visual_odometry=options.visual_odometry,
        coarse_prior=bool(options.prior_weights is not None and options.fusion),
        map_frame=options.map_frame, odom_frame=options.odom_frame, base_frame=options.base_frame,
        fusion_params=dict(options.fusion_params),
        # the fusion reads the noise figures of the weights this replay runs (noise_from_weights)
        fusion_settings={**options.fusion_settings, "network_weights": str(weights)},
        order=options.order)
    if options.fusion:  # bad fusion parameters: say so before anything runs
        # here, not at the top: vizloc_ros.fusion loads gtsam, which --no-fusion does without
        from vizloc_ros.fusion import FusionConfig

        try:
            FusionConfig.from_dict(dict(options.fusion_params))
            settings = fusion_settings_of(spec)
            if settings.noise_from_weights:  # a broken JSON: said now, not by the fusion side
                network_noise(weights)
        except (ValueError, TypeError) as exc:
            raise ReplayError(f"fusion parameters: {exc}") from None
    try:
        GroundTruthReader(options.ground_truth, options.base_frame)
    except GroundTruthError as exc:
        raise ReplayError(str(exc)) from None

    # built under .OUT.partial-PID (locked while this run lives; a dead run's is removed
    # here, a live one's is a concurrent writer: refused now, not after the run); moved
    # into place at the end only if nothing else took OUT meanwhile (--overwrite: only an
    # earlier report is replaced)
    try:
        with staged(out, folder=True, replaceable=is_replay_report if options.overwrite else None,
                    what="report folder") as staging:
            spec.out_bag = staging / "bag"
            return _run_in(staging, options, spec, bag, topics, weights)
    except OutputError as exc:
        raise ReplayError(str(exc)) from None


def _run_in(staging: Path, options: ReplayOptions, spec: FusionSideSpec, bag: Path, topics: dict,
            weights) -> dict:
    """The run itself, writing its report into ``staging``; the fusion side has ended
    when this returns or raises (its child process writes into ``staging``)."""
    from tqdm import tqdm

    fusion_side = None
    try:
        # the fusion side starts first: it reads the odometry and ground truth while the
        # network loads (and, in a child process, before torch starts any thread)
        fusion_side = (FusionProcess if options.fusion_process else InProcessFusion)(spec)
        try:
            # offline: no ROS callbacks to leave a core for, so use every core
            estimator = load_estimator(weights, device=options.device, precision=options.precision,
                                       mc_dropout_samples=options.mc_dropout_samples,
                                       cpu_threads=os.cpu_count() or 1)
        except ValueError as exc:
            raise ReplayError(str(exc)) from None
        try:
            regressor = RegressorCore(estimator, base_T_camera=options.camera_extrinsic or
                                      options.camera_extrinsic_fallback,
                                      map_frame=options.map_frame, visual_odometry=options.visual_odometry,
                                      odom_frame=options.odom_frame, base_frame=options.base_frame,
                                      max_rate=options.max_rate, max_image_pixels=options.max_image_pixels)
        except ValueError as exc:
            what = ("--visual-odom" if options.visual_odometry and "visual" in str(exc) else
                    "max_rate" if "max_rate" in str(exc) else "camera extrinsic")
            raise ReplayError(f"{what}: {exc}") from None
        prior = None
        if options.prior_weights is not None and options.fusion:
            try:
                prior = RegressorCore(load_estimator(options.prior_weights, device=options.device,
                                                     cpu_threads=os.cpu_count() or 1),
                                      base_T_camera=options.camera_extrinsic, map_frame=options.map_frame)
            except ValueError as exc:
                raise ReplayError(f"--prior-weights: {exc}") from None
        # the clock starts at the first image, after the startup work (network, odometry)
        fusion_side.wait_ready()
        started = time.perf_counter()
        metrics = _regress(options, bag, topics, regressor, prior, fusion_side, started, tqdm, read_messages)
        if options.fusion and fusion_settings_of(spec).noise_from_weights:
            noise = network_noise(weights)
            if noise:  # what the fusion took from the weights, beside the figures it gave
                metrics["metrics"]["fusion_noise_from_weights"] = {"json": str(sidecar_json(weights)), **noise}
        write_report(staging, metrics)
        return metrics["metrics"]
    finally:
        if fusion_side is not None:
            fusion_side.close()


def _regress(options, bag, topics, regressor, prior, fusion_side, started, tqdm, read_messages) -> dict:
    """The regressor side: images in batches -> absolute poses -> the fusion side; then
    the report's numbers."""
    camera_mount = CameraMountResolver(
        override=options.camera_extrinsic,
        hint="using camera_extrinsic of --params-file" if options.camera_extrinsic_fallback is not None
        else "pass --camera-extrinsic, or --base-frame if the robot's base has another name")
    # the mount comes from --camera-extrinsic or the bag; a fallback (the node's
    # camera_extrinsic) is used until the bag gives it, as on the robot
    mount_known = options.camera_extrinsic is not None
    warned_extrinsic: list = []
    image_stamps: list = []
    absolute: list = []
    vo_track: list = []        # (stamp, t, q) of the network's visual odometry
    pending: list = []
    latest_image = -np.inf
    received_ns: dict = {}     # --order receive: image stamp (ns) -> its log time (ns)
    n_images = None
    try:
        n_images = topic_message_counts(bag).get(options.image_topic)
    except Exception:  # counts are for the progress bar only
        pass
    phase = {"network": 0.0, "fusion_wait": 0.0}
    bar = tqdm(total=n_images, desc="replay", unit="frame", disable=not options.progress,
               dynamic_ncols=True)

    def flush_images():
        nonlocal mount_known
        if not pending:
            return
        flush_start = time.perf_counter()
        if not mount_known:
            frame = options.camera_frame or pending[0].header.frame_id
            mount = resolve_in_bag(camera_mount, bag, topics, options.base_frame, frame)
            if mount.source == FROM_FIXED_TF:
                LOG.info("camera extrinsic %s -> %s from transforms that stay fixed on /tf: t=%s q_wxyz=%s",
                         options.base_frame, frame, np.round(mount.pose[0], 4), np.round(mount.pose[1], 4))
            if mount.found:
                regressor.set_extrinsic(*mount.pose)
                mount_known = True
            elif not warned_extrinsic:
                warned_extrinsic.append(frame)
                LOG.warning("%s", mount.reason)
        if regressor.sequential:  # clips are read in stamp order
            pending.sort(key=_stamp_or_zero)
        events = []
        if prior is not None:  # coarse poses (retrieval): initialisation and kidnap recovery only
            if regressor.base_T_camera is not None:  # the mount as known now (a fallback may go)
                prior.set_extrinsic(*regressor.base_T_camera)
            events += [(r.pose.stamp, "prior", r.pose) for r in prior.process_batch(pending)
                       if r.pose is not None]
        for result in regressor.process_batch(pending):
            pose = result.pose
            if pose is not None:
                if pose.odometry is not None:  # odometry first: it covers the pose's stamp
                    events.append((pose.stamp, "visual_odometry", pose.odometry))
                    vo_track.append((pose.stamp, pose.odometry.t, pose.odometry.q))
                events.append((pose.stamp, "absolute", pose))
                absolute.append(pose)
        network_done = time.perf_counter()
        phase["network"] += network_done - flush_start
        fusion_side.add(events, latest_image, dict(received_ns) if options.order == "receive" else None)
        received_ns.clear()
        phase["fusion_wait"] += time.perf_counter() - network_done
        bar.update(len(pending))
        bar.set_postfix(fps=f"{bar.n / max(time.perf_counter() - started, 1e-9):.1f}")
        pending.clear()

    wanted = [options.image_topic] + (["/tf_static"] if "/tf_static" in topics else [])
    try:
        with bag_errors(bag):
            for record in read_messages(bag, wanted):
                if record.topic == options.image_topic:
                    pending.append(record.msg)
                    received_ns[record.stamp_ns] = record.log_time_ns
                    try:
                        stamp = messages.header_stamp_sec(record.msg)
                        image_stamps.append(stamp)
                        latest_image = max(latest_image, stamp)
                    except (ValueError, AttributeError):
                        pass
                    if len(pending) >= options.batch_size:
                        flush_images()
                elif record.topic == "/tf_static":
                    camera_mount.feed(record.msg, static=True)
            flush_images()
    finally:
        bar.close()
    inference_s = time.perf_counter() - started
    if not absolute:
        raise ReplayError(f"no image on {options.image_topic} could be processed "
                          f"({dict(regressor.counters)}; last error: "
                          f"{regressor.last_drop.detail if regressor.last_drop else None})")
    handing_over = phase["fusion_wait"]  # time the fusion side held up the image loop
    finish_start = time.perf_counter()
    result = fusion_side.finish()
    phase["fusion_wait"] += time.perf_counter() - finish_start
    gt_stamps, gt_t, gt_q = result.ground_truth
    abs_stamps = np.array([p.stamp for p in absolute])
    gt_at_abs = interpolate_poses(gt_stamps, gt_t, gt_q, abs_stamps)
    if not np.any(np.isfinite(gt_at_abs[0][:, 0])):
        spans = (f"images {abs_stamps.min():.3f}..{abs_stamps.max():.3f} s, ground truth "
                 f"{gt_stamps.min():.3f}..{gt_stamps.max():.3f} s")
        if gt_stamps.max() < abs_stamps.min() or gt_stamps.min() > abs_stamps.max():
            raise ReplayError(f"ground truth on {options.ground_truth} never overlaps the images ({spans})")
        raise ReplayError(f"ground truth on {options.ground_truth} has a gap of more than "
                          f"{default_max_gap(gt_stamps):.2f} s around every image ({spans}, "
                          f"{len(gt_stamps)} ground-truth poses)")
    elapsed = time.perf_counter() - started
    phases = {"bag_read": max(0.0, inference_s - phase["network"] - handing_over),
              "network": phase["network"], "fusion_and_output": result.busy_s,
              "waiting_for_fusion": phase["fusion_wait"]}
    return _assemble(options, absolute, result.fused, result.odom_track, (gt_stamps, gt_t, gt_q),
                     regressor, result.counts, elapsed, inference_s, len(image_stamps), vo_track, phases)


def _stamp_or_zero(msg) -> float:
    try:
        return messages.header_stamp_sec(msg)
    except (ValueError, AttributeError):
        return 0.0


def _anchored(track, gt_stamps, gt_t, gt_q):
    """An odometry track (stamp, t, q) in its own frame, moved into ``map`` so that it
    starts on the ground truth at its first usable stamp; None if it never overlaps."""
    if len(track) < 2:
        return None
    o_stamps = np.array([o[0] for o in track])
    order = np.argsort(o_stamps, kind="stable")
    o_stamps = o_stamps[order]
    o_t = np.stack([o[1] for o in track])[order]
    o_q = np.stack([o[2] for o in track])[order]
    g_t, g_q = interpolate_poses(gt_stamps, gt_t, gt_q, o_stamps)
    first = np.flatnonzero(np.all(np.isfinite(g_t), axis=1))
    if not len(first):
        return None
    k = first[0]
    t_inv, q_inv = geometry.pose_inverse(o_t[k], o_q[k])
    m_t, m_q = geometry.pose_compose(g_t[k], g_q[k], t_inv, q_inv)
    om_t, om_q = geometry.pose_compose(np.broadcast_to(m_t, o_t.shape),
                                       np.broadcast_to(m_q, o_q.shape), o_t, o_q)
    return o_stamps, om_t, om_q


def _assemble(options, absolute, fused, odom_track, gt, regressor, fusion_counts, elapsed,
              inference_s, n_images, vo_track=(), phases=None) -> dict:
    """Trajectories evaluated at the image stamps, and the metrics of each source."""
    gt_stamps, gt_t, gt_q = gt
    stamps = np.array([p.stamp for p in absolute])
    raw_t = np.stack([p.t for p in absolute])
    raw_q = np.stack([p.q for p in absolute])
    truth_t, truth_q = interpolate_poses(gt_stamps, gt_t, gt_q, stamps)
    valid = np.all(np.isfinite(truth_t), axis=1)
    trajectories = {"ground_truth": (gt_stamps, gt_t, gt_q), "absolute": (stamps, raw_t, raw_q)}
    sources = {"absolute": (raw_t, raw_q)}
    # the covariance each scored pose was published with, at the image stamps (for NEES)
    covariances = {"absolute": np.stack([p.cov for p in absolute])}
    if fused:
        f_stamps = np.array([f[0] for f in fused])
        order = np.argsort(f_stamps, kind="stable")
        f_stamps, f_t, f_q = f_stamps[order], np.stack([f[1] for f in fused])[order], \
            np.stack([f[2] for f in fused])[order]
        keep = np.r_[np.diff(f_stamps) > 0, True]  # the last output at each stamp
        trajectories["fused"] = (f_stamps[keep], f_t[keep], f_q[keep])
        sources["fused"] = previous_poses(f_stamps[keep], f_t[keep], f_q[keep], stamps)
        covariances["fused"] = _held_covariances(
            f_stamps[keep], np.stack([f[3] for f in fused])[order][keep], stamps)
    # odometry alone (the bag's, and the network's visual odometry), anchored in map with
    # the ground truth at its first usable stamp
    for name, track in (("odometry", odom_track), ("visual_odometry", vo_track)):
        anchored = _anchored(track, gt_stamps, gt_t, gt_q)
        if anchored is not None:
            trajectories[name] = anchored
            sources[name] = interpolate_poses(*anchored, stamps)
    metrics: dict = {"bag": str(options.bag), "weights": str(options.weights or default_weights()),
                     "frames": {"images": int(n_images), "estimated": int(len(absolute)),
                                "evaluated": int(valid.sum())},
                     "sources": {}, "counts": {}, "timing": {}}
    per_frame = {"stamp": stamps[valid]}
    for name, (t, q) in sources.items():
        ok = valid & np.all(np.isfinite(t), axis=1)
        if not np.any(ok):
            continue
        t_err, r_err = pose_errors(t[ok], q[ok], truth_t[ok], truth_q[ok])
        summary = summarize_errors(t_err, r_err)
        tail = max(1, len(t_err) // 10)
        summary["final_median_translation_m"] = float(np.median(t_err[-tail:]))
        summary.update(step_errors(t[ok], q[ok], truth_t[ok], truth_q[ok]))
        summary.update(trajectory_metrics(stamps[ok], t[ok], q[ok], truth_t[ok], truth_q[ok]))
        if name in covariances:
            summary.update(nees_summary(t[ok], q[ok], truth_t[ok], truth_q[ok], covariances[name][ok]))
        if name == "fused":  # restarts of the fusion from rejected measurements (kidnap recovery)
            summary["reinitialisations"] = int(fusion_counts.get("fusion_reinitialisations", 0))
        metrics["sources"][name] = summary
        full_t = np.full(len(stamps), np.nan)
        full_r = np.full(len(stamps), np.nan)
        full_t[ok], full_r[ok] = t_err, r_err
        per_frame[f"{name}_translation_m"] = full_t[valid]
        per_frame[f"{name}_rotation_deg"] = full_r[valid]
    if "fused" in covariances:  # the report's error band: signed error and 1-sigma per axis of map
        per_frame["fused_error_xyz_m"], per_frame["fused_sigma_xyz_m"] = _error_band(
            *sources["fused"], truth_t, truth_q, covariances["fused"], valid)
    counts = {"images_" + k: int(v) for k, v in regressor.counters.items()}
    counts.update(fusion_counts)
    metrics["counts"] = counts
    metrics["timing"] = {"seconds": round(elapsed, 3),
                         "frames_per_second": round(len(absolute) / max(elapsed, 1e-9), 2),
                         "inference_frames_per_second": round(len(absolute) / max(inference_s, 1e-9), 2),
                         "device": str(regressor.estimator.device)}
    if phases:  # where the time went: seconds per stage, summed over the run
        metrics["timing"]["phase_seconds"] = {k: round(v, 3) for k, v in phases.items()}
    return {"metrics": metrics, "trajectories": trajectories, "per_frame": per_frame}


def _held_covariances(f_stamps, f_cov, query):
    """The covariance of the fused pose that :func:`previous_poses` holds at each query
    stamp (the latest at or before it; NaN before the first), so a pose and the covariance
    it was published with are scored together."""
    held = np.full((len(query), 6, 6), np.nan)
    idx = held_index(f_stamps, query)
    held[idx >= 0] = f_cov[idx[idx >= 0]]
    return held


def _error_band(t, q, truth_t, truth_q, cov, valid):
    """Per frame of ``valid``: the signed translation error t_true - t_est along x, y, z of
    map and its standard deviation sqrt(C_ii) from the published covariance (NaN where
    the pose or a usable covariance is missing)."""
    error = pose_error_vectors(t[valid], q[valid], truth_t[valid], truth_q[valid])[:, :3]
    sigma = np.full(error.shape, np.nan)
    usable = usable_covariances(cov[valid])
    sigma[usable] = np.sqrt(np.diagonal(cov[valid][usable], axis1=1, axis2=2)[:, :3])
    return error, sigma


def default_weights() -> Path:
    """The shipped demo map (see :mod:`vizloc_ros.localize.weights` for where it is looked up)."""
    try:
        return shipped_weights()
    except FileNotFoundError as exc:
        raise ReplayError(f"{exc}; pass --weights") from None


# --------------------------------------------------------------------------- CLI

def _extrinsic(values):
    """--camera-extrinsic X Y Z QX QY QZ QW -> (t, q_wxyz), or None when not given."""
    if values is None:
        return None
    try:
        return messages.extrinsic_from_ros(values, f"--camera-extrinsic {' '.join(f'{v:g}' for v in values)}")
    except ValueError as exc:
        raise ReplayError(str(exc)) from None


def _file_then_flags(args) -> dict:
    """The :class:`ReplayOptions` fields that ``--params-file`` may set, with the flags
    given on the command line over the file's values (the defaults: ReplayOptions')."""
    values = {}
    if args.params_file:
        read = read_params_file(args.params_file)
        if read.not_honoured:
            LOG.warning("--params-file %s: not reproduced offline: %s", args.params_file,
                        "; ".join(read.not_honoured))
        values.update(read.options)
    flags = {"image_topic": args.image_topic, "device": args.device, "precision": args.precision,
             "mc_dropout_samples": args.mc_dropout_samples, "base_frame": args.base_frame,
             "visual_odometry": args.visual_odom}
    values.update({name: value for name, value in flags.items() if value is not None})
    if args.weights:
        values["weights"] = Path(args.weights)
    for name, topic in (("odom_topic", args.odom_topic), ("imu_topic", args.imu_topic)):
        if topic is not None:
            values[name] = None if topic.lower() == "none" else topic
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vizloc-replay",
        description="Replay a rosbag2 (mcap / sqlite3) or ROS 1 bag through the vizloc_ros pipeline "
                    "(estimator + fusion, exactly as the nodes run) and report how well it localized.",
        epilog="With --params-file, the flags given on the command line win over the file; the "
               "defaults shown apply where neither sets a value.")
    parser.add_argument("bag", nargs="?", help="bag folder (rosbag2) or .bag file (ROS 1)")
    parser.add_argument("--demo", action="store_true",
                        help="replay the demo scene's test walk (rendered with vizloc-synth on first "
                             "use and cached) with the shipped demo map (weights/ace_demo)")
    parser.add_argument("--params-file", metavar="YAML",
                        help="the nodes' parameter file (config/vizloc.yaml format: vizloc_regressor / "
                             "vizloc_fusion ros__parameters), checked as the nodes check it: the replay "
                             "runs the robot's fusion and network settings. Flags given here win over it; "
                             "a parameter it cannot reproduce offline is named in one warning")
    parser.add_argument("--weights", help="checkpoint (default: the shipped demo map, weights/ace_demo)")
    parser.add_argument("--image-topic",
                        help="sensor_msgs/Image or CompressedImage topic (default /camera/image_raw)")
    parser.add_argument("--ground-truth", default="/ground_truth/pose",
                        help="PoseStamped / PoseWithCovarianceStamped / Odometry / TransformStamped topic, "
                             "or tf:PARENT->CHILD for a TF chain of any length through /tf and /tf_static "
                             "(default /ground_truth/pose)")
    parser.add_argument("--odom-topic", help="nav_msgs/Odometry topic, or 'none' (default /odom)")
    parser.add_argument("--imu-topic", help="sensor_msgs/Imu topic to fuse, or 'none' (default)")
    parser.add_argument("--no-fusion", action="store_true", help="raw network poses only")
    parser.add_argument("--visual-odom", action="store_true", default=None,
                        help="fuse the network's own relative-pose head (VLocNet) as visual odometry "
                             "instead of --odom-topic (for robots without odometry)")
    parser.add_argument("--prior-weights", help="a second checkpoint (e.g. NetVLAD retrieval) whose poses "
                                                "only initialise the fusion and recover it after a kidnapping")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--precision", choices=("fp32", "fp16"),
                        help="network precision, as the node's `precision` parameter: fp16 runs "
                             "the GPU in half precision (default fp32; the CPU always runs fp32)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per network batch (default 16)")
    parser.add_argument("--mc-dropout-samples", type=int,
                        help="MC dropout samples per image for the covariance (default 0: validation covariance)")
    parser.add_argument("--camera-extrinsic", type=float, nargs=7, metavar=("X", "Y", "Z", "QX", "QY", "QZ", "QW"),
                        help="base -> camera transform when the bag has no /tf_static for it")
    parser.add_argument("--base-frame", help="the robot's base frame (default base_link)")
    parser.add_argument("--out", help="output folder (default vizloc_replay_<bag name>; "
                                      "--demo: vizloc_demo_report, replaced on each run)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier report folder (never a folder that is not a report or "
                             "that holds the bag or the weights)")
    parser.add_argument("--single-process", action="store_true",
                        help="fuse in this process instead of a second one beside the network "
                             "(slower; for debugging)")
    parser.add_argument("--order", choices=ORDERS, default="stamp",
                        help="feed the fusion in header-stamp order (default) or in the bag's receive "
                             "order, as the nodes get the messages (shows what a stamp off the others does)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.demo == bool(args.bag):
        parser.error("give a BAG or --demo (not both)")
    overwrite = args.overwrite
    try:
        file_and_flags = _file_then_flags(args)  # a bad --params-file: said before any work
        extrinsic = _extrinsic(args.camera_extrinsic)  # likewise
        if args.demo:
            print("vizloc-replay: preparing the demo bag (rendered once, then cached) ...", file=sys.stderr)
            bag = cached_demo_bag(progress=not args.no_progress)
            out = Path(args.out or "vizloc_demo_report")
            overwrite = overwrite or args.out is None
        else:
            bag = Path(args.bag)
            out = Path(args.out or f"vizloc_replay_{bag.resolve().name}")
        options = ReplayOptions(
            bag=bag, out=out, ground_truth=args.ground_truth, fusion=not args.no_fusion,
            batch_size=args.batch_size, overwrite=overwrite, progress=not args.no_progress,
            camera_extrinsic=extrinsic,
            prior_weights=Path(args.prior_weights) if args.prior_weights else None,
            fusion_process=not args.single_process, order=args.order, **file_and_flags)
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        try:
            metrics = run_replay(options)
        finally:
            signal.signal(signal.SIGTERM, previous)
    except ReplayError as exc:
        print(f"vizloc-replay: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the disk filled up while the report was written
        print(f"vizloc-replay: error: {exc}; no report was written", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vizloc-replay: interrupted; no report was written", file=sys.stderr)
        return 130
    except ImportError as exc:  # Ctrl-C while an extension module (gtsam, torch) initialises
        if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):
            print("vizloc-replay: interrupted; no report was written", file=sys.stderr)
            return 130
        raise
    print(format_table(metrics))
    print(f"\nreport: {out.resolve()}/report.md (plots, TUM files, metrics.json, result bag in {out}/bag)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
