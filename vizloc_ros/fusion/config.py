"""Parameters of the sliding-window fusion: one dataclass, validated on construction.

Why validated here and not in the node: the node, the replay and the tests all build a
:class:`FusionConfig`, and a typo or a wrong type must fail the same way in each.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from vizloc_ros.geometry import quat_hemisphere, quat_normalize

_ROBUST_KERNELS = ("huber", "cauchy", "none")
_IMU_MODES = ("preintegration", "gyro")
_MOTION_MODELS = ("constant_velocity", "random_walk")

# --------------------------------------------------------------------------- config

_FIELD_KINDS = {
    "window_size": "opt_int", "window_seconds": "opt_float",
    "robust_kernel": "str", "robust_param": "float", "gate_probability": "float",
    "use_odom": "bool", "use_imu": "bool", "imu_mode": "str",
    "odom_floor_trans": "float", "odom_floor_rot": "float",
    "odom_floor_trans_per_m": "float", "odom_floor_rot_per_rad": "float",
    "odom_max_gap": "float",
    "motion_model": "str", "motion_sigma_trans": "float", "motion_sigma_rot": "float",
    "motion_sigma_acc": "float",
    "kidnap_consecutive": "int", "init_consistent": "int",
    "base_T_camera": "pose", "base_T_imu": "pose",
    "gyro_noise_density": "float", "accel_noise_density": "float",
    "gyro_bias_walk": "float", "accel_bias_walk": "float",
    "gyro_bias_sigma": "float", "accel_bias_sigma": "float",
    "init_velocity_sigma": "float", "imu_integration_sigma": "float",
    "imu_max_gap": "float", "gravity": "vec3",
    "min_abs_sigma_trans": "float", "min_abs_sigma_rot": "float",
    "time_jump_s": "float", "buffer_seconds": "float", "relinearize_threshold": "float",
}


@dataclass
class FusionConfig:
    """Parameters of :class:`SlidingWindowFusion` (all have working defaults).

    Window: ``window_seconds`` (a time span) takes precedence when set; otherwise the
    window holds the last ``window_size`` poses. Noise figures are standard deviations
    (IMU ones are continuous-time densities, as in Kalibr / GTSAM).
    """

    window_size: int | None = 20
    window_seconds: float | None = None
    robust_kernel: str = "huber"          # "huber" | "cauchy" | "none"
    robust_param: float = 3.0             # on the whitened 6-dof residual norm
    gate_probability: float = 0.99        # chi-square gate, 6 dof
    use_odom: bool = True
    use_imu: bool = False
    imu_mode: str = "preintegration"      # "preintegration" | "gyro"
    # Odometry: a relative motion's covariance is the increase of the (accumulated) message
    # covariance between its two ends; these floors apply where that is zero or smaller.
    odom_floor_trans: float = 0.002       # m
    odom_floor_rot: float = 0.002         # rad
    odom_floor_trans_per_m: float = 0.02  # extra sigma per metre travelled
    odom_floor_rot_per_rad: float = 0.02  # extra sigma per radian turned
    odom_max_gap: float = 0.5             # s; never interpolate across a longer gap
    # Motion model between poses where odometry does not constrain them. Without odometry
    # (absolute only, or gyro) "constant_velocity" adds velocity states and a white-noise
    # acceleration model (motion_sigma_acc); "random_walk" ties poses only by
    # motion_sigma_trans / motion_sigma_rot, which is also the fallback for odometry gaps.
    motion_model: str = "constant_velocity"
    motion_sigma_trans: float = 0.5       # m / sqrt(s)
    motion_sigma_rot: float = 0.5         # rad / sqrt(s)
    motion_sigma_acc: float = 0.5         # m/s^2 / sqrt(Hz)
    kidnap_consecutive: int = 5
    init_consistent: int = 3
    base_T_camera: tuple = ((0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0))  # (t, q_wxyz)
    base_T_imu: tuple = ((0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0))
    # IMU noise: datasheet values of a typical MEMS IMU (EuRoC's ADIS16448). Set your own;
    # real IMUs often need them inflated 2-10x for unmodelled effects (vibration, timing).
    gyro_noise_density: float = 1.7e-4    # rad/s/sqrt(Hz)
    accel_noise_density: float = 2.0e-3   # m/s^2/sqrt(Hz)
    gyro_bias_walk: float = 1.9e-5        # rad/s^2/sqrt(Hz)
    accel_bias_walk: float = 3.0e-3       # m/s^3/sqrt(Hz)
    gyro_bias_sigma: float = 0.02         # rad/s, prior on the initial bias
    accel_bias_sigma: float = 0.2         # m/s^2
    init_velocity_sigma: float = 1.0      # m/s
    imu_integration_sigma: float = 1e-4
    imu_max_gap: float = 0.1              # s between two IMU samples
    gravity: tuple = (0.0, 0.0, -9.81)    # in map
    min_abs_sigma_trans: float = 1e-3     # floor added to the estimator's covariance
    min_abs_sigma_rot: float = 1e-4
    time_jump_s: float = 1.0              # a stamp this far back is a bag loop: reset
    buffer_seconds: float = 30.0          # odometry / IMU history kept
    relinearize_threshold: float = 0.1

    def __post_init__(self):
        self._validate()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FusionConfig":
        """Build from a dict (ROS parameters, YAML); unknown keys or wrong types are a
        ``ValueError`` naming the key, so a typo never silently falls back to a default."""
        if not isinstance(values, dict):
            raise ValueError(f"FusionConfig.from_dict expects a dict, got {type(values).__name__}")
        unknown = sorted(set(values) - set(_FIELD_KINDS))
        if unknown:
            raise ValueError(f"unknown fusion parameter(s): {', '.join(map(str, unknown))}; "
                             f"known: {', '.join(sorted(_FIELD_KINDS))}")
        kwargs = {k: _check_kind(k, _FIELD_KINDS[k], v) for k, v in values.items()}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def _validate(self):
        for f in fields(self):
            setattr(self, f.name, _check_kind(f.name, _FIELD_KINDS[f.name], getattr(self, f.name)))
        if self.window_seconds is None:
            if self.window_size is None or self.window_size < 2:
                raise ValueError("window_size must be an int >= 2 (or set window_seconds)")
        elif self.window_seconds <= 0:
            raise ValueError("window_seconds must be > 0")
        if self.robust_kernel not in _ROBUST_KERNELS:
            raise ValueError(f"robust_kernel must be one of {_ROBUST_KERNELS}, got {self.robust_kernel!r}")
        if self.motion_model not in _MOTION_MODELS:
            raise ValueError(f"motion_model must be one of {_MOTION_MODELS}, got {self.motion_model!r}")
        if self.imu_mode not in _IMU_MODES:
            raise ValueError(f"imu_mode must be one of {_IMU_MODES}, got {self.imu_mode!r}")
        if not 0.0 < self.gate_probability < 1.0:
            raise ValueError("gate_probability must be in (0, 1)")
        if self.kidnap_consecutive < 1 or self.init_consistent < 1:
            raise ValueError("kidnap_consecutive and init_consistent must be >= 1")
        for name in ("robust_param", "odom_floor_trans", "odom_floor_rot", "odom_max_gap",
                     "motion_sigma_trans", "motion_sigma_rot", "motion_sigma_acc",
                     "gyro_noise_density", "accel_noise_density", "gyro_bias_walk",
                     "accel_bias_walk", "gyro_bias_sigma", "accel_bias_sigma",
                     "init_velocity_sigma", "imu_integration_sigma", "imu_max_gap",
                     "min_abs_sigma_trans", "min_abs_sigma_rot", "time_jump_s",
                     "buffer_seconds", "relinearize_threshold"):
            if not getattr(self, name) > 0.0:
                raise ValueError(f"{name} must be > 0")
        for name in ("odom_floor_trans_per_m", "odom_floor_rot_per_rad"):
            if getattr(self, name) < 0.0:
                raise ValueError(f"{name} must be >= 0")


def _check_kind(name: str, kind: str, v):
    def bad(expected):
        return ValueError(f"fusion parameter {name!r} must be {expected}, got {v!r} "
                          f"({type(v).__name__})")

    is_num = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
    if kind in ("opt_int", "opt_float") and v is None:
        return None
    if kind in ("int", "opt_int"):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise bad("an int")
        return int(v)
    if kind in ("float", "opt_float"):
        if not is_num or not math.isfinite(float(v)):
            raise bad("a finite number")
        return float(v)
    if kind == "bool":
        if not isinstance(v, (bool, np.bool_)):
            raise bad("a bool")
        return bool(v)
    if kind == "str":
        if not isinstance(v, str):
            raise bad("a string")
        return v.lower()
    if kind == "vec3":
        try:
            a = np.asarray(v, dtype=float).reshape(-1)
        except (TypeError, ValueError):
            raise bad("3 numbers") from None
        if a.shape != (3,) or not np.all(np.isfinite(a)):
            raise bad("3 finite numbers")
        return tuple(float(x) for x in a)
    if kind == "pose":
        try:
            t, q = v
            t = np.asarray(t, dtype=float).reshape(-1)
            q = np.asarray(q, dtype=float).reshape(-1)
        except (TypeError, ValueError):
            raise bad("a pair ((tx, ty, tz), (qw, qx, qy, qz))") from None
        if t.shape != (3,) or q.shape != (4,) or not np.all(np.isfinite(t)) \
                or not np.all(np.isfinite(q)) or np.linalg.norm(q) < 1e-9:
            raise bad("a pair ((tx, ty, tz), (qw, qx, qy, qz)) of finite values")
        q = quat_hemisphere(quat_normalize(q))
        return (tuple(float(x) for x in t), tuple(float(x) for x in q))
    raise AssertionError(kind)  # pragma: no cover
