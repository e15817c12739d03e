"""Parameters of the sliding-window fusion: one dataclass, validated on construction.

Why validated here and not in the node: the node, the replay and the tests all build a
:class:`FusionConfig`, and a typo or a wrong type must fail the same way in each.

Each field is defined once, with :func:`vizloc_ros.settings.setting`: its type is the
annotation, and the field's metadata (:class:`~vizloc_ros.settings.Setting`) holds its
one-line description, bounds, choices and how it appears as a ROS parameter. The
validation below, the fusion node's parameter declarations, ``config/vizloc.yaml`` and
the table in ``docs/ROS.md`` are all derived from it (``vizloc_ros.nodes.params`` and
``python -m vizloc_ros.nodes.param_files --write``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from vizloc_ros.geometry import quat_hemisphere, quat_normalize
from vizloc_ros.settings import Pose, Vec3, field_kind, setting

# --------------------------------------------------------------------------- config

_IDENTITY_POSE = ((0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0))


@dataclass
class FusionConfig:
    """Parameters of :class:`SlidingWindowFusion` (all have working defaults).

    Window: ``window_seconds`` (a time span) takes precedence when set; otherwise the
    window holds the last ``window_size`` poses. Noise figures are standard deviations
    (IMU ones are continuous-time densities, as in Kalibr / GTSAM). Poses are
    ``((tx, ty, tz), (qw, qx, qy, qz))``.
    """

    window_size: int | None = setting(
        20, "poses in the sliding window (>= 2); used when window_seconds is unset (0)")
    window_seconds: float | None = setting(
        None, "window as a time span in s; 0: use window_size", above=0.0, none_as=0.0)
    robust_kernel: str = setting(
        "huber", "robust loss on absolute poses: huber, cauchy or none",
        choices=("huber", "cauchy", "none"))
    robust_param: float = setting(3.0, "robust kernel width on the whitened residual norm", above=0.0)
    gate_probability: float = setting(
        0.99, "chi-square gate (6 dof) for absolute poses, in (0, 1)", above=0.0, below=1.0)
    use_odom: bool = setting(True, "fuse odometry as relative constraints",
                             not_ros="set from the node's use_odom")
    use_imu: bool = setting(False, "fuse the IMU", not_ros="set from the node's use_imu")
    imu_mode: str = setting("preintegration", "preintegration (gyro + accelerometer) or gyro",
                            choices=("preintegration", "gyro"))
    # Odometry: a relative motion's covariance is the increase of the (accumulated) message
    # covariance between its two ends; these floors apply where that is zero or smaller.
    odom_floor_trans: float = setting(0.002, "minimum odometry translation sigma per step, m", above=0.0)
    odom_floor_rot: float = setting(0.002, "minimum odometry rotation sigma per step, rad", above=0.0)
    odom_floor_trans_per_m: float = setting(0.02, "extra odometry sigma per metre travelled", minimum=0.0)
    odom_floor_rot_per_rad: float = setting(0.02, "extra odometry sigma per radian turned", minimum=0.0)
    odom_max_gap: float = setting(0.5, "s; odometry is never interpolated across a longer gap", above=0.0)
    # Motion model between poses where odometry does not constrain them. Without odometry
    # (absolute only, or gyro) "constant_velocity" adds velocity states and a white-noise
    # acceleration model (motion_sigma_acc); "random_walk" ties poses only by
    # motion_sigma_trans / motion_sigma_rot, which is also the fallback for odometry gaps.
    motion_model: str = setting(
        "constant_velocity", "between poses without odometry: constant_velocity or random_walk",
        choices=("constant_velocity", "random_walk"))
    motion_sigma_trans: float = setting(0.5, "random-walk translation noise, m/sqrt(s)", above=0.0)
    motion_sigma_rot: float = setting(0.5, "random-walk rotation noise, rad/sqrt(s)", above=0.0)
    motion_sigma_acc: float = setting(
        0.5, "constant-velocity white acceleration noise, m/s^2/sqrt(Hz)", above=0.0)
    kidnap_consecutive: int = setting(
        5, "consecutive gated poses that agree with each other: re-initialise there (kidnapped robot)",
        minimum=1)
    kidnap_probability: float = setting(
        0.999999999, "chi-square quantile (6 dof): gated poses beyond it restart the window after "
        "kidnap_consecutive of them; nearer ones only once the gate has rejected every pose for "
        "abs_correlation_time (a correlated network error passes sooner)", above=0.0, below=1.0)
    init_consistent: int = setting(3, "mutually consistent absolute poses needed to initialise", minimum=1)
    base_T_camera: Pose = setting(
        _IDENTITY_POSE, "pose of the camera in the base frame",
        not_ros="the fusion receives base poses (the regressor applied the extrinsic): identity")
    base_T_imu: Pose = setting(_IDENTITY_POSE, "pose of the IMU in base_frame [x, y, z, qx, qy, qz, qw]",
                               ros_name="imu_extrinsic")
    # IMU noise: datasheet values of a typical MEMS IMU (EuRoC's ADIS16448). Set your own;
    # real IMUs often need them inflated 2-10x for unmodelled effects (vibration, timing).
    gyro_noise_density: float = setting(1.7e-4, "rad/s/sqrt(Hz)", above=0.0)
    accel_noise_density: float = setting(2.0e-3, "m/s^2/sqrt(Hz)", above=0.0)
    gyro_bias_walk: float = setting(1.9e-5, "rad/s^2/sqrt(Hz)", above=0.0)
    accel_bias_walk: float = setting(3.0e-3, "m/s^3/sqrt(Hz)", above=0.0)
    gyro_bias_sigma: float = setting(0.02, "prior sigma of the initial gyro bias, rad/s", above=0.0)
    accel_bias_sigma: float = setting(0.2, "prior sigma of the initial accelerometer bias, m/s^2", above=0.0)
    init_velocity_sigma: float = setting(1.0, "prior sigma of the initial velocity, m/s", above=0.0)
    imu_integration_sigma: float = setting(1e-4, "preintegration integration noise", above=0.0)
    imu_max_gap: float = setting(
        0.1, "s between two IMU samples before the gap is bridged by the motion model", above=0.0)
    gravity: Vec3 = setting((0.0, 0.0, -9.81), "gravity in map_frame, m/s^2")
    # The network's covariance as the fusion models it. Its errors are correlated over
    # about a second (the shipped MapNet on the demo's held-out walk: correlation 0.92
    # between consecutive frames at 15 Hz, 0.47 at 0.67 s, 0.30 at 1 s, about 0 at 2 s: an
    # exponential with 0.8 s; 0.5-3 s on walks of the same room driven by other recordings),
    # so consecutive poses are not independent: each is weighted as (1 - r) / (1 + r) of
    # an independent one, r = exp(-dt / abs_correlation_time) with dt the time to its
    # neighbour in the window. 1 s was the best default over the walks of
    # benchmarks/fusion_walks.py.
    abs_cov_scale: float = setting(
        1.0, "multiplies the network's covariance before it is fused (vizloc-calibrate measures it)",
        above=0.0)
    abs_cov_adaptive_window: int = setting(
        50, "recent gate innovations whose median sets an extra scale (>= 1) on the network's "
        "covariance where its errors are larger than it says; 0: off", minimum=0)
    abs_correlation_time: float = setting(
        1.0, "s; correlation time of the network's errors; 0: independent poses", minimum=0.0)
    # Part of a network's error does not average out at all over a walk: on walks of the
    # demo room driven by other recordings the MapNet's height and pitch were off by about
    # its own sigma for the whole walk (a view unlike its training views). Neither the
    # odometry nor the innovations can see such a bias, so the fusion cannot remove it;
    # it can say it: this share of the network's covariance is added to the fused
    # covariance and to the prediction the gate compares with.
    abs_bias_share: float = setting(
        0.5, "share of the network's (typical) covariance that is a bias common to all its poses of a "
        "walk (never averaged out): added to the fused covariance", minimum=0.0)
    min_abs_sigma_trans: float = setting(1e-3, "floor added to the network's translation sigma, m", above=0.0)
    min_abs_sigma_rot: float = setting(1e-4, "floor added to the network's rotation sigma, rad", above=0.0)
    time_jump_s: float = setting(
        1.0, "a stamp this far back (bag loop, restarted clock) resets the fusion", above=0.0)
    buffer_seconds: float = setting(30.0, "odometry / IMU history kept, s", above=0.0)
    relinearize_threshold: float = setting(0.1, "iSAM2 relinearisation threshold", above=0.0)

    def __post_init__(self):
        self._validate()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FusionConfig":
        """Build from a dict (ROS parameters, YAML); unknown keys or wrong types are a
        ``ValueError`` naming the key, so a typo never silently falls back to a default."""
        if not isinstance(values, dict):
            raise ValueError(f"FusionConfig.from_dict expects a dict, got {type(values).__name__}")
        unknown = sorted(set(values) - set(_FIELDS))
        if unknown:
            raise ValueError(f"unknown fusion parameter(s): {', '.join(map(str, unknown))}; "
                             f"known: {', '.join(sorted(_FIELDS))}")
        kwargs = {k: _check_kind(k, field_kind(_FIELDS[k]), v) for k, v in values.items()}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def _validate(self):
        for f in fields(self):
            value = _check_kind(f.name, field_kind(f), getattr(self, f.name))
            setattr(self, f.name, value)
            meta = f.metadata["setting"]
            if meta.choices and value not in meta.choices:
                raise ValueError(f"{f.name} must be one of {meta.choices}, got {value!r}")
            problem = meta.bounds.violated(value) if value is not None else None
            if problem:
                raise ValueError(f"{f.name} {problem}")
        # the one rule between two fields
        if self.window_seconds is None and (self.window_size is None or self.window_size < 2):
            raise ValueError("window_size must be an int >= 2 (or set window_seconds)")


_FIELDS = {f.name: f for f in fields(FusionConfig)}
for _f in _FIELDS.values():  # an annotation without a kind fails at import, not at first use
    field_kind(_f)


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
