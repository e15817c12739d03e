"""Where the camera sits on the robot: ``base_frame -> camera frame`` from TF.

One resolver for everything that turns a camera pose into a base pose or back: the
regressor node (fed by its /tf_static and /tf subscriptions), ``vizloc-replay`` and the
training datasets (fed from the bag they read). The sources, first match wins:

1. an override the user gave (``--camera-extrinsic``, ``camera_extrinsic=``): the user
   knows better than the recording; then images already in the base frame (identity);
2. ``/tf_static``, chained in either direction (robot_state_publisher's mounts);
3. transforms that stay fixed over the first :data:`TF_FIXED_WINDOW_S` of ``/tf``:
   ROS 1 bags, and ROS 2 bags recorded without /tf_static, republish their mounts there.
   Only the start of /tf is read: a mount is fixed from the first message on, and a busy
   /tf is long.

Frame names are normalised as tf2 does (``/camera`` and ``camera`` are one frame; ROS 1
bags spell them with a leading slash). When nothing connects the two frames, the
:class:`CameraMount` says which path is missing and how the caller's user fixes it.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from vizloc_ros.ros_io.bag_io import read_messages
from vizloc_ros.ros_io.ground_truth import (add_tf_samples, describe_skipped, fixed_edges, normalise_frame,
                                          static_chain, tf_edges)

LOG = logging.getLogger(__name__)

#: /tf is read for this long (from its first message) for transforms that stay fixed
TF_FIXED_WINDOW_S = 5.0

#: where a resolved mount came from
FROM_OVERRIDE = "override"
FROM_SAME_FRAME = "same frame"
FROM_TF_STATIC = "/tf_static"
FROM_FIXED_TF = "fixed on /tf"

#: REP-103's camera optical frame (z forward, x right, y down) in a body frame (x forward,
#: y left, z up): optical z along body x, optical x along -body y, optical y along -body z.
#: The rotation of every camera mount this package writes (the synthetic robot's, and
#: vizloc-bag's for a dataset that knows no robot).
OPTICAL_IN_BODY_R = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


@dataclass(frozen=True)
class CameraMount:
    """``base_T_camera`` as (t, q_wxyz) and its source, or ``pose=None`` with the reason.

    ``reason`` names the missing TF path and, when the resolver was given one, the hint
    that fixes it (the caller's option names)."""

    pose: tuple | None
    source: str = ""
    reason: str = ""

    @property
    def found(self) -> bool:
        return self.pose is not None


class CameraMountResolver:
    """Collects TF messages (:meth:`feed`) and resolves ``base -> camera`` (:meth:`resolve`).

    Thread-safe: a node's subscription callbacks feed it while a worker thread resolves,
    and :meth:`resolve` can wait for the mount to arrive.

    ``override``: (t, q_wxyz) used whatever TF says. ``hint``: appended to the reason of a
    missing mount (e.g. "pass --camera-extrinsic, or --base-frame if ...").
    """

    def __init__(self, override=None, hint: str = "", window_s: float = TF_FIXED_WINDOW_S):
        self.override = override
        self.hint = hint
        self.window_s = float(window_s)
        self._static: dict = {}        # (parent, child) -> (t, q) from /tf_static
        self._static_skipped: dict = {}  # (parent, child) -> why a /tf_static transform was unusable
        self._tf_samples: dict = {}    # (parent, child) -> samples of the /tf window
        self._tf_first_ns: int | None = None
        self._tf_window_closed = False
        self._fixed_tf: dict | None = None  # fixed_edges of the closed window (it changes no more)
        self._changed = threading.Condition()

    # -- feeding ---------------------------------------------------------------
    def feed(self, msg, static: bool, time_ns: int | None = None) -> bool:
        """Take one TFMessage (tf2_msgs or ROS 1's tf/tfMessage).

        ``static``: it came from /tf_static; a transform that cannot be read (NaN, a
        quaternion of norm 2) is left out, warned about once, and named when the mount
        is missing (an earlier good value of its edge stays). Otherwise it came from /tf at ``time_ns``
        (receive or log time): only the first :attr:`window_s` are kept, and a message
        past the window closes it. Returns whether the resolver still wants /tf messages,
        so that a reader can stop reading (or unsubscribe from) /tf.
        """
        with self._changed:
            if static:
                skipped: dict = {}
                try:
                    edges = tf_edges(msg.transforms, skipped)
                except (ValueError, TypeError, AttributeError):
                    LOG.debug("malformed /tf_static message skipped", exc_info=True)
                    return not self._tf_window_closed
                for key, why in skipped.items():
                    if self._static_skipped.get(key) != why:
                        LOG.warning("/tf_static transform %s -> %s left out: %s", *key, why)
                self._static_skipped.update(skipped)
                for key in edges:
                    self._static_skipped.pop(key, None)
                self._static.update(edges)
            else:
                if self._tf_window_closed:
                    return False
                if time_ns is None:
                    raise ValueError("a /tf message needs its receive or log time (time_ns)")
                if self._tf_first_ns is None:
                    self._tf_first_ns = int(time_ns)
                if time_ns - self._tf_first_ns > self.window_s * 1e9:
                    self._tf_window_closed = True
                else:
                    try:
                        add_tf_samples(self._tf_samples, msg.transforms)
                    except (ValueError, TypeError, AttributeError):  # the transforms before it are kept
                        LOG.debug("malformed /tf message", exc_info=True)
            self._changed.notify_all()
            return not self._tf_window_closed

    def close_tf_window(self) -> None:
        """No more /tf will come (a bag's window was read to its end, or /tf is short):
        the fixed transforms seen so far count."""
        with self._changed:
            self._tf_window_closed = True
            self._changed.notify_all()

    @property
    def tf_window_closed(self) -> bool:
        return self._tf_window_closed

    def static_edges(self) -> dict:
        """{(parent, child): (t, q)} of the /tf_static fed so far, for a reader that chains
        other frames through them too (a ground truth ``tf:world->base_link``)."""
        with self._changed:
            return dict(self._static)

    def static_skipped(self) -> dict:
        """{(parent, child): why} of the /tf_static transforms that could not be used."""
        with self._changed:
            return dict(self._static_skipped)

    # -- resolving -------------------------------------------------------------
    def resolve(self, base_frame: str, camera_frame: str, timeout_s: float = 0.0) -> CameraMount:
        """base_T_camera: the override, else /tf_static, else (once the /tf window has
        closed) the transforms that stayed fixed on /tf. ``timeout_s`` > 0 waits that
        long for a :meth:`feed` that completes the path (a node's first frame)."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._changed:
            while True:
                mount = self._resolve_now(base_frame, camera_frame)
                remaining = deadline - time.monotonic()
                if mount.found or remaining <= 0:
                    return mount
                self._changed.wait(remaining)

    def _resolve_now(self, base_frame: str, camera_frame: str) -> CameraMount:
        if self.override is not None:
            return CameraMount(tuple(self.override), FROM_OVERRIDE)
        if normalise_frame(base_frame) == normalise_frame(camera_frame):  # images in the base frame
            return CameraMount((np.zeros(3), np.array([1.0, 0.0, 0.0, 0.0])), FROM_SAME_FRAME)
        chain = static_chain(self._static, base_frame, camera_frame)
        if chain is not None:
            return CameraMount(chain, FROM_TF_STATIC)
        if self._tf_window_closed and self._tf_samples:
            if self._fixed_tf is None:  # once: a node resolves on every frame until a mount appears
                self._fixed_tf = fixed_edges(self._tf_samples)
            chain = static_chain(self._fixed_tf | self._static, base_frame, camera_frame)
            if chain is not None:
                return CameraMount(chain, FROM_FIXED_TF)
        reason = (f"no TF path {normalise_frame(base_frame)} -> {normalise_frame(camera_frame)} "
                  "(the images' frame) on /tf_static or fixed on /tf"
                  f"{describe_skipped(self._static_skipped, '/tf_static')}")
        return CameraMount(None, reason=f"{reason}: {self.hint}" if self.hint else reason)


def feed_tf_window(resolver: CameraMountResolver, bag) -> None:
    """Feed the first window of a bag's /tf to ``resolver`` (a short second read: only
    needed when /tf_static has no path), then close the window."""
    try:
        for record in read_messages(bag, ["/tf"]):
            if not resolver.feed(record.msg, static=False, time_ns=record.log_time_ns):
                break
    except Exception:  # noqa: BLE001 - a damaged /tf: the mount is then missing, and its reason says so
        LOG.debug("reading /tf for fixed transforms failed", exc_info=True)
    resolver.close_tf_window()


def resolve_in_bag(resolver: CameraMountResolver, bag, topics, base_frame: str,
                   camera_frame: str) -> CameraMount:
    """:meth:`CameraMountResolver.resolve` for a bag reader that feeds /tf_static itself:
    when that has no path and the bag (``topics``: name -> type) has /tf, its window is
    read once (:func:`feed_tf_window`) and the mount resolved again."""
    mount = resolver.resolve(base_frame, camera_frame)
    if not mount.found and "/tf" in topics and not resolver.tf_window_closed:
        feed_tf_window(resolver, bag)
        mount = resolver.resolve(base_frame, camera_frame)
    return mount
