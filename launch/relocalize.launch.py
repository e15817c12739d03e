"""Relocalization: vizloc_regressor (camera -> absolute pose) + vizloc_fusion (-> pose, path, TF).

    ros2 launch vizloc_ros relocalize.launch.py                     # your robot's topics
    ros2 launch vizloc_ros relocalize.launch.py demo:=true rviz:=true
    ros2 launch vizloc_ros relocalize.launch.py weights:=my_vlocnet.safetensors visual_odom:=true
    ros2 launch vizloc_ros relocalize.launch.py prior_weights:=my_netvlad.safetensors

Every parameter comes from ``params_file`` (config/vizloc.yaml by default). An argument
left empty keeps the file's value; a non-empty one overrides it. The regressor's weights
(the argument's, else the file's) also go to the fusion as ``network_weights``: a map
made by vizloc-map carries its errors' correlation time, which the fusion takes while
``noise_from_weights`` is true. ``demo:=true`` plays
the demo scene's bag in a loop with ``--clock`` (rendered on first use and cached) and
sets use_sim_time. ``visual_odom:=true`` (a checkpoint with a relative-pose head, VLocNet)
makes the regressor publish its visual odometry and the fusion use it as odometry.
``prior_weights:=W`` starts a second regressor (``vizloc_prior``: the regressor's
parameters from the file, with W as its weights, at ``prior_rate`` frames per second)
whose poses go to ``/vizloc/coarse_pose``: a coarse relocalizer such as NetVLAD, which
the fusion uses only to initialise and to recover after a kidnapping.
"""
import os
import shutil
import signal
import subprocess

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess, LogInfo, OpaqueFunction, RegisterEventHandler
from launch.event_handlers import OnProcessExit
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

PACKAGE = "vizloc_ros"
#: node_params.VISUAL_ODOMETRY_TOPIC, ABSOLUTE_POSE_TOPIC, COARSE_POSE_TOPIC (the launch file
#: does not import the package at parse time)
VISUAL_ODOMETRY_TOPIC = "/vizloc/visual_odometry"
ABSOLUTE_POSE_TOPIC = "/vizloc/absolute_pose"
COARSE_POSE_TOPIC = "/vizloc/coarse_pose"
#: the nodes' exit codes (vizloc_ros.nodes.common.STARTUP_FAILED and TERMINATED)
NODE_STARTUP_FAILED = os.EX_CONFIG
NODE_TERMINATED = 128 + signal.SIGTERM


def _share() -> str:
    """The installed share folder, or the source tree when run uninstalled."""
    try:
        from ament_index_python.packages import get_package_share_directory

        return get_package_share_directory(PACKAGE)
    except Exception:  # noqa: BLE001 - PackageNotFoundError, or no ament index at all
        return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flag(context, name: str):
    """'true'/'false' (any case) -> bool; '' -> None (keep the params file's value)."""
    text = context.perform_substitution(LaunchConfiguration(name)).strip().lower()
    if text == "":
        return None
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"launch argument {name}:={text!r} must be true or false")


def _demo_bag() -> str:
    """The demo bag: rendered on first use (about a minute), then cached.

    ``ros2 launch`` runs with the Python the ROS install was built for, which need not
    see the packages the nodes use (rosbags and Pillow, pip-installed in the venv the
    README builds with). Rendered here when this process has them; otherwise by the
    package's own ``vizloc-synth --demo-bag``, which runs with the nodes' interpreter.
    """
    try:
        from vizloc_ros.sim.synthetic import cached_demo_bag

        return str(cached_demo_bag())
    except ImportError as exc:
        missing = exc.name or str(exc)
    exe = _synth_executable()
    if exe is None:
        raise RuntimeError(f"demo: cannot render the demo bag here (no module {missing!r}) and "
                           f"vizloc-synth was not found; is vizloc_ros installed?")
    result = subprocess.run([exe, "--demo-bag", "--quiet"], stdout=subprocess.PIPE, text=True, check=False)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"demo: '{exe} --demo-bag' failed with exit code {result.returncode}")
    return lines[-1]


def _synth_executable():
    """The installed package's vizloc-synth (colcon: <prefix>/lib/vizloc_ros), else the PATH's (pip)."""
    try:
        from ament_index_python.packages import get_package_prefix

        exe = os.path.join(get_package_prefix(PACKAGE), "lib", PACKAGE, "vizloc-synth")
        if os.access(exe, os.X_OK):
            return exe
    except Exception:  # noqa: BLE001 - PackageNotFoundError, or no ament index at all
        pass
    return shutil.which("vizloc-synth")


class ProcessEnded(RuntimeError):
    """A process of the launch ended while the launch was running.

    Raised from the exit handlers rather than returning a Shutdown action: launch logs
    an exception as one ERROR line, shuts everything down and makes ``ros2 launch`` exit
    1, whereas a Shutdown action alone ends the launch with exit code 0, so scripts and
    CI could not tell a failed start from a clean Ctrl-C.
    """


def how_it_ended(returncode: int) -> str:
    """A process's exit code in words: a FATAL start, a signal, or the code itself."""
    def signal_name(number):
        try:
            return signal.Signals(number).name
        except ValueError:
            return f"signal {number}"

    if returncode < 0:  # asyncio's code for a process killed by a signal
        return f"was killed by {signal_name(-returncode)}"
    if returncode == NODE_STARTUP_FAILED:
        return f"stopped at startup (exit code {returncode}): see its FATAL line above"
    if 128 < returncode < 128 + 65:  # a shell's code for a signal (the nodes' own for SIGTERM)
        return f"was stopped by {signal_name(returncode - 128)} (exit code {returncode})"
    if returncode == 0:
        return "exited (code 0) while the launch was running"
    return f"exited with code {returncode}"


def _player_exited(event, context):
    """A looping player only stops on shutdown; anything else ends the demo with a reason."""
    if context.is_shutdown:  # the launch is stopping it
        return None
    failed = 0 < event.returncode < 128  # an error of its own, not a signal: say what may be missing
    hint = ("; is rosbag2 installed (apt install ros-$ROS_DISTRO-rosbag2 "
            "ros-$ROS_DISTRO-rosbag2-storage-mcap)?" if failed else "")
    raise ProcessEnded(f"demo: 'ros2 bag play' {how_it_ended(event.returncode)}{hint}")


def _node_exited(event, context):
    """A vizloc node that stops for any reason while the launch runs (a FATAL line at
    startup, a crash, a signal sent to it alone) ends the launch with one line saying
    which node and how, rather than leaving its partner running without it."""
    if context.is_shutdown:  # Ctrl-C, or the launch stopping the others after one ended
        return None
    raise ProcessEnded(f"{_node_label(event.action.node_name)} {how_it_ended(event.returncode)}: "
                       "stopping the launch")


def _node_label(node_name: str) -> str:
    """'vizloc_fusion' for '<node_namespace_unspecified>/vizloc_fusion' (launch_ros's name
    of a node launched without a namespace) or '/vizloc_fusion'; '/ns/vizloc_fusion' kept."""
    if node_name.startswith("<"):
        node_name = node_name[node_name.find(">/") + 2:]
    return node_name if node_name.count("/") > 1 else node_name.lstrip("/")


def _setup(context):
    """Resolve the arguments once: demo bag, use_sim_time, and the parameter overrides."""
    text = {name: context.perform_substitution(LaunchConfiguration(name)).strip()
            for name in ("weights", "device", "image_topic", "odom_topic", "imu_topic", "params_file",
                         "prior_weights", "prior_rate")}
    demo = bool(_flag(context, "demo"))
    use_sim_time = True if demo else bool(_flag(context, "use_sim_time"))
    actions = []
    if demo:
        bag = _demo_bag()  # rendered on first use (about a minute), then cached
        # the bag path before --clock, whose rate argument is optional
        player = ExecuteProcess(cmd=["ros2", "bag", "play", bag, "--loop", "--clock"],
                                output="screen", name="demo_bag")
        actions += [LogInfo(msg=f"demo: playing {bag} in a loop (sim time)"), player,
                    RegisterEventHandler(OnProcessExit(target_action=player, on_exit=_player_exited))]

    def strings(*names):
        return {n: ParameterValue(text[n], value_type=str) for n in names if text[n]}

    regressor = {"use_sim_time": use_sim_time, **strings("weights", "device", "image_topic")}
    fusion = {"use_sim_time": use_sim_time, **strings("odom_topic", "imu_topic")}
    for name in ("use_odom", "use_imu"):
        value = _flag(context, name)
        if value is not None:
            fusion[name] = value
    if _flag(context, "visual_odom"):
        # the network's relative head is the odometry: regressor publishes, fusion listens
        regressor["visual_odometry"] = True
        regressor["visual_odometry_topic"] = VISUAL_ODOMETRY_TOPIC
        fusion["odom_topic"] = VISUAL_ODOMETRY_TOPIC
        fusion["use_odom"] = True
    params_file = text["params_file"]
    # the fusion reads the noise figures a map carries (noise_from_weights) from the
    # weights the regressor runs: the argument's, else the file's (empty: both nodes take
    # the shipped default)
    network = text["weights"] or str(_regressor_file_params(params_file, "weights").get("weights") or "")
    if network.strip():
        fusion["network_weights"] = ParameterValue(network.strip(), value_type=str)
    nodes = [
        Node(package=PACKAGE, executable="vizloc_regressor", name="vizloc_regressor",
             output="screen", parameters=[params_file, regressor]),
        Node(package=PACKAGE, executable="vizloc_fusion", name="vizloc_fusion",
             output="screen", parameters=[params_file, fusion]),
    ]
    if text["prior_weights"]:
        prior = _regressor_file_params(params_file, "prior_weights")
        prior.update(regressor)  # the same camera, device and sim time as the regressor's
        prior.update({"weights": ParameterValue(text["prior_weights"], value_type=str),
                      "max_rate": _rate(text["prior_rate"]), "visual_odometry": False,
                      "mc_dropout_samples": 0})
        nodes.append(Node(package=PACKAGE, executable="vizloc_regressor", name="vizloc_prior",
                          output="screen", parameters=[prior],
                          remappings=[(ABSOLUTE_POSE_TOPIC, COARSE_POSE_TOPIC)]))
        actions.append(LogInfo(msg=f"coarse prior: {text['prior_weights']} -> {COARSE_POSE_TOPIC}"))
    actions += nodes
    actions += [RegisterEventHandler(OnProcessExit(target_action=node, on_exit=_node_exited))
                for node in nodes]
    if _flag(context, "rviz"):
        if _has_package("rviz2"):
            actions.append(Node(package="rviz2", executable="rviz2", name="rviz2", output="log",
                                arguments=["-d", os.path.join(_share(), "config", "vizloc.rviz")],
                                parameters=[{"use_sim_time": use_sim_time}]))
        else:  # a missing package would abort the launch and orphan the nodes already started
            actions.append(LogInfo(msg="rviz:=true but rviz2 is not installed "
                                       "(apt install ros-$ROS_DISTRO-rviz2): running without it"))
    return actions


def _regressor_file_params(params_file: str, why: str) -> dict:
    """The regressor's ``ros__parameters`` from the params file (the prior node has another
    name, so the file's section does not reach it by itself; the fusion reads the
    regressor's weights); ``why`` names the argument that needs them in an error."""
    import yaml

    try:
        with open(params_file, encoding="utf-8") as handle:
            content = yaml.safe_load(handle) or {}
        section = content.get("vizloc_regressor", {}).get("ros__parameters", {})
    except (OSError, AttributeError, yaml.YAMLError) as exc:
        raise RuntimeError(f"{why}: cannot read the regressor's parameters from "
                           f"{params_file}: {exc}") from None
    if not isinstance(section, dict):
        raise RuntimeError(f"{why}: vizloc_regressor.ros__parameters in {params_file} is not a mapping")
    return dict(section)


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = -1.0
    if not rate >= 0.0:
        raise ValueError(f"launch argument prior_rate:={text!r} must be a number >= 0 (0: every frame)")
    return rate


def _has_package(name: str) -> bool:
    try:
        from ament_index_python.packages import get_package_share_directory

        get_package_share_directory(name)
        return True
    except Exception:  # noqa: BLE001
        return False


def generate_launch_description():
    share = _share()
    keep = " (empty: keep the params file's value)"
    return LaunchDescription([
        DeclareLaunchArgument("weights", default_value="",
                              description="checkpoint .safetensors / .onnx / .engine" + keep),
        DeclareLaunchArgument("device", default_value="", description="auto, cpu, cuda or cuda:N" + keep),
        DeclareLaunchArgument("image_topic", default_value="", description="sensor_msgs/Image topic" + keep),
        DeclareLaunchArgument("odom_topic", default_value="", description="nav_msgs/Odometry topic" + keep),
        DeclareLaunchArgument("imu_topic", default_value="", description="sensor_msgs/Imu topic" + keep),
        DeclareLaunchArgument("use_odom", default_value="", description="fuse odometry, publish map -> odom" + keep),
        DeclareLaunchArgument("use_imu", default_value="", description="fuse the IMU" + keep),
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "vizloc.yaml"),
                              description="ROS 2 parameter file for both nodes"),
        DeclareLaunchArgument("rviz", default_value="false",
                              description="start rviz2 with config/vizloc.rviz"),
        DeclareLaunchArgument("demo", default_value="false",
                              description="play the demo scene's bag in a loop (implies use_sim_time)"),
        DeclareLaunchArgument("use_sim_time", default_value="false",
                              description="use /clock (a bag played with --clock)"),
        DeclareLaunchArgument("visual_odom", default_value="false",
                              description="fuse the network's relative-pose head (vlocnet weights) as "
                                          "visual odometry, for a robot without odometry"),
        DeclareLaunchArgument("prior_weights", default_value="",
                              description="a coarse relocalizer's checkpoint (NetVLAD): a second regressor "
                                          "whose poses only initialise the fusion and recover it"),
        DeclareLaunchArgument("prior_rate", default_value="1.0",
                              description="frames per second the coarse relocalizer processes (0: all)"),
        OpaqueFunction(function=_setup),
    ])
