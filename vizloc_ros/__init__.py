"""vizloc_ros: camera relocalization for ROS 2.

Everything outside ``vizloc_ros.nodes`` imports without ROS 2 installed, so the same
code runs in the live nodes, in bag replay and in the tests (see DESIGN.md).
"""
__version__ = "0.1.0"
