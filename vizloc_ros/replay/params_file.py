"""``vizloc-replay --params-file``: the nodes' parameter file, read into replay options.

Why the nodes' own file and checks: a tuning tried offline must be the tuning the robot
runs. The file is read by :func:`vizloc_ros.nodes.params.load_yaml_parameters` and every
section is checked by the same :func:`~vizloc_ros.nodes.params.regressor_settings` /
:func:`~vizloc_ros.nodes.params.fusion_settings` the nodes start with, so a value the node
would refuse is refused here too (a :class:`ReplayError` naming the file, the node and the
parameter), and a value the node accepts reaches the same settings objects.

What the replay honours: every fusion parameter (``FusionConfig``, ``FusionSettings``,
``odom_topic`` / ``use_odom``, ``imu_topic`` / ``use_imu``) and the regressor's
``weights``, ``device``, ``precision``, ``mc_dropout_samples``, ``image_topic`` (+
``compressed``), ``max_rate``, ``max_image_pixels``, the frames, ``camera_frame`` and ``camera_extrinsic`` (the
fallback used while the bag gives no camera mount, as on the robot). A value the replay
cannot reproduce (it differs from what the replay does) is named in
:attr:`ParamsFileOptions.not_honoured`, which the command line prints once as a warning.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from vizloc_ros.nodes import params as node_params
from vizloc_ros.pipeline.fusion_core import FusionSettings
from vizloc_ros.pipeline.outputs import OutputTopics
from vizloc_ros.replay.fusion_side import ReplayError

#: parameters ROS itself gives every node (rclpy, diagnostic_updater): a parameter file may
#: set them; they change nothing the replay records
ROS_NODE_PARAMS = ("use_sim_time", "diagnostic_updater.period")
#: a section for every node (``/**:``), as ROS 2 applies it
ALL_NODES = "**"
#: the FusionSettings fields that the replay sets from its own options (frames, inputs);
#: the others (TF, path) travel to the fusion side as they are
_FRAMES_AND_INPUTS = ("map_frame", "odom_frame", "base_frame", "use_odom", "use_imu")
_FRAMES = ("map_frame", "odom_frame", "base_frame")


@dataclass
class ParamsFileOptions:
    """What a parameter file sets: :class:`~vizloc_ros.replay.cli.ReplayOptions` fields
    and their values, and the parameters the replay cannot reproduce, with why."""

    options: dict = field(default_factory=dict)
    not_honoured: list = field(default_factory=list)


def read_params_file(path) -> ParamsFileOptions:
    """The replay options of a ``config/vizloc.yaml``-style file; :class:`ReplayError`
    (one line naming the file and the parameter) for a file the nodes would refuse."""
    path = Path(path)
    try:
        sections = node_params.load_yaml_parameters(path)
    except ValueError as exc:
        raise ReplayError(f"--params-file {exc}") from None
    except OSError as exc:
        raise ReplayError(f"--params-file {path}: cannot read it: {exc.strerror or exc}") from None
    nodes = (node_params.REGRESSOR_NODE, node_params.FUSION_NODE)
    if not any(node in sections for node in nodes):
        raise ReplayError(f"--params-file {path} has no {' or '.join(nodes)} section "
                          f"(sections: {', '.join(sections) or 'none'})")
    read = ParamsFileOptions()
    for other in sections:
        if other not in nodes + (ALL_NODES,):
            read.not_honoured.append(f"section {other!r} (not a vizloc node)")
    # a /** parameter reaches each node that declares it; ROS ignores it in the others
    shared = {name: value for name, value in sections.get(ALL_NODES, {}).items() if name not in ROS_NODE_PARAMS}
    declared = {node: {p.name for p in node_params.PARAMS_BY_NODE[node]} for node in nodes}
    for name in shared:
        if not any(name in names for names in declared.values()):
            read.not_honoured.append(f"{ALL_NODES}.{name} (no vizloc node has it)")
    given = {node: {**{k: v for k, v in shared.items() if k in declared[node]},
                    **{k: v for k, v in sections[node].items() if k not in ROS_NODE_PARAMS}}
             for node in nodes if node in sections}
    regressor = fusion = None
    if node_params.REGRESSOR_NODE in given:
        # empty weights stay empty: the replay's own default (the shipped demo map), as the node's
        regressor = _checked(path, node_params.REGRESSOR_NODE, node_params.regressor_settings,
                             given[node_params.REGRESSOR_NODE], default_weights=lambda: "")
    if node_params.FUSION_NODE in given:
        fusion = _checked(path, node_params.FUSION_NODE, node_params.fusion_settings,
                          given[node_params.FUSION_NODE])
    if fusion is not None:
        _fusion_options(fusion, read)
    if regressor is not None:
        _regressor_options(regressor, given[node_params.REGRESSOR_NODE], fusion, read)
    _frames(regressor, fusion, read)
    return read


def _checked(path, node, convert, values, **kwargs):
    """``convert(values)``, the node's own check; its ValueError as one line naming the file."""
    try:
        return convert(values, **kwargs)
    except ValueError as exc:
        raise ReplayError(f"--params-file {path}, {node}: {exc}") from None


def _fusion_options(fusion, read: ParamsFileOptions) -> None:
    """The fusion node's parameters: every one has its place in the replay."""
    settings = fusion.settings
    read.options["odom_topic"] = fusion.odom_topic if settings.use_odom else None
    read.options["imu_topic"] = fusion.imu_topic if settings.use_imu else None
    read.options["fusion_settings"] = {f.name: getattr(settings, f.name) for f in fields(FusionSettings)
                                       if f.name not in _FRAMES_AND_INPUTS}
    read.options["fusion_params"] = {p.config_field.name: getattr(fusion.config, p.config_field.name)
                                     for p in node_params.FUSION_CONFIG_PARAMS}


def _regressor_options(s, given: dict, fusion, read: ParamsFileOptions) -> None:
    """The regressor node's parameters that mean the same offline; the others are
    listed when their value would make the robot differ from the replay."""
    if str(given.get("weights", "")).strip():
        read.options["weights"] = s.weights
    read.options.update(device=s.device, precision=s.precision, mc_dropout_samples=s.mc_dropout_samples,
                        image_topic=s.subscribed_topic, max_rate=s.max_rate,
                        max_image_pixels=s.max_image_pixels, camera_frame=s.camera_frame)
    t, q = s.camera_extrinsic
    if np.any(t) or q[0] != 1.0:
        # identity (the node's own test) is "no fallback": the camera pose is published as the base's
        read.options["camera_extrinsic_fallback"] = s.camera_extrinsic
    if not s.visual_odometry:
        return
    if fusion is None:
        fused_odom_topic = next(p.default for p in node_params.FUSION_TOPIC_PARAMS if p.name == "odom_topic")
    else:
        fused_odom_topic = fusion.odom_topic if fusion.settings.use_odom else None
    if fused_odom_topic != s.visual_odometry_topic:
        read.not_honoured.append(
            "vizloc_regressor.visual_odometry (the fusion does not read visual_odometry_topic: "
            "the replay fuses as the robot does, without recording the visual odometry)")
        return
    read.options["visual_odometry"] = True
    if s.visual_odometry_topic != OutputTopics().visual_odometry:
        read.not_honoured.append(f"vizloc_regressor.visual_odometry_topic (recorded as "
                                 f"{OutputTopics().visual_odometry} in the result bag)")
    if not s.publish_odom_tf:
        read.not_honoured.append("vizloc_regressor.publish_odom_tf (the result bag has the odom TF)")


def _frames(regressor, fusion, read: ParamsFileOptions) -> None:
    """The replay runs one set of frames for both nodes: the fusion node's where the file
    has its section (its defaults included: they are what the robot runs), else the
    regressor's; a regressor frame that differs is named. The regressor's ``odom_frame``
    is that of its visual odometry: it counts only when that is fused."""
    for name in _FRAMES:
        values = {}
        if regressor is not None and (name != "odom_frame" or read.options.get("visual_odometry")):
            values[node_params.REGRESSOR_NODE] = getattr(regressor, name)
        if fusion is not None:
            values[node_params.FUSION_NODE] = getattr(fusion.settings, name)
        if not values:
            continue
        used = values.get(node_params.FUSION_NODE, values.get(node_params.REGRESSOR_NODE))
        read.options[name] = used
        if len(set(values.values())) > 1:
            read.not_honoured.append(
                f"vizloc_regressor.{name} ({values[node_params.REGRESSOR_NODE]!r}: the replay uses one "
                f"{name} for both nodes, vizloc_fusion's {used!r})")
