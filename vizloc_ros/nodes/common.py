"""What both nodes share: parameters from the tables, message classes, QoS, diagnostics,
throttled problem reports and a ``main`` that turns startup errors into one fatal line.

Everything ROS-specific of the two nodes that is not wiring lives here, so the node
modules read like the ros2/examples nodes.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import rclpy
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rcl_interfaces.msg import ParameterDescriptor

from vizloc_ros.nodes.params import PARAMS_BY_NODE, unknown_parameters
from vizloc_ros.pipeline.diagnostics import RateMeter, diagnostics_summary
from vizloc_ros.pipeline.drops import Drop
from vizloc_ros.pipeline.outputs import TF_TOPIC
from vizloc_ros.ros_io import messages


class StartupError(Exception):
    """A configuration problem found at startup: logged as one fatal line, exit code
    :data:`STARTUP_FAILED`."""


#: exit code of a node stopped by a :class:`StartupError` (sysexits' EX_CONFIG, 78): the
#: launch file tells it from a crash (1) and says "see its FATAL line" only for this one
STARTUP_FAILED = os.EX_CONFIG
#: exit code of a node stopped by SIGTERM (128 + 15, as a shell reports it): rclpy turns
#: SIGTERM into a clean shutdown, which would otherwise exit 0 and look like a normal end
TERMINATED = 128 + signal.SIGTERM


# --------------------------------------------------------------------------- QoS

def sensor_qos(depth: int) -> QoSProfile:
    """SensorDataQoS with our depth: best effort matches reliable and best-effort publishers."""
    return QoSProfile(depth=depth, history=HistoryPolicy.KEEP_LAST,
                      reliability=ReliabilityPolicy.BEST_EFFORT, durability=DurabilityPolicy.VOLATILE)


def reliable_qos(depth: int = 10) -> QoSProfile:
    return QoSProfile(depth=depth, history=HistoryPolicy.KEEP_LAST,
                      reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)


def latched_qos() -> QoSProfile:
    """Reliable + transient_local, depth 1: what amcl uses for ``amcl_pose``; a late
    subscriber (rviz, nav2) gets the last pose at once."""
    return QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                      reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


def static_tf_qos() -> QoSProfile:
    """What tf2_ros uses for /tf_static: reliable, transient_local (latched), depth 100."""
    return QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST,
                      reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


# --------------------------------------------------------------------------- messages

def ros_message_types() -> messages.MessageTypes:
    """The rclpy message classes for the builders in :mod:`vizloc_ros.ros_io.messages`."""
    import builtin_interfaces.msg
    import geometry_msgs.msg
    import nav_msgs.msg
    import sensor_msgs.msg
    import std_msgs.msg
    import tf2_msgs.msg

    return messages.message_types_from_modules(
        builtin_interfaces.msg, std_msgs.msg, geometry_msgs.msg, nav_msgs.msg, sensor_msgs.msg,
        tf2_msgs.msg)


# --------------------------------------------------------------------------- parameters

#: parameters that libraries the nodes use declare later (diagnostic_updater.period, .use_fqn)
LIBRARY_PARAMETER_PREFIXES = ("diagnostic_updater.",)
#: every parameter of every vizloc node
VIZLOC_PARAMETER_NAMES = frozenset(p.name for table in PARAMS_BY_NODE.values() for p in table)


def declare_parameters(node, table) -> dict:
    """Declare every parameter of a :mod:`vizloc_ros.nodes.params` table; their values.

    Read-only: the nodes read them once at startup, so ``ros2 param set`` is refused
    instead of silently doing nothing. A value of the wrong type in the YAML becomes a
    :class:`StartupError` naming the parameter.
    """
    # known besides the table: what rclpy declared itself (use_sim_time, ...), and the
    # other vizloc node's names, which a shared ``/**:`` section gives both nodes
    also_known = set(node.list_parameters([], 0).names) | VIZLOC_PARAMETER_NAMES
    problem = unknown_parameters(parameter_overrides(node), table, also_known=also_known,
                                 known_prefixes=LIBRARY_PARAMETER_PREFIXES)
    if problem:  # before the declarations: a misspelt name must not leave a default running
        raise StartupError(f"{problem}: check the params file and the -p / launch parameters "
                           f"given to {node.get_name()}")
    values = {}
    for param in table:
        descriptor = ParameterDescriptor(description=param.description, additional_constraints=param.allowed,
                                         read_only=True)
        try:
            values[param.name] = node.declare_parameter(param.name, param.default, descriptor).value
        except ParameterException as exc:
            # a double or double[] written with integers: rclpy says INTEGER / INTEGER_ARRAY
            integers = param.type_name.startswith("double") and "INTEGER" in str(exc)
            hint = " (write 1.0, not 1)" if integers else ""
            raise StartupError(f"parameter {param.name!r} must be a {param.type_name}{hint}; "
                               f"rclpy says: {exc}") from None
    return values


def parameter_overrides(node) -> list[str]:
    """The names of the parameters given to ``node`` (params files, ``-p``, a launch
    file's ``parameters=``), whether or not the node declares them.

    rclpy (Jazzy) merges them into ``Node._parameter_overrides`` when the node is built
    and has no public accessor for the names it was given but nobody declared; without
    them a misspelt name is silently ignored. Should a later rclpy drop the attribute,
    the node says once that it cannot check, rather than failing to start.
    """
    overrides = getattr(node, "_parameter_overrides", None)
    if not isinstance(overrides, dict):
        node.get_logger().warning("this rclpy does not expose the parameters given to the node: "
                                  "misspelt parameter names cannot be detected")
        return []
    return list(overrides)


# --------------------------------------------------------------------------- logging

class ProblemLog:
    """One log line per kind of problem per ``period`` seconds, with how many were not shown.

    rclpy's ``throttle_duration_sec`` throttles per call site; dropped messages of several
    kinds reach the log through one call site here, so each kind gets its own throttle.
    """

    def __init__(self, logger, period: float = 5.0):
        self.logger = logger
        self.period = period
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, kind: str, text: str) -> None:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.period:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        more = self._suppressed.pop(kind, 0)
        self._last[kind] = now
        suffix = f" ({more} more like this in the last {now - last:.0f} s)" if more and last else ""
        self.logger.warning(f"{text}{suffix}")


def report_drop(problems: ProblemLog, drop: Drop | None, what: str) -> None:
    """Log a core's drop, throttled per reason, e.g. "image dropped (invalid image):
    unsupported encoding '16UC1'"."""
    if drop is not None:
        problems.warn(drop.reason.counter, f"{what} {drop.reason.label}: {drop.detail or 'no detail'}")


def publish(publishers: dict, tf_broadcaster, items) -> None:
    """Publish ``(topic, message)`` pairs (:mod:`vizloc_ros.pipeline.outputs`): each on its
    topic's publisher, TF through ``tf_broadcaster`` (the outputs hold TF only when the
    node broadcasts it)."""
    for topic, msg in items:
        if topic == TF_TOPIC:
            tf_broadcaster.sendTransform(list(msg.transforms))
        else:
            publishers[topic].publish(msg)


# --------------------------------------------------------------------------- diagnostics

class Diagnostics:
    """A diagnostic_updater task fed by a core's counters; a no-op without diagnostic_updater.

    ``name`` is the task's name only: the updater prefixes the node's name, so the status
    reads ``vizloc_fusion: pose fusion``.
    """

    def __init__(self, node, name: str, status_fn):
        self.rate = RateMeter()
        self.updater = None
        try:
            from diagnostic_updater import Updater
        except ImportError:
            node.get_logger().warning("diagnostic_updater is not installed: no /diagnostics "
                                      "(apt install ros-$ROS_DISTRO-diagnostic-updater)")
            return
        self.updater = Updater(node)
        self.updater.setHardwareID("none")
        self._status_fn = status_fn
        self.updater.add(name, self._run)

    def _run(self, stat):
        from diagnostic_msgs.msg import DiagnosticStatus

        level_name, message, counters, latency = self._status_fn()
        level = {"ok": DiagnosticStatus.OK, "warn": DiagnosticStatus.WARN,
                 "error": DiagnosticStatus.ERROR}[level_name]
        stat.summary(level, message)
        for key, value in diagnostics_summary(counters, latency, self.rate.rate()).items():
            stat.add(key, value)
        return stat


# --------------------------------------------------------------------------- main

def _quiet_half_built_rclpy_objects(stopped_by: list):
    """An ``sys.unraisablehook`` that drops one known, harmless message after a stop signal.

    rclpy's signal handler shuts the context down at once, from whichever thread the
    signal lands on (DDS threads included, so masking it in the main thread does not
    help); a stop that lands while rclpy builds its executor leaves a half-built
    executor and guard condition whose ``__del__`` print "Exception ignored ...
    AttributeError" tracebacks at exit (seen on Jazzy with SIGTERM sent as the node
    reports it is ready). Only those are dropped: an AttributeError from an rclpy
    object's ``__del__`` once a stop signal was received; everything else goes on to
    the previous hook.
    """
    previous = sys.unraisablehook

    def hook(unraisable):
        where = getattr(unraisable.object, "__module__", "") or ""
        if stopped_by and isinstance(unraisable.exc_value, AttributeError) and where.startswith("rclpy"):
            return
        previous(unraisable)

    return hook


def run(node_class, args=None) -> int:
    """Init, build the node, spin, shut down; the exit code says how it ended.

    A :class:`StartupError` is one fatal line and :data:`STARTUP_FAILED`; SIGTERM ends
    the node cleanly with :data:`TERMINATED` (not 0: the launch file must be able to tell
    a node stopped on its own from one it stopped); SIGINT and the end of the context 0.

    Signals: rclpy's own handler shuts the context down on SIGINT and SIGTERM, which ends
    the executor's spin (ExternalShutdownException), then calls ours. Ours only records the
    signal once the node spins: an exception raised from a signal handler lands in
    whatever Python runs at that moment, and inside an rclpy call pybind11 turns it into
    a RuntimeError traceback (seen on Jazzy: "Unable to convert call argument '0'"). While
    the node is being built (loading weights) the first signal interrupts with
    KeyboardInterrupt, and whatever error the interrupted build raises counts as that
    stop, not as a crash. Ctrl-C under ``ros2 launch`` reaches a node twice (the terminal
    signals the process group, then launch forwards its own): the second does nothing.
    """
    stopped_by = []
    spinning = []

    def on_signal(signum, frame):
        if stopped_by:
            return
        stopped_by.append(signum)
        if not spinning:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    sys.unraisablehook = _quiet_half_built_rclpy_objects(stopped_by)
    node = executor = None
    code = 0
    try:
        rclpy.init(args=args)
        node = node_class()
        spinning.append(True)
        if rclpy.ok():  # a stop signal may already have ended the context
            executor = SingleThreadedExecutor()
            executor.add_node(node)
            executor.spin()
    except StartupError as exc:
        rclpy.logging.get_logger(getattr(node_class, "NODE_NAME", "vizloc")).fatal(str(exc))
        code = STARTUP_FAILED
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception:  # noqa: BLE001 - an rclpy call cut short by the stop signal is that stop
        # rclpy's C handler shuts the context down before ours runs, so an RCLError from a
        # wait set built on the dead context can come first: the context's end says it
        if not stopped_by and rclpy.ok():
            raise
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if executor is not None:
            executor.remove_node(node)
        if node is not None:
            node.close()
            node.destroy_node()
        rclpy.try_shutdown()
    if code == 0 and stopped_by == [signal.SIGTERM]:
        return TERMINATED
    return code
