"""Load, short (CI): images far faster than the network, odometry at 1 kHz, IMU at 2 kHz.

Through the regressor node's own threading (LatestFrameSlot + FrameWorker + RegressorCore)
and the fusion node's core (FusionCore on one thread). The 60 s runs with memory and
latency figures are ``benchmarks/fault_suite.py``'s.
"""
import threading
import time

import numpy as np
import pytest

import fault_cases as F
import load_harness as L
from vizloc_ros.pipeline.worker import FrameWorker, LatestFrameSlot


@pytest.fixture(scope="module")
def res(tmp_path_factory, fast_cpu):
    return F.Resources(tmp_path_factory.mktemp("load"))


def test_ten_times_more_images_than_the_network_serves(res):
    """Expected: the newest frame is always the one processed, the rest are counted drops,
    the latency stays near one service time, nothing non-finite is published."""
    size = (240, 320)
    service = L.service_time(res.estimator, size)
    rate = min(10.0 / service, 400.0)
    run = L.image_load(res.estimator, rate, seconds=1.5, size=size, sample_every=0.5)
    assert run["processed"] >= 3
    assert run["stale_frames_processed"] == 0 and run["nan_outputs"] == 0 and run["worker_errors"] == 0
    assert run["received"] == run["sent"]
    # every frame is either processed, replaced by a newer one (counted), or the last one
    assert run["sent"] - run["dropped_not_latest"] - run["processed"] in (0, 1)
    assert run["dropped_not_latest"] > run["processed"]
    # the newest frame is taken as soon as the worker is free: it was put at most one input
    # period (a tenth of a service time) before, so its wait is a small part of its latency
    # (wait + its own service); a queue would make the wait most of it. Judged against the
    # same run's own times, not a wall-clock bound that a loaded machine could miss.
    assert run["age_at_take_ms"]["median"] < 0.75 * run["latency_ms"]["median"]


def test_odometry_at_1khz_and_imu_at_2khz_keep_the_fusion_bounded_and_finite():
    """Expected: every message handled, outputs finite, the odometry / IMU history trimmed
    to ``buffer_seconds`` (memory does not grow with time), localized at the end."""
    run = L.fusion_load(seconds=2.5, odom_hz=1000, imu_hz=2000, abs_hz=10, paced=False, buffer_seconds=1.0)
    assert run["nan_outputs"] == 0
    assert run["messages"] == {"odom": 2500, "imu": 5000, "abs": 25}
    c = run["counters"]
    assert c["odom_accepted"] == 2500 and c["imu_accepted"] == 5000
    assert c["absolute_accepted"] + c["absolute_initialising"] == 25
    # history kept: buffer_seconds of it, plus at most the 256-entry trimming slack
    assert run["buffers"]["odometry"] <= 1.0 * 1000 + 300 and run["buffers"]["imu"] <= 1.0 * 2000 + 300
    assert run["final_error_m"] < 0.1


def test_frame_worker_survives_a_failing_frame_and_stops_when_asked():
    slot = LatestFrameSlot()
    seen, errors = [], []

    def handle(msg):
        if msg == "bad":
            raise RuntimeError("broken frame")
        seen.append(msg)

    worker = FrameWorker(slot, handle, on_error=lambda exc: errors.append(str(exc)) or True, poll_s=0.05).start()
    for msg in ("bad", "good"):
        slot.put(msg)
        deadline = time.monotonic() + 60.0  # taken by the worker; a loaded machine is only slower
        while slot._item is not None and time.monotonic() < deadline:
            time.sleep(0.01)
    worker.stop(timeout=60.0)  # the frame being processed finishes first
    assert seen == ["good"] and errors == ["broken frame"] and worker.errors == 1
    assert not worker.is_alive()


def test_frame_worker_ends_when_on_error_says_so():
    slot = LatestFrameSlot()
    done = threading.Event()
    worker = FrameWorker(slot, lambda msg: 1 / 0, on_error=lambda exc: done.set() or False, poll_s=0.05).start()
    slot.put(object())
    assert done.wait(60.0)  # a hang fails; a loaded machine only makes it slower
    worker._thread.join(60.0)
    assert not worker.is_alive()
    slot.put(object())  # nothing takes it any more: the slot just holds the newest
    assert slot.received == 2
    np.testing.assert_equal(worker.errors, 1)
