"""vizloc_fusion: absolute poses + odometry (+ IMU) -> ``/vizloc/pose``, ``/vizloc/path``, TF.

Every decision (gating, the ``map -> odom`` arithmetic, TF stamps, when the path grows)
is made by :class:`~vizloc_ros.pipeline.fusion_core.FusionCore`, the code ``vizloc-replay`` runs;
this node wires topics, QoS, TF and the ``~/reset`` service to it. Callbacks run on one
executor thread, so the core needs no lock.
"""
from __future__ import annotations

import sys
import time
from collections import Counter

from rclpy.node import Node

from vizloc_ros.nodes import params as node_params
from vizloc_ros.nodes.common import (Diagnostics, ProblemLog, StartupError, declare_parameters,
                                     latched_qos, publish, reliable_qos, report_drop,
                                     ros_message_types, run, sensor_qos)
from vizloc_ros.pipeline.drops import Drop, DropReason
from vizloc_ros.pipeline.fusion_core import FusionCore
from vizloc_ros.pipeline.outputs import FusionMessages, OutputTopics


class FusionNode(Node):
    NODE_NAME = node_params.FUSION_NODE

    def __init__(self):
        super().__init__(self.NODE_NAME)
        try:
            p = node_params.fusion_settings(declare_parameters(self, node_params.FUSION_PARAMS))
            p.settings = node_params.with_network_weights(p.settings)
            self.core = FusionCore(p.config, p.settings)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        except ImportError as exc:  # gtsam missing
            raise StartupError(f"cannot start the fusion: {exc} (pip install gtsam)") from None
        s = self.settings = p.settings
        self.types = ros_message_types()
        self.problems = ProblemLog(self.get_logger())
        self._latency = None
        topics = OutputTopics(pose=node_params.FUSED_POSE_TOPIC, path=node_params.PATH_TOPIC)
        self.outputs = FusionMessages(self.core, self.types, topics)

        self.publishers_by_topic = {
            topics.pose: self.create_publisher(self.types.PoseWithCovarianceStamped, topics.pose,
                                               latched_qos()),
            topics.path: self.create_publisher(self.types.Path, topics.path, latched_qos())}
        self.tf_broadcaster = None
        if s.publish_tf:
            from tf2_ros import TransformBroadcaster
            self.tf_broadcaster = TransformBroadcaster(self)
        self.diagnostics = Diagnostics(self, "pose fusion", self._status)

        T = self.types
        self.create_subscription(T.PoseWithCovarianceStamped, node_params.ABSOLUTE_POSE_TOPIC,
                                 self._on_absolute, reliable_qos(10))
        self.create_subscription(T.PoseWithCovarianceStamped, node_params.INITIAL_POSE_TOPIC,
                                 self._on_initial_pose, reliable_qos(1))
        # a coarse relocalizer's poses (launch prior_weights:=...): initialisation and recovery
        self.create_subscription(T.PoseWithCovarianceStamped, node_params.COARSE_POSE_TOPIC,
                                 self._on_coarse_pose, reliable_qos(10))
        if s.use_odom:
            self.create_subscription(T.Odometry, p.odom_topic, self._on_odometry, sensor_qos(50))
        if s.use_imu:
            self.create_subscription(T.Imu, p.imu_topic, self._on_imu, sensor_qos(400))
        from std_srvs.srv import Trigger
        self.create_service(Trigger, "~/reset", self._on_reset)
        inputs = [node_params.ABSOLUTE_POSE_TOPIC] + [p.odom_topic] * s.use_odom + [p.imu_topic] * s.use_imu
        tf = (f"{s.map_frame} -> {s.odom_frame if s.use_odom else s.base_frame}"
              if s.publish_tf else "no TF")
        self.get_logger().info(f"fusing {', '.join(inputs)}; publishing {node_params.FUSED_POSE_TOPIC}, "
                               f"{node_params.PATH_TOPIC}, {tf}")
        if self.core.network_noise:
            figures = ", ".join(f"{k} {v:g}" for k, v in self.core.network_noise.items())
            self.get_logger().info(f"network noise from {s.network_weights} (noise_from_weights): {figures}")

    # -- inputs ----------------------------------------------------------------
    def _on_absolute(self, msg) -> None:
        self.diagnostics.rate.tick()
        self._handle(self.core.on_absolute, msg, "absolute pose")

    def _on_odometry(self, msg) -> None:
        self._handle(self.core.on_odometry, msg, "odometry")

    def _on_coarse_pose(self, msg) -> None:
        self._handle(self.core.on_coarse_pose, msg, "coarse pose")

    def _on_imu(self, msg) -> None:
        self._handle(self.core.on_imu, msg, "IMU")

    def _on_initial_pose(self, msg) -> None:
        self.get_logger().info("initial pose received: restarting the fusion there")
        self._handle(self.core.on_initial_pose, msg, "initial pose")
        if not self.core.path:  # accepted: the core restarted its path (a refused pose keeps it)
            self.outputs.clear_path()
        self._publish_path_now()

    def _on_reset(self, request, response):
        self.core.reset()
        self.outputs.clear_path()
        self._publish_path_now()
        response.success = True
        response.message = "fusion reset: waiting for consistent absolute poses"
        self.get_logger().info(response.message)
        return response

    def _handle(self, method, msg, what: str) -> None:
        """Run one core input; publish what it produced; report what it refused."""
        start = time.perf_counter()
        try:
            step = method(msg)
            if step.output is not None:
                publish(self.publishers_by_topic, self.tf_broadcaster, self.outputs.of(step.output))
            report_drop(self.problems, step.drop, what)
            for kind, line in step.notices:  # a restart (clock jump), an implausible input
                self.problems.warn(kind, line)
        except Exception as exc:  # noqa: BLE001 - one line per problem, never a traceback per message
            self.core.record_drop(Drop(DropReason.ERROR, f"{type(exc).__name__}: {exc}"))
            self.problems.warn(f"error:{type(exc).__name__}", f"{what} dropped: {type(exc).__name__}: {exc}")
        self._latency = time.perf_counter() - start

    def _publish_path_now(self) -> None:
        """The path whatever the throttle says (after a reset or an initial pose)."""
        publish(self.publishers_by_topic, None, [self.outputs.path_now(self.get_clock().now().to_msg())])

    # -- diagnostics -----------------------------------------------------------
    def _status(self):
        counters = Counter(self.core.counters)
        if not self.core.fusion.initialised:
            return "warn", "not initialised: waiting for consistent absolute poses", counters, self._latency
        if self.diagnostics.rate.rate() == 0.0:
            return "warn", f"no absolute poses on {node_params.ABSOLUTE_POSE_TOPIC}", counters, self._latency
        return "ok", "localized", counters, self._latency

    def close(self) -> None:
        """Nothing runs outside the executor."""


def main(args=None):
    sys.exit(run(FusionNode, args))


if __name__ == "__main__":
    main()
