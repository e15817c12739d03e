"""Ground truth from a recording: a pose topic or a TF chain, interpolated to other stamps.

Shared by the bag dataset (training on recordings) and ``vizloc-replay`` (evaluation),
so both associate images with the same poses.
"""
from __future__ import annotations

from array import array

import numpy as np

from vizloc_ros import geometry
from vizloc_ros.ros_io import messages

#: message types that carry a ground-truth pose on their own (else: a TF chain)
GT_TYPES = ("geometry_msgs/msg/PoseStamped", "geometry_msgs/msg/PoseWithCovarianceStamped",
            "nav_msgs/msg/Odometry", "geometry_msgs/msg/TransformStamped")

#: ground truth is not interpolated across a gap longer than this, or than
#: GT_GAP_PERIODS of its own median period when it is slower (1 Hz GNSS, SLAM keyframes)
GT_MAX_GAP_S = 0.25
GT_GAP_PERIODS = 2.5

#: a ground-truth pose this close to a query stamp is the pose at that stamp. Why not
#: exact equality: one header stamp turned into float seconds two ways (``sec + nanosec *
#: 1e-9`` here, ``ns * 1e-9`` in the pipeline) differs by up to ~2.4e-7 s at today's
#: epoch (float64 spacing at 1.7e9 s), and an image stamped at the last pose of a recording
#: would otherwise fall "after" it and go unscored. 1 us is far below any sensor's period.
STAMP_MATCH_S = 1e-6


class GroundTruthError(ValueError):
    """No usable ground truth where it was asked for."""


#: /tf message types: tf2's, and ROS 1's older tf/tfMessage (same fields; e.g. TUM RGB-D bags)
TF_TYPES = ("tf2_msgs/msg/TFMessage", "tf/msg/tfMessage")


def normalise_frame(frame) -> str:
    """A frame id as tf2 spells it: no leading slash (ROS 1 bags often say ``/world``)."""
    return str(frame).strip().lstrip("/")


def tf_edges(transforms, skipped: dict | None = None):
    """{(parent, child): (t, q)} from static transforms.

    A transform that cannot be read (NaN, a quaternion of norm 2) raises ``ValueError``;
    with ``skipped`` (a dict) it is left out instead and its problem kept there under its
    edge, so the good transforms of the message still count and a missing chain can say
    which transform broke it (not just "no TF path").
    """
    edges = {}
    for tf in transforms:
        try:
            key = (normalise_frame(tf.header.frame_id), normalise_frame(tf.child_frame_id))
        except AttributeError as exc:
            raise ValueError(f"not a TransformStamped: {exc}") from None
        try:
            edges[key] = messages.pose_from_msg(tf)
        except (ValueError, TypeError) as exc:
            if skipped is None:
                raise ValueError(f"transform {key[0]} -> {key[1]}: {exc}") from None
            skipped[key] = str(exc)
    return edges


def describe_skipped(skipped: dict, where: str) -> str:
    """``"; transforms on /tf_static that could not be used: a -> b (why), ..."`` or ""."""
    if not skipped:
        return ""
    listing = ", ".join(f"{a} -> {b} ({why})" for (a, b), why in sorted(skipped.items())[:5])
    more = f", ... ({len(skipped)} in all)" if len(skipped) > 5 else ""
    return f"; transforms on {where} that could not be used: {listing}{more}"


def _frame_path(edges, parent: str, child: str):
    """Shortest chain of edges from ``parent`` to ``child``: [((a, b), forward)], or None.

    TF is a tree, but a chain asked for may go up before it goes down
    (``camera -> base_link -> map``), so edges are walked in both directions."""
    graph: dict = {}
    for a, b in sorted(edges):
        graph.setdefault(a, []).append((b, (a, b), True))
        graph.setdefault(b, []).append((a, (a, b), False))
    previous = {parent: None}
    frontier = [parent]
    while frontier and child not in previous:
        nxt = []
        for frame in frontier:
            for other, key, forward in graph.get(frame, []):
                if other not in previous:
                    previous[other] = (frame, key, forward)
                    nxt.append(other)
        frontier = nxt
    if child not in previous:
        return None
    path, frame = [], child
    while previous[frame] is not None:
        frame, key, forward = previous[frame]
        path.append((key, forward))
    return path[::-1]


def static_chain(edges: dict, parent: str, child: str):
    """parent_T_child by composing static edges (either direction); None if unconnected."""
    parent, child = normalise_frame(parent), normalise_frame(child)
    path = _frame_path(edges, parent, child)
    if path is None:
        return None
    t, q = np.zeros(3), np.array([1.0, 0, 0, 0])
    for key, forward in path:
        t_e, q_e = edges[key] if forward else geometry.pose_inverse(*edges[key])
        t, q = geometry.pose_compose(t, q, t_e, q_e)
    return t, q


def _is_constant(t, q) -> bool:
    """A transform republished unchanged (ROS 1's static_transform_publisher on /tf)."""
    return bool(np.ptp(t, axis=0).max() < 1e-9
                and np.min(np.abs(np.sum(q * q[0], axis=1))) > 1.0 - 1e-12)


def add_tf_samples(dynamic: dict, transforms, skipped: dict | None = None) -> None:
    """Append the transforms of one /tf message to ``dynamic``: (parent, child) -> flat
    ``array('d')`` of rows (stamp, x, y, z, qw, qx, qy, qz); 64 bytes a sample, where
    tuples of numpy arrays took about 350 (an hour of a busy /tf is millions of them).
    Raises ``ValueError`` for a malformed transform (those before it are kept); with
    ``skipped`` (a dict) it is left out, its problem kept under its edge, and the rest of
    the message is read."""
    for tf in transforms:
        key = (normalise_frame(tf.header.frame_id), normalise_frame(tf.child_frame_id))
        try:
            t, q = messages.pose_from_msg(tf)
            stamp = messages.header_stamp_sec(tf)
        except ValueError as exc:
            if skipped is None:
                raise
            skipped[key] = str(exc)
            continue
        dynamic.setdefault(key, array("d")).extend((stamp, t[0], t[1], t[2], q[0], q[1], q[2], q[3]))


def _edge_series(samples):
    """(stamps, t, q) arrays of one edge's samples: an ``array('d')`` of rows as
    :func:`add_tf_samples` keeps them, or a list of (stamp, t, q)."""
    if isinstance(samples, array):
        rows = np.frombuffer(samples, dtype=float).reshape(-1, 8)
        return rows[:, 0].copy(), rows[:, 1:4].copy(), rows[:, 4:8].copy()
    return (np.array([s[0] for s in samples], dtype=float), np.array([s[1] for s in samples], dtype=float),
            np.array([s[2] for s in samples], dtype=float))


def fixed_edges(dynamic: dict) -> dict:
    """{(parent, child): (t, q)} of the /tf edges in ``dynamic`` (as :func:`add_tf_samples`
    collects them) that were seen at least twice and never changed: the mounts a ROS 1
    bag, or a ROS 2 bag recorded without /tf_static, only carries on /tf
    (:mod:`vizloc_ros.ros_io.camera_mount` looks for the camera's there)."""
    fixed = {}
    for key, samples in dynamic.items():
        _, t, q = _edge_series(samples)
        if len(t) >= 2 and _is_constant(t, q):
            fixed[key] = (t[0], q[0])
    return fixed


def tf_chain_poses(dynamic: dict, static_edges: dict, parent: str, child: str, skipped: str = ""):
    """parent_T_child over time from TF edges: (stamps, t, q), sorted by stamp.

    ``skipped``: what :func:`describe_skipped` said of the transforms left out, appended
    to the error when no path is found (the path may exist through one of them).

    ``dynamic`` maps (parent, child) to the samples from /tf (:func:`add_tf_samples`; a
    list of (stamp, t, q) works too), ``static_edges`` is
    :func:`tf_edges` of /tf_static. The chain may have any length and run through static
    and moving edges in either direction (``world -> mocap_body -> base_link``). Poses
    are given at the stamps of the chain's densest moving edge (the motion capture);
    the other moving edges are interpolated there, and a stamp where one of them has a
    gap (:func:`default_max_gap`) is left out. A chain whose /tf edges never change (a
    robot standing still) gives that pose at their stamps; one only on /tf_static is
    an error.
    """
    # (stamps or None, t, q, moving): fixed edges keep their /tf stamps, which time a
    # chain of fixed edges only (a robot that never moved)
    edges: dict = {key: (None, t, q, False) for key, (t, q) in static_edges.items()}
    for key, samples in dynamic.items():
        stamps, t, q = _edge_series(samples)
        order = np.argsort(stamps, kind="stable")
        stamps, t, q = stamps[order], t[order], q[order]
        edges[key] = (stamps, t[0], q[0], False) if _is_constant(t, q) else (stamps, t, q, True)
    path = _frame_path(edges, parent, child)
    if path is None:
        names = [f"{a}->{b}" for a, b in sorted(edges)]
        listing = ", ".join(names[:30]) + (f", ... ({len(names)} in all)" if len(names) > 30 else "")
        raise GroundTruthError(f"no TF path {parent} -> {child} in the bag's /tf and /tf_static "
                               f"(edges: {listing or 'none'}){skipped}")
    timed = [key for key, _ in path if edges[key][0] is not None]
    if not timed:
        raise GroundTruthError(f"TF {parent} -> {child} is only on /tf_static: it is not a trajectory")
    moving = [key for key in timed if edges[key][3]] or timed
    driver = max(moving, key=lambda key: len(edges[key][0]))
    query = edges[driver][0]
    parts = []
    for key, forward in path:
        stamps, t, q, is_moving = edges[key]
        if not is_moving:
            t, q = np.broadcast_to(t, (len(query), 3)), np.broadcast_to(q, (len(query), 4))
        elif key != driver:
            t, q = interpolate_poses(stamps, t, q, query)
        parts.append((t, q, forward))
    valid = np.ones(len(query), dtype=bool)
    for t, q, _ in parts:
        valid &= np.all(np.isfinite(t), axis=1) & np.all(np.isfinite(q), axis=1)
    t_out, q_out = np.zeros((int(valid.sum()), 3)), np.tile([1.0, 0.0, 0.0, 0.0], (int(valid.sum()), 1))
    for t, q, forward in parts:
        t_e, q_e = np.asarray(t)[valid], np.asarray(q)[valid]
        if not forward:
            t_e, q_e = geometry.pose_inverse(t_e, q_e)
        t_out, q_out = geometry.pose_compose(t_out, q_out, t_e, q_e)
    return query[valid], t_out, q_out


class GroundTruthReader:
    """Ground-truth base poses in ``map`` from a pose topic or a TF chain."""

    def __init__(self, spec: str, base_frame: str):
        self.spec = spec
        self._rows = array("d")  # (stamp, x, y, z, qw, qx, qy, qz) of a pose topic
        self.tf_parent = self.tf_child = None
        if spec.startswith("tf:"):
            try:
                self.tf_parent, self.tf_child = [normalise_frame(s) for s in spec[3:].split("->")]
            except ValueError:
                raise GroundTruthError(f"--ground-truth {spec!r}: expected tf:PARENT->CHILD") from None
            if not self.tf_parent or not self.tf_child:
                raise GroundTruthError(f"--ground-truth {spec!r}: expected tf:PARENT->CHILD")
            if self.tf_parent == self.tf_child:
                raise GroundTruthError(f"--ground-truth {spec!r}: PARENT and CHILD are the same frame")
        self.dynamic: dict = {}
        self.skipped_tf: dict = {}  # (parent, child) -> why a /tf transform was left out
        self.bad = 0
        self.last_problem = ""

    def add(self, topic: str, msg) -> None:
        try:
            if self.tf_parent is None:
                stamp = messages.header_stamp_sec(msg)
                t, q = messages.pose_from_msg(msg)
                self._rows.extend((stamp, t[0], t[1], t[2], q[0], q[1], q[2], q[3]))
            else:
                add_tf_samples(self.dynamic, msg.transforms, self.skipped_tf)
        except (ValueError, TypeError, AttributeError) as exc:
            self.bad += 1
            self.last_problem = str(exc)

    def finish(self, static_edges: dict, static_skipped: dict | None = None):
        """Sorted (stamps, t, q); a TF chain is resolved through /tf and /tf_static.
        ``static_skipped``: the /tf_static transforms left out (:func:`tf_edges`), named
        in the error when the chain is missing."""
        if self.tf_parent is not None:
            skipped = (describe_skipped(static_skipped or {}, "/tf_static")
                       + describe_skipped(self.skipped_tf, "/tf"))
            stamps, t, q = tf_chain_poses(self.dynamic, static_edges, self.tf_parent, self.tf_child, skipped)
        else:
            stamps, t, q = _edge_series(self._rows)
        if not len(stamps):
            unread = f" ({self.bad} message(s) could not be read, e.g. {self.last_problem})" if self.bad else ""
            raise GroundTruthError(f"no valid ground truth on {self.spec}{unread}")
        order = np.argsort(stamps, kind="stable")
        return stamps[order], t[order], q[order]


def default_max_gap(stamps) -> float:
    """The longest gap :func:`interpolate_poses` bridges by default: :data:`GT_MAX_GAP_S`,
    or :data:`GT_GAP_PERIODS` median periods of a slower source, so that a 1 Hz ground
    truth is interpolated between its samples while a dropout is still left out."""
    steps = np.diff(np.asarray(stamps, dtype=float))
    steps = steps[steps > 0]
    if not len(steps):
        return GT_MAX_GAP_S
    return max(GT_MAX_GAP_S, GT_GAP_PERIODS * float(np.median(steps)))


def interpolate_poses(stamps, t, q, query, max_gap: float | None = None):
    """Poses at ``query`` stamps: linear translation, slerp rotation; NaN where the
    nearest samples are more than ``max_gap`` apart (default: :func:`default_max_gap` of
    ``stamps``) or the stamp is outside the range."""
    t_out = np.full((len(query), 3), np.nan)
    q_out = np.full((len(query), 4), np.nan)
    if len(stamps) == 0:
        return t_out, q_out
    if max_gap is None:
        max_gap = default_max_gap(stamps)
    idx = np.searchsorted(stamps, query)
    for k, (i, s) in enumerate(zip(idx, query)):
        at = [j for j in (i - 1, i) if 0 <= j < len(stamps) and abs(stamps[j] - s) <= STAMP_MATCH_S]
        if at:
            j = min(at, key=lambda j: abs(stamps[j] - s))
            t_out[k], q_out[k] = t[j], q[j]
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


#: s: stamps this close are the same instant. Float seconds at epoch times (1.7e9 s) are
#: 0.24 us apart, and the same header stamp converted two ways (ns * 1e-9, or sec +
#: nanosec * 1e-9) can differ by that much: a tolerance of 1e-9 s absorbed nothing, so
#: an output at an image's own stamp was, by the rounding, held at that image or not
SAME_STAMP_S = 1e-6


def held_index(stamps, query) -> np.ndarray:
    """Index of the latest of the sorted ``stamps`` at or before each ``query`` stamp
    (within :data:`SAME_STAMP_S`); -1 before the first."""
    return np.searchsorted(np.asarray(stamps, float), np.asarray(query, float) + SAME_STAMP_S, side="right") - 1


def previous_poses(stamps, t, q, query):
    """Causal association: the latest pose at or before each query stamp (NaN before the first)."""
    t_out = np.full((len(query), 3), np.nan)
    q_out = np.full((len(query), 4), np.nan)
    if len(stamps) == 0:
        return t_out, q_out
    idx = held_index(stamps, query)
    ok = idx >= 0
    t_out[ok] = t[idx[ok]]
    q_out[ok] = q[idx[ok]]
    return t_out, q_out


