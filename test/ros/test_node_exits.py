"""The nodes on a real rclpy: a parameter they do not have stops them with one FATAL line
naming it and the closest known one (exit code 78), and SIGTERM ends them cleanly with
exit code 143, so the launch file can tell either from a stop it asked for.

Skipped without rclpy (run with ROS sourced: ``python -m pytest test/ros``).
"""
import os
import signal
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import pytest

from vizloc_ros.nodes import params as P

# a mark, not importorskip: see test/test_cv_bridge_parity.py
MISSING = next((f"{name} is not importable" for name in ("rclpy", "gtsam") if find_spec(name) is None), None)
if MISSING is None:
    import rclpy
    from vizloc_ros.nodes.common import STARTUP_FAILED, TERMINATED, StartupError, declare_parameters

pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"needs rclpy and gtsam: {MISSING}")

ROOT = Path(__file__).resolve().parents[2]
FUSION_MAIN = "import sys; from vizloc_ros.nodes.fusion_node import main; sys.exit(main())"


def _node(tmp_path, params_yaml: str, name: str = P.FUSION_NODE):
    """A node of ``name`` whose overrides come from a params file, as launch passes them."""
    path = tmp_path / "params.yaml"
    path.write_text(params_yaml)
    context = rclpy.Context()
    rclpy.init(args=["--ros-args", "--params-file", str(path)], context=context)
    return context, rclpy.create_node(name, context=context)


@pytest.mark.parametrize("section, words", [
    ("vizloc_fusion:\n  ros__parameters:\n    windw_size: 10\n", r"windw_size \(did you mean window_size\?\)"),
    ("/**:\n  ros__parameters:\n    windw_size: 10\n", r"windw_size \(did you mean window_size\?\)"),
])
def test_a_misspelt_parameter_stops_the_node_naming_the_closest_one(tmp_path, section, words):
    context, node = _node(tmp_path, section)
    try:
        with pytest.raises(StartupError, match=words):
            declare_parameters(node, P.FUSION_PARAMS)
    finally:
        node.destroy_node()
        rclpy.shutdown(context=context)


def test_rclpy_and_library_parameters_and_a_shared_section_are_accepted(tmp_path):
    """use_sim_time (rclpy's), diagnostic_updater.period, and a /** section holding the
    other node's parameters (ROS gives it to both nodes) are not misspellings."""
    context, node = _node(tmp_path, "/**:\n  ros__parameters:\n    use_sim_time: true\n"
                                    "    device: cpu\n    diagnostic_updater:\n      period: 2.0\n"
                                    "vizloc_fusion:\n  ros__parameters:\n    window_size: 12\n")
    try:
        values = declare_parameters(node, P.FUSION_PARAMS)
        assert values["window_size"] == 12
    finally:
        node.destroy_node()
        rclpy.shutdown(context=context)


def _start_fusion(*ros_args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-c", FUSION_MAIN, "--ros-args", *ros_args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def test_the_fusion_node_exits_78_after_one_fatal_line():
    proc = _start_fusion("-p", "windw_size:=10")
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == STARTUP_FAILED == 78, output
    fatal = [line for line in output.splitlines() if "FATAL" in line]
    assert len(fatal) == 1 and "windw_size (did you mean window_size?)" in fatal[0], output
    assert "Traceback" not in output


def test_sigterm_ends_the_fusion_node_cleanly_with_143():
    proc = _start_fusion("-r", "__node:=vizloc_fusion")
    lines = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # started: its "fusing ..." line
            line = proc.stdout.readline()
            lines.append(line)
            if "fusing" in line or not line:
                break
        assert any("fusing" in line for line in lines), "".join(lines)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == TERMINATED == 143, "".join(lines) + output
    assert "Traceback" not in output
