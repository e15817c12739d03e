"""rclpy nodes: the only place where rclpy and ROS message packages are imported."""
