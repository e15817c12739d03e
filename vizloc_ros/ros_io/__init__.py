"""Stage 1: ROS data in and out, without rclpy.

Message conversion (stamps, poses, images, covariances), rosbag reading and writing,
ground truth and TF resolution. Field-compatible with rclpy's messages and with those of
``rosbags``, so the nodes, the replay and the training datasets read data the same way.
"""
