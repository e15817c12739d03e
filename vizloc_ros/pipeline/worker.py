"""The newest camera frame and the thread that runs it.

Why only the newest: a network slower than the camera must never build a queue; an
older frame waiting in a slot is dropped and counted instead.
"""
from __future__ import annotations

import threading



# --------------------------------------------------------------------------- frames

class LatestFrameSlot:
    """A one-element mailbox between a subscription callback and a worker thread.

    ``put`` never blocks: a frame not yet taken is replaced by the newer one and counted
    as dropped. ``take`` waits for a frame. Memory is bounded by one frame whatever the
    input rate, and the worker always processes the newest frame.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._item = None
        self._closed = False
        self.received = 0
        self.dropped = 0

    def put(self, item) -> bool:
        """Store ``item``; returns True when it replaced (dropped) an unprocessed one."""
        with self._cond:
            replaced = self._item is not None
            if replaced:
                self.dropped += 1
            self._item = item
            self.received += 1
            self._cond.notify()
            return replaced

    def take(self, timeout: float | None = None):
        """The newest item, or None on timeout / close."""
        with self._cond:
            if self._item is None and not self._closed:
                self._cond.wait(timeout)
            item, self._item = self._item, None
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class FrameWorker:
    """The regressor node's worker thread, ROS-free: newest frame of a slot -> ``handle``.

    The thread takes the newest frame from a :class:`LatestFrameSlot` and calls
    ``handle(msg)`` on it. An exception out of ``handle`` drops that frame (counted in
    ``errors``) and goes to ``on_error(exc)``; the worker goes on unless ``on_error``
    returns False (the node does when rclpy is shutting down). The node, the tests and
    ``benchmarks/fault_suite.py`` run this same loop.
    """

    def __init__(self, slot: LatestFrameSlot, handle, on_error=None, name: str = "vizloc_worker",
                 poll_s: float = 0.5):
        self.slot = slot
        self.handle = handle
        self.on_error = on_error
        self.poll_s = poll_s
        self.errors = 0
        self._running = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "FrameWorker":
        self._running = True
        self._thread.start()
        return self

    def _run(self) -> None:
        while self._running:
            msg = self.slot.take(timeout=self.poll_s)
            if msg is None:
                continue
            try:
                self.handle(msg)
            except Exception as exc:  # noqa: BLE001 - one bad frame never ends the worker
                self.errors += 1
                if self.on_error is not None and self.on_error(exc) is False:
                    return

    def stop(self, timeout: float = 5.0) -> None:
        """End the loop (the frame being processed finishes) and join the thread."""
        self._running = False
        self.slot.close()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()
