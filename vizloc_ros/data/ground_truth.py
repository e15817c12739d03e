"""Ground truth from a recording: a pose topic or a TF chain, interpolated to other stamps.

Shared by the bag dataset (training on recordings) and ``vizloc-replay`` (evaluation),
so both associate images with the same poses.
"""
from __future__ import annotations

import numpy as np

from vizloc_ros import geometry, messages

#: message types that carry a ground-truth pose on their own (else: a TF chain)
GT_TYPES = ("geometry_msgs/msg/PoseStamped", "geometry_msgs/msg/PoseWithCovarianceStamped",
            "nav_msgs/msg/Odometry", "geometry_msgs/msg/TransformStamped")

#: ground truth further than this from a query stamp is not interpolated across
GT_MAX_GAP_S = 0.25


class GroundTruthError(ValueError):
    """No usable ground truth where it was asked for."""


def tf_edges(transforms):
    """{(parent, child): (t, q)} from static transforms."""
    edges = {}
    for tf in transforms:
        t, q = messages.pose_from_msg(tf)
        edges[(tf.header.frame_id, tf.child_frame_id)] = (t, q)
    return edges


def static_chain(edges: dict, parent: str, child: str):
    """parent_T_child by composing static edges (either direction); None if unconnected."""
    graph: dict = {}
    for (a, b), (t, q) in edges.items():
        graph.setdefault(a, []).append((b, t, q))
        t_inv, q_inv = geometry.pose_inverse(t, q)
        graph.setdefault(b, []).append((a, t_inv, q_inv))
    frontier = [(parent, np.zeros(3), np.array([1.0, 0, 0, 0]))]
    seen = {parent}
    while frontier:
        frame, t, q = frontier.pop()
        if frame == child:
            return t, q
        for nxt, t_e, q_e in graph.get(frame, []):
            if nxt not in seen:
                seen.add(nxt)
                frontier.append((nxt, *geometry.pose_compose(t, q, t_e, q_e)))
    return None


class GroundTruthReader:
    """Ground-truth base poses in ``map`` from a pose topic or a TF chain."""

    def __init__(self, spec: str, base_frame: str):
        self.spec = spec
        self.stamps: list[float] = []
        self.t: list[np.ndarray] = []
        self.q: list[np.ndarray] = []
        self.tf_parent = self.tf_child = None
        if spec.startswith("tf:"):
            try:
                self.tf_parent, self.tf_child = [s.strip() for s in spec[3:].split("->")]
            except ValueError:
                raise GroundTruthError(f"--ground-truth {spec!r}: expected tf:PARENT->CHILD") from None
        self.dynamic: dict = {}
        self.bad = 0

    def add(self, topic: str, msg) -> None:
        try:
            if self.tf_parent is None:
                stamp = messages.header_stamp_sec(msg)
                t, q = messages.pose_from_msg(msg)
                self._append(stamp, t, q)
            else:
                for tf in msg.transforms:
                    key = (tf.header.frame_id, tf.child_frame_id)
                    t, q = messages.pose_from_msg(tf)
                    self.dynamic.setdefault(key, []).append(
                        (messages.header_stamp_sec(tf), t, q))
        except ValueError:
            self.bad += 1

    def _append(self, stamp, t, q):
        self.stamps.append(stamp)
        self.t.append(t)
        self.q.append(q)

    def finish(self, static_edges: dict):
        """Resolve a TF chain (direct edge, or two dynamic edges through one frame)."""
        if self.tf_parent is not None:
            direct = self.dynamic.get((self.tf_parent, self.tf_child))
            if direct:
                for stamp, t, q in direct:
                    self._append(stamp, t, q)
            else:
                pairs = [(a, b) for (a, b) in self.dynamic if a == self.tf_parent]
                for _, mid in pairs:
                    second = self.dynamic.get((mid, self.tf_child))
                    if not second:
                        continue
                    first = self.dynamic[(self.tf_parent, mid)]
                    s1 = np.array([f[0] for f in first])
                    t1, q1 = interpolate_poses(s1, np.array([f[1] for f in first]),
                                          np.array([f[2] for f in first]),
                                          np.array([s[0] for s in second]))
                    for k, (stamp, t, q) in enumerate(second):
                        if np.all(np.isfinite(t1[k])):
                            self._append(stamp, *geometry.pose_compose(t1[k], q1[k], t, q))
                    break
            if not self.stamps:
                raise GroundTruthError(f"no TF path {self.tf_parent} -> {self.tf_child} in the bag's /tf "
                                  f"(dynamic edges: {sorted(self.dynamic)})")
        if not self.stamps:
            raise GroundTruthError(f"no valid ground truth on {self.spec}")
        order = np.argsort(self.stamps, kind="stable")
        return (np.asarray(self.stamps)[order], np.asarray(self.t)[order], np.asarray(self.q)[order])


def interpolate_poses(stamps, t, q, query, max_gap: float = GT_MAX_GAP_S):
    """Poses at ``query`` stamps: linear translation, slerp rotation; NaN where the
    nearest samples are more than ``max_gap`` apart or the stamp is outside the range."""
    t_out = np.full((len(query), 3), np.nan)
    q_out = np.full((len(query), 4), np.nan)
    if len(stamps) == 0:
        return t_out, q_out
    idx = np.searchsorted(stamps, query)
    for k, (i, s) in enumerate(zip(idx, query)):
        if i < len(stamps) and abs(stamps[i] - s) < 1e-9:
            t_out[k], q_out[k] = t[i], q[i]
            continue
        if i == 0 or i >= len(stamps):
            continue
        a, b = i - 1, i
        if stamps[b] - stamps[a] > max_gap:
            continue
        w = (s - stamps[a]) / (stamps[b] - stamps[a])
        t_out[k] = (1 - w) * t[a] + w * t[b]
        q_rel = geometry.quat_multiply(geometry.quat_conjugate(q[a]), q[b])
        q_out[k] = geometry.quat_hemisphere(geometry.quat_normalize(
            geometry.quat_multiply(q[a], geometry.quat_exp(w * geometry.quat_log(q_rel)))))
    return t_out, q_out


def previous_poses(stamps, t, q, query):
    """Causal association: the latest pose at or before each query stamp (NaN before the first)."""
    t_out = np.full((len(query), 3), np.nan)
    q_out = np.full((len(query), 4), np.nan)
    if len(stamps) == 0:
        return t_out, q_out
    idx = np.searchsorted(stamps, np.asarray(query) + 1e-9, side="right") - 1
    ok = idx >= 0
    t_out[ok] = t[idx[ok]]
    q_out[ok] = q[idx[ok]]
    return t_out, q_out


