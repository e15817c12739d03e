"""rosbag2 (MCAP) writing and reading with rosbags, without a ROS installation.

Why a wrapper: every bag in this project (synthetic world, replay, acceptance checks)
is written and read the same way, with the same typestore, with errors that say which
bag and which topic, and with no half-written bag ever left under the final name.

Writing: :class:`BagWriter` writes into a hidden temporary directory next to the target
and renames it into place on a clean close; an exception removes it. Bags are rosbag2
metadata version :data:`BAG_VERSION` (8: readable by rosbag2 on Humble and Jazzy; rosbags
0.11 writes 8 or 9), storage MCAP, CDR messages with their definitions embedded.

Reading: :func:`list_topics` / :func:`topic_message_counts` describe a bag;
:func:`read_messages` yields deserialised messages of chosen topics in the bag's
log-time order (for bags recorded live that is receive order) or, with
``order="header"``, in header-stamp order.
"""
from __future__ import annotations

import heapq
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

from vizloc_ros.ros_io.messages import rosbags_typestore, stamp_to_ns

#: rosbag2 metadata version written (see module docstring)
BAG_VERSION = 8


class BagMessage(NamedTuple):
    topic: str
    msgtype: str
    log_time_ns: int  # when the message was recorded
    stamp_ns: int  # its header stamp (first transform's for TFMessage), else the log time
    msg: object


def message_stamp_ns(msg, fallback_ns: int) -> int:
    """Header stamp of a message in ns; TFMessage uses its first transform; else ``fallback_ns``."""
    header = getattr(msg, "header", None)
    if header is None:
        transforms = getattr(msg, "transforms", None)
        if transforms:
            header = getattr(transforms[0], "header", None)
    if header is None:
        return int(fallback_ns)
    return stamp_to_ns(header.stamp)


def _latched_qos():
    """QoS of /tf_static-like topics: reliable, transient local, depth 1."""
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime

    zero = QosTime(0, 0)
    return Qos(QosHistory.KEEP_LAST, 1, QosReliability.RELIABLE, QosDurability.TRANSIENT_LOCAL,
               zero, zero, QosLiveliness.AUTOMATIC, zero, False)


class BagWriter:
    """Write one rosbag2 MCAP bag atomically.

    >>> with BagWriter(path) as bag:
    ...     bag.add_topic("/odom", "nav_msgs/msg/Odometry")
    ...     bag.write("/odom", stamp_ns, msg)
    """

    def __init__(self, path, typestore=None, version: int = BAG_VERSION):
        from rosbags.rosbag2 import StoragePlugin, Writer

        self.path = Path(path)
        if self.path.exists():
            raise FileExistsError(f"{self.path} exists already; not overwriting a bag")
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"cannot write bag {self.path}: folder {self.path.parent} does not exist")
        self.typestore = typestore if typestore is not None else rosbags_typestore()
        self._staging = self.path.parent / f".{self.path.name}.partial-{os.getpid()}"
        if self._staging.exists():
            shutil.rmtree(self._staging)
        self._staging.mkdir()
        self._writer = Writer(self._staging / self.path.name, version=version,
                              storage_plugin=StoragePlugin.MCAP)
        self._connections: dict[str, tuple[object, str]] = {}
        self._open = False

    def open(self) -> "BagWriter":
        self._writer.open()
        self._open = True
        return self

    def __enter__(self) -> "BagWriter":
        return self.open()

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    def add_topic(self, topic: str, msgtype: str, latched: bool = False) -> None:
        """Declare a topic; ``latched`` offers transient-local QoS (like /tf_static)."""
        if topic in self._connections:
            raise ValueError(f"topic {topic} added twice to {self.path}")
        if msgtype not in self.typestore.types:
            raise ValueError(f"unknown message type {msgtype!r} for topic {topic}")
        qos = [_latched_qos()] if latched else []
        connection = self._writer.add_connection(topic, msgtype, typestore=self.typestore,
                                                 offered_qos_profiles=qos)
        self._connections[topic] = (connection, msgtype)

    def write(self, topic: str, log_time_ns: int, msg) -> None:
        """Serialise ``msg`` (a rosbags message) to ``topic`` at ``log_time_ns``."""
        if topic not in self._connections:
            raise KeyError(f"topic {topic} was not added to {self.path}; added: {sorted(self._connections)}")
        connection, msgtype = self._connections[topic]
        if getattr(msg, "__msgtype__", msgtype) != msgtype:
            raise TypeError(f"topic {topic} carries {msgtype}, got {msg.__msgtype__}")
        self._writer.write(connection, int(log_time_ns), self.typestore.serialize_cdr(msg, msgtype))

    def close(self) -> Path:
        """Finish the bag and move it to its final name."""
        if self._open:
            self._writer.close()
            self._open = False
        os.replace(self._staging / self.path.name, self.path)
        shutil.rmtree(self._staging, ignore_errors=True)
        return self.path

    def abort(self) -> None:
        """Drop everything written so far."""
        if self._open:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - the partial bag is deleted anyway
                pass
            self._open = False
        shutil.rmtree(self._staging, ignore_errors=True)


def _check_bag_path(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no rosbag2 at {path}")
    if path.is_dir() and not (path / "metadata.yaml").exists():
        raise ValueError(f"{path} is a folder but not a rosbag2 (no metadata.yaml)")
    return path


def _open_reader(path):
    from rosbags.highlevel import AnyReader, AnyReaderError

    path = _check_bag_path(path)
    try:
        reader = AnyReader([path], default_typestore=rosbags_typestore())
        reader.open()
    except (AnyReaderError, Exception) as exc:  # rosbags raises several error types
        if isinstance(exc, (FileNotFoundError, MemoryError, KeyboardInterrupt)):
            raise
        raise ValueError(f"cannot read bag {path}: {exc}") from exc
    return reader


def list_topics(path) -> dict[str, str]:
    """Topic -> message type (e.g. ``"sensor_msgs/msg/Image"``) of a bag."""
    reader = _open_reader(path)
    try:
        return {c.topic: c.msgtype for c in reader.connections}
    finally:
        reader.close()


def topic_message_counts(path) -> dict[str, int]:
    """Topic -> number of messages."""
    reader = _open_reader(path)
    try:
        counts: dict[str, int] = {}
        for connection in reader.connections:
            counts[connection.topic] = counts.get(connection.topic, 0) + connection.msgcount
        return counts
    finally:
        reader.close()


def require_messages(path, topics: dict[str, str], alternatives: dict[str, list[str]] | None = None,
                     hint: str = "") -> None:
    """``ValueError`` when a topic of ``topics`` ({topic: what it is, e.g. "image"}) is in
    the bag without a single message, naming the bag and the topics of the same kind that
    do have messages (``alternatives``: {topic: candidates}), then ``hint`` (how to pick one).

    Why up front: an empty topic otherwise surfaces at the end of a run, as "nothing
    could be processed" with empty counters, although the bag names the cause at once
    (a recording that subscribed to the wrong camera beside two good ones).
    """
    counts = topic_message_counts(path)
    for topic, what in topics.items():
        if counts.get(topic, 0) == 0:
            others = [f"{name} ({counts[name]})" for name in (alternatives or {}).get(topic, [])
                      if name != topic and counts.get(name, 0) > 0]
            listing = f"; {what} topics with messages: {', '.join(others)}{hint}" if others else ""
            raise ValueError(f"{what} topic {topic!r} has no messages in {path}{listing}")


def read_messages(path, topics: Iterable[str] | None = None, expected_types: dict[str, str] | None = None,
                  start_ns: int | None = None, stop_ns: int | None = None, order: str = "log",
                  reorder_window_ns: int = 1_000_000_000) -> Iterator[BagMessage]:
    """Deserialised messages of ``topics`` (all when None).

    ``order="log"`` yields them in the bag's log-time order (receive order). ``"header"``
    yields them in header-stamp order, which is what a replay that uses message stamps
    needs when the recorder received them out of order: messages are held back until
    the log time has moved ``reorder_window_ns`` past their stamp, and a message later
    than that raises ``ValueError`` (rather than silently breaking the order).
    Raises ``ValueError`` naming the bag and its topics when a requested topic is
    missing, or when ``expected_types`` (topic -> type) disagrees with the bag.
    """
    if order not in ("log", "header"):
        raise ValueError(f"order must be 'log' or 'header', not {order!r}")
    messages = _read_in_log_order(path, topics, expected_types, start_ns, stop_ns)
    if order == "log":
        yield from messages
        return
    heap: list[tuple[int, int, BagMessage]] = []
    last_yielded = None
    for count, record in enumerate(messages):
        if last_yielded is not None and record.stamp_ns < last_yielded[0]:
            raise ValueError(
                f"bag {path}: {record.topic} message stamped {record.stamp_ns} ns was logged at "
                f"{record.log_time_ns} ns, after a message stamped {last_yielded[0]} ns on {last_yielded[1]} "
                f"was already given out; increase reorder_window_ns (now {reorder_window_ns})")
        heapq.heappush(heap, (record.stamp_ns, count, record))
        while heap and heap[0][0] <= record.log_time_ns - reorder_window_ns:
            stamp, _, ready = heapq.heappop(heap)
            last_yielded = (stamp, ready.topic)
            yield ready
    while heap:
        yield heapq.heappop(heap)[2]


def _read_in_log_order(path, topics, expected_types, start_ns, stop_ns) -> Iterator[BagMessage]:
    reader = _open_reader(path)
    try:
        available = {c.topic: c.msgtype for c in reader.connections}
        wanted = list(available) if topics is None else list(topics)
        missing = [t for t in wanted if t not in available]
        if missing:
            raise ValueError(f"bag {path} has no topic {', '.join(missing)}; it has: "
                             + ", ".join(f"{t} ({m})" for t, m in sorted(available.items())))
        for topic, msgtype in (expected_types or {}).items():
            if topic in available and available[topic] != msgtype:
                raise ValueError(f"bag {path}: topic {topic} carries {available[topic]}, expected {msgtype}")
        connections = [c for c in reader.connections if c.topic in set(wanted)]
        for connection, timestamp, raw in reader.messages(connections=connections, start=start_ns, stop=stop_ns):
            try:
                msg = reader.deserialize(raw, connection.msgtype)
            except Exception as exc:  # noqa: BLE001 - re-raised with context
                raise ValueError(f"bag {path}: cannot decode a {connection.msgtype} on "
                                 f"{connection.topic} at {timestamp} ns: {exc}") from exc
            yield BagMessage(connection.topic, connection.msgtype, int(timestamp),
                             message_stamp_ns(msg, timestamp), msg)
    finally:
        reader.close()
