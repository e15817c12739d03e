"""Is the estimator's covariance honest? NEES on a dataset split, for both uncertainty modes.

NEES = e^T C^-1 e with e = (t_true - t_est, log(R_true R_est^T)) in ROS order (the
estimator's covariance convention). A calibrated 6-dof covariance averages 6.

    python benchmarks/calibration.py WEIGHTS DATA_7SCENES [--split test] [--mc 10]
        [--write-scale VAL_7SCENES]   # store mc_dropout_scale measured on a validation split

``--write-scale`` measures the MC-dropout NEES on the given (validation) split and writes
``validation_errors.mc_dropout_scale = NEES / 6`` into the checkpoint JSON, so MC-dropout
covariances are inflated to calibrated size; run it on a split other than the test one.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from vizloc_ros.metrics import NEES_BOUND_95, POSE_DOF, pose_error_vectors
from vizloc_ros.metrics import nees as nees_values
from vizloc_ros.training.datasets import SevenScenes
from vizloc_ros.localize.estimator import PoseEstimator


def nees(weights, dataset, mc: int, every: int = 1) -> dict:
    estimator = PoseEstimator(weights, device="cpu", mc_dropout_samples=mc)
    t_est, q_est, t_true, q_true, covs = [], [], [], [], []
    for i in range(0, len(dataset), every):
        sample = dataset[i]
        est = estimator.estimate(sample["image"])
        t_est.append(est.t)
        q_est.append(est.q)
        covs.append(est.cov)
        t_true.append(sample["t"])
        q_true.append(sample["q"])
    errors = pose_error_vectors(t_est, q_est, t_true, q_true)
    values = nees_values(errors, np.asarray(covs))
    values = values[np.isfinite(values)]  # a singular covariance has no NEES
    return {"mode": f"mc_dropout x{mc}" if mc > 1 else "validation covariance", "frames": len(values),
            "mean_nees": float(values.mean()), "mean_nees_per_dof": float(values.mean() / POSE_DOF),
            "median_nees": float(np.median(values)),
            "share_within_chi2_95": float(np.mean(values <= NEES_BOUND_95)),
            "median_translation_m": float(np.median(np.linalg.norm(errors[:, :3], axis=1)))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("weights")
    parser.add_argument("data")
    parser.add_argument("--split", default="test")
    parser.add_argument("--mc", type=int, default=10)
    parser.add_argument("--every", type=int, default=1, help="use every n-th frame")
    parser.add_argument("--write-scale", metavar="VAL_DATA", help="7-Scenes folder of a validation split")
    args = parser.parse_args(argv)
    if args.write_scale:
        val = SevenScenes(args.write_scale, "test")
        result = nees(args.weights, val, args.mc, args.every)
        scale = result["mean_nees_per_dof"]
        json_path = Path(args.weights).with_suffix(".json")
        meta = json.loads(json_path.read_text())
        meta.setdefault("validation_errors", {})["mc_dropout_scale"] = scale
        tmp = json_path.with_name(f".{json_path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, json_path)
        print(f"mc_dropout_scale = {scale:.3f} (validation NEES {result['mean_nees']:.2f}) written to {json_path}")
    data = SevenScenes(args.data, args.split)
    rows = [nees(args.weights, data, 0, args.every)]
    if args.mc > 1:
        rows.append(nees(args.weights, data, args.mc, args.every))
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
