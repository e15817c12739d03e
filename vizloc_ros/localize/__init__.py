"""Stage 2: one camera image -> an absolute pose in ``map`` with a covariance.

:class:`~vizloc_ros.localize.estimator.PoseEstimator` is the one inference interface; it
picks one adapter of :mod:`~vizloc_ros.localize.runners` when it loads the weights (TensorRT
engines through :mod:`~vizloc_ros.localize.tensorrt`). ``models/`` holds the networks
(inference only: how each is trained lives in ``vizloc_ros.training.recipes``) and the
checkpoint format; :mod:`~vizloc_ros.localize.camera` the network-input intrinsics the
geometric models need; :mod:`~vizloc_ros.localize.preprocess` the image preparation shared
with training.
"""
