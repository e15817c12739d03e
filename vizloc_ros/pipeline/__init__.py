"""The relocalization pipeline without ROS: what the nodes do, so the replay does it too.

The two rclpy nodes are thin adapters over the two cores of this package, and
``vizloc-replay`` drives the very same cores from a bag. Every decision (which frame
is processed, what is dropped and why, which stamp and frame an output carries, the
``map -> odom`` arithmetic) lives here and is tested without ROS 2.

* :class:`LatestFrameSlot` - keep only the newest camera frame; older ones are
  dropped and counted (a slow network never builds a queue);
* :class:`FrameWorker` - the worker thread that runs the newest frame of the slot;
* :class:`RegressorCore` - image message -> ``PoseEstimator`` -> base pose in ``map``
  (through the camera extrinsic, covariance propagated) = ``/vizloc/absolute_pose``;
  sequence models get their frames in stamp order, and a network with a relative head
  (VLocNet) can also drive :class:`VisualOdometry` = ``/vizloc/visual_odometry``;
* :class:`FusionCore` - absolute pose / odometry / IMU / initial pose messages ->
  ``SlidingWindowFusion`` -> ``/vizloc/pose``, ``/vizloc/path`` and the TF transform.

Each core input returns a result (:class:`~vizloc_ros.pipeline.regressor.FrameResult`,
:class:`~vizloc_ros.pipeline.fusion_core.FusionStep`): the output, or a
:class:`~vizloc_ros.pipeline.drops.Drop` with a typed reason, from which the counters are
derived. :mod:`vizloc_ros.pipeline.outputs` turns outputs into the ``(topic, message)``
lists that the nodes publish and the replay writes: the output path exists once.

Messages may be rclpy or rosbags messages: the cores only read fields (messages.py).
"""
