"""Stage 2: one camera image -> an absolute pose in ``map`` with a covariance.

:class:`~vizloc_ros.localize.estimator.PoseEstimator` is the one inference interface;
``models/`` holds the networks (inference only) and the checkpoint format.
"""
