"""The last step, once for node and replay alike: core results -> ``(topic, message)`` lists.

Why one place: the nodes publish these lists and ``vizloc-replay`` writes the same lists
to its result bag, so what the replay records is what the nodes would publish (the
same messages, the same stamps, the same path throttling) by construction.

TF goes out as ``(TF_TOPIC, TFMessage)``: the replay writes it as it is, a node hands
its transforms to its ``tf2_ros.TransformBroadcaster``.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from vizloc_ros.pipeline.fusion_core import FusionCore, FusionOutput
from vizloc_ros.pipeline.regressor import AbsolutePose, OdometryPose
from vizloc_ros.ros_io import messages

#: /vizloc/path is republished at most this often (seconds of message time): it can hold
#: thousands of poses, and rviz does not need it at the odometry rate
PATH_PERIOD_S = 0.5
#: ... and, once long, only after this many new poses per pose it held when last sent:
#: each message carries the whole path, so sending it every period made the bytes on the
#: wire (and in a replay's result bag) grow with the square of the run's length. New
#: poses are counted, not the length, so a path at ``path_max_length`` keeps updating.
PATH_GROWTH = 0.05
TF_TOPIC = "/tf"


@dataclass(frozen=True)
class OutputTopics:
    """Where the outputs go (the nodes' topics; remap them like any ROS topic)."""

    absolute_pose: str = "/vizloc/absolute_pose"
    coarse_pose: str = "/vizloc/coarse_pose"
    pose: str = "/vizloc/pose"
    path: str = "/vizloc/path"
    visual_odometry: str = "/vizloc/visual_odometry"


# --------------------------------------------------------------------------- regressor

def absolute_pose_messages(types, pose: AbsolutePose, topic: str) -> list[tuple[str, object]]:
    """A regressor's pose of the base as PoseWithCovarianceStamped on ``topic``
    (``/vizloc/absolute_pose``, or ``/vizloc/coarse_pose`` for a coarse prior)."""
    return [(topic, messages.make_pose_with_covariance_stamped(
        types, messages.time_from_ns(types, pose.stamp_ns), pose.frame_id, pose.t, pose.q, pose.cov))]


def visual_odometry_messages(types, odometry: OdometryPose, topic: str,
                             with_tf: bool = True) -> list[tuple[str, object]]:
    """The network's visual odometry as nav_msgs/Odometry, and (``with_tf``) the same
    ``odom_frame -> base_frame`` as TF."""
    stamp = messages.time_from_ns(types, odometry.stamp_ns)
    out = [(topic, messages.make_odometry(types, stamp, odometry.frame_id, odometry.child_frame_id,
                                          odometry.t, odometry.q, odometry.cov))]
    if with_tf:
        out.append((TF_TOPIC, messages.make_tf_message(types, [messages.make_transform_stamped(
            types, stamp, odometry.frame_id, odometry.child_frame_id, odometry.t, odometry.q)])))
    return out


def regressor_messages(types, pose: AbsolutePose, topics: OutputTopics,
                       odometry_tf: bool = True) -> list[tuple[str, object]]:
    """Everything the regressor publishes for one processed frame: its visual odometry
    first (it covers the pose's stamp when the fusion reads the pose), then the pose."""
    out = []
    if pose.odometry is not None:
        out += visual_odometry_messages(types, pose.odometry, topics.visual_odometry, odometry_tf)
    return out + absolute_pose_messages(types, pose, topics.absolute_pose)


# --------------------------------------------------------------------------- fusion

class PathMirror:
    """The fused path as PoseStamped messages for ``/vizloc/path``, each pose converted once.

    The path holds thousands of poses and is republished over and over; converting it
    whole each time made publishing quadratic in its length. The mirror follows
    ``core.path`` one appended pose at a time and rebuilds itself when the core has
    cleared its path (reset, initial pose, a jump back in time).
    """

    def __init__(self, core: FusionCore, types):
        self.core = core
        self.types = types
        self.poses: deque = deque(maxlen=core.settings.path_max_length)  # (stamp, PoseStamped)

    def clear(self) -> None:
        self.poses.clear()

    def sync(self) -> None:
        """Call after an output with ``path_appended``."""
        path = self.core.path
        if not path:
            self.poses.clear()
            return
        if len(path) == 1 or not self.poses or path[-2][0] != self.poses[-1][0]:
            self.poses.clear()  # the core cleared its path: rebuild
            entries = list(path)
        else:
            entries = [path[-1]]
        for stamp, t, q in entries:
            self.poses.append((stamp, messages.make_pose_stamped(
                self.types, messages.time_from_ns(self.types, self.core.exact_ns(stamp)),
                self.core.settings.map_frame, t, q)))

    @property
    def newest_stamp(self) -> float | None:
        return self.poses[-1][0] if self.poses else None

    def message(self, stamp=None):
        """nav_msgs/Path of the mirrored poses, stamped with the newest pose's stamp
        (or ``stamp``, a Time message, when the path is empty)."""
        if self.poses:
            stamp = self.poses[-1][1].header.stamp
        return self.types.Path(header=self.types.Header(stamp=stamp, frame_id=self.core.settings.map_frame),
                               poses=[m for _, m in self.poses])


class FusionMessages:
    """A :class:`FusionCore`'s outputs -> what the fusion node publishes: the fused pose,
    its TF, and the path, at most every :data:`PATH_PERIOD_S` of message time and after
    :data:`PATH_GROWTH` new poses (at once when time went back: a looping bag)."""

    def __init__(self, core: FusionCore, types, topics: OutputTopics = OutputTopics()):
        self.types = types
        self.topics = topics
        self.path = PathMirror(core, types)
        self._path_published_at: float | None = None  # newest stamp of the last path sent
        self._path_published_length = 0   # poses in the last path sent
        self._poses_since_published = 0   # poses appended since

    def of(self, out: FusionOutput) -> list[tuple[str, object]]:
        """The messages of one output, in publishing order."""
        T = self.types
        items = [(self.topics.pose, messages.make_pose_with_covariance_stamped(
            T, messages.time_from_ns(T, out.stamp_ns), out.frame_id, out.t, out.q, out.cov))]
        if out.transform is not None:
            tr = out.transform
            items.append((TF_TOPIC, messages.make_tf_message(T, [messages.make_transform_stamped(
                T, messages.time_from_ns(T, tr.stamp_ns), tr.parent, tr.child, tr.t, tr.q)])))
        if out.path_appended:
            self.path.sync()
            self._poses_since_published += 1
            newest, last = self.path.newest_stamp, self._path_published_at
            if last is None or newest < last or (  # the first, or time went back
                    newest - last >= PATH_PERIOD_S
                    and self._poses_since_published >= PATH_GROWTH * self._path_published_length):
                items.append(self.path_now())
        return items

    def path_now(self, stamp_if_empty=None) -> tuple[str, object]:
        """The path as it is, whenever it was last sent (after a reset or an initial pose,
        at the end of a recording); ``stamp_if_empty``: a Time message for an empty path."""
        self._path_published_at = self.path.newest_stamp
        self._path_published_length = len(self.path.poses)
        self._poses_since_published = 0
        return self.topics.path, self.path.message(stamp_if_empty)

    def clear_path(self) -> None:
        """The core cleared its path (reset, initial pose)."""
        self.path.clear()
