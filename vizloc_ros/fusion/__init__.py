"""Stage 3: sliding-window pose-graph fusion (GTSAM), ROS-free.

Absolute camera poses from :mod:`vizloc_ros.localize` are fused with odometry and IMU into
a ``map -> base_link`` estimate with a covariance and the REP-105 ``map -> odom``
transform. :class:`SlidingWindowFusion` (``window.py``) is the one entry point; the parts
it delegates to live in the modules beside it.

The names below are loaded on first use (PEP 562): ``vizloc_ros.fusion.config`` is read by
the nodes' parameter tables, and importing it must not load GTSAM into the regressor node
or into ``vizloc-replay --no-fusion``.
"""
from __future__ import annotations

import importlib

#: public name -> the module of this package that defines it
_EXPORTS = {
    "FusionConfig": "config",
    "SlidingWindowFusion": "window",
    "MeasurementResult": "estimate",
    "FusedEstimate": "estimate",
    "map_to_odom": "conventions",
    "gtsam_cov_to_ros": "conventions",
    "ros_cov_to_gtsam": "conventions",
    "chi2_quantile": "conventions",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # looked up once
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
