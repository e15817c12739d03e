"""The fused path as ``PoseStamped`` messages, kept once for node and replay alike."""
from __future__ import annotations

from collections import deque

from vizloc_ros.ros_io import messages
from vizloc_ros.pipeline.fusion_core import FusionCore


PATH_PERIOD_S = 0.5


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
