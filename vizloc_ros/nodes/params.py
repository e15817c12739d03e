"""The ROS parameters of the two nodes, as plain tables (no rclpy here).

Why a table outside ``vizloc_ros/nodes``: the nodes declare exactly these parameters
(iterating the tables), ``config/vizloc.yaml`` lists exactly these, the docs table is
written from them, and the tests check all of that without ROS installed. The
conversion of parameter values into the ROS-free settings objects
(:class:`~vizloc_ros.pipeline.fusion_core.FusionSettings`, :class:`~vizloc_ros.fusion.FusionConfig`,
:class:`RegressorSettings`) also lives here, so a bad YAML value is caught by the same
code in the node and in the tests, and reported as one ``ValueError`` naming the
parameter.

Parameter types follow the default value, as rclpy infers them: bool, int, float
(``double``: write ``1.0``, not ``1``, in YAML), str, list of float (``double[]``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from vizloc_ros.localize.weights import shipped_weights

REGRESSOR_NODE = "vizloc_regressor"
FUSION_NODE = "vizloc_fusion"

#: topics that are not parameters (remap them like any ROS topic)
ABSOLUTE_POSE_TOPIC = "/vizloc/absolute_pose"
FUSED_POSE_TOPIC = "/vizloc/pose"
PATH_TOPIC = "/vizloc/path"
INITIAL_POSE_TOPIC = "/initialpose"
#: coarse poses (a second regressor, e.g. NetVLAD retrieval, remapped here by the launch
#: file's prior_weights): the fusion uses them only to initialise and to recover
COARSE_POSE_TOPIC = "/vizloc/coarse_pose"
#: default topic of the regressor's visual odometry (a relative-head network, VLocNet)
VISUAL_ODOMETRY_TOPIC = "/vizloc/visual_odometry"

IDENTITY_EXTRINSIC = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]


@dataclass(frozen=True)
class Param:
    """One ROS parameter: name, default (its type is the parameter's type), description."""

    name: str
    default: Any
    description: str
    choices: tuple = ()
    length: int | None = None  # for lists

    @property
    def type_name(self) -> str:
        return _type_name(self.default)


def _type_name(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "double[]"
    raise TypeError(f"unsupported parameter type {type(value).__name__}")


REGRESSOR_PARAMS: tuple[Param, ...] = (
    Param("weights", "", "checkpoint (.safetensors with its .json; or an exported .onnx / "
          ".engine with the .json beside it); empty: the shipped weights/mapnet_demo.safetensors"),
    Param("device", "auto", "inference device: auto, cpu, cuda or cuda:N (cuda without a GPU "
          "falls back to the CPU with a warning)"),
    Param("precision", "fp32", "fp32 or fp16 (fp16 only on CUDA)", choices=("fp32", "fp16")),
    Param("mc_dropout_samples", 0, "N > 1: covariance from N MC-dropout samples per image; "
          "0 or 1: the validation covariance stored in the checkpoint"),
    Param("image_topic", "/camera/image_raw", "sensor_msgs/Image topic (SensorDataQoS, depth 1)"),
    Param("compressed", False, "subscribe to sensor_msgs/CompressedImage on image_topic + "
          "'/compressed' instead"),
    Param("max_rate", 0.0, "process at most this many frames per second of message time; "
          "0: as fast as the network goes (only the newest frame is ever processed)"),
    Param("map_frame", "map", "frame of the published poses (the frame the network was trained in)"),
    Param("base_frame", "base_link", "robot base frame: the pose published is this frame's"),
    Param("camera_frame", "", "camera optical frame; empty: the image header's frame_id"),
    Param("camera_extrinsic", list(IDENTITY_EXTRINSIC),
          "fallback pose of the camera in base_frame [x, y, z, qx, qy, qz, qw], used until (or "
          "unless) TF has base_frame <- camera_frame", length=7),
    Param("visual_odometry", False, "integrate the network's relative-pose head (vlocnet "
          "checkpoints) into visual odometry, published on visual_odometry_topic for the fusion's "
          "odom_topic: relative constraints for a robot without odometry"),
    Param("visual_odometry_topic", VISUAL_ODOMETRY_TOPIC, "nav_msgs/Odometry topic of the visual "
          "odometry (odom_frame -> base_frame)"),
    Param("odom_frame", "odom", "frame of the visual odometry (REP-105)"),
    Param("publish_odom_tf", True, "with visual_odometry: broadcast odom_frame -> base_frame "
          "(turn off when another node publishes it)"),
)

FUSION_SETTINGS_PARAMS: tuple[Param, ...] = (
    Param("map_frame", "map", "global frame (REP-105)"),
    Param("odom_frame", "odom", "odometry frame (REP-105)"),
    Param("base_frame", "base_link", "robot base frame"),
    Param("odom_topic", "/odom", "nav_msgs/Odometry topic (odom_frame -> base_frame)"),
    Param("imu_topic", "/imu/data", "sensor_msgs/Imu topic"),
    Param("use_odom", True, "fuse odometry as relative constraints and publish map -> odom; "
          "false: publish map -> base_frame"),
    Param("use_imu", False, "fuse the IMU (see imu_mode)"),
    Param("publish_tf", True, "broadcast map -> odom (or map -> base_frame without odometry)"),
    Param("transform_tolerance", 0.1, "s added to the TF stamp (as in amcl): how far into the "
          "future the transform is valid"),
    Param("path_max_length", 10000, "poses kept in /vizloc/path"),
    Param("path_min_spacing", 0.0, "m between consecutive poses of /vizloc/path"),
)

#: FusionConfig fields exposed as parameters (defaults equal FusionConfig's; a test checks)
FUSION_CONFIG_PARAMS: tuple[Param, ...] = (
    Param("window_size", 20, "poses in the sliding window (>= 2); used when window_seconds is 0"),
    Param("window_seconds", 0.0, "window as a time span in s; 0: use window_size"),
    Param("robust_kernel", "huber", "robust loss on absolute poses: huber, cauchy or none",
          choices=("huber", "cauchy", "none")),
    Param("robust_param", 3.0, "robust kernel width on the whitened residual norm"),
    Param("gate_probability", 0.99, "chi-square gate (6 dof) for absolute poses, in (0, 1)"),
    Param("kidnap_consecutive", 5, "consecutive gated poses that agree with each other: "
          "re-initialise there (kidnapped robot)"),
    Param("init_consistent", 3, "mutually consistent absolute poses needed to initialise"),
    Param("motion_model", "constant_velocity", "between poses without odometry: "
          "constant_velocity or random_walk", choices=("constant_velocity", "random_walk")),
    Param("motion_sigma_trans", 0.5, "random-walk translation noise, m/sqrt(s)"),
    Param("motion_sigma_rot", 0.5, "random-walk rotation noise, rad/sqrt(s)"),
    Param("motion_sigma_acc", 0.5, "constant-velocity white acceleration noise, m/s^2/sqrt(Hz)"),
    Param("odom_floor_trans", 0.002, "minimum odometry translation sigma per step, m"),
    Param("odom_floor_rot", 0.002, "minimum odometry rotation sigma per step, rad"),
    Param("odom_floor_trans_per_m", 0.02, "extra odometry sigma per metre travelled"),
    Param("odom_floor_rot_per_rad", 0.02, "extra odometry sigma per radian turned"),
    Param("odom_max_gap", 0.5, "s; odometry is never interpolated across a longer gap"),
    Param("imu_mode", "preintegration", "preintegration (gyro + accelerometer) or gyro",
          choices=("preintegration", "gyro")),
    Param("gyro_noise_density", 1.7e-4, "rad/s/sqrt(Hz)"),
    Param("accel_noise_density", 2.0e-3, "m/s^2/sqrt(Hz)"),
    Param("gyro_bias_walk", 1.9e-5, "rad/s^2/sqrt(Hz)"),
    Param("accel_bias_walk", 3.0e-3, "m/s^3/sqrt(Hz)"),
    Param("gyro_bias_sigma", 0.02, "prior sigma of the initial gyro bias, rad/s"),
    Param("accel_bias_sigma", 0.2, "prior sigma of the initial accelerometer bias, m/s^2"),
    Param("init_velocity_sigma", 1.0, "prior sigma of the initial velocity, m/s"),
    Param("imu_integration_sigma", 1e-4, "preintegration integration noise"),
    Param("imu_max_gap", 0.1, "s between two IMU samples before the gap is bridged by the motion model"),
    Param("gravity", [0.0, 0.0, -9.81], "gravity in map_frame, m/s^2", length=3),
    Param("imu_extrinsic", list(IDENTITY_EXTRINSIC),
          "pose of the IMU in base_frame [x, y, z, qx, qy, qz, qw]", length=7),
    Param("min_abs_sigma_trans", 1e-3, "floor added to the network's translation sigma, m"),
    Param("min_abs_sigma_rot", 1e-4, "floor added to the network's rotation sigma, rad"),
    Param("time_jump_s", 1.0, "a stamp this far back (bag loop, restarted clock) resets the fusion"),
    Param("buffer_seconds", 30.0, "odometry / IMU history kept, s"),
    Param("relinearize_threshold", 0.1, "iSAM2 relinearisation threshold"),
)

FUSION_PARAMS: tuple[Param, ...] = FUSION_SETTINGS_PARAMS + FUSION_CONFIG_PARAMS

#: FusionConfig fields deliberately not parameters, and why.
FUSION_CONFIG_NOT_PARAMS = {
    "use_odom": "set from the node's use_odom",
    "use_imu": "set from the node's use_imu",
    "base_T_camera": "the fusion receives base poses (the regressor applied the extrinsic): identity",
    "base_T_imu": "parameter imu_extrinsic (ROS quaternion order)",
}

PARAMS_BY_NODE = {REGRESSOR_NODE: REGRESSOR_PARAMS, FUSION_NODE: FUSION_PARAMS}


# --------------------------------------------------------------------------- checking

def check_value(param: Param, value):
    """``value`` converted to the parameter's type; ``ValueError`` naming the parameter.

    rclpy already enforces the declared type in the nodes; this is the same rule for
    YAML files checked without ROS (and it checks choices, list lengths, finiteness).
    """
    kind = param.type_name

    def bad(expected):
        return ValueError(f"parameter {param.name!r} must be {expected}, got {value!r} "
                          f"({type(value).__name__})")

    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if kind == "double":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number (double)")
        if not math.isfinite(float(value)):
            raise bad("a finite number")
        return float(value)
    if kind == "string":
        if not isinstance(value, str):
            raise bad("a string")
        if param.choices and value.lower() not in param.choices:
            raise bad("one of " + ", ".join(param.choices))
        return value.lower() if param.choices else value
    values = list(value) if isinstance(value, (list, tuple)) else None
    if values is None or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        raise bad("a list of numbers")
    if param.length is not None and len(values) != param.length:
        raise bad(f"a list of {param.length} numbers")
    if not all(math.isfinite(float(v)) for v in values):
        raise bad("a list of finite numbers")
    return [float(v) for v in values]


def check_values(table, values: dict) -> dict:
    """Every parameter of ``table`` checked; missing ones take their default."""
    known = {p.name: p for p in table}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown parameter(s): {', '.join(unknown)}")
    return {p.name: check_value(p, values.get(p.name, p.default)) for p in table}


def extrinsic_from_ros(values, name: str = "camera_extrinsic"):
    """[x, y, z, qx, qy, qz, qw] (ROS order) -> (t (3,), q_wxyz (4,)), unit quaternion."""
    import numpy as np

    from vizloc_ros import geometry

    v = np.asarray(values, dtype=float).reshape(-1)
    if v.size != 7 or not np.all(np.isfinite(v)):
        raise ValueError(f"parameter {name!r} must be 7 finite numbers [x, y, z, qx, qy, qz, qw]")
    q = geometry.ros_to_wxyz(v[3:7])
    norm = float(np.linalg.norm(q))
    if abs(norm - 1.0) > 1e-2:
        raise ValueError(f"parameter {name!r}: the quaternion (qx, qy, qz, qw) = {v[3:7].tolist()} "
                         f"has norm {norm:.4g}, expected 1")
    return v[:3].copy(), geometry.quat_hemisphere(q / norm)


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass
class RegressorSettings:
    """The regressor node's parameters, checked."""

    weights: Path
    device: str
    precision: str
    mc_dropout_samples: int
    image_topic: str
    compressed: bool
    max_rate: float
    map_frame: str
    base_frame: str
    camera_frame: str
    camera_extrinsic: tuple  # (t, q_wxyz), base -> camera
    visual_odometry: bool = False
    visual_odometry_topic: str = VISUAL_ODOMETRY_TOPIC
    odom_frame: str = "odom"
    publish_odom_tf: bool = True

    @property
    def subscribed_topic(self) -> str:
        return self.image_topic.rstrip("/") + "/compressed" if self.compressed else self.image_topic


def regressor_settings(values: dict, default_weights=None) -> RegressorSettings:
    """Parameter values (as declared) -> :class:`RegressorSettings`; ``ValueError`` if bad.

    ``default_weights`` is a callable giving the shipped checkpoint (called only when
    ``weights`` is empty).
    """
    v = check_values(REGRESSOR_PARAMS, values)
    device = v["device"].strip().lower()
    if not _DEVICE.match(device):
        raise ValueError(f"parameter 'device' must be auto, cpu, cuda or cuda:N, got {v['device']!r}")
    if v["mc_dropout_samples"] < 0:
        raise ValueError("parameter 'mc_dropout_samples' must be >= 0")
    if v["max_rate"] < 0:
        raise ValueError("parameter 'max_rate' must be >= 0 (0 = no limit)")
    for name in ("image_topic", "map_frame", "base_frame", "visual_odometry_topic", "odom_frame"):
        if not v[name].strip():
            raise ValueError(f"parameter {name!r} must not be empty")
    weights = v["weights"].strip()
    if weights:
        path = Path(weights).expanduser()
    elif default_weights is not None:
        path = Path(default_weights())
    else:
        raise ValueError("parameter 'weights' is empty and no default checkpoint is known")
    return RegressorSettings(
        weights=path, device=device, precision=v["precision"],
        mc_dropout_samples=v["mc_dropout_samples"], image_topic=v["image_topic"],
        compressed=v["compressed"], max_rate=v["max_rate"], map_frame=v["map_frame"],
        base_frame=v["base_frame"], camera_frame=v["camera_frame"].strip(),
        camera_extrinsic=extrinsic_from_ros(v["camera_extrinsic"], "camera_extrinsic"),
        visual_odometry=v["visual_odometry"], visual_odometry_topic=v["visual_odometry_topic"],
        odom_frame=v["odom_frame"], publish_odom_tf=v["publish_odom_tf"])


@dataclass
class FusionNodeSettings:
    """The fusion node's parameters, checked: topics + the two ROS-free settings objects."""

    odom_topic: str
    imu_topic: str
    settings: Any       # pipeline.FusionSettings
    config: Any         # fusion.FusionConfig


def fusion_settings(values: dict) -> FusionNodeSettings:
    """Parameter values -> topics, FusionSettings and FusionConfig; ``ValueError`` if bad."""
    from vizloc_ros.fusion import FusionConfig
    from vizloc_ros.pipeline.fusion_core import FusionSettings

    v = check_values(FUSION_PARAMS, values)
    for name in ("odom_topic", "imu_topic"):
        if not v[name].strip():
            raise ValueError(f"parameter {name!r} must not be empty")
    if v["path_max_length"] < 1:
        raise ValueError("parameter 'path_max_length' must be >= 1")
    if v["path_min_spacing"] < 0:
        raise ValueError("parameter 'path_min_spacing' must be >= 0")
    settings = FusionSettings(
        map_frame=v["map_frame"], odom_frame=v["odom_frame"], base_frame=v["base_frame"],
        publish_tf=v["publish_tf"], transform_tolerance=v["transform_tolerance"],
        use_odom=v["use_odom"], use_imu=v["use_imu"], path_max_length=v["path_max_length"],
        path_min_spacing=v["path_min_spacing"])
    config = {p.name: v[p.name] for p in FUSION_CONFIG_PARAMS
              if p.name not in ("window_seconds", "imu_extrinsic")}
    if v["window_seconds"] < 0:
        raise ValueError("parameter 'window_seconds' must be >= 0 (0 = use window_size)")
    config["window_seconds"] = v["window_seconds"] if v["window_seconds"] > 0 else None
    t, q = extrinsic_from_ros(v["imu_extrinsic"], "imu_extrinsic")
    config["base_T_imu"] = (tuple(t), tuple(q))
    config["use_odom"], config["use_imu"] = v["use_odom"], v["use_imu"]
    try:
        fusion_config = FusionConfig.from_dict(config)
    except ValueError as exc:
        text = str(exc).replace("fusion parameter", "parameter")
        raise ValueError(text if text.startswith("parameter") else f"bad fusion parameter: {text}") from None
    return FusionNodeSettings(odom_topic=v["odom_topic"], imu_topic=v["imu_topic"],
                              settings=settings, config=fusion_config)


def default_weights() -> Path:
    """The shipped MapNet (see :mod:`vizloc_ros.localize.weights` for where it is looked up)."""
    try:
        return shipped_weights()
    except FileNotFoundError as exc:
        raise ValueError(f"{exc}; set the 'weights' parameter") from None


def load_yaml_parameters(path) -> dict[str, dict]:
    """``{node: {param: value}}`` of a ROS 2 parameter file (``node: ros__parameters: ...``).

    Nested dicts are flattened with dots, as ROS does (``a: {b: 1}`` is ``a.b``).
    """
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            document = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ValueError(f"{path} is not valid YAML{line}: {problem}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not a UTF-8 text file: {exc}") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path}: a parameter file maps node names to ros__parameters, "
                         f"found {type(document).__name__} data at the top")
    out = {}
    for node, body in document.items():
        if not isinstance(body, dict) or "ros__parameters" not in body:
            raise ValueError(f"{path}: {node!r} has no ros__parameters")
        params = body["ros__parameters"] or {}
        if not isinstance(params, dict):
            raise ValueError(f"{path}: ros__parameters of {node!r} must map names to values, "
                             f"found {type(params).__name__} data")
        out[str(node).lstrip("/")] = _flatten(params)
    return out


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out
