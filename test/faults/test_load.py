"""Load, short (CI), through the regressor node's own threading (LatestFrameSlot +
FrameWorker + RegressorCore) and the fusion node's core (FusionCore on one thread)."""
import threading
import time

import numpy as np

from vizloc_ros.pipeline import FrameWorker, LatestFrameSlot


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
        deadline = time.monotonic() + 5.0
        while slot._item is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
    worker.stop()
    assert seen == ["good"] and errors == ["broken frame"] and worker.errors == 1
    assert not worker.is_alive()


def test_frame_worker_ends_when_on_error_says_so():
    slot = LatestFrameSlot()
    done = threading.Event()
    worker = FrameWorker(slot, lambda msg: 1 / 0, on_error=lambda exc: done.set() or False, poll_s=0.05).start()
    slot.put(object())
    assert done.wait(5.0)
    worker._thread.join(5.0)
    assert not worker.is_alive()
    slot.put(object())  # nothing takes it any more: the slot just holds the newest
    assert slot.received == 2
    np.testing.assert_equal(worker.errors, 1)
