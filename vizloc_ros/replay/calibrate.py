"""``vizloc-calibrate BAG``: the noise figures of a robot's sensors and network, measured
against a bag's ground truth, written as a parameter file the nodes and
``vizloc-replay --params-file`` read.

Why from a replay: the figures that make the fusion honest are those of the sensors as
the fusion sees them: the network's poses as the regressor publishes them (through the
camera mount), the odometry between the camera stamps where the graph has its poses,
interpolated as the fusion interpolates it. So the bag is replayed once
(:func:`vizloc_ros.replay.cli.run_replay`, with the ``--params-file`` given), and what is
measured from that replay is:

* ``abs_cov_scale``: the network's NEES per dof (its errors against its covariance); the
  fusion multiplies the network covariance by it;
* ``abs_correlation_time``: how long the network's errors stay alike, the integral of
  the autocorrelation of its normalised errors up to its first zero (for an exponential
  correlation exp(-dt / T) that integral is T);
* ``abs_bias_share``: the share of its error that is common to the whole recording (the
  squared mean of the normalised errors over their mean square), raised where the fused
  pose is still over-confident with it (NEES per dof above 1: errors that drift over
  seconds, which one correlation time does not describe) until its NEES per dof on the
  walk is 1;
* ``odom_floor_trans_per_m`` / ``odom_floor_rot_per_rad``: the odometry noise per metre
  travelled and per radian turned, chosen so that the relative motions between
  consecutive camera stamps, with the covariance the fusion gives them
  (:class:`~vizloc_ros.fusion.motion.MotionModel`), have NEES 1 per dof;
* with ``--imu-topic``: ``gyro_noise_density`` / ``accel_noise_density`` from the IMU's
  residuals against the ground truth's rotation rate and specific force.

Then the fusion alone is run again on the same network poses and odometry with the new
figures, and the NEES before and after is printed. The file is written atomically and
read back with the nodes' own checks (:func:`~vizloc_ros.replay.params_file.read_params_file`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import gtsam
import numpy as np

from vizloc_ros import geometry
from vizloc_ros.fusion.buffers import SensorBuffers
from vizloc_ros.fusion.config import FusionConfig
from vizloc_ros.fusion.conventions import pose3
from vizloc_ros.fusion.motion import MotionModel
from vizloc_ros.metrics import (POSE_DOF, bias_share, correlation_time, nees, nees_summary, pose_error_vectors,
                                pose_errors)
from vizloc_ros.pipeline.fusion_core import FusionCore, FusionSettings
from vizloc_ros.ros_io import messages
from vizloc_ros.ros_io.bag_io import read_messages
from vizloc_ros.ros_io.ground_truth import held_index, interpolate_poses, previous_poses
from vizloc_ros.ros_io.tum import read_tum
from vizloc_ros.replay.cli import ReplayOptions, default_weights, run_replay
from vizloc_ros.replay.fusion_side import TOPICS, ReplayError, bag_errors
from vizloc_ros.replay.params_file import read_params_file

LOG = logging.getLogger("vizloc-calibrate")

#: fewest network poses with ground truth to calibrate from
MIN_FRAMES = 30
#: fewest odometry steps (between camera stamps) with motion to fit a noise per metre / radian
MIN_STEPS = 20
FUSION_NODE = "vizloc_fusion"
#: smallest odometry floor written (m or rad per step): below it the odometry's own
#: covariance, not the floor, decides, and a floor near zero makes a stiff graph
MIN_FLOOR = 1e-4


@dataclasses.dataclass
class NetworkPoses:
    """The regressor's poses of a replay (result bag) with the truth at their stamps."""

    stamps: np.ndarray
    t: np.ndarray
    q: np.ndarray
    cov: np.ndarray
    truth_t: np.ndarray
    truth_q: np.ndarray


# --------------------------------------------------------------------------- reading

def read_network_poses(report: Path) -> NetworkPoses:
    """/vizloc/absolute_pose of a replay's result bag and the truth (ground_truth.tum) at
    those stamps, frames without truth left out."""
    stamps, ts, qs, covs = [], [], [], []
    with bag_errors(report / "bag"):
        for record in read_messages(report / "bag", [TOPICS.absolute_pose]):
            t, q, cov = messages.pose_with_covariance_from_msg(record.msg)
            stamps.append(messages.header_stamp_sec(record.msg))
            ts.append(t)
            qs.append(q)
            covs.append(cov)
    if not stamps:
        raise ReplayError(f"the replay of the bag published no network pose ({TOPICS.absolute_pose})")
    gs, gt, gq = read_tum(report / "ground_truth.tum")
    stamps = np.asarray(stamps)
    truth_t, truth_q = interpolate_poses(gs, gt, gq, stamps)
    ok = np.all(np.isfinite(truth_t), axis=1)
    return NetworkPoses(stamps[ok], np.asarray(ts)[ok], np.asarray(qs)[ok], np.asarray(covs)[ok],
                        truth_t[ok], truth_q[ok])


def read_odometry(bag: Path, topic: str) -> list:
    """(stamp, t, q_wxyz, cov ROS) of each odometry message, in stamp order; bad ones skipped."""
    out = []
    with bag_errors(bag):
        for record in read_messages(bag, [topic]):
            try:
                t, q, cov = messages.pose_with_covariance_from_msg(record.msg)
                out.append((messages.header_stamp_sec(record.msg), t, q, cov))
            except ValueError:
                continue
    out.sort(key=lambda o: o[0])
    return out


def read_imu(bag: Path, topic: str):
    """(stamps, gyro, accel) arrays of an IMU topic; bad messages skipped."""
    stamps, gyro, accel = [], [], []
    with bag_errors(bag):
        for record in read_messages(bag, [topic]):
            try:
                s, g, a = messages.imu_motion_from_msg(record.msg)
            except ValueError:
                continue
            stamps.append(s)
            gyro.append(g)
            accel.append(a)
    order = np.argsort(stamps, kind="stable")
    return np.asarray(stamps)[order], np.asarray(gyro).reshape(-1, 3)[order], np.asarray(accel).reshape(-1, 3)[order]


# --------------------------------------------------------------------------- estimates

def network_figures(poses: NetworkPoses) -> dict:
    """NEES per dof of the network (the covariance scale that makes it 1) and the
    correlation time of its errors (seconds)."""
    errors = pose_error_vectors(poses.t, poses.q, poses.truth_t, poses.truth_q)
    values = nees(errors, poses.cov)
    scored = values[np.isfinite(values)]
    scale = float(np.mean(scored) / POSE_DOF) if scored.size else 1.0
    return {"nees_per_dof": scale, "correlation_time": correlation_time(poses.stamps, errors, poses.cov),
            "bias_share": bias_share(errors, poses.cov)}


def odometry_figures(odometry: list, stamps, truth_t, truth_q, config) -> dict:
    """The odometry noise figures (per step floors, per metre, per radian) at which the
    fusion's own relative covariance (MotionModel.odom_between) gives the odometry's
    motions between consecutive camera stamps a NEES of 1 per dof, translation and rotation
    apart, with the NEES per dof before and after; ``figures`` None with too few steps."""
    sensors = SensorBuffers()
    for s, t, q, cov in odometry:
        sensors.add_odometry(s, pose3(t, q), cov)
    steps = []
    for i in range(len(stamps) - 1):
        oa = sensors.odom_at(stamps[i], config.odom_max_gap)
        ob = sensors.odom_at(stamps[i + 1], config.odom_max_gap)
        if oa is None or ob is None:
            continue
        true_delta = pose3(truth_t[i], truth_q[i]).between(pose3(truth_t[i + 1], truth_q[i + 1]))
        steps.append((oa, ob, true_delta))
    if len(steps) < MIN_STEPS:
        return {"figures": None, "steps": len(steps)}

    def block_nees(figures):
        cfg = dataclasses.replace(config, **figures)
        motion = MotionModel(cfg, sensors)
        rot, trans = [], []
        for oa, ob, true_delta in steps:
            delta, cov = motion.odom_between(oa, ob)
            e = gtsam.Pose3.Logmap(delta.between(true_delta))
            rot.append(e[:3] @ np.linalg.solve(cov[:3, :3], e[:3]) / 3.0)
            trans.append(e[3:] @ np.linalg.solve(cov[3:, 3:], e[3:]) / 3.0)
        return {"trans": float(np.mean(trans)), "rot": float(np.mean(rot))}

    figures = {"odom_floor_trans": config.odom_floor_trans, "odom_floor_rot": config.odom_floor_rot,
               "odom_floor_trans_per_m": config.odom_floor_trans_per_m,
               "odom_floor_rot_per_rad": config.odom_floor_rot_per_rad}
    before = block_nees(figures)
    # two passes: the fusion clips a correlated odometry covariance at the smaller of the
    # two floors, so each block's figure can move the other's NEES a little
    for block, per_unit, floor in (("trans", "odom_floor_trans_per_m", "odom_floor_trans"),
                                   ("rot", "odom_floor_rot_per_rad", "odom_floor_rot")) * 2:
        # NEES falls as either figure grows: the noise per metre (radian) when the odometry
        # is worse than its floors say, else the floor itself, with no noise per unit
        figures[per_unit] = 0.0
        if block_nees(figures)[block] > 1.0:
            figures[per_unit] = _bisect(lambda x: block_nees({**figures, per_unit: x})[block], 0.0, 0.05)
        else:
            figures[floor] = _bisect(lambda x: block_nees({**figures, floor: x})[block], MIN_FLOOR,
                                     max(figures[floor], MIN_FLOOR), log=True)
    after = block_nees(figures)
    return {"figures": figures, "trans_nees_per_dof": before["trans"], "rot_nees_per_dof": before["rot"],
            "trans_nees_after": after["trans"], "rot_nees_after": after["rot"], "steps": len(steps)}


def _bisect(nees_of, lo: float, hi: float, log: bool = False, iterations: int = 30) -> float:
    """The figure in [lo, ...] at which ``nees_of`` (falling as the figure grows) is 1; ``hi``
    is grown until the NEES there is below 1; ``log``: bisect on a log scale (floors)."""
    while nees_of(hi) > 1.0 and hi < 100.0:
        lo, hi = hi, hi * 4.0
    if nees_of(lo) <= 1.0:
        return lo
    for _ in range(iterations):
        mid = math.sqrt(lo * hi) if log else 0.5 * (lo + hi)
        lo, hi = (mid, hi) if nees_of(mid) > 1.0 else (lo, mid)
    return hi


def fit_bias_share(fused_nees, measured: float) -> float:
    """The smallest ``abs_bias_share`` from ``measured`` up at which ``fused_nees(share)``
    (the fused NEES per dof of the walk, falling as the share grows) is 1, to 3 decimals;
    :data:`BIAS_FIT_ITERATIONS` bisection steps, each a run of the fusion."""
    return round(_bisect(fused_nees, measured, max(2.0 * measured, 0.05), iterations=BIAS_FIT_ITERATIONS), 3)


def imu_figures(imu, gt, base_R_imu, gravity) -> dict | None:
    """Gyro and accelerometer noise densities (and the biases taken out) from the IMU's
    residuals against the ground truth's rotation rate and specific force, at the IMU
    samples inside the truth; None with fewer than 100 such samples."""
    stamps, gyro, accel = imu
    gs, gt_t, gt_q = gt
    inside = (stamps > gs[0] + 0.1) & (stamps < gs[-1] - 0.1)
    if np.count_nonzero(inside) < 100:
        return None
    s = stamps[inside]
    h = 0.02   # s: central differences over the truth, wide enough to span its samples
    t0, q0 = interpolate_poses(gs, gt_t, gt_q, s)
    tm, qm = interpolate_poses(gs, gt_t, gt_q, s - h)
    tp, qp = interpolate_poses(gs, gt_t, gt_q, s + h)
    ok = np.all(np.isfinite(t0) & np.isfinite(tm) & np.isfinite(tp), axis=1)
    if np.count_nonzero(ok) < 100:
        return None
    R0, Rm, Rp = (geometry.quat_to_matrix(q[ok]) for q in (q0, qm, qp))
    omega_base = geometry.so3_log(np.swapaxes(Rm, -1, -2) @ Rp) / (2 * h)
    acc_map = (tp[ok] - 2 * t0[ok] + tm[ok]) / (h * h)
    force_base = np.einsum("nji,nj->ni", R0, acc_map - np.asarray(gravity, dtype=float))
    # the IMU's readings in base axes
    gyro_base = gyro[inside][ok] @ base_R_imu.T
    accel_base = accel[inside][ok] @ base_R_imu.T
    rate = 1.0 / float(np.median(np.diff(stamps)))
    out = {"samples": int(np.count_nonzero(ok)), "rate_hz": rate}
    for name, measured, truth in (("gyro", gyro_base, omega_base), ("accel", accel_base, force_base)):
        residual = measured - truth
        bias = np.median(residual, axis=0)
        spread = residual - bias
        # robust sigma per axis (MAD), so the truth's own differencing spikes do not count
        sigma = 1.4826 * np.median(np.abs(spread - np.median(spread, axis=0)), axis=0)
        out[f"{name}_noise_density"] = float(np.sqrt(np.mean(sigma ** 2)) / math.sqrt(rate))
        out[f"{name}_bias"] = bias.tolist()
    return out


# --------------------------------------------------------------------------- fusion again

#: bisection steps when the bias share is fitted (each runs the fusion over the walk again)
BIAS_FIT_ITERATIONS = 8


def fuse_again(bag: Path, report: Path, options: ReplayOptions, fusion_params: dict,
               noise_from_weights: bool | None = None) -> dict:
    """The fusion alone, run again on a replay's network poses and the bag's odometry / IMU
    (in stamp order, odometry and IMU first at equal stamps, as the replay's fusion side),
    with ``fusion_params``; the NEES summary and the reinitialisations of its output.
    As in the replay, the fusion reads the noise figures of the weights that made the
    poses unless ``noise_from_weights`` (None: the options' value) is false."""
    use_odom = bool(options.odom_topic)
    use_imu = bool(options.imu_topic)
    given = dict(options.fusion_settings)
    if noise_from_weights is not None:
        given["noise_from_weights"] = noise_from_weights
    settings = FusionSettings(**{**given, "network_weights": str(options.weights or default_weights()),
                                 "map_frame": options.map_frame, "odom_frame": options.odom_frame,
                                 "base_frame": options.base_frame, "use_odom": use_odom, "use_imu": use_imu})
    core = FusionCore(dict(fusion_params), settings)
    events = []
    own = [t for t in (options.odom_topic, options.imu_topic) if t]
    with bag_errors(bag):
        for seq, record in enumerate(read_messages(bag, own)):
            try:
                events.append((messages.header_stamp_sec(record.msg), 0, seq, record.topic, record.msg))
            except ValueError:
                continue
    with bag_errors(report / "bag"):
        for seq, record in enumerate(read_messages(report / "bag", [TOPICS.absolute_pose])):
            events.append((messages.header_stamp_sec(record.msg), 1, seq, TOPICS.absolute_pose, record.msg))
    events.sort(key=lambda e: e[:3])
    fused = []
    absolute_stamps = []
    for stamp, _, _, topic, msg in events:
        if topic == TOPICS.absolute_pose:
            absolute_stamps.append(stamp)
            step = core.on_absolute(msg)
        elif topic == options.odom_topic:
            step = core.on_odometry(msg)
        else:
            step = core.on_imu(msg)
        if step.output is not None:
            fused.append((step.output.stamp, step.output.t, step.output.q, step.output.cov))
    return _score_fused(fused, np.asarray(absolute_stamps), report, core.fusion.counters)


def _score_fused(fused, stamps, report: Path, counters) -> dict:
    """NEES of the fused pose held at each network stamp (as the replay's report scores it)."""
    if not fused:
        return {"nees_per_dof": None, "nees_share_within_95": None, "reinitialisations": 0}
    f_stamps = np.array([f[0] for f in fused])
    order = np.argsort(f_stamps, kind="stable")
    f_stamps = f_stamps[order]
    keep = np.r_[np.diff(f_stamps) > 0, True]
    f_stamps = f_stamps[keep]
    f_t = np.stack([f[1] for f in fused])[order][keep]
    f_q = np.stack([f[2] for f in fused])[order][keep]
    f_cov = np.stack([f[3] for f in fused])[order][keep]
    t, q = previous_poses(f_stamps, f_t, f_q, stamps)
    idx = held_index(f_stamps, stamps)
    gs, gt, gq = read_tum(report / "ground_truth.tum")
    truth_t, truth_q = interpolate_poses(gs, gt, gq, stamps)
    ok = (idx >= 0) & np.all(np.isfinite(truth_t), axis=1)
    summary = nees_summary(t[ok], q[ok], truth_t[ok], truth_q[ok], f_cov[idx[ok]])
    t_err, _ = pose_errors(t[ok], q[ok], truth_t[ok], truth_q[ok])
    summary["median_translation_m"] = float(np.median(t_err)) if t_err.size else None
    summary["reinitialisations"] = int(counters.get("reinitialisations", 0))
    return summary


# --------------------------------------------------------------------------- the file

def write_params_file(out: Path, values: dict, base_file: Path | None) -> None:
    """``values`` into the fusion node's section of a copy of ``base_file`` (or a new file),
    written under a temporary name and renamed."""
    import yaml

    document = {}
    if base_file is not None:
        with open(base_file, encoding="utf-8") as handle:
            document = yaml.safe_load(handle) or {}
    key = next((k for k in document if str(k).lstrip("/") == FUSION_NODE), FUSION_NODE)
    section = document.setdefault(key, {})
    params = section.get("ros__parameters") or {}
    params.update(values)
    section["ros__parameters"] = params
    header = ("# vizloc_ros parameters measured by vizloc-calibrate (the fusion's noise figures);\n"
              "# use with: ros2 launch vizloc_ros relocalize.launch.py params_file:=<this file>,\n"
              "# or vizloc-replay BAG --params-file <this file>\n")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(header + yaml.safe_dump(document, sort_keys=False, default_flow_style=False),
                       encoding="utf-8")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------------- the command

def calibrate(options: ReplayOptions, out: Path, base_file: Path | None, keep_report: Path | None,
              from_report: Path | None = None) -> dict:
    """Replay (or take ``from_report``, an earlier vizloc-replay report of the same bag with
    the same parameters), measure, write ``out``; what was measured, with the NEES before
    and after."""
    if not options.fusion or not options.odom_topic:
        raise ReplayError("vizloc-calibrate needs the bag's odometry (--odom-topic)")
    work = Path(tempfile.mkdtemp(prefix="vizloc_calibrate_"))
    try:
        if from_report is not None:
            report = from_report
            try:
                metrics = json.loads((report / "metrics.json").read_text())
            except (OSError, ValueError) as exc:
                raise ReplayError(f"--from-report {report}: not a vizloc-replay report ({exc})") from None
            if Path(metrics.get("bag", "")).resolve() != Path(options.bag).resolve():
                raise ReplayError(f"--from-report {report} is a replay of {metrics.get('bag')}, not of {options.bag}")
            # the weights that made the poses: the fusion reads their noise figures
            # (noise_from_weights), so "before" must be the fusion that report ran
            made_with = metrics.get("weights")
            if made_with and options.weights is None:
                options = dataclasses.replace(options, weights=Path(made_with))
            elif made_with and Path(options.weights).resolve() != Path(made_with).resolve():
                raise ReplayError(f"--from-report {report} was made with the weights {made_with}, "
                                  f"not {options.weights}")
        else:
            report = keep_report if keep_report is not None else work / "replay"
            options = dataclasses.replace(options, out=report)
            metrics = run_replay(options)
        poses = read_network_poses(report)
        if len(poses.stamps) < MIN_FRAMES:
            raise ReplayError(f"only {len(poses.stamps)} network poses of {options.bag} have ground truth; "
                              f"at least {MIN_FRAMES} are needed to calibrate")
        config = FusionConfig.from_dict(dict(options.fusion_params))
        network = network_figures(poses)
        odometry = odometry_figures(read_odometry(options.bag, options.odom_topic), poses.stamps,
                                    poses.truth_t, poses.truth_q, config)
        values = {"abs_cov_scale": round(max(config.abs_cov_scale * network["nees_per_dof"], 1e-6), 4),
                  "abs_correlation_time": round(network["correlation_time"], 3),
                  "abs_bias_share": round(network["bias_share"], 3)}
        if odometry["figures"] is not None:
            values.update({name: float(f"{value:.4g}") for name, value in odometry["figures"].items()})
        imu = None
        if options.imu_topic:
            base_R_imu = geometry.quat_to_matrix(np.asarray(config.base_T_imu[1]))
            gs, gt, gq = read_tum(report / "ground_truth.tum")
            imu = imu_figures(read_imu(options.bag, options.imu_topic), (gs, gt, gq), base_R_imu, config.gravity)
            if imu is not None:
                values["gyro_noise_density"] = float(f"{imu['gyro_noise_density']:.3g}")
                values["accel_noise_density"] = float(f"{imu['accel_noise_density']:.3g}")
        after_params = {**options.fusion_params, **values}
        FusionConfig.from_dict(after_params)  # the values are ones the fusion accepts
        before = fuse_again(options.bag, report, options, options.fusion_params)
        # measured on the robot's own walk: these win over what the weights carry
        after = fuse_again(options.bag, report, options, after_params, noise_from_weights=False)
        measured_bias = values["abs_bias_share"]
        if (after["nees_per_dof"] or 0.0) > 1.0:
            # still over-confident: the network's errors have slower parts than one
            # exponential correlation time and the walk-wide mean describe (MapNet's drift
            # over seconds); the bias share, the fusion's figure for what it cannot average
            # out, is raised until the fused NEES per dof on this walk is 1
            def fused_nees(share):
                return fuse_again(options.bag, report, options, {**after_params, "abs_bias_share": share},
                                  noise_from_weights=False)["nees_per_dof"] or 0.0

            values["abs_bias_share"] = fit_bias_share(fused_nees, measured_bias)
            after_params = {**options.fusion_params, **values}
            after = fuse_again(options.bag, report, options, after_params, noise_from_weights=False)
        write_params_file(out, {**values, "noise_from_weights": False}, base_file)
        read_params_file(out)  # read back with the nodes' own checks
        return {"values": values, "network": network, "odometry": odometry, "imu": imu,
                "measured_bias_share": measured_bias,
                "fused_before": before, "fused_after": after,
                "network_nees_before": metrics["sources"]["absolute"].get("nees_per_dof")}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vizloc-calibrate",
        description="Measure the fusion's noise figures (network covariance scale and error "
                    "correlation time, odometry noise per metre and per radian, IMU noise) from a "
                    "bag with ground truth, and write them as a parameter file for the nodes and "
                    "vizloc-replay --params-file.")
    parser.add_argument("bag", help="bag folder (rosbag2) or .bag file (ROS 1) with ground truth")
    parser.add_argument("--out", default="vizloc_calibrated.yaml", help="parameter file to write "
                        "(default vizloc_calibrated.yaml)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--params-file", metavar="YAML",
                        help="the robot's parameter file: replayed with, and copied into --out with "
                             "the measured values replaced")
    parser.add_argument("--weights", help="checkpoint (default: the shipped demo map, weights/ace_demo)")
    parser.add_argument("--ground-truth", default="/ground_truth/pose",
                        help="ground-truth topic or tf:PARENT->CHILD (default /ground_truth/pose)")
    parser.add_argument("--odom-topic", help="nav_msgs/Odometry topic (default /odom)")
    parser.add_argument("--imu-topic", help="sensor_msgs/Imu topic: also measure the IMU noise")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--keep-report", metavar="DIR", help="keep the replay's report in DIR")
    parser.add_argument("--from-report", metavar="DIR",
                        help="measure on an earlier vizloc-replay report of BAG (run with the same "
                             "--params-file) instead of replaying it again")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    try:
        if out.exists() and not args.overwrite:
            raise ReplayError(f"{out} exists; pass --overwrite to replace it")
        if out.exists() and not out.is_file():
            raise ReplayError(f"--out {out} is not a file")
        if not out.parent.is_dir():
            raise ReplayError(f"--out {out}: folder {out.parent} does not exist")
        values = {}
        if args.params_file:
            read = read_params_file(args.params_file)
            values.update(read.options)
        if args.weights:
            values["weights"] = Path(args.weights)
        if args.device:
            values["device"] = args.device
        if args.odom_topic:
            values["odom_topic"] = None if args.odom_topic.lower() == "none" else args.odom_topic
        if args.imu_topic:
            values["imu_topic"] = args.imu_topic
        keep = Path(args.keep_report) if args.keep_report else None
        options = ReplayOptions(bag=Path(args.bag), out=keep or Path("unused"), ground_truth=args.ground_truth,
                                progress=False, overwrite=keep is not None, **values)
        result = calibrate(options, out, Path(args.params_file) if args.params_file else None, keep,
                           Path(args.from_report) if args.from_report else None)
    except ReplayError as exc:
        # one line: the replay's listing of the bag's topics is left out
        print(f"vizloc-calibrate: error: {str(exc).splitlines()[0].removesuffix(' The bag has:')}",
              file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"vizloc-calibrate: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vizloc-calibrate: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(format_result(result, out))
    return 0


def _f(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def format_result(result: dict, out: Path) -> str:
    net, odo, before, after = result["network"], result["odometry"], result["fused_before"], result["fused_after"]
    lines = [f"vizloc-calibrate: wrote {out}"]
    lines += [f"  {name}: {value}" for name, value in result["values"].items()]
    lines.append("  noise_from_weights: false (these figures win over those the weights carry)")
    lines.append(f"network: NEES/dof {_f(net['nees_per_dof'])} (after the scale: 1.00), "
                 f"errors correlated over {net['correlation_time']:.2f} s, "
                 f"{net['bias_share']:.0%} of them common to the whole recording")
    if result["values"]["abs_bias_share"] > result["measured_bias_share"]:
        lines.append(f"  abs_bias_share raised from {result['measured_bias_share']:g} to "
                     f"{result['values']['abs_bias_share']:g}: with the measured one the fused pose was "
                     f"over-confident (its errors have slower parts than one correlation time shows)")
    if odo["figures"] is None:
        lines.append(f"odometry: only {odo['steps']} steps between camera stamps; its figures were left as they were")
    else:
        lines.append(f"odometry between camera stamps ({odo['steps']} steps): NEES/dof translation "
                     f"{_f(odo['trans_nees_per_dof'])} -> {_f(odo['trans_nees_after'])}, rotation "
                     f"{_f(odo['rot_nees_per_dof'])} -> {_f(odo['rot_nees_after'])}")
    if result["imu"] is not None:
        lines.append(f"IMU ({result['imu']['samples']} samples at {result['imu']['rate_hz']:.0f} Hz): "
                     f"gyro {result['imu']['gyro_noise_density']:.3g} rad/s/sqrt(Hz), accel "
                     f"{result['imu']['accel_noise_density']:.3g} m/s^2/sqrt(Hz)")
    lines.append("fused /vizloc/pose:     NEES/dof  inside 95 %  median m  reinitialisations")
    for name, s in (("before", before), ("after", after)):
        share = "-" if s["nees_share_within_95"] is None else f"{s['nees_share_within_95']:.0%}"
        lines.append(f"  {name:<20} {_f(s['nees_per_dof']):>9}  {share:>11}  "
                     f"{_f(s.get('median_translation_m'), '.3f'):>8}  {s['reinitialisations']:>17}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
