"""vizloc_regressor: camera images -> ``/vizloc/absolute_pose`` (network pose of the base in map).

The subscription callback only drops the message into a one-frame slot
(:class:`~vizloc_ros.pipeline.worker.LatestFrameSlot`); a worker thread
(:class:`~vizloc_ros.pipeline.worker.FrameWorker`) runs the network on the newest frame, so a
slow network never blocks the executor or builds a queue (replaced frames are counted).
What a frame becomes is decided by :class:`~vizloc_ros.pipeline.regressor.RegressorCore`, the code
``vizloc-replay`` runs too: a sequence model (VidLoc) reads the clip of the last frames it
processed, and with ``visual_odometry`` a network's relative head (VLocNet) becomes
``nav_msgs/Odometry`` on ``visual_odometry_topic`` (+ TF ``odom_frame -> base_frame``).
"""
from __future__ import annotations

import sys
import threading
import time
from collections import Counter

from rclpy.node import Node

from vizloc_ros.ros_io.camera_mount import CameraMountResolver
from vizloc_ros.nodes import params as node_params
from vizloc_ros.nodes.common import (Diagnostics, ProblemLog, StartupError, declare_parameters, publish,
                                     reliable_qos, report_drop, ros_message_types, run,
                                     sensor_qos, static_tf_qos)
from vizloc_ros.pipeline.drops import Drop, DropReason
from vizloc_ros.pipeline.outputs import OutputTopics, regressor_messages
from vizloc_ros.pipeline.regressor import RegressorCore, load_estimator
from vizloc_ros.pipeline.worker import FrameWorker, LatestFrameSlot

#: how long the first frame waits for the static TF base <- camera before the fallback is used
FIRST_EXTRINSIC_WAIT_S = 2.0

#: queue depth of the /tf subscription (tf2_ros's listener uses 100 too)
TF_QOS_DEPTH = 100


class RegressorNode(Node):
    NODE_NAME = node_params.REGRESSOR_NODE

    def __init__(self):
        super().__init__(self.NODE_NAME)
        try:
            s = node_params.regressor_settings(declare_parameters(self, node_params.REGRESSOR_PARAMS),
                                               node_params.default_weights)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        self.settings = s
        self.types = ros_message_types()
        self.problems = ProblemLog(self.get_logger())
        self.estimator = self._load_estimator(s)
        try:
            self.core = RegressorCore(self.estimator, base_T_camera=s.camera_extrinsic,
                                      map_frame=s.map_frame, max_rate=s.max_rate,
                                      max_image_pixels=s.max_image_pixels,
                                      visual_odometry=s.visual_odometry, odom_frame=s.odom_frame,
                                      base_frame=s.base_frame)
        except ValueError as exc:
            raise StartupError(f"visual_odometry: {exc}") from None
        self._extrinsic_from_tf = False
        self._extrinsic_attempts = 0
        self._lock = threading.Lock()  # core.counters: worker writes, diagnostics read
        self._latency = None

        # The camera mount, resolved as the replay and the training datasets do
        # (vizloc_ros.ros_io.camera_mount): /tf_static (robot_state_publisher), else the
        # transforms that stay fixed over the first seconds of /tf (a bag recorded without
        # /tf_static). No tf2 TransformListener: it would take every /tf message for the
        # node's lifetime (odometry, our own map -> odom) and warn TF_OLD_DATA at each
        # loop of a bag; our /tf subscription goes once its window is read.
        fallback = ("identity: the camera pose is published as the base pose"
                    if self._fallback_is_identity() else "as given")
        self.camera_mount = CameraMountResolver(
            hint=f"using the camera_extrinsic parameter ({fallback}) until it appears")
        self.create_subscription(self.types.TFMessage, "/tf_static", self._on_tf_static, static_tf_qos())
        self._tf_subscription = self.create_subscription(self.types.TFMessage, "/tf", self._on_tf,
                                                         reliable_qos(TF_QOS_DEPTH))

        self.topics = OutputTopics(absolute_pose=node_params.ABSOLUTE_POSE_TOPIC,
                                   visual_odometry=s.visual_odometry_topic)
        self.publishers_by_topic = {self.topics.absolute_pose: self.create_publisher(
            self.types.PoseWithCovarianceStamped, self.topics.absolute_pose, reliable_qos(10))}
        self.odom_tf = None
        if s.visual_odometry:
            self.publishers_by_topic[self.topics.visual_odometry] = self.create_publisher(
                self.types.Odometry, self.topics.visual_odometry, reliable_qos(10))
            if s.publish_odom_tf:
                from tf2_ros import TransformBroadcaster
                self.odom_tf = TransformBroadcaster(self)
        self.slot = LatestFrameSlot()
        self.diagnostics = Diagnostics(self, "pose regression", self._status)
        image_type = self.types.CompressedImage if s.compressed else self.types.Image
        self.subscription = self.create_subscription(image_type, s.subscribed_topic,
                                                     self._on_image, sensor_qos(1))
        self.worker = FrameWorker(self.slot, self._process, self._on_worker_error,
                                  name="vizloc_regressor_worker").start()
        self.get_logger().info(
            f"{s.weights.name} on {self.estimator.device} ({s.precision}); "
            f"{s.subscribed_topic} -> {node_params.ABSOLUTE_POSE_TOPIC} in {s.map_frame!r}")

    def _load_estimator(self, s):
        """The PoseEstimator, or a StartupError naming the file and what is wrong with it."""
        try:
            estimator = load_estimator(s.weights, device=s.device, precision=s.precision,
                                       mc_dropout_samples=s.mc_dropout_samples)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        if estimator.map_frame != s.map_frame:
            self.get_logger().warning(
                f"{s.weights.name} was trained in frame {estimator.map_frame!r} but map_frame "
                f"is {s.map_frame!r}: poses are published in {s.map_frame!r} unchanged")
        return estimator

    # -- callbacks -------------------------------------------------------------
    def _on_tf_static(self, msg) -> None:
        self.camera_mount.feed(msg, static=True)

    def _on_tf(self, msg) -> None:
        """The first seconds of /tf (receive time: a bag's sim time may stand still), then
        the subscription goes; also once the mount is known."""
        wanted = self.camera_mount.feed(msg, static=False, time_ns=time.monotonic_ns())
        if (not wanted or self._extrinsic_from_tf) and self._tf_subscription is not None:
            self.destroy_subscription(self._tf_subscription)
            self._tf_subscription = None

    def _on_image(self, msg) -> None:
        """Never blocks: the worker takes the newest frame when it is free."""
        self.slot.put(msg)
        self.diagnostics.rate.tick()

    def _on_worker_error(self, exc) -> bool:
        """A frame raised: one line per kind of problem, never a traceback per frame."""
        if not self.context.ok():
            return False  # Ctrl-C shut rclpy down under us: nothing to report, stop
        with self._lock:
            self.core.record_drop(Drop(DropReason.ERROR, f"{type(exc).__name__}: {exc}"))
        self.problems.warn(f"error:{type(exc).__name__}", f"frame dropped: {type(exc).__name__}: {exc}")
        return True

    def _process(self, msg) -> None:
        if not self._extrinsic_from_tf:
            self._lookup_extrinsic(msg.header.frame_id)
        with self._lock:
            result = self.core.process(msg)
        report_drop(self.problems, result.drop, "image")
        pose = result.pose
        if pose is None:
            return
        self._latency = pose.latency_s
        if not self.context.ok():
            return
        publish(self.publishers_by_topic, self.odom_tf,
                regressor_messages(self.types, pose, self.topics, odometry_tf=self.odom_tf is not None))

    def _lookup_extrinsic(self, header_frame: str) -> None:
        """base_frame <- camera frame from TF (:attr:`camera_mount`); the parameter is used until then.

        The first frame waits up to FIRST_EXTRINSIC_WAIT_S (on this worker thread, never
        in a callback) so /tf_static has time to arrive; later frames only check.
        """
        camera = self.settings.camera_frame or header_frame
        base = self.settings.base_frame
        if not camera:
            self.get_logger().warning("images have no frame_id and camera_frame is empty: using the "
                                      "camera_extrinsic parameter", throttle_duration_sec=30.0)
            return
        wait = FIRST_EXTRINSIC_WAIT_S if self._extrinsic_attempts == 0 else 0.0
        self._extrinsic_attempts += 1
        mount = self.camera_mount.resolve(base, camera, timeout_s=wait)
        if not mount.found:
            self.get_logger().warning(mount.reason, throttle_duration_sec=30.0)
            return
        t, q = mount.pose
        with self._lock:
            self.core.set_extrinsic(t, q)
        self._extrinsic_from_tf = True
        self.get_logger().info(f"camera extrinsic {base} <- {camera} ({mount.source}): "
                               f"t={t.round(4).tolist()} q_wxyz={q.round(4).tolist()}")

    def _fallback_is_identity(self) -> bool:
        t, q = self.settings.camera_extrinsic
        return not t.any() and q[0] == 1.0

    # -- diagnostics -----------------------------------------------------------
    def _status(self):
        with self._lock:
            counters = Counter(self.core.counters)
        counters["dropped_not_latest"] = self.slot.dropped
        if self.diagnostics.rate.rate() == 0.0:
            return "warn", f"no images on {self.settings.subscribed_topic}", counters, self._latency
        if not self._extrinsic_from_tf:
            return "warn", "camera extrinsic not from TF (using the parameter)", counters, self._latency
        return "ok", "running", counters, self._latency

    def close(self) -> None:
        """Stop the worker before the node goes away (it publishes through the node)."""
        self.worker.stop(timeout=5.0)


def main(args=None):
    sys.exit(run(RegressorNode, args))


if __name__ == "__main__":
    main()
