"""Which validation epoch `vizloc-train` keeps: the checkpoint selection rule.

Every validated epoch gets one score from its median errors, and the epoch with the
lowest score is the checkpoint written (``optim.select_by``). The rules:

* ``mean-pose`` (the default): each median divided by the same median of the *mean-pose
  predictor* on the validation split (the error of always answering the training set's
  mean position and mean orientation), summed. The mean pose itself scores 2.0 (1 + 1;
  less where a floor below applies), 0.4 is "five times better in both". It is scale-free: a 90 m KITTI drive and a 4 m room
  weigh translation and rotation alike, and it is the yardstick the project's targets use
  ("at least 5x better than the mean-pose baseline"). Each median is floored at the
  tightest accuracy DESIGN.md asks for (5 cm, 2 deg), so a component that hardly varies
  on the split (the heading of a car driving straight) does not decide alone.
* ``translation+rotation/10``: metres + degrees / 10, the rule before it. One metre is
  worth ten degrees whatever the scene: in a room that is fair, but on a 90 m trajectory
  metres dwarf degrees, and it kept an early 38 deg epoch over a 3 deg one whose
  translation was a few metres worse.
* ``translation``: the median metres alone; ``rotation``: the median degrees alone (a
  model that is judged on one of them only).
"""
from __future__ import annotations

import numpy as np

from vizloc_ros import geometry
from vizloc_ros.metrics import THRESHOLDS, evaluate_poses

MEAN_POSE = "mean-pose"
SELECTION_RULES = (MEAN_POSE, "translation+rotation/10", "translation", "rotation")
DEFAULT_RULE = MEAN_POSE

#: floors of the mean-pose medians: the tightest accuracy DESIGN.md asks for in each
#: component (5 cm, 2 deg). A drive that hardly turns has a mean-pose rotation error of
#: ~0.5 deg; dividing by that would rank an epoch at 0.6 m / 1.1 deg below one that
#: answers the mean pose (15 m / 0.4 deg) on rotation noise alone, and a split of one
#: orientation would divide by zero. Below the floor an error counts as a fraction of
#: the accuracy asked for, not of a baseline that is even smaller.
MIN_BASELINE_M = min(metres for metres, _ in THRESHOLDS)
MIN_BASELINE_DEG = min(degrees for _, degrees in THRESHOLDS)


def mean_rotation(q: np.ndarray) -> np.ndarray:
    """The chordal L2 mean of unit quaternions (w, x, y, z), either sign: the principal
    eigenvector of sum(q q^T) (Markley et al. 2007), w >= 0."""
    q = np.asarray(q, dtype=float).reshape(-1, 4)
    _, vectors = np.linalg.eigh(q.T @ q)
    return geometry.quat_hemisphere(geometry.quat_normalize(vectors[:, -1]))


def mean_pose_baseline(train_t, train_q, val_t, val_q) -> dict:
    """Median errors on the validation poses of always predicting the training set's
    mean position and mean orientation: ``{"median_translation_m", "median_rotation_deg"}``
    (floored at :data:`MIN_BASELINE_M` / :data:`MIN_BASELINE_DEG`)."""
    val_t = np.asarray(val_t, dtype=float).reshape(-1, 3)
    n = len(val_t)
    t_mean = np.asarray(train_t, dtype=float).reshape(-1, 3).mean(axis=0)
    metrics = evaluate_poses(np.tile(t_mean, (n, 1)), np.tile(mean_rotation(train_q), (n, 1)),
                             val_t, np.asarray(val_q, dtype=float).reshape(-1, 4))
    return {"median_translation_m": max(float(metrics["median_translation_m"]), MIN_BASELINE_M),
            "median_rotation_deg": max(float(metrics["median_rotation_deg"]), MIN_BASELINE_DEG)}


def check_rule(rule) -> str:
    """``rule`` if it is one of :data:`SELECTION_RULES`, else ``ValueError`` in one line."""
    if rule not in SELECTION_RULES:
        raise ValueError(f"optim.select_by must be one of {', '.join(SELECTION_RULES)}; got {rule!r}")
    return rule


def selection_score(metrics: dict, rule: str, baseline: dict | None = None) -> float:
    """The score of one validation (lower is better) under ``rule``; ``baseline`` (from
    :func:`mean_pose_baseline`) is needed by the ``mean-pose`` rule only."""
    t = float(metrics["median_translation_m"])
    r = float(metrics["median_rotation_deg"])
    rule = check_rule(rule)
    if rule == "translation":
        return t
    if rule == "rotation":
        return r
    if rule == "translation+rotation/10":
        return t + r / 10.0
    if baseline is None:
        raise ValueError("the mean-pose rule needs the mean-pose baseline of the validation split")
    return t / baseline["median_translation_m"] + r / baseline["median_rotation_deg"]
