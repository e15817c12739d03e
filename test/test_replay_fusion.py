"""The replay's fusion side: stamp order across the bag's own messages and the regressor's
poses, the same report in a child process as in-process, and errors that cross back."""
import signal
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pytest

from vizloc_ros.pipeline.fusion_core import FusionCore, FusionSettings
from vizloc_ros.pipeline.outputs import (PATH_PERIOD_S, FusionMessages, OutputTopics, absolute_pose_messages,
                                         visual_odometry_messages)
from vizloc_ros.pipeline.regressor import AbsolutePose, OdometryPose
from vizloc_ros.replay import cli as replay
from vizloc_ros.replay import fusion_side as replay_fusion
from vizloc_ros.ros_io import messages
from vizloc_ros.ros_io.bag_io import BagMessage, read_messages, topic_message_counts
from vizloc_ros.ros_io.messages import header_stamp_sec
from vizloc_ros.ros_io.tum import read_tum


def _pose(stamp):
    ns = int(round(stamp * 1e9))
    return AbsolutePose(stamp=ns * 1e-9, frame_id="map", t=np.zeros(3), q=np.array([1.0, 0, 0, 0]),
                        cov=np.eye(6) * 0.1, latency_s=0.0, t_cam=np.zeros(3), q_cam=np.array([1.0, 0, 0, 0]),
                        stamp_ns=ns)


def _odometry_stamps(bag):
    return [header_stamp_sec(r.msg) for r in read_messages(bag, ["/odom"])]


class _Recording(replay_fusion.FusionSide):
    """Records what would be fused, in order, instead of fusing it."""

    def __init__(self, spec):
        super().__init__(spec)
        self.seen = []

    def _process(self, kind, payload):
        stamp = payload.stamp if kind == "absolute" else \
            payload.header.stamp.sec + payload.header.stamp.nanosec * 1e-9
        self.seen.append((round(stamp, 6), kind))


def test_events_are_fused_in_stamp_order_with_odometry_first_at_equal_stamps(small_bag, tmp_path):
    side = _Recording(replay_fusion.FusionSideSpec(bag=small_bag, out_bag=tmp_path / "bag"))
    side.read_bag()
    odom = _odometry_stamps(small_bag)
    assert len(odom) > 30 and odom == sorted(odom)
    image_stamps = odom[::2][:20]  # poses at odometry stamps: ties are fused odometry first
    # the regressor hands over batches out of order inside each batch
    side.add([(s, "absolute", _pose(s)) for s in reversed(image_stamps[:8])], image_stamps[7])
    assert all(stamp < image_stamps[7] - replay_fusion.IMAGE_REORDER_S + 1e-9 for stamp, _ in side.seen)
    side.add([(s, "absolute", _pose(s)) for s in image_stamps[8:]], image_stamps[-1])
    side._release(np.inf)
    stamps = [s for s, _ in side.seen]
    assert stamps == sorted(stamps)
    assert sum(kind == "absolute" for _, kind in side.seen) == 20
    for i, (stamp, kind) in enumerate(side.seen):
        if kind == "absolute" and stamp in [round(o, 6) for o in odom]:
            assert side.seen[i - 1] == (stamp, "odom")
    assert side._late == {"absolute": 0, "own": 0}


def test_a_pose_older_than_what_was_fused_is_fused_on_arrival_and_counted(small_bag, tmp_path):
    side = _Recording(replay_fusion.FusionSideSpec(bag=small_bag, out_bag=tmp_path / "bag"))
    side.read_bag()
    first = _odometry_stamps(small_bag)[0]
    side.add([(first + 3.0, "absolute", _pose(first + 3.0))], first + 5.0)
    side.add([(first + 0.5, "absolute", _pose(first + 0.5))], first + 5.0)  # the camera clock jumped back
    assert side.seen[-1] == (round(first + 0.5, 6), "absolute")
    assert side._late == {"absolute": 1, "own": 0}


@pytest.mark.parametrize("batch_size", [1, 7])
def test_child_process_and_in_process_fusion_give_identical_reports(small_bag, tiny_weights, tmp_path,
                                                                   batch_size):
    reports = {}
    for in_child in (True, False):
        out = tmp_path / f"child{in_child}"
        metrics = replay.run_replay(replay.ReplayOptions(
            bag=small_bag, out=out, weights=tiny_weights, device="cpu", batch_size=batch_size,
            progress=False, fusion_process=in_child))
        reports[in_child] = (metrics, read_tum(out / "fused.tum"))
    (m_child, fused_child), (m_here, fused_here) = reports[True], reports[False]
    assert m_child["sources"] == m_here["sources"]
    assert m_child["counts"] == m_here["counts"]
    assert m_child["counts"]["absolute_received"] == 24
    for a, b in zip(fused_child, fused_here):
        np.testing.assert_array_equal(a, b)


def test_a_fusion_side_error_comes_back_as_a_replay_error(small_bag, tiny_weights, tmp_path):
    with pytest.raises(replay.ReplayError, match="no TF path map -> nowhere"):
        replay.run_replay(replay.ReplayOptions(
            bag=small_bag, out=tmp_path / "r", weights=tiny_weights, device="cpu", progress=False,
            ground_truth="tf:map->nowhere"))
    assert not list(tmp_path.iterdir())


def test_a_dead_fusion_process_is_a_clear_error(small_bag, tmp_path):
    process = replay_fusion.FusionProcess(replay_fusion.FusionSideSpec(bag=small_bag, out_bag=tmp_path / "bag"))
    try:
        process._process.kill()
        with pytest.raises(replay.ReplayError, match="stopped unexpectedly"):
            process.finish()
    finally:
        process.close()


def test_result_bag_path_snapshots_grow_and_the_last_is_the_whole_fused_path(small_bag, tiny_weights, tmp_path):
    out = tmp_path / "r"
    replay.run_replay(replay.ReplayOptions(bag=small_bag, out=out, weights=tiny_weights, device="cpu",
                                           progress=False, fusion_process=False))
    snapshots = [(r.log_time_ns * 1e-9, len(r.msg.poses), r.msg.poses)
                 for r in read_messages(out / "bag", ["/vizloc/path"])]
    assert len(snapshots) >= 2
    lengths = [n for _, n, _ in snapshots]
    assert lengths == sorted(lengths)
    times = [t for t, _, _ in snapshots]
    assert all(b - a >= PATH_PERIOD_S - 1e-6 for a, b in zip(times[:-2], times[1:-1]))
    fused = read_tum(out / "fused.tum")
    final = snapshots[-1][2]
    assert len(final) == len(fused[0])
    # the path keeps the first output at each stamp, fused.tum the last: same stamps
    np.testing.assert_allclose([p.header.stamp.sec + p.header.stamp.nanosec * 1e-9 for p in final],
                               fused[0], atol=1e-6)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_the_fusion_child_starts_deaf_to_ctrl_c_and_the_parent_keeps_its_handlers(small_bag, tmp_path):
    def handler(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)  # as vizloc-replay's main() does
    # Python's own Ctrl-C handler, set here: a test run started in the background (or under
    # nohup) begins with SIGINT ignored, which would make the child's check below vacuous
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = replay_fusion.FusionProcess(replay_fusion.FusionSideSpec(bag=small_bag,
                                                                           out_bag=tmp_path / "bag"))
        try:
            status = Path(f"/proc/{process._process.pid}/status").read_text()
            ignored = int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)
            assert ignored & (1 << (signal.SIGINT - 1))
        finally:
            process.close()
        assert process._process.exitcode is not None
        assert signal.getsignal(signal.SIGTERM) is handler
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


class _Queued(_Recording):
    """Also records how much odometry / IMU was read ahead after each batch."""

    def __init__(self, spec):
        super().__init__(spec)
        self.ahead = []

    def add(self, events, image_stamp):
        super().add(events, image_stamp)
        if self._own:
            self.ahead.append((image_stamp, len(self._own), max(e[0] for e in self._own)))

    def _process(self, kind, payload):
        stamp = payload.stamp if kind == "absolute" else \
            payload.header.stamp.sec + payload.header.stamp.nanosec * 1e-9
        self.seen.append((stamp, kind))


def test_odometry_and_imu_are_read_as_the_fusion_goes_not_all_at_once(longer_bag, tmp_path):
    spec = replay_fusion.FusionSideSpec(bag=longer_bag, out_bag=tmp_path / "bag", imu_topic="/imu/data",
                                        use_imu=True)
    side = _Queued(spec)
    side.read_bag()
    assert side._own == []  # nothing read ahead before the first pose
    images = [header_stamp_sec(r.msg) for r in read_messages(longer_bag, ["/camera/image_raw"])]
    counts = topic_message_counts(longer_bag)
    total = counts["/odom"] + counts["/imu/data"]
    for k in range(0, len(images), 10):
        batch = images[k:k + 10]
        side.add([(s, "absolute", _pose(s)) for s in batch], batch[-1])
    # at most the two reorder windows (and one message) beyond what was fused is queued
    window = replay_fusion.IMAGE_REORDER_S + replay_fusion.OWN_REORDER_S
    for image_stamp, queued, newest in side.ahead[:-1]:
        assert newest <= image_stamp - replay_fusion.IMAGE_REORDER_S + window + 0.05
        assert queued < 0.5 * total
    side._release(np.inf)
    stamps = [s for s, _ in side.seen]
    assert stamps == sorted(stamps)
    assert sum(kind != "absolute" for _, kind in side.seen) == total
    assert sum(kind == "absolute" for _, kind in side.seen) == len(images)
    assert side._late == {"absolute": 0, "own": 0}
    assert len(side.odom_track) == counts["/odom"]


def test_an_odometry_message_stamped_behind_its_window_is_fused_on_arrival_and_counted(small_bag, tmp_path):
    def odom(stamp):
        sec = int(stamp)
        return BagMessage("/odom", "nav_msgs/msg/Odometry", 0, 0, NS(header=NS(
            stamp=NS(sec=sec, nanosec=int(round((stamp - sec) * 1e9))), frame_id="odom")))

    side = _Recording(replay_fusion.FusionSideSpec(bag=small_bag, out_bag=tmp_path / "bag"))
    side.read_bag()
    side._own_stream.close()
    arrivals = [10.0, 10.5, 11.0, 11.5, 12.0, 8.0, 12.5, 13.0, 13.5, 14.0]  # 8.0: the clock jumped back
    side._own_stream = iter([odom(s) for s in arrivals])
    side._own_left = {"/odom": len(arrivals)}
    side._own_front = {"/odom": -np.inf}
    # images at 12.0: fuse what is stamped before 11.0, reading odometry until it passes 12.0
    side.add([(10.7, "absolute", _pose(10.7))], 12.0)
    assert [s for s, _ in side.seen] == [10.0, 10.5, 10.7]
    side.add([], 14.0)  # reads 8.0 after 10.7 was fused: it goes next, out of order
    side._release(np.inf)
    assert [s for s, _ in side.seen][3:] == [8.0, 11.0, 11.5, 12.0, 12.5, 13.0, 13.5, 14.0]
    assert side._late == {"absolute": 0, "own": 1}


def _serialized(msg) -> bytes:
    return bytes(messages.rosbags_typestore().serialize_cdr(msg, msg.__msgtype__))


def test_the_result_bag_holds_exactly_the_messages_of_the_nodes_output_functions(small_bag, tiny_weights,
                                                                                  tmp_path, monkeypatch):
    """One output path: the events the replay fused, fed again to a fresh core and turned
    into messages by pipeline.outputs (what the nodes publish), give the result bag
    message for message; the replay adds only the whole path at the end."""
    events = []
    fuse = replay_fusion.FusionSide._process

    def recording(side, kind, payload):
        events.append((kind, payload))
        fuse(side, kind, payload)

    monkeypatch.setattr(replay_fusion.FusionSide, "_process", recording)
    out = tmp_path / "r"
    replay.run_replay(replay.ReplayOptions(bag=small_bag, out=out, weights=tiny_weights, device="cpu",
                                           progress=False, fusion_process=False))
    assert {kind for kind, _ in events} == {"absolute", "odom"}

    types, topics = messages.rosbags_types(), OutputTopics()
    core = FusionCore({}, FusionSettings())
    outputs = FusionMessages(core, types, topics)
    expected = defaultdict(list)
    for kind, payload in events:
        if kind == "absolute":
            items = absolute_pose_messages(types, payload, topics.absolute_pose)
            step = core.on_absolute(items[0][1])
        else:
            items, step = [], core.on_odometry(payload)
        if step.output is not None:
            items += outputs.of(step.output)
        for topic, msg in items:
            expected[topic].append(_serialized(msg))
    expected[topics.path].append(_serialized(outputs.path_now()[1]))  # the whole path, last

    written = defaultdict(list)
    for record in read_messages(out / "bag"):
        written[record.topic].append(_serialized(record.msg))
    assert set(written) == {topics.absolute_pose, topics.pose, topics.path, "/tf"}
    for topic in written:
        assert written[topic] == expected[topic], topic
    assert len(written[topics.pose]) > 20 and len(written[topics.path]) >= 2


def test_visual_odometry_and_coarse_poses_are_written_by_the_output_functions(tmp_path):
    """The regressor side's other outputs: the replay writes what the regressor node
    publishes, and feeds the fusion the very message it wrote."""
    spec = replay_fusion.FusionSideSpec(bag=Path("unused"), out_bag=tmp_path / "bag", odom_topic=None,
                                        visual_odometry=True, coarse_prior=True)
    side = replay_fusion.FusionSide(spec)
    side.open_output()
    odometry = OdometryPose(stamp=100.0, stamp_ns=100_000_000_000, frame_id="odom", child_frame_id="base_link",
                            t=np.array([1.0, 0.0, 0.0]), q=np.array([1.0, 0, 0, 0]), cov=np.eye(6) * 1e-3)
    fed = []  # what the fusion core is given
    for method in ("on_odometry", "on_coarse_pose"):
        original = getattr(side.core, method)
        setattr(side.core, method, lambda msg, original=original: (fed.append(msg), original(msg))[1])
    side._process("visual_odometry", odometry)
    side._process("prior", _pose(100.0))
    side._writer.close()
    side._writer = None
    types, topics = messages.rosbags_types(), OutputTopics()
    expected = visual_odometry_messages(types, odometry, topics.visual_odometry) + \
        absolute_pose_messages(types, _pose(100.0), topics.coarse_pose)
    written = [(r.topic, _serialized(r.msg)) for r in read_messages(tmp_path / "bag")]
    assert sorted(written) == sorted((topic, _serialized(msg)) for topic, msg in expected)
    assert [_serialized(m) for m in fed] == [_serialized(expected[0][1]), _serialized(expected[2][1])]
    assert side.core.counters["coarse_received"] == 1  # the node's path: the frame is checked
