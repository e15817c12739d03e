"""The ROS surface without ROS: launch arguments, the parameter definitions (the tables and
the FusionConfig field metadata), the nodes' declarations, the rviz config and docs/ROS.md;
config/vizloc.yaml and the docs' parameter tables are generated from the definitions and
must be current; parameter values are checked into one clear error; rclpy stays under
vizloc_ros/nodes/."""
from __future__ import annotations

import ast
import os
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import yaml

from vizloc_ros.fusion import FusionConfig
from vizloc_ros.nodes import param_files
from vizloc_ros.nodes import params as P

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch" / "relocalize.launch.py"
CONFIG = ROOT / "config" / "vizloc.yaml"
NODES = ROOT / "vizloc_ros" / "nodes"
SYNTH = ROOT / "vizloc_ros" / "sim" / "synthetic.py"

LAUNCH_ARGUMENTS = {"weights", "device", "image_topic", "odom_topic", "imu_topic", "use_odom",
                    "use_imu", "params_file", "rviz", "demo", "use_sim_time", "visual_odom",
                    "prior_weights", "prior_rate"}


def _calls(tree, name):
    """Call nodes whose function is ``name`` or ``something.name``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if (isinstance(func, ast.Name) and func.id == name) or \
                    (isinstance(func, ast.Attribute) and func.attr == name):
                yield node


def _literal_first_args(tree, name):
    return [c.args[0].value for c in _calls(tree, name)
            if c.args and isinstance(c.args[0], ast.Constant)]


# --------------------------------------------------------------------------- launch

@pytest.fixture(scope="module")
def launch_tree():
    return ast.parse(LAUNCH.read_text(), filename=str(LAUNCH))


def test_launch_declares_exactly_the_documented_arguments(launch_tree):
    declared = _literal_first_args(launch_tree, "DeclareLaunchArgument")
    assert len(declared) == len(set(declared)), "an argument is declared twice"
    assert set(declared) == LAUNCH_ARGUMENTS
    assert len(list(_calls(launch_tree, "DeclareLaunchArgument"))) == len(declared)  # all literal names


def test_launch_uses_only_declared_arguments(launch_tree):
    used = {call.args[1].value for call in _calls(launch_tree, "_flag")
            if isinstance(call.args[1], ast.Constant)}
    for node in ast.walk(launch_tree):  # the tuple of names read as text in _setup
        if isinstance(node, ast.Tuple) and all(isinstance(e, ast.Constant) for e in node.elts):
            names = {e.value for e in node.elts}
            if "params_file" in names or "use_odom" in names:
                used |= names
    assert used and used <= LAUNCH_ARGUMENTS
    assert {"demo", "rviz", "use_sim_time", "use_odom", "use_imu", "params_file", "weights",
            "visual_odom"} <= used


def test_launch_starts_both_nodes_and_plays_the_demo_bag_with_clock(launch_tree):
    executables = {kw.value.value for call in _calls(launch_tree, "Node") for kw in call.keywords
                   if kw.arg == "executable"}
    assert executables == {"vizloc_regressor", "vizloc_fusion", "rviz2"}
    cmds = [kw.value for call in _calls(launch_tree, "ExecuteProcess") for kw in call.keywords
            if kw.arg == "cmd"]
    assert len(cmds) == 1
    words = [e.value if isinstance(e, ast.Constant) else None for e in cmds[0].elts]
    assert words[:3] == ["ros2", "bag", "play"] and "--loop" in words and words[-1] == "--clock"
    # --clock takes an optional rate: the bag path must not follow it
    assert words.index(None) < words.index("--clock")
    source = LAUNCH.read_text()
    assert "cached_demo_bag()" in source and "OpaqueFunction" in source


def test_launch_renders_the_demo_bag_through_vizloc_synth_when_it_cannot_import_the_package(launch_tree):
    """`ros2 launch` runs with the ROS install's Python, which may lack rosbags / Pillow (pip,
    in the nodes' venv): the launch file then asks the package's own vizloc-synth."""
    calls = [c for c in _calls(launch_tree, "run") if c.args and isinstance(c.args[0], ast.List)]
    assert len(calls) == 1
    words = [e.value if isinstance(e, ast.Constant) else None for e in calls[0].args[0].elts]
    assert words[1:] == ["--demo-bag", "--quiet"]
    handlers = [h for node in ast.walk(launch_tree) if isinstance(node, ast.Try) for h in node.handlers
                if isinstance(h.type, ast.Name) and h.type.id == "ImportError"]
    assert handlers, "the in-process cached_demo_bag() must fall back on ImportError"
    assert "--demo-bag" in {a for c in _calls(ast.parse(SYNTH.read_text()), "add_argument")
                            for a in (x.value for x in c.args if isinstance(x, ast.Constant))}


def test_launch_visual_odom_points_the_fusion_at_the_regressors_visual_odometry(launch_tree):
    constants = {node.targets[0].id: node.value.value for node in launch_tree.body
                 if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                 and isinstance(node.targets[0], ast.Name)}
    assert constants["VISUAL_ODOMETRY_TOPIC"] == P.VISUAL_ODOMETRY_TOPIC
    source = LAUNCH.read_text()
    for line in ('regressor["visual_odometry"] = True', 'fusion["odom_topic"] = VISUAL_ODOMETRY_TOPIC',
                 'fusion["use_odom"] = True'):
        assert line in source


def test_launch_gives_the_fusion_the_regressors_weights_for_their_noise_figures(tmp_path):
    """weights:= (else the params file's regressor weights) reaches the fusion as
    network_weights, so a map's own correlation time is used (noise_from_weights)."""
    source = LAUNCH.read_text()
    assert 'fusion["network_weights"] = ParameterValue(network.strip(), value_type=str)' in source
    assert 'text["weights"] or str(_regressor_file_params(params_file, "weights").get("weights") or "")' in source
    read = _launch_helpers()["_regressor_file_params"]
    params = tmp_path / "robot.yaml"
    params.write_text("vizloc_regressor:\n  ros__parameters:\n    weights: /maps/lab.safetensors\n")
    assert read(str(params), "weights")["weights"] == "/maps/lab.safetensors"
    params.write_text("vizloc_regressor: [1, 2]\n")
    with pytest.raises(RuntimeError, match="^weights: cannot read"):
        read(str(params), "weights")


def _launch_helpers():
    """The launch file's exit handlers and what they need, without launch installed: its
    stdlib imports, constants, the ProcessEnded class and the functions, compiled alone."""
    tree = ast.parse(LAUNCH.read_text(), filename=str(LAUNCH))
    keep = [node for node in tree.body
            if (isinstance(node, ast.Import) and all(a.name in ("os", "signal") for a in node.names))
            or (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id.startswith("NODE_"))
            or (isinstance(node, ast.ClassDef) and node.name == "ProcessEnded")
            or (isinstance(node, ast.FunctionDef)
                and node.name in ("how_it_ended", "_node_exited", "_player_exited", "_node_label",
                                  "_regressor_file_params"))]
    namespace = {}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(LAUNCH), "exec"), namespace)  # noqa: S102
    return namespace


class _Exited:
    """launch's ProcessExited event as the handlers read it."""

    def __init__(self, returncode, node_name="<node_namespace_unspecified>/vizloc_fusion"):
        self.returncode = returncode
        self.action = type("NodeAction", (), {"node_name": node_name, "name": "demo_bag"})()


class _Context:
    def __init__(self, is_shutdown):
        self.is_shutdown = is_shutdown


@pytest.mark.parametrize("returncode, words, not_words", [
    (78, ["vizloc_fusion", "stopped at startup", "FATAL"], []),
    (-9, ["vizloc_fusion", "killed by SIGKILL"], ["FATAL"]),
    (-15, ["killed by SIGTERM"], ["FATAL"]),
    (143, ["stopped by SIGTERM", "143"], ["FATAL"]),
    (-11, ["killed by SIGSEGV"], ["FATAL"]),
    (0, ["vizloc_fusion", "code 0"], ["FATAL"]),
    (1, ["exited with code 1"], ["FATAL"]),
])
def test_a_node_ending_while_the_launch_runs_stops_it_with_one_line_saying_how(returncode, words, not_words):
    """Any end of a node, SIGTERM's clean exit included, stops the launch through an
    exception: launch logs it as one ERROR line and `ros2 launch` exits 1 (a Shutdown
    action alone would exit 0). Only a FATAL start refers to a FATAL line."""
    helpers = _launch_helpers()
    with pytest.raises(helpers["ProcessEnded"]) as raised:
        helpers["_node_exited"](_Exited(returncode), _Context(is_shutdown=False))
    line = str(raised.value)
    assert "\n" not in line and line.startswith("vizloc_fusion ") and line.endswith("stopping the launch")
    for word in words:
        assert word in line
    for word in not_words:
        assert word not in line


@pytest.mark.parametrize("node_name, label", [("<node_namespace_unspecified>/vizloc_fusion", "vizloc_fusion"),
                                               ("/vizloc_fusion", "vizloc_fusion"),
                                               ("/robot1/vizloc_fusion", "/robot1/vizloc_fusion")])
def test_the_stop_line_names_the_node_as_ros_does(node_name, label):
    helpers = _launch_helpers()
    with pytest.raises(helpers["ProcessEnded"], match=f"^{label} was killed by SIGKILL"):
        helpers["_node_exited"](_Exited(-9, node_name), _Context(is_shutdown=False))


@pytest.mark.parametrize("returncode", [0, 130, -2, -15, 143])
def test_nodes_stopped_by_the_launchs_own_shutdown_are_not_reported(returncode):
    helpers = _launch_helpers()
    assert helpers["_node_exited"](_Exited(returncode), _Context(is_shutdown=True)) is None
    assert helpers["_player_exited"](_Exited(returncode), _Context(is_shutdown=True)) is None


def test_the_demo_player_ending_while_the_launch_runs_stops_it():
    helpers = _launch_helpers()
    with pytest.raises(helpers["ProcessEnded"], match="ros2 bag play' exited with code 1; is rosbag2 installed"):
        helpers["_player_exited"](_Exited(1), _Context(is_shutdown=False))
    with pytest.raises(helpers["ProcessEnded"]) as raised:
        helpers["_player_exited"](_Exited(-9), _Context(is_shutdown=False))
    assert str(raised.value) == "demo: 'ros2 bag play' was killed by SIGKILL"


def test_the_launch_file_knows_the_nodes_exit_codes():
    """common.py (rclpy: not importable here) and the launch file name the same codes."""
    helpers = _launch_helpers()
    tree = ast.parse((NODES / "common.py").read_text())
    codes = {node.targets[0].id: ast.unparse(node.value) for node in tree.body
             if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
    assert codes["STARTUP_FAILED"] == "os.EX_CONFIG" and helpers["NODE_STARTUP_FAILED"] == os.EX_CONFIG
    assert codes["TERMINATED"] == "128 + signal.SIGTERM" and helpers["NODE_TERMINATED"] == 143
    source = (NODES / "common.py").read_text()
    assert "code = STARTUP_FAILED" in source and "return TERMINATED" in source


def test_launch_file_paths_exist():
    assert (ROOT / "config" / "vizloc.rviz").is_file() and CONFIG.is_file()


# --------------------------------------------------------------------------- parameters

def test_yaml_lists_exactly_the_parameters_each_node_declares():
    params = P.load_yaml_parameters(CONFIG)
    assert set(params) == {P.REGRESSOR_NODE, P.FUSION_NODE}
    for node, table in P.PARAMS_BY_NODE.items():
        names = [p.name for p in table]
        assert len(names) == len(set(names))
        assert set(params[node]) == set(names), node


@pytest.mark.parametrize("node", [P.REGRESSOR_NODE, P.FUSION_NODE])
def test_yaml_values_have_the_declared_types_and_are_the_defaults(node):
    """rclpy refuses an integer for a double parameter: the shipped file must not need luck."""
    values = P.load_yaml_parameters(CONFIG)[node]
    for param in P.PARAMS_BY_NODE[node]:
        value = values[param.name]
        assert type(value) is type(param.default), (param.name, value)
        if isinstance(value, list):
            assert all(type(v) is float for v in value), param.name
        assert P.check_value(param, value) == param.default, param.name


def test_yaml_settings_build():
    values = P.load_yaml_parameters(CONFIG)
    regressor = P.regressor_settings(values[P.REGRESSOR_NODE], default_weights=lambda: "w.safetensors")
    assert regressor.subscribed_topic == "/camera/image_raw"
    fusion = P.fusion_settings(values[P.FUSION_NODE])
    assert fusion.settings.use_odom and fusion.config.window_seconds is None


def _declare_calls(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    direct = list(_calls(tree, "declare_parameter")) + list(_calls(tree, "declare_parameters"))
    return tree, direct


@pytest.mark.parametrize("module, table", [("regressor_node.py", "REGRESSOR_PARAMS"),
                                           ("fusion_node.py", "FUSION_PARAMS")])
def test_nodes_declare_their_table_and_nothing_else(module, table):
    _, calls = _declare_calls(NODES / module)
    assert len(calls) == 1, "declare parameters only through common.declare_parameters(table)"
    arg = calls[0].args[1]
    assert isinstance(arg, ast.Attribute) and arg.attr == table


def test_only_the_table_loop_declares_parameters():
    _, calls = _declare_calls(NODES / "common.py")
    assert len([c for c in calls if isinstance(c.func, ast.Attribute)]) == 1
    for path in NODES.glob("*.py"):
        source = path.read_text()
        assert "use_sim_time" not in source or path.name == "common.py", \
            f"{path.name}: use_sim_time is rclpy's; do not redeclare it"


def test_diagnostic_task_names_leave_the_node_name_to_the_updater():
    """diagnostic_updater names each status '<node name>: <task name>'; a task name that
    repeats the node's name reads 'vizloc_fusion: vizloc_fusion: pose fusion'."""
    names = {}
    for module in ("fusion_node", "regressor_node"):
        tree = ast.parse((NODES / f"{module}.py").read_text())
        names[module] = [c.args[1].value for c in _calls(tree, "Diagnostics")
                         if len(c.args) > 1 and isinstance(c.args[1], ast.Constant)]
    assert names == {"fusion_node": ["pose fusion"], "regressor_node": ["pose regression"]}


def test_package_xml_declares_every_ros_package_the_nodes_and_launch_file_import():
    """rosdep installs exec_depends only: each ROS package imported under nodes/ or by the
    launch file is declared (REP 149), and Pillow (PIL: compressed images, the demo bag)."""
    import sys
    import xml.etree.ElementTree as ET

    declared = {e.text for e in ET.parse(ROOT / "package.xml").getroot().iter("exec_depend")}
    imported = set()
    for path in [*NODES.glob("*.py"), LAUNCH]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    rosdep_keys = {"yaml": "python3-yaml", "numpy": "python3-numpy", "PIL": "python3-pil"}
    ros = {rosdep_keys.get(m, m) for m in imported - set(sys.stdlib_module_names) - {"vizloc_ros"}}
    assert ros and not ros - declared, sorted(ros - declared)
    assert "python3-pil" in declared


def test_node_modules_compile():
    for path in NODES.glob("*.py"):
        compile(path.read_text(), str(path), "exec")


def test_every_fusion_config_field_is_a_parameter_or_says_why_not():
    from vizloc_ros.settings import field_setting

    exposed = {p.config_field.name: p for p in P.FUSION_CONFIG_PARAMS}
    for f in fields(FusionConfig):
        meta = field_setting(f)
        assert bool(meta.ros_name) != bool(meta.not_ros), f.name
        assert (f.name in exposed) == bool(meta.ros_name), f.name
        assert meta.description and "\n" not in meta.description, f.name
    assert exposed["base_T_imu"].name == "imu_extrinsic"
    names = [p.name for p in P.FUSION_PARAMS]
    assert len(names) == len(set(names)), "a FusionConfig parameter shadows a node parameter"


def test_the_ros_defaults_give_the_fusion_config_defaults():
    """The YAML is written from the ROS form of the defaults: read back, it must be
    FusionConfig() exactly (the demo runs on those defaults)."""
    assert P.fusion_settings({}).config == FusionConfig()
    values = P.load_yaml_parameters(CONFIG)[P.FUSION_NODE]
    assert P.fusion_settings(values).config == FusionConfig()


def test_none_is_zero_for_ros_in_one_place():
    from vizloc_ros.settings import field_setting

    meta = field_setting(next(f for f in fields(FusionConfig) if f.name == "window_seconds"))
    assert meta.to_ros(None) == 0.0 and meta.from_ros(0.0) is None
    assert meta.to_ros(2.5) == 2.5 and meta.from_ros(2.5) == 2.5
    param = next(p for p in P.FUSION_CONFIG_PARAMS if p.name == "window_seconds")
    assert param.default == 0.0 and param.none_as == 0.0
    assert P.fusion_settings({"window_seconds": 0.0}).config.window_seconds is None
    assert P.fusion_settings({"window_seconds": 2.5}).config.window_seconds == 2.5


def _outside(param):
    b = param.bounds
    edge = b.minimum if b.minimum is not None else b.above if b.above is not None else b.below
    step = 1 if param.type_name == "int" else 0.5
    value = edge + step if b.minimum is None and b.above is None else edge - step
    return value if param.type_name == "int" else float(value)


BOUNDED = [(node, p) for node, table in P.PARAMS_BY_NODE.items() for p in table if str(p.bounds)]


@pytest.mark.parametrize("node, param", BOUNDED, ids=[p.name for _, p in BOUNDED])
def test_a_value_out_of_bounds_is_refused_naming_the_parameter(node, param):
    build = {P.REGRESSOR_NODE: lambda v: P.regressor_settings(v, default_weights=lambda: "w.safetensors"),
             P.FUSION_NODE: P.fusion_settings}[node]
    with pytest.raises(ValueError, match=f"'{param.name}'"):
        build({param.name: _outside(param)})


def test_fusion_config_applies_the_same_bounds_without_ros():
    for param in P.FUSION_CONFIG_PARAMS:
        if str(param.bounds):
            with pytest.raises(ValueError, match=param.config_field.name):
                FusionConfig.from_dict({param.config_field.name: _outside(param)})


def test_every_fusion_settings_field_is_a_parameter_defined_by_the_field():
    """FusionSettings' fields are the fusion node's frame / output parameters: the table is
    derived from them (no second copy of a default or a description)."""
    from vizloc_ros.pipeline.fusion_core import FusionSettings

    derived = {p.name: p for p in P.FUSION_SETTINGS_PARAMS if p.config_field is not None}
    assert set(derived) == {f.name for f in fields(FusionSettings)}
    defaults = FusionSettings()
    for name, param in derived.items():
        assert param.default == getattr(defaults, name) and param.description
    assert P.fusion_settings({}).settings == defaults
    with pytest.raises(ValueError, match="'transform_tolerance' must be >= 0"):
        P.fusion_settings({"transform_tolerance": -0.5})
    with pytest.raises(ValueError, match="'map_frame' must not be empty"):
        P.fusion_settings({"map_frame": " "})


# --------------------------------------------------------------------------- checking values

def test_regressor_settings_convert_the_extrinsic_from_ros_order():
    s = P.regressor_settings({"camera_extrinsic": [0.1, 0.0, 0.2, -0.5, 0.5, -0.5, 0.5],
                              "compressed": True, "weights": "/w/x.safetensors"})
    t, q = s.camera_extrinsic
    assert np.allclose(t, [0.1, 0.0, 0.2]) and np.allclose(q, [0.5, -0.5, 0.5, -0.5])
    assert s.subscribed_topic == "/camera/image_raw/compressed" and s.weights == Path("/w/x.safetensors")


def test_empty_weights_use_the_default_checkpoint():
    s = P.regressor_settings({}, default_weights=lambda: "/share/weights/mapnet_demo.safetensors")
    assert s.weights.name == "mapnet_demo.safetensors"


def test_shipped_weights_are_found_from_the_source_tree():
    # the default is the demo map (scene coordinates), MapNet stays selectable by its name
    if not (ROOT / "weights" / "ace_demo.safetensors").is_file():
        with pytest.raises(ValueError, match="set the 'weights' parameter"):
            P.default_weights()
    else:
        assert P.default_weights().name == "ace_demo.safetensors"


@pytest.mark.parametrize("values, match", [
    ({"device": "tpu"}, "'device'"),
    ({"device": 1}, "'device'"),
    ({"precision": "fp64"}, "'precision'"),
    ({"mc_dropout_samples": -1}, "'mc_dropout_samples'"),
    ({"mc_dropout_samples": 2.0}, "'mc_dropout_samples'"),
    ({"max_rate": -1.0}, "'max_rate'"),
    ({"max_rate": float("nan")}, "'max_rate'"),
    ({"compressed": "yes"}, "'compressed'"),
    ({"camera_extrinsic": [0.0] * 6}, "'camera_extrinsic'"),
    ({"camera_extrinsic": [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0]}, "'camera_extrinsic'.*norm"),
    ({"image_topic": ""}, "'image_topic'"),
    ({"visual_odometry_topic": " "}, "'visual_odometry_topic'"),
    ({"visual_odometry": "yes"}, "'visual_odometry'"),
    ({"wieghts": ""}, "unknown parameter"),
])
def test_bad_regressor_values_name_the_parameter(values, match):
    with pytest.raises(ValueError, match=match):
        P.regressor_settings(values, default_weights=lambda: "w.safetensors")


@pytest.mark.parametrize("values, match", [
    ({"robust_kernel": "tukey"}, "'robust_kernel'"),
    ({"window_size": 1}, "window_size"),
    ({"window_seconds": -1.0}, "'window_seconds'"),
    ({"gate_probability": 1.5}, "gate_probability"),
    ({"transform_tolerance": -0.1}, "transform_tolerance"),
    ({"use_odom": 1}, "'use_odom'"),
    ({"gravity": [0.0, -9.81]}, "'gravity'"),
    ({"imu_extrinsic": [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]}, "'imu_extrinsic'"),
    ({"path_max_length": 0}, "'path_max_length'"),
    ({"kidnap_consecutive": 0}, "kidnap_consecutive"),
    ({"base_T_camera": [0.0]}, "unknown parameter"),
])
def test_bad_fusion_values_name_the_parameter(values, match):
    with pytest.raises(ValueError, match=match):
        P.fusion_settings(values)


@pytest.mark.parametrize("given, table, words", [
    (["windw_size"], P.FUSION_PARAMS, "unknown parameter(s): windw_size (did you mean window_size?)"),
    (["devise"], P.REGRESSOR_PARAMS, "devise (did you mean device?)"),
    (["Window_Size"], P.FUSION_PARAMS, "(did you mean window_size?)"),
    (["zzz_not_close"], P.FUSION_PARAMS, "unknown parameter(s): zzz_not_close"),
    (["windw_size", "devise", "window_size"], P.REGRESSOR_PARAMS + P.FUSION_PARAMS,
     "devise (did you mean device?), windw_size (did you mean window_size?)"),
])
def test_unknown_parameters_are_named_with_the_closest_known_one(given, table, words):
    line = P.unknown_parameters(given, table)
    assert line is not None and words in line and "\n" not in line


def test_known_and_library_parameters_are_not_unknown():
    names = [p.name for p in P.FUSION_PARAMS]
    assert P.unknown_parameters(names, P.FUSION_PARAMS) is None
    assert P.unknown_parameters([], P.FUSION_PARAMS) is None
    assert P.unknown_parameters(["use_sim_time", "diagnostic_updater.period"], P.FUSION_PARAMS,
                                also_known=["use_sim_time"], known_prefixes=("diagnostic_updater.",)) is None
    assert "use_sim_time" in P.unknown_parameters(["use_sim_time"], P.FUSION_PARAMS)


def test_the_nodes_check_their_overrides_before_declaring_anything():
    """common.declare_parameters compares the node's overrides (params files, -p) with the
    table first: a misspelt name stops the node instead of leaving the default running."""
    tree = ast.parse((NODES / "common.py").read_text())
    declare = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "declare_parameters")
    calls = [c.func.id if isinstance(c.func, ast.Name) else c.func.attr for c in ast.walk(declare)
             if isinstance(c, ast.Call)]
    assert calls.index("unknown_parameters") < calls.index("declare_parameter")
    assert "parameter_overrides" in calls


def test_fusion_settings_map_onto_fusion_config():
    s = P.fusion_settings({"use_odom": False, "use_imu": True, "window_seconds": 2.5,
                           "robust_kernel": "cauchy", "imu_extrinsic": [0.1, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0],
                           "transform_tolerance": 0.3, "odom_topic": "/wheel/odom"})
    assert s.odom_topic == "/wheel/odom" and s.settings.transform_tolerance == 0.3
    assert (s.settings.use_odom, s.settings.use_imu) == (False, True)  # the one source ...
    from vizloc_ros.pipeline.fusion_core import FusionCore
    core = FusionCore(s.config, s.settings)                            # ... that the core applies
    assert (core.fusion.config.use_odom, core.fusion.config.use_imu) == (False, True)
    assert s.config.window_seconds == 2.5 and s.config.robust_kernel == "cauchy"
    t, q = s.config.base_T_imu
    assert np.allclose(t, [0.1, 0, 0]) and np.allclose(q, [0, 0, 0, 1])  # ROS order -> wxyz


def test_an_integer_for_a_double_is_a_type_error_like_rclpy_makes_it():
    param = next(p for p in P.FUSION_PARAMS if p.name == "transform_tolerance")
    assert P.check_value(param, 1) == 1.0  # the ROS-free check is lenient ...
    assert param.type_name == "double"     # ... rclpy is not: the YAML test guards the file


# --------------------------------------------------------------------------- rviz, docs, layout

def test_rviz_config_shows_tf_poses_path_and_image():
    config = yaml.safe_load((ROOT / "config" / "vizloc.rviz").read_text())
    manager = config["Visualization Manager"]
    assert manager["Global Options"]["Fixed Frame"] == "map"
    shown = {(d["Class"].split("/")[-1], d.get("Topic", {}).get("Value")) for d in manager["Displays"]}
    for expected in [("TF", None), ("PoseWithCovariance", "/vizloc/pose"),
                     ("PoseWithCovariance", "/vizloc/absolute_pose"), ("Path", "/vizloc/path"),
                     ("Image", "/camera/image_raw")]:
        assert expected in shown


def test_docs_list_every_parameter_and_launch_argument():
    text = (ROOT / "docs" / "ROS.md").read_text()
    for table in (P.REGRESSOR_PARAMS, P.FUSION_PARAMS):
        for param in table:
            assert f"`{param.name}`" in text, param.name
    for name in LAUNCH_ARGUMENTS:
        assert f"`{name}`" in text, name


def test_the_generated_yaml_and_docs_tables_are_current():
    stale = param_files.stale_files()
    assert not stale, (f"{', '.join(str(p.relative_to(ROOT)) for p in stale)} no longer match the "
                       f"parameter definitions: run `{param_files.COMMAND}` and commit the result")


@pytest.mark.parametrize("value", [0.0, 1.0, -9.81, 1.9e-05, 1e-05, 1e20, 0.1, 3, True, False, "",
                                   "map", 'a "quoted" word', [0.0, -1.0, 2e-07]])
def test_yaml_literals_read_back_with_their_type(value):
    loaded = yaml.safe_load(param_files.yaml_literal(value))
    assert loaded == value and type(loaded) is type(value)
    if isinstance(value, list):
        assert all(type(v) is float for v in loaded)


def test_the_generator_rewrites_stale_files_and_keeps_the_prose(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "config" / "vizloc.yaml").write_text("vizloc_regressor:\n  ros__parameters: {}\n")
    docs = f"# Title\n\nbefore\n\n{param_files.DOCS_BEGIN}\nold table\n{param_files.DOCS_END}\n\nafter\n"
    (tmp_path / "docs" / "ROS.md").write_text(docs)
    assert param_files.main(["--root", str(tmp_path)]) == 1
    assert len(param_files.stale_files(tmp_path)) == 2
    assert param_files.main(["--root", str(tmp_path), "--write"]) == 0
    assert param_files.stale_files(tmp_path) == [] and param_files.main(["--root", str(tmp_path)]) == 0
    written = (tmp_path / "docs" / "ROS.md").read_text()
    assert written.startswith("# Title\n\nbefore\n\n") and written.endswith("\n\nafter\n")
    assert "old table" not in written and "| `window_size` | int | `20` |" in written
    written_yaml = P.load_yaml_parameters(tmp_path / "config" / "vizloc.yaml")
    assert written_yaml.keys() == {P.REGRESSOR_NODE, P.FUSION_NODE}


def test_the_generator_refuses_docs_without_markers(tmp_path):
    with pytest.raises(ValueError, match="markers"):
        param_files.docs_with_tables("# ROS\n\n### vizloc_regressor\n")


ROS_MODULES = {"rclpy", "rcl_interfaces", "tf2_ros", "diagnostic_updater", "launch", "launch_ros",
               "geometry_msgs", "sensor_msgs", "nav_msgs", "std_msgs", "std_srvs", "tf2_msgs",
               "builtin_interfaces", "diagnostic_msgs", "rosgraph_msgs"}


def test_rclpy_is_imported_only_under_nodes():
    offenders = []
    for path in (ROOT / "vizloc_ros").rglob("*.py"):
        if NODES in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ROS_MODULES]
    assert not offenders
