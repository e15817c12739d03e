"""Replay report: TUM trajectories, ``metrics.json`` (schema below), ``report.md`` and plots.

Everything is written into a folder the caller renames into place when complete, so a
reader never sees half a report.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vizloc_ros.metrics import scored_frames_warning
from vizloc_ros.ros_io.tum import write_tum

#: the sources a replay scores, in the order of the table
SOURCE_NAMES = ("absolute", "fused", "odometry", "visual_odometry")
SHORT_NAMES = {"visual_odometry": "visual odom"}

_SOURCE = {
    "type": "object",
    "required": ["frames", "median_translation_m", "median_rotation_deg", "within_5cm_5deg",
                 "within_25cm_2deg", "within_50cm_5deg", "within_500cm_10deg",
                 "final_median_translation_m", "ate_rmse_m", "ate_rmse_m_se3_aligned"],
    "properties": {
        "frames": {"type": "integer", "minimum": 1},
        "median_translation_m": {"type": "number", "minimum": 0},
        "median_rotation_deg": {"type": "number", "minimum": 0, "maximum": 180},
        "final_median_translation_m": {"type": "number", "minimum": 0},
        "ate_rmse_m": {"type": "number", "minimum": 0},
        "ate_rmse_m_se3_aligned": {"type": "number", "minimum": 0},
        "rpe_rmse_m_per_1m": {"type": ["number", "null"], "minimum": 0},
        "rpe_rmse_m_per_1m_se3_aligned": {"type": ["number", "null"], "minimum": 0},
    },
    "patternProperties": {"^within_": {"type": "number", "minimum": 0, "maximum": 1}},
}

#: covariance honesty (DESIGN.md), for the sources published with a covariance: mean NEES
#: / 6 and share of frames with NEES <= 12.59 (null when no frame had a usable
#: covariance), frames scored, frames skipped for a singular or non-finite covariance
_NEES = {
    "nees_per_dof": {"type": ["number", "null"], "minimum": 0},
    "nees_share_within_95": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
    "nees_frames": {"type": "integer", "minimum": 0},
    "nees_skipped_covariances": {"type": "integer", "minimum": 0},
}
_COVARIANCE_SOURCE = {**_SOURCE, "required": _SOURCE["required"] + list(_NEES),
                      "properties": {**_SOURCE["properties"], **_NEES}}
#: the fused source also counts the fusion's restarts from rejected measurements
_FUSED_SOURCE = {**_COVARIANCE_SOURCE, "required": _COVARIANCE_SOURCE["required"] + ["reinitialisations"],
                 "properties": {**_COVARIANCE_SOURCE["properties"],
                                "reinitialisations": {"type": "integer", "minimum": 0}}}

#: JSON Schema of ``metrics.json`` (draft 2020-12). ``sources`` holds ``absolute`` (raw
#: network), ``fused`` (when fusion ran), ``odometry`` (odometry alone, anchored to the
#: ground truth at its first pose) and ``visual_odometry`` (the network's relative head
#: integrated, ``--visual-odom``), each evaluated at the image stamps; ``absolute`` and
#: ``fused`` also score their published covariances (NEES), ``fused`` counts the
#: fusion's reinitialisations.
METRICS_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["bag", "weights", "frames", "sources", "counts", "timing"],
    "properties": {
        "bag": {"type": "string"},
        "weights": {"type": "string"},
        "frames": {"type": "object", "required": ["images", "estimated", "evaluated"],
                   "additionalProperties": {"type": "integer", "minimum": 0}},
        "sources": {"type": "object", "required": ["absolute"],
                    "properties": {"absolute": _COVARIANCE_SOURCE, "fused": _FUSED_SOURCE, "odometry": _SOURCE,
                                   "visual_odometry": _SOURCE},
                    "additionalProperties": False},
        "counts": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
        "timing": {"type": "object", "required": ["seconds", "frames_per_second", "device"],
                   "properties": {"seconds": {"type": "number", "minimum": 0},
                                  "frames_per_second": {"type": "number", "minimum": 0},
                                  "inference_frames_per_second": {"type": "number", "minimum": 0},
                                  "device": {"type": "string"},
                                  # seconds per stage: bag_read (images), network (image
                                  # decoding + estimator), fusion_and_output (busy time of the
                                  # fusion side: fusion + result bag), waiting_for_fusion (the
                                  # image loop held up by it, and its finish)
                                  "phase_seconds": {"type": "object",
                                                    "additionalProperties": {"type": "number",
                                                                             "minimum": 0}}}},
    },
}

#: the fused translation error over time with its 2-sigma band (written when fusion ran)
ERROR_BAND_PLOT = "fused_error_band.png"

COLOURS = {"ground_truth": "black", "absolute": "tab:orange", "fused": "tab:blue", "odometry": "tab:green",
           "visual_odometry": "tab:purple"}


def write_report(folder: Path, result: dict) -> None:
    folder = Path(folder)
    for name, (stamps, t, q) in result["trajectories"].items():
        write_tum(folder / f"{name}.tum", stamps, t, q)
    (folder / "metrics.json").write_text(json.dumps(result["metrics"], indent=2, allow_nan=False) + "\n")
    error_band = _plots(folder, result)
    (folder / "report.md").write_text(_markdown(result["metrics"], error_band))


def _phases(metrics: dict) -> str:
    phases = metrics["timing"].get("phase_seconds")
    if not phases:
        return ""
    return ": " + ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in phases.items())


def format_table(metrics: dict) -> str:
    """The metrics table that vizloc-replay prints and report.md shows."""
    names = [n for n in SOURCE_NAMES if n in metrics["sources"]]
    rows = [("frames scored", "frames", "{:d}"),
            ("median translation (m)", "median_translation_m", "{:.3f}"),
            ("median rotation (deg)", "median_rotation_deg", "{:.2f}"),
            ("final median transl. (m)", "final_median_translation_m", "{:.3f}"),
            ("within 25 cm, 2 deg", "within_25cm_2deg", "{:.1%}"),
            ("within 50 cm, 5 deg", "within_50cm_5deg", "{:.1%}"),
            ("ATE RMSE (m)", "ate_rmse_m", "{:.3f}"),
            ("ATE RMSE, SE(3)-aligned (m)", "ate_rmse_m_se3_aligned", "{:.3f}"),
            ("median step error (m)", "median_step_translation_m", "{:.4f}"),
            ("median step error (deg)", "median_step_rotation_deg", "{:.3f}"),
            ("NEES / dof (1 = honest)", "nees_per_dof", "{:.2f}"),
            ("inside 95 % bound (NEES)", "nees_share_within_95", "{:.1%}"),
            ("reinitialisations", "reinitialisations", "{:d}")]
    width = max(len(r[0]) for r in rows)
    lines = [" " * width + "".join(f"{SHORT_NAMES.get(n, n):>12}" for n in names)]
    for label, key, fmt in rows:
        cells = []
        for n in names:
            value = metrics["sources"][n].get(key)
            cells.append(f"{fmt.format(value) if value is not None else '-':>12}")
        lines.append(label.ljust(width) + "".join(cells))
    counts = metrics["counts"]
    lines.append("")
    frames = metrics["frames"]
    lines.append(f"images: {frames['images']} read, {frames['estimated']} estimated, {frames['evaluated']} "
                 f"with ground truth; "
                 f"absolute measurements accepted {counts.get('absolute_accepted', 0)}, "
                 f"rejected {counts.get('absolute_rejected', 0)}, dropped {counts.get('absolute_dropped', 0)}; "
                 f"{metrics['timing']['frames_per_second']:.1f} frames/s end to end on "
                 f"{metrics['timing']['device']}")
    noise = metrics.get("fusion_noise_from_weights")
    if noise:
        figures = ", ".join(f"{k} {v:g}" for k, v in noise.items() if k != "json")
        lines.append(f"fusion noise from the weights ({Path(noise['json']).name}, noise_from_weights): {figures}")
    warning = scored_frames_warning(frames["evaluated"], frames["estimated"],
                                    "the others have no ground truth near their stamp")
    return "\n".join(lines + ([warning] if warning else []))


def _skipped_covariances(metrics: dict) -> str:
    """A sentence naming the sources whose NEES left frames out, or nothing."""
    skipped = [f"{metrics['sources'][n]['nees_skipped_covariances']} {SHORT_NAMES.get(n, n)}"
               for n in SOURCE_NAMES
               if metrics["sources"].get(n, {}).get("nees_skipped_covariances")]
    if not skipped:
        return ""
    return (f" Frames left out of the NEES for a singular or non-finite covariance: "
            f"{', '.join(skipped)}.")


def _markdown(metrics: dict, error_band: bool = False) -> str:
    lines = ["# vizloc-replay report", "",
             f"- bag: `{metrics['bag']}`", f"- weights: `{metrics['weights']}`",
             f"- device: {metrics['timing']['device']}, {metrics['timing']['frames_per_second']:.1f} "
             f"frames/s end to end ({metrics['timing']['seconds']:.1f} s{_phases(metrics)})", "",
             "```", format_table(metrics), "```", "",
             "Errors are measured at the image stamps against the interpolated ground truth; "
             "`fused` is the latest fused pose at or before each image (causal), `odometry` "
             "is the odometry alone anchored to the ground truth at its first pose (`visual "
             "odometry`: the network's relative head integrated, likewise). ATE/RPE "
             "come from evo on the same poses. NEES = e^T C^-1 e scores each pose against the "
             "covariance it was published with (e = (t_true - t_est, rotvec(R_true R_est^T)), "
             "ROS order, map axes): NEES / dof is its mean / 6, about 1 when the covariance "
             "is honest and larger when it is over-confident; about 95 % of the frames should "
             "lie inside the 95 % bound (NEES <= 12.59, chi-square with 6 dof)."
             + _skipped_covariances(metrics), "",
             "![trajectories](trajectories.png)", "", "![errors](errors.png)", "",
             "![error CDF](error_cdf.png)", ""]
    if error_band:
        lines += [f"![fused error and its 2-sigma band]({ERROR_BAND_PLOT})", "",
                  "Fused translation error t_true - t_est along each axis of map, with the "
                  "band of +-2 sigma per axis (sigma = the square root of that axis's "
                  "diagonal entry of the published covariance); with an honest covariance "
                  "about 95 % of the error lies inside the band.", ""]
    lines += ["## Counts", ""]
    lines += [f"- {k}: {v}" for k, v in sorted(metrics["counts"].items())]
    return "\n".join(lines) + "\n"


def _plots(folder: Path, result: dict) -> bool:
    """Writes the plots; True when the fused error band was among them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    for name, (_, t, _) in result["trajectories"].items():
        ax.plot(t[:, 0], t[:, 1], ".-" if name == "absolute" else "-", ms=2, lw=1 if name == "absolute" else 1.6,
                color=COLOURS.get(name), alpha=0.6 if name == "absolute" else 1.0,
                label=name.replace("_", " "))
    ax.set_xlabel("x (m, map)")
    ax.set_ylabel("y (m, map)")
    ax.set_aspect("equal", adjustable="datalim")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Top-down trajectories")
    fig.tight_layout()
    fig.savefig(folder / "trajectories.png", dpi=110)
    plt.close(fig)

    per_frame = result["per_frame"]
    stamps = per_frame["stamp"]
    rel = stamps - stamps[0] if len(stamps) else stamps
    names = [n for n in COLOURS if n != "ground_truth" and f"{n}_translation_m" in per_frame]
    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for name in names:
        axes[0].plot(rel, per_frame[f"{name}_translation_m"], color=COLOURS[name], lw=1, label=name)
        axes[1].plot(rel, per_frame[f"{name}_rotation_deg"], color=COLOURS[name], lw=1, label=name)
    axes[0].set_ylabel("translation error (m)")
    axes[1].set_ylabel("rotation error (deg)")
    axes[1].set_xlabel("time (s)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "errors.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in names:
        for ax, key in zip(axes, ("translation_m", "rotation_deg")):
            values = np.sort(per_frame[f"{name}_{key}"][np.isfinite(per_frame[f"{name}_{key}"])])
            if len(values):
                ax.plot(values, np.arange(1, len(values) + 1) / len(values), color=COLOURS[name], label=name)
    axes[0].set_xlabel("translation error (m)")
    axes[1].set_xlabel("rotation error (deg)")
    for ax in axes:
        ax.set_ylabel("share of frames")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "error_cdf.png", dpi=110)
    plt.close(fig)
    return _error_band_plot(folder, per_frame, rel, plt)


def _error_band_plot(folder: Path, per_frame: dict, rel, plt) -> bool:
    """Fused signed translation error per axis of map with +-2 sigma of the published
    covariance: where the covariance is over-confident the error leaves the band."""
    error, sigma = per_frame.get("fused_error_xyz_m"), per_frame.get("fused_sigma_xyz_m")
    if error is None or not np.any(np.isfinite(error)):
        return False
    fig, axes = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
    for axis, ax in enumerate(axes):
        inside = np.abs(error[:, axis]) <= 2 * sigma[:, axis]
        scored = np.isfinite(error[:, axis]) & np.isfinite(sigma[:, axis])
        share = f", {np.mean(inside[scored]):.0%} inside" if np.any(scored) else ""
        ax.fill_between(rel, -2 * sigma[:, axis], 2 * sigma[:, axis], color=COLOURS["fused"], alpha=0.2,
                        lw=0, label="+-2 sigma (published covariance)")
        ax.plot(rel, error[:, axis], color=COLOURS["fused"], lw=1, label=f"error{share}")
        ax.axhline(0.0, color="black", lw=0.5)
        ax.set_ylabel(f"{'xyz'[axis]} error (m)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize="small")
    axes[0].set_title("Fused translation error (t_true - t_est, map axes) and its 2-sigma band")
    axes[-1].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(folder / ERROR_BAND_PLOT, dpi=110)
    plt.close(fig)
    return True
