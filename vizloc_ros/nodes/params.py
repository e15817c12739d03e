"""The ROS parameters of the two nodes, as plain tables (no rclpy here): each defined once.

Why a table outside the node modules: the nodes declare exactly these parameters
(iterating the tables), ``config/vizloc.yaml`` and the parameter tables of
``docs/ROS.md`` are generated from them (``python -m vizloc_ros.nodes.param_files
--write``), and the tests check all of that without ROS installed. Where each parameter
is defined:

* the regressor node's parameters and the fusion node's two input topics: the
  :class:`Param` entries below;
* the fusion node's frames and outputs: the
  :class:`~vizloc_ros.pipeline.fusion_core.FusionSettings` fields, and the sliding-window
  fusion's: the :class:`~vizloc_ros.fusion.FusionConfig` fields (both with
  :func:`~vizloc_ros.settings.setting` metadata); ``FUSION_SETTINGS_PARAMS`` and
  ``FUSION_CONFIG_PARAMS`` are derived from them.

The conversion of parameter values into the ROS-free settings objects
(:class:`~vizloc_ros.pipeline.fusion_core.FusionSettings`, :class:`~vizloc_ros.fusion.FusionConfig`,
:class:`RegressorSettings`) also lives here, so a bad YAML value is caught by the same
code in the node and in the tests, and reported as one ``ValueError`` naming the
parameter.

Parameter types follow the default value, as rclpy infers them: bool, int, float
(``double``: write ``1.0``, not ``1``, in YAML), str, list of float (``double[]``).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from vizloc_ros.fusion.config import FusionConfig
from vizloc_ros.geometry import wxyz_to_ros
from vizloc_ros.localize.weights import shipped_weights
from vizloc_ros.pipeline.fusion_core import FusionSettings
from vizloc_ros.pipeline.outputs import OutputTopics
from vizloc_ros.ros_io.messages import DEFAULT_MAX_IMAGE_PIXELS, extrinsic_from_ros
from vizloc_ros.settings import NO_BOUNDS, Bounds, field_kind, field_setting

REGRESSOR_NODE = "vizloc_regressor"
FUSION_NODE = "vizloc_fusion"

#: topics that are not parameters (remap them like any ROS topic); the outputs' names are
#: defined once, in :class:`~vizloc_ros.pipeline.outputs.OutputTopics`
_OUTPUTS = OutputTopics()
ABSOLUTE_POSE_TOPIC = _OUTPUTS.absolute_pose
FUSED_POSE_TOPIC = _OUTPUTS.pose
PATH_TOPIC = _OUTPUTS.path
INITIAL_POSE_TOPIC = "/initialpose"
#: coarse poses (a second regressor, e.g. NetVLAD retrieval, remapped here by the launch
#: file's prior_weights): the fusion uses them only to initialise and to recover
COARSE_POSE_TOPIC = _OUTPUTS.coarse_pose
#: default topic of the regressor's visual odometry (a relative-head network, VLocNet)
VISUAL_ODOMETRY_TOPIC = _OUTPUTS.visual_odometry

IDENTITY_EXTRINSIC = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]


@dataclass(frozen=True)
class Param:
    """One ROS parameter: name, default (its type is the parameter's type), description,
    and what a valid value is (choices, list length, bounds, non-empty).

    ``config_field``: the settings field (of :class:`FusionConfig` or
    :class:`FusionSettings`) the parameter sets, None for the parameters defined here;
    its value reaches the field through :func:`config_value`.
    """

    name: str
    default: Any
    description: str
    choices: tuple = ()
    length: int | None = None  # for lists
    bounds: Bounds = NO_BOUNDS
    required: bool = False     # a string that must not be empty
    config_field: Any = field(default=None, compare=False)  # dataclasses.Field of FusionConfig

    @property
    def type_name(self) -> str:
        return _type_name(self.default)

    @property
    def none_as(self):
        """The value standing for None in the settings field (ROS has no None), or None."""
        return field_setting(self.config_field).none_as if self.config_field is not None else None

    @property
    def allowed(self) -> str:
        """What a valid value is, in words (empty when any value of the type is)."""
        parts = []
        if self.choices:
            parts.append(", ".join(self.choices))
        if self.length is not None:
            parts.append(f"{self.length} numbers")
        if str(self.bounds):
            parts.append(str(self.bounds))
        if self.none_as is not None:
            parts.append(f"or {self.none_as!r} (unset)")
        if self.required:
            parts.append("not empty")
        return "; ".join(parts)


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


def _config_param(f) -> Param:
    """The ROS parameter of a settings field, from its metadata: a pose becomes
    ``[x, y, z, qx, qy, qz, qw]`` (ROS order), a vector a list, None its ``none_as``."""
    meta = field_setting(f)
    kind = field_kind(f)
    default, length = meta.to_ros(f.default), None
    if kind in ("float", "opt_float"):  # a default written 1 would declare an int parameter
        default = float(default)
    elif kind == "pose":
        t, q = default
        default, length = [float(x) for x in t] + [float(x) for x in wxyz_to_ros(q)], 7
    elif kind == "vec3":
        default, length = [float(x) for x in default], 3
    return Param(meta.ros_name, default, meta.description, choices=meta.choices, length=length,
                 bounds=meta.bounds, required=meta.required, config_field=f)


def config_value(param: Param, value):
    """A checked ROS value of ``param`` -> the value of its settings field."""
    kind = field_kind(param.config_field)
    if kind == "pose":
        t, q = extrinsic_from_ros(value, f"parameter {param.name!r}")
        return (tuple(float(x) for x in t), tuple(float(x) for x in q))
    if kind == "vec3":
        return tuple(value)
    return field_setting(param.config_field).from_ros(value)


REGRESSOR_PARAMS: tuple[Param, ...] = (
    Param("weights", "", "checkpoint (.safetensors with its .json; or an exported .onnx / "
          ".engine with the .json beside it); empty: the shipped demo map weights/ace_demo.safetensors"),
    Param("device", "auto", "inference device: auto, cpu, cuda or cuda:N (cuda without a GPU "
          "falls back to the CPU with a warning)"),
    Param("precision", "fp32", "fp32 or fp16 (fp16 only on CUDA)", choices=("fp32", "fp16")),
    Param("mc_dropout_samples", 0, "N > 1: covariance from N MC-dropout samples per image; "
          "0 or 1: the validation covariance stored in the checkpoint", bounds=Bounds(minimum=0)),
    Param("image_topic", "/camera/image_raw", "sensor_msgs/Image topic (SensorDataQoS, depth 1)",
          required=True),
    Param("compressed", False, "subscribe to sensor_msgs/CompressedImage on image_topic + "
          "'/compressed' instead"),
    Param("max_rate", 0.0, "process at most this many frames per second of message time; "
          "0: as fast as the network goes (only the newest frame is ever processed)",
          bounds=Bounds(minimum=0.0)),
    Param("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS, "an image whose header announces more "
          "pixels (width x height) is dropped before decoding (a corrupt header or a "
          "decompression bomb would take the node's memory)", bounds=Bounds(minimum=1)),
    Param("map_frame", "map", "frame of the published poses (the frame the network was trained in)",
          required=True),
    Param("base_frame", "base_link", "robot base frame: the pose published is this frame's",
          required=True),
    Param("camera_frame", "", "camera optical frame; empty: the image header's frame_id"),
    Param("camera_extrinsic", list(IDENTITY_EXTRINSIC),
          "fallback pose of the camera in base_frame [x, y, z, qx, qy, qz, qw], used until (or "
          "unless) TF has base_frame <- camera_frame", length=7),
    Param("visual_odometry", False, "integrate the network's relative-pose head (vlocnet "
          "checkpoints) into visual odometry, published on visual_odometry_topic for the fusion's "
          "odom_topic: relative constraints for a robot without odometry"),
    Param("visual_odometry_topic", VISUAL_ODOMETRY_TOPIC, "nav_msgs/Odometry topic of the visual "
          "odometry (odom_frame -> base_frame)", required=True),
    Param("odom_frame", "odom", "frame of the visual odometry (REP-105)", required=True),
    Param("publish_odom_tf", True, "with visual_odometry: broadcast odom_frame -> base_frame "
          "(turn off when another node publishes it)"),
)

#: the fusion node's inputs (the outputs are OutputTopics: remapped, not parameters)
FUSION_TOPIC_PARAMS: tuple[Param, ...] = (
    Param("odom_topic", "/odom", "nav_msgs/Odometry topic (odom_frame -> base_frame)", required=True),
    Param("imu_topic", "/imu/data", "sensor_msgs/Imu topic", required=True),
)

#: the fusion node's frames, topics and outputs: its topics, then the FusionSettings fields
FUSION_SETTINGS_PARAMS: tuple[Param, ...] = FUSION_TOPIC_PARAMS + tuple(
    _config_param(f) for f in fields(FusionSettings) if field_setting(f).ros_name)

#: the FusionConfig fields that are parameters (those whose metadata gives a ROS name), in field order
FUSION_CONFIG_PARAMS: tuple[Param, ...] = tuple(
    _config_param(f) for f in fields(FusionConfig) if field_setting(f).ros_name)

FUSION_PARAMS: tuple[Param, ...] = FUSION_SETTINGS_PARAMS + FUSION_CONFIG_PARAMS

PARAMS_BY_NODE = {REGRESSOR_NODE: REGRESSOR_PARAMS, FUSION_NODE: FUSION_PARAMS}


# --------------------------------------------------------------------------- checking

def check_value(param: Param, value):
    """``value`` converted to the parameter's type; ``ValueError`` naming the parameter.

    rclpy already enforces the declared type in the nodes; this is the same rule for
    YAML files checked without ROS, and it checks what rclpy does not: choices, list
    lengths, finiteness, bounds and non-empty strings.
    """
    value = _checked_type(param, value)
    if param.required and not value.strip():
        raise ValueError(f"parameter {param.name!r} must not be empty")
    if param.type_name in ("int", "double") and value != param.none_as:
        problem = param.bounds.violated(value)
        if problem:
            unset = f" (or {param.none_as!r}: unset)" if param.none_as is not None else ""
            raise ValueError(f"parameter {param.name!r} {problem}{unset}, got {value!r}")
    return value


def _checked_type(param: Param, value):
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
    problem = unknown_parameters(values, table)
    if problem:
        raise ValueError(problem)
    return {p.name: check_value(p, values.get(p.name, p.default)) for p in table}


def unknown_parameters(given, table, also_known=(), known_prefixes=()) -> str | None:
    """One line naming each of the ``given`` names that ``table`` does not declare, with
    the closest declared name; None when every name is known.

    Why: rclpy keeps a parameter file's entries that no node declares as silent
    overrides, so a misspelt ``windw_size:`` would leave the default running without a
    word. The nodes compare their overrides with their table here (and the replay its
    YAML), so both refuse the same names with the same line. ``also_known`` and
    ``known_prefixes``: names the node gets besides the table (the ones rclpy declares,
    diagnostic_updater's ``diagnostic_updater.*``).
    """
    names = [p.name for p in table]
    known = set(names) | set(also_known)
    unknown = sorted(str(name) for name in given
                     if name not in known and not str(name).startswith(tuple(known_prefixes)))
    if not unknown:
        return None

    def with_hint(name: str) -> str:
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        return f"{name} (did you mean {close[0]}?)" if close else name

    return f"unknown parameter(s): {', '.join(with_hint(name) for name in unknown)}"


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass
class RegressorSettings:
    """The regressor node's parameters, checked (no defaults here: they are the
    :data:`REGRESSOR_PARAMS` entries, and :func:`regressor_settings` fills every field)."""

    weights: Path
    device: str
    precision: str
    mc_dropout_samples: int
    image_topic: str
    compressed: bool
    max_rate: float
    max_image_pixels: int
    map_frame: str
    base_frame: str
    camera_frame: str
    camera_extrinsic: tuple  # (t, q_wxyz), base -> camera
    visual_odometry: bool
    visual_odometry_topic: str
    odom_frame: str
    publish_odom_tf: bool

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
        compressed=v["compressed"], max_rate=v["max_rate"], max_image_pixels=v["max_image_pixels"],
        map_frame=v["map_frame"],
        base_frame=v["base_frame"], camera_frame=v["camera_frame"].strip(),
        camera_extrinsic=extrinsic_from_ros(v["camera_extrinsic"], "parameter 'camera_extrinsic'"),
        visual_odometry=v["visual_odometry"], visual_odometry_topic=v["visual_odometry_topic"],
        odom_frame=v["odom_frame"], publish_odom_tf=v["publish_odom_tf"])


@dataclass
class FusionNodeSettings:
    """The fusion node's parameters, checked: topics + the two ROS-free settings objects."""

    odom_topic: str
    imu_topic: str
    settings: FusionSettings
    config: FusionConfig


def fusion_settings(values: dict) -> FusionNodeSettings:
    """Parameter values -> topics, FusionSettings and FusionConfig; ``ValueError`` if bad."""
    v = check_values(FUSION_PARAMS, values)
    settings = FusionSettings(**{p.config_field.name: config_value(p, v[p.name])
                                 for p in FUSION_SETTINGS_PARAMS if p.config_field is not None})
    config = {p.config_field.name: config_value(p, v[p.name]) for p in FUSION_CONFIG_PARAMS}
    try:
        fusion_config = FusionConfig.from_dict(config)
    except ValueError as exc:
        text = str(exc).replace("fusion parameter", "parameter")
        raise ValueError(text if text.startswith("parameter") else f"bad fusion parameter: {text}") from None
    return FusionNodeSettings(odom_topic=v["odom_topic"], imu_topic=v["imu_topic"],
                              settings=settings, config=fusion_config)


def with_network_weights(settings: FusionSettings) -> FusionSettings:
    """The fusion node's settings with an empty ``network_weights`` resolved to the shipped
    default weights, the ones a regressor with an empty ``weights`` runs (none found:
    left empty, so the parameter file's noise figures are used)."""
    if not settings.noise_from_weights or settings.network_weights.strip():
        return settings
    try:
        return dataclasses.replace(settings, network_weights=str(shipped_weights()))
    except FileNotFoundError:
        return settings


def default_weights() -> Path:
    """The shipped demo map (see :mod:`vizloc_ros.localize.weights` for where it is looked up)."""
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
