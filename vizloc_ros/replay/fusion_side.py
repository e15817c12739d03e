"""The fusion side of ``vizloc-replay``: what the fusion node does, fed from a bag.

The replay is split like the two nodes. The regressor side (:mod:`vizloc_ros.replay.cli`)
reads the images and turns them into absolute poses; this side reads everything else
(odometry, IMU, ground truth), runs :class:`~vizloc_ros.pipeline.fusion_core.FusionCore` on all of it
in header-stamp order, and writes the result bag. By default it runs in a child process
(:class:`FusionProcess`), so the fusion of one batch overlaps the network's work on the
next, on another core; :class:`FusionSide` itself also runs in-process.

Order: a pose is fused once no pose with an earlier stamp can still come, i.e. once
the images read have moved :data:`IMAGE_REORDER_S` past its stamp (camera stamps only
go forward, give or take that much). Before that, this side reads its own odometry and
IMU ahead until each of their topics is :data:`OWN_REORDER_S` past the same stamp, so
everything stamped earlier is queued; it never holds more than that window of them,
however long the recording (the ground truth, which the report needs whole, is read
first). Events with equal stamps go odometry / IMU first, then the regressor's outputs
in the order it made them. A pose or a message whose stamp is older than something
already fused (a clock jumping back) is fused on arrival, as the node would, and
counted as ``late_absolute`` / ``late_own``.

Receive order (``vizloc-replay --order receive``, :data:`ORDERS`): everything is fused in
the bag's log-time order instead, the regressor's outputs at the log time of their image
(no inference latency), as the nodes receive them. Stamp order hides what a stamp off
the others does on the robot (a message stamped an hour ahead is simply fused last);
receive order shows it, as the fusion node would publish it.
"""
from __future__ import annotations

import contextlib
import heapq
import multiprocessing
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vizloc_ros.files import exit_with_parent
from vizloc_ros.pipeline.fusion_core import FusionCore, FusionSettings
from vizloc_ros.pipeline.outputs import (TF_TOPIC, FusionMessages, OutputTopics, absolute_pose_messages,
                                         visual_odometry_messages)
from vizloc_ros.ros_io import messages
from vizloc_ros.ros_io.bag_io import BagWriter, read_messages, topic_message_counts
from vizloc_ros.ros_io.ground_truth import GroundTruthError, GroundTruthReader, tf_edges

#: how far (seconds) camera stamps may go back between consecutive images before the
#: poses are fused out of stamp order
IMAGE_REORDER_S = 1.0
#: the same for odometry / IMU stamps within their topic; a message later than that is
#: fused when it is read, as the node would on arrival, and counted as ``late_own``
OWN_REORDER_S = 1.0
TF_TYPE = "tf2_msgs/msg/TFMessage"
#: the orders the fusion side can feed the fusion in: header stamps (the default, what
#: the node sees when nothing is late) or the bag's receive (log) order
ORDERS = ("stamp", "receive")
#: the result bag's topics: what the nodes publish
TOPICS = OutputTopics()

#: regressor-side events: (message builder, topic, the FusionCore method the node's
#: subscription calls with that message)
_REGRESSOR_OUTPUTS = {
    "absolute": (absolute_pose_messages, TOPICS.absolute_pose, "on_absolute"),
    "prior": (absolute_pose_messages, TOPICS.coarse_pose, "on_coarse_pose"),
    "visual_odometry": (visual_odometry_messages, TOPICS.visual_odometry, "on_odometry"),
}


class ReplayError(RuntimeError):
    """The replay cannot run: the message says why and what to do."""


@contextlib.contextmanager
def bag_errors(bag):
    """Errors while reading ``bag`` as a :class:`ReplayError` that names it: a truncated
    or corrupt bag surfaces as various reader errors."""
    try:
        yield
    except ReplayError:
        raise
    except ValueError as exc:
        raise ReplayError(f"bag {bag}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - rosbags raises many types for damaged files
        raise ReplayError(f"bag {bag} could not be read to the end ({type(exc).__name__}: {exc}); "
                          "is it truncated or corrupt?") from None


@dataclass
class FusionSideSpec:
    """What the fusion side reads, fuses and writes (picklable: it crosses to the child)."""

    bag: Path
    out_bag: Path
    ground_truth: str = "/ground_truth/pose"
    odom_topic: str | None = "/odom"
    imu_topic: str | None = None
    read_tf_static: bool = False
    fusion: bool = True
    use_odom: bool = True
    use_imu: bool = False
    visual_odometry: bool = False
    coarse_prior: bool = False  # the regressor side sends a coarse prior's poses too
    map_frame: str = "map"
    odom_frame: str = "odom"
    base_frame: str = "base_link"
    fusion_params: dict = field(default_factory=dict)
    #: the other FusionSettings fields (publish_tf, transform_tolerance, path_*), e.g. from
    #: ``--params-file``; the frames and inputs are the fields above
    fusion_settings: dict = field(default_factory=dict)
    #: one of :data:`ORDERS`
    order: str = "stamp"


@dataclass
class FusionSideResult:
    """What the report needs from the fusion side."""

    fused: list          # (stamp, t, q, cov) of every /vizloc/pose, in publishing order; cov:
                         # the (6, 6) ROS-order covariance it carries (for the report's NEES)
    odom_track: list     # (stamp, t, q) of the bag's odometry
    ground_truth: tuple  # (stamps, t, q) of the base in map, sorted
    counts: dict         # FusionCore counters + fusion_* counters + late_absolute
    busy_s: float = 0.0  # time spent fusing and writing the result bag


def fusion_settings_of(spec: FusionSideSpec) -> FusionSettings:
    """The fusion node's settings the replay runs; ``ValueError`` for a bad value."""
    return FusionSettings(**{**spec.fusion_settings, "map_frame": spec.map_frame, "odom_frame": spec.odom_frame,
                             "base_frame": spec.base_frame, "use_odom": spec.use_odom,
                             "use_imu": spec.use_imu})


class FusionSide:
    """Own messages of the bag + the regressor's events -> FusionCore -> result bag."""

    def __init__(self, spec: FusionSideSpec):
        self.spec = spec
        try:
            self.gt = GroundTruthReader(spec.ground_truth, spec.base_frame)
        except GroundTruthError as exc:
            raise ReplayError(str(exc)) from None
        settings = fusion_settings_of(spec)
        self.core = FusionCore(dict(spec.fusion_params), settings) if spec.fusion else None
        self.odom_track: list = []
        self.fused: list = []
        self._own: list = []     # heap of (stamp, 0, seq, kind, msg): odometry / IMU read ahead
        self._own_stream = None  # the bag's odometry / IMU, in log order, until read to the end
        self._own_front: dict = {}  # topic -> newest stamp read (inf: no messages left)
        self._own_left: dict = {}   # topic -> messages not read yet
        self._own_received = -np.inf  # receive order: log time (s) of the last one read
        if spec.order not in ORDERS:
            raise ReplayError(f"order must be one of {', '.join(ORDERS)}, got {spec.order!r}")
        self._by_receive = spec.order == "receive"
        self._heap: list = []    # (stamp, 1, seq, kind, payload) from the regressor side
        self._seq = 0
        self._last_stamp = -np.inf
        self._late = {"absolute": 0, "own": 0}  # events fused after a later stamp
        self._busy = 0.0
        self._writer = None
        self._types = None
        self._outputs = None  # FusionMessages, once the message types are loaded
        self.ground_truth = None

    # -- the bag's own messages ---------------------------------------------------------
    def read_bag(self) -> None:
        """Read the ground truth (and /tf_static) now: it is small, and a bad one is an
        error before any work starts. Odometry and IMU are read as the fusion goes
        (:meth:`_pull`), so memory stays bounded on long recordings."""
        spec = self.spec
        wanted = ["/tf"] if spec.ground_truth.startswith("tf:") else [spec.ground_truth]
        if spec.read_tf_static:
            wanted.append("/tf_static")
        static_edges: dict = {}
        static_skipped: dict = {}  # unusable /tf_static transforms: named if the chain is missing
        with bag_errors(spec.bag):
            for record in read_messages(spec.bag, list(dict.fromkeys(wanted))):
                if record.topic == "/tf_static":
                    try:
                        static_edges.update(tf_edges(record.msg.transforms, static_skipped))
                    except ValueError:
                        pass
                if record.topic == spec.ground_truth or (record.topic == "/tf" and self.gt.tf_parent):
                    self.gt.add(record.topic, record.msg)
            own = [spec.odom_topic] if spec.odom_topic else []
            if spec.use_imu and spec.imu_topic:
                own.append(spec.imu_topic)
            own = list(dict.fromkeys(own))
            if own:
                counts = topic_message_counts(spec.bag)
                self._own_left = {topic: counts.get(topic, 0) for topic in own}
                self._own_front = {topic: -np.inf if self._own_left[topic] else np.inf for topic in own}
                self._own_stream = read_messages(spec.bag, own)
        try:
            self.ground_truth = self.gt.finish(static_edges, static_skipped)
        except GroundTruthError as exc:
            raise ReplayError(str(exc)) from None

    def _pull(self, limit: float) -> None:
        """Read odometry / IMU until every one of their topics has stamps
        :data:`OWN_REORDER_S` past ``limit`` (or has no messages left), so that all of them
        stamped before ``limit`` are queued; a topic that ended counts as past any stamp."""
        stream, front, left = self._own_stream, self._own_front, self._own_left
        if stream is None:
            return
        spec = self.spec
        fuse_odom = spec.fusion and spec.use_odom and not spec.visual_odometry
        target = limit + OWN_REORDER_S
        with bag_errors(spec.bag):
            while (self._own_received < limit) if self._by_receive else (min(front.values()) < target):
                record = next(stream, None)
                if record is None:  # read to the end: nothing more can come
                    self._own_stream = None
                    for topic in front:
                        front[topic] = np.inf
                    return
                topic, msg = record.topic, record.msg
                try:
                    stamp = messages.header_stamp_sec(msg)
                except ValueError:
                    stamp = None
                self._own_received = record.log_time_ns * 1e-9
                key = self._own_received if self._by_receive else stamp if stamp is not None else -1.0
                left[topic] -= 1
                if left[topic] <= 0:
                    front[topic] = np.inf
                elif stamp is not None:
                    front[topic] = max(front[topic], stamp)
                if topic == spec.odom_topic:
                    try:
                        t, q = messages.pose_from_msg(msg)
                        if stamp is not None:
                            self.odom_track.append((stamp, t, q))
                    except (ValueError, TypeError):  # counted by the fusion when it reads it
                        pass
                    if fuse_odom:
                        self._add_own(key, "odom", msg)
                elif spec.use_imu and topic == spec.imu_topic:
                    self._add_own(key, "imu", msg)

    def _add_own(self, stamp: float, kind: str, msg) -> None:
        heapq.heappush(self._own, (stamp, 0, self._seq, kind, msg))
        self._seq += 1

    # -- the regressor's events -----------------------------------------------------------
    def open_output(self) -> None:
        self._types = messages.rosbags_types()
        if self.core is not None:
            self._outputs = FusionMessages(self.core, self._types, TOPICS)
        writer = BagWriter(self.spec.out_bag, typestore=messages.rosbags_typestore())
        writer.open()
        self._writer = writer
        writer.add_topic(TOPICS.absolute_pose, "geometry_msgs/msg/PoseWithCovarianceStamped")
        writer.add_topic(TOPICS.pose, "geometry_msgs/msg/PoseWithCovarianceStamped")
        writer.add_topic(TOPICS.path, "nav_msgs/msg/Path")
        writer.add_topic(TF_TOPIC, TF_TYPE)
        if self.spec.visual_odometry:
            writer.add_topic(TOPICS.visual_odometry, "nav_msgs/msg/Odometry")
        if self.spec.coarse_prior:
            writer.add_topic(TOPICS.coarse_pose, "geometry_msgs/msg/PoseWithCovarianceStamped")

    def add(self, events, image_stamp: float, received_ns: dict | None = None) -> None:
        """Events of one image batch, ``(stamp, kind, payload)`` in the order the regressor
        made them (kind: absolute, prior or visual_odometry); ``image_stamp`` is the latest
        image stamp read so far. Fuses everything that can no longer be preceded.

        Receive order: ``received_ns`` maps the batch's image stamps (ns) to their log
        times; an event is fused at its image's log time, and everything logged before the
        batch's last image is fused now."""
        if self._by_receive:
            received_ns = received_ns or {}
            latest = max(received_ns.values(), default=None)
            limit = latest * 1e-9 if latest is not None else self._own_received
        for stamp, kind, payload in events:
            if self._by_receive:
                stamp = received_ns.get(getattr(payload, "stamp_ns", None), latest or 0) * 1e-9
            heapq.heappush(self._heap, (stamp, 1, self._seq, kind, payload))
            self._seq += 1
        start = time.perf_counter()
        self._release(limit if self._by_receive else image_stamp - IMAGE_REORDER_S)
        self._busy += time.perf_counter() - start

    def finish(self) -> FusionSideResult:
        """Fuse what is left, close the result bag; what the report needs."""
        start = time.perf_counter()
        self._release(np.inf)
        if self._outputs is not None and self._outputs.path.poses:  # the complete path, last
            self._write(self.core.exact_ns(self._outputs.path.newest_stamp) + 1, [self._outputs.path_now()])
        self._writer.close()
        self._writer = None
        counts: dict = {}
        if self.core is not None:
            counts.update({k: int(v) for k, v in self.core.counters.items()})
            counts.update({"fusion_" + k: int(v) for k, v in self.core.fusion.counters.items()})
        for what, late in self._late.items():
            if late:
                counts[f"late_{what}"] = late
        self._busy += time.perf_counter() - start
        return FusionSideResult(self.fused, self.odom_track, self.ground_truth, counts, self._busy)

    def abort(self) -> None:
        if self._own_stream is not None:
            self._own_stream.close()  # closes the bag reader behind it
            self._own_stream = None
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def _release(self, limit: float) -> None:
        """Fuse, in stamp order, everything of both sides stamped before ``limit``."""
        self._pull(limit)
        own, heap = self._own, self._heap
        while True:
            if heap and (not own or heap[0][:3] < own[0][:3]):
                queue, late = heap, "absolute"
            elif own:
                queue, late = own, "own"
            else:
                return
            if queue[0][0] >= limit:
                return
            candidate = heapq.heappop(queue)
            if candidate[0] < self._last_stamp:
                self._late[late] += 1
            self._last_stamp = max(self._last_stamp, candidate[0])
            self._process(candidate[3], candidate[4])

    def _process(self, kind: str, payload) -> None:
        """One event, as the fusion node handles the message; what the nodes would publish
        (the regressor's message, then the fusion's) goes to the result bag."""
        core, types = self.core, self._types
        step = None
        if kind in _REGRESSOR_OUTPUTS:  # the regressor node's message, written, then fused
            build, topic, on_message = _REGRESSOR_OUTPUTS[kind]
            written = build(types, payload, topic)
            self._write(payload.stamp_ns, written)
            if core is not None:
                step = getattr(core, on_message)(written[0][1])
        elif kind == "odom":
            step = core.on_odometry(payload)
        elif kind == "imu":
            core.on_imu(payload)
        if step is None or step.output is None:
            return
        output = step.output
        self.fused.append((output.stamp, output.t, output.q, output.cov))
        self._write(output.stamp_ns, self._outputs.of(output))

    def _write(self, ns: int, items) -> None:
        for topic, msg in items:
            self._writer.write(topic, ns, msg)


# --------------------------------------------------------------------------- child process

class _ChildFailure(RuntimeError):
    """An unexpected error in the fusion process (a bug): its traceback, as text."""


def _serve(conn, spec: FusionSideSpec, parent_end=None, parent_pid: int | None = None) -> None:
    """The child process: Ctrl-C is the parent's to handle; it ends this process.

    It must never outlive the parent (a ``kill -9`` of ``vizloc-replay`` would leave it
    waiting forever): a forked child inherits the parent's end of the pipe, so it closes
    that copy first (then the parent's death is an end of file on ``recv``), and asks
    the kernel to end it with the parent (:func:`~vizloc_ros.files.exit_with_parent`).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent_end is not None:
        parent_end.close()
    if parent_pid is not None:
        exit_with_parent(parent_pid)
    side = None
    try:
        side = FusionSide(spec)
        side.read_bag()
        side.open_output()
        conn.send(("ready", None))
        while True:
            request = conn.recv()
            if request[0] == "add":
                side.add(*request[1:])
            elif request[0] == "finish":
                conn.send(("result", side.finish()))
                return
    except (EOFError, BrokenPipeError):  # the parent is gone: nothing to report to
        pass
    except (ReplayError, OSError) as exc:
        _send_error(conn, exc)
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        _send_error(conn, _ChildFailure(traceback.format_exc()))
    finally:
        if side is not None:
            side.abort()


def _send_error(conn, exc: BaseException) -> None:
    try:
        conn.send(("error", exc))
    except Exception:  # noqa: BLE001 - the parent is gone, or the error does not pickle
        try:
            conn.send(("error", ReplayError(f"{type(exc).__name__}: {exc}")))
        except Exception:  # noqa: BLE001
            pass


@contextlib.contextmanager
def _child_signals():
    """The signal dispositions a forked child starts with: Ctrl-C ignored (the parent
    handles it and stops the child), SIGTERM fatal. A forked child inherits the parent's
    Python handlers; one that raised KeyboardInterrupt before the child reached
    :func:`_serve` would unwind into a copy of the parent's own code."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may change handlers; Python runs them there only
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


class FusionProcess:
    """:class:`FusionSide` in a child process, with the same ``add`` / ``finish`` calls.

    The pipe gives back-pressure: when the fusion falls behind, ``add`` waits for it. An
    error on the fusion side comes back as the same exception from the next call.
    """

    def __init__(self, spec: FusionSideSpec):
        methods = multiprocessing.get_all_start_methods()
        # fork: the child starts at once and sees the parent's modules; it never touches torch
        method = "fork" if "fork" in methods else "spawn"
        ctx = multiprocessing.get_context(method)
        self._conn, child_conn = ctx.Pipe()
        # a forked child gets this process's end of the pipe too, and closes it; a spawned
        # one inherits nothing (passing the end would hand it a copy to keep open)
        inherited = self._conn if method == "fork" else None
        self._process = ctx.Process(target=_serve, args=(child_conn, spec, inherited, os.getpid()),
                                    name="vizloc-replay-fusion", daemon=True)
        with _child_signals():
            self._process.start()
        child_conn.close()
        self._ready = False

    def _receive(self, expected: str):
        try:
            kind, value = self._conn.recv()
        except (EOFError, OSError):
            self._process.join(5)
            raise ReplayError(f"the fusion process stopped unexpectedly (exit code {self._process.exitcode})") \
                from None
        if kind == "error":
            raise value
        if kind != expected:
            raise ReplayError(f"the fusion process answered {kind!r}, expected {expected!r}")
        return value

    def wait_ready(self) -> None:
        """Wait until the fusion side has read the ground truth and opened its output;
        raises its error (e.g. no ground truth) if it had one."""
        if not self._ready:
            self._receive("ready")
            self._ready = True

    def add(self, events, image_stamp: float, received_ns: dict | None = None) -> None:
        self.wait_ready()
        try:
            self._conn.send(("add", events, image_stamp, received_ns))
        except (BrokenPipeError, OSError):
            self._receive("error")  # raises the child's error, or says it stopped

    def finish(self) -> FusionSideResult:
        self.wait_ready()
        try:
            self._conn.send(("finish",))
        except (BrokenPipeError, OSError):
            self._receive("error")
        return self._receive("result")

    def close(self) -> None:
        """Stop the child (after ``finish`` it has ended on its own)."""
        if self._process.is_alive():
            self._process.terminate()
        self._process.join(10)
        self._conn.close()


class InProcessFusion:
    """:class:`FusionSide` run in this process, with the same calls as :class:`FusionProcess`."""

    def __init__(self, spec: FusionSideSpec):
        self._side = FusionSide(spec)
        try:
            self._side.read_bag()
            self._side.open_output()
        except BaseException:
            self._side.abort()
            raise

    def wait_ready(self) -> None:
        pass

    def add(self, events, image_stamp: float, received_ns: dict | None = None) -> None:
        self._side.add(events, image_stamp, received_ns)

    def finish(self) -> FusionSideResult:
        return self._side.finish()

    def close(self) -> None:
        self._side.abort()
