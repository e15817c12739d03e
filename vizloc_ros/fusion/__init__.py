"""Stage 3: sliding-window pose-graph fusion (GTSAM), ROS-free.

Absolute camera poses from :mod:`vizloc_ros.localize` are fused with odometry and IMU into
a ``map -> base_link`` estimate with a covariance and the REP-105 ``map -> odom``
transform. :class:`SlidingWindowFusion` is the one entry point; the parts it delegates to
live in the modules beside this one.
"""
from vizloc_ros.fusion.config import FusionConfig
from vizloc_ros.fusion.conventions import chi2_quantile, gtsam_cov_to_ros, map_to_odom, ros_cov_to_gtsam
from vizloc_ros.fusion.window import FusedEstimate, MeasurementResult, SlidingWindowFusion

__all__ = [
    "FusionConfig", "SlidingWindowFusion", "MeasurementResult", "FusedEstimate",
    "map_to_odom", "gtsam_cov_to_ros", "ros_cov_to_gtsam", "chi2_quantile",
]
