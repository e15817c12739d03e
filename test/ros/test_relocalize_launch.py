"""End to end on ROS 2: relocalize.launch.py with demo:=true plays the demo bag and the
nodes localize in it: a fused pose with a finite covariance and the map -> odom TF.

Skipped without rclpy / launch_testing / ros2bag. Run with ROS sourced:
``python -m pytest test/ros`` (launch_testing's plugin; pytest < 9 on Jazzy) or
``launch_test test/ros/test_relocalize_launch.py``.
"""
import math
import os
import time
import unittest
from importlib.util import find_spec
from pathlib import Path

import pytest

# a mark, not importorskip: see test/test_cv_bridge_parity.py
MISSING = next((f"{name} is not importable" for name in
                ("rclpy", "launch", "launch_testing", "launch_ros", "tf2_ros", "ros2bag")  # ros2bag: demo:=true
                if find_spec(name) is None), None)
if MISSING is None:
    import launch
    import launch_testing.actions
    import rclpy
    from launch.actions import IncludeLaunchDescription
    from launch.launch_description_sources import PythonLaunchDescriptionSource

pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"needs ROS 2 with launch_testing: {MISSING}")
post_shutdown_test = launch_testing.post_shutdown_test() if MISSING is None else (lambda cls: cls)

#: seconds for the first fused pose: demo bag rendering on a cold cache, the network's
#: start-up on a CPU and the fusion's initialisation (three consistent poses)
POSE_TIMEOUT_S = float(os.environ.get("VIZLOC_LAUNCH_TEST_TIMEOUT", "240"))


def _launch_file() -> Path:
    try:
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory("vizloc_ros")) / "launch" / "relocalize.launch.py"
    except Exception:  # noqa: BLE001 - not installed: the source tree
        return Path(__file__).resolve().parents[2] / "launch" / "relocalize.launch.py"


if MISSING is None:  # launch_testing's plugin runs this whatever the skip mark says
    @pytest.mark.launch_test
    def generate_test_description():
        return launch.LaunchDescription([
            IncludeLaunchDescription(
                PythonLaunchDescriptionSource(str(_launch_file())),
                launch_arguments={"demo": "true", "rviz": "false", "device": "cpu"}.items()),
            launch_testing.actions.ReadyToTest(),
        ])


class TestRelocalization(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        rclpy.init()

    @classmethod
    def tearDownClass(cls):
        rclpy.shutdown()

    def test_fused_pose_and_map_to_odom(self):
        from geometry_msgs.msg import PoseWithCovarianceStamped
        from rclpy.parameter import Parameter
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from rclpy.time import Time
        from tf2_ros import Buffer, TransformListener

        node = rclpy.create_node("vizloc_launch_test",
                                 parameter_overrides=[Parameter("use_sim_time", value=True)])
        poses, absolute = [], []
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        node.create_subscription(PoseWithCovarianceStamped, "/vizloc/pose", poses.append, latched)
        node.create_subscription(PoseWithCovarianceStamped, "/vizloc/absolute_pose", absolute.append, 10)
        buffer = Buffer()
        TransformListener(buffer, node)
        try:
            deadline = time.monotonic() + POSE_TIMEOUT_S
            have_tf = False
            while time.monotonic() < deadline and not (len(poses) >= 3 and have_tf):
                rclpy.spin_once(node, timeout_sec=0.1)
                have_tf = have_tf or buffer.can_transform("map", "odom", Time())
            self.assertTrue(absolute, f"no /vizloc/absolute_pose within {POSE_TIMEOUT_S:.0f} s")
            self.assertGreaterEqual(len(poses), 3, f"no /vizloc/pose within {POSE_TIMEOUT_S:.0f} s "
                                                   f"({len(absolute)} absolute poses seen)")
            pose = poses[-1]
            self.assertEqual(pose.header.frame_id, "map")
            cov = list(pose.pose.covariance)
            self.assertTrue(all(math.isfinite(c) for c in cov), cov)
            self.assertTrue(all(cov[i * 7] > 0.0 for i in range(6)), cov)
            p = pose.pose.pose.position
            self.assertTrue(all(math.isfinite(v) for v in (p.x, p.y, p.z)))
            self.assertTrue(have_tf, "no TF map -> odom")
            tf = buffer.lookup_transform("map", "odom", Time())
            # published with the measurement stamp + transform_tolerance (0.1 s by default)
            stamp_ns = tf.header.stamp.sec * 10**9 + tf.header.stamp.nanosec
            self.assertGreater(stamp_ns, 0)
        finally:
            node.destroy_node()


@post_shutdown_test
class TestShutdown(unittest.TestCase):
    def test_nodes_exit_cleanly(self, proc_info):
        for process in proc_info.processes():
            name = process.process_details["name"]
            if name.startswith("vizloc_"):
                # 143: the node's own code for a SIGTERM (launch's escalation after SIGINT)
                self.assertIn(proc_info[process].returncode, (0, -2, -15, 130, 143), name)
