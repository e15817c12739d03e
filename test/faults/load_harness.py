"""Load runs through the nodes' own code, shared by test_load.py (short) and
benchmarks/fault_suite.py (60 s, with memory and latency figures).

* :func:`image_load`: images at a given rate through the regressor node's threading
  (LatestFrameSlot + FrameWorker + RegressorCore + the message it publishes);
* :func:`fusion_load`: odometry, IMU and network poses into FusionCore on one thread, as
  the fusion node's executor runs it, with the node's subscription queue depths.
"""
from __future__ import annotations

import os
import resource
import threading
import time

import numpy as np

from fault_cases import TYPES, T0, _abs, _finite, _imu, _odom, _truth
from vizloc_ros.ros_io import messages
from vizloc_ros.fusion import FusionConfig
from vizloc_ros.pipeline.diagnostics import RateMeter
from vizloc_ros.pipeline.fusion_core import FusionCore, FusionSettings
from vizloc_ros.pipeline.outputs import OutputTopics, regressor_messages
from vizloc_ros.pipeline.regressor import RegressorCore
from vizloc_ros.pipeline.worker import FrameWorker, LatestFrameSlot

#: the fusion node's subscription depths (KEEP_LAST): odometry sensor_qos(50), IMU
#: sensor_qos(400), absolute poses reliable_qos(10); a late executor loses the oldest
NODE_QUEUE_DEPTHS = {"odom": 50, "imu": 400, "abs": 10}


def rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc; the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_bytes() -> int:
    """Peak resident memory of this process image (VmHWM: unlike ru_maxrss it is not
    inherited from the parent across fork + exec)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def service_time(estimator, size=(480, 640), frames: int = 8) -> float:
    """Median seconds the regressor core needs for one frame (decode + network + base pose)."""
    core = RegressorCore(estimator, base_T_camera=((0.1, 0.0, 0.2), (0.5, -0.5, 0.5, -0.5)))
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    times = []
    for k in range(frames):
        msg = messages.make_image(TYPES, T0 + k, "camera", pixels)
        start = time.perf_counter()
        core.process(msg)
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


def _recording_slot():
    """A LatestFrameSlot that also notes, under its own lock, the newest stamp put, so the
    worker can check it was handed the newest frame (the property the slot promises)."""
    class Recording(LatestFrameSlot):
        def __init__(self):
            super().__init__()
            self.newest_put = None
            self.newest_at_take = None

        def put(self, item):
            with self._cond:
                self.newest_put = messages.header_stamp_ns(item)
                return super().put(item)

        def take(self, timeout=None):
            with self._cond:
                item = super().take(timeout)
                self.newest_at_take = self.newest_put
                return item
    return Recording()


def image_load(estimator, rate_hz: float, seconds: float, size=(480, 640), sample_every: float = 1.0) -> dict:
    """Images at ``rate_hz`` for ``seconds`` through the regressor node's own path.

    A producer thread plays the subscription callback (``slot.put`` + the rate meter, as
    ``RegressorNode._on_image``); a :class:`~vizloc_ros.pipeline.worker.FrameWorker` runs
    ``RegressorCore.process`` and builds the message the node publishes. Each frame is a
    new buffer stamped with the wall clock when it is made (the camera's capture time), so
    latency = publish time - stamp, as a subscriber would measure it.
    """
    slot = _recording_slot()
    core = RegressorCore(estimator, base_T_camera=((0.1, 0.0, 0.2), (0.5, -0.5, 0.5, -0.5)))
    meter = RateMeter()
    lock = threading.Lock()
    processed = []  # (stamp, age at take, latency)
    state = {"stale": 0, "nan": 0, "errors": 0}
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(4)]

    def handle(msg):
        taken = time.time()
        stamp_ns = messages.header_stamp_ns(msg)
        if slot.newest_at_take is not None and stamp_ns != slot.newest_at_take:
            state["stale"] += 1
        pose = core.process(msg).pose
        if pose is None:
            return
        if not _finite(pose.t, pose.q, pose.cov):
            state["nan"] += 1
            return
        regressor_messages(TYPES, pose, OutputTopics())  # what the node publishes
        done = time.time()
        with lock:
            processed.append((stamp_ns * 1e-9, taken - stamp_ns * 1e-9, done - stamp_ns * 1e-9))

    def on_error(exc):
        state["errors"] += 1
        state["last_error"] = f"{type(exc).__name__}: {exc}"
        return True

    worker = FrameWorker(slot, handle, on_error, name="load_worker").start()
    rss = [(0.0, rss_bytes())]
    period = 1.0 / rate_hz
    start = time.perf_counter()
    next_sample = sample_every
    sent = 0
    while True:
        now = time.perf_counter() - start
        if now >= seconds:
            break
        target = sent * period
        if target > now:
            time.sleep(target - now)
        frame = frames[sent % len(frames)].copy()  # a new buffer per message, as DDS delivers
        slot.put(messages.make_image(TYPES, time.time(), "camera_optical_frame", frame))
        meter.tick()
        sent += 1
        if now >= next_sample:
            rss.append((now, rss_bytes()))
            next_sample += sample_every
    elapsed = time.perf_counter() - start
    worker.stop(timeout=10.0)
    rss.append((elapsed, rss_bytes()))
    lat = np.array([p[2] for p in processed]) if processed else np.zeros(0)
    age = np.array([p[1] for p in processed]) if processed else np.zeros(0)
    third = max(1, len(lat) // 3)

    def ms(values, q):
        return round(1000 * float(np.percentile(values, q)), 2) if len(values) else None
    return {
        "input_hz_requested": rate_hz, "input_hz_achieved": round(sent / elapsed, 2), "seconds": round(elapsed, 2),
        "image_size": list(size), "sent": sent, "received": slot.received, "dropped_not_latest": slot.dropped,
        "processed": len(processed), "processed_hz": round(len(processed) / elapsed, 2),
        "stale_frames_processed": state["stale"], "nan_outputs": state["nan"], "worker_errors": state["errors"],
        "core_counters": dict(core.counters),
        "latency_ms": {"median": ms(lat, 50), "p95": ms(lat, 95), "max": ms(lat, 100),
                       "first_third_median": ms(lat[:third], 50), "last_third_median": ms(lat[-third:], 50)},
        "age_at_take_ms": {"median": ms(age, 50), "p95": ms(age, 95)},
        "rss_mb": {"start": round(rss[0][1] / 2**20, 1), "end": round(rss[-1][1] / 2**20, 1),
                   "max": round(max(r[1] for r in rss) / 2**20, 1),
                   "after_5s": round(next((r[1] for r in rss if r[0] >= 5.0), rss[-1][1]) / 2**20, 1),
                   # the steady state: the largest sample from 5 s on (the end sample alone
                   # can be low when the kernel evicts file-backed pages of the libraries)
                   "max_after_5s": round(max([r[1] for r in rss if r[0] >= 5.0] or [rss[-1][1]]) / 2**20, 1)},
        "rss_samples_mb": [(round(t, 1), round(b / 2**20, 1)) for t, b in rss],
        "input_rate_meter_hz": round(meter.rate(), 1),
    }


def fusion_load(seconds: float, odom_hz: float = 1000.0, imu_hz: float = 2000.0, abs_hz: float = 10.0,
                paced: bool = True, buffer_seconds: float | None = None, sample_every: float = 1.0,
                depths: dict | None = None) -> dict:
    """Odometry, IMU and absolute poses into FusionCore, one thread (the node's executor).

    Messages are made on the fly in stamp order. ``paced`` plays them at their stamps in
    wall time (latency = handled - stamp); otherwise as fast as possible (capacity). With
    ``depths`` (e.g. :data:`NODE_QUEUE_DEPTHS`) a paced run keeps, like a KEEP_LAST
    subscription, only the newest ``depth`` messages of a stream that are waiting: when
    the executor is late the oldest are lost (counted), as in the node.
    """
    config = FusionConfig()
    if buffer_seconds is not None:
        config.buffer_seconds = buffer_seconds
    core = FusionCore(config, FusionSettings(use_imu=imu_hz > 0))
    streams = [(1.0 / odom_hz, "odom")] + ([(1.0 / imu_hz, "imu")] if imu_hz > 0 else []) + [(1.0 / abs_hz, "abs")]
    counters = {kind: 0 for _, kind in streams}
    dropped = {kind: 0 for _, kind in streams}
    totals = {kind: int(np.ceil(seconds / period)) for period, kind in streams}
    depths = depths or {}
    latency = {kind: [] for _, kind in streams}  # handled - due (paced) or handled - start
    work = {kind: [] for _, kind in streams}     # building the message + the core's work
    nan = 0
    rss = [(0.0, rss_bytes())]
    start = time.perf_counter()
    next_sample = sample_every
    offsets = {"odom": 0.0, "imu": 1e-5, "abs": 2e-5}
    while True:
        # the next message in stamp order
        due, kind = min(((counters[kind] * period + offsets[kind], kind) for period, kind in streams))
        if due >= seconds:
            break
        counters[kind] += 1
        if paced:
            now = time.perf_counter() - start
            if due > now:
                time.sleep(due - now)
            elif kind in depths:  # late: how many of this stream wait in its queue?
                period = dict((k, v) for v, k in streams)[kind]
                arrived = min(int((now - offsets[kind]) / period) + 1, totals[kind])
                waiting = arrived - (counters[kind] - 1)
                if waiting > depths[kind]:  # KEEP_LAST: the oldest are gone
                    skip = waiting - depths[kind]
                    dropped[kind] += skip
                    counters[kind] += skip
                    due = (counters[kind] - 1) * period + offsets[kind]
        stamp = T0 + due
        begun = time.perf_counter()
        if kind == "odom":
            out = core.on_odometry(_odom(stamp)).output
        elif kind == "imu":
            out = core.on_imu(_imu(stamp)).output
        else:
            out = core.on_absolute(_abs(stamp)).output
        if out is not None and not _finite(out.t, out.q, out.cov):
            nan += 1
        handled = time.perf_counter() - start
        work[kind].append(handled - (begun - start))
        latency[kind].append(handled - due if paced else handled)
        if handled >= next_sample:
            rss.append((handled, rss_bytes()))
            next_sample += sample_every
    elapsed = time.perf_counter() - start
    rss.append((elapsed, rss_bytes()))
    estimate = core.fusion.estimate()
    if estimate is None or not _finite(estimate.t, estimate.cov_ros):
        nan += 1
    result = {"seconds_of_messages": seconds, "wall_seconds": round(elapsed, 2),
              "realtime_factor": round(seconds / elapsed, 2), "paced": paced,
              "rates_hz": {"odom": odom_hz, "imu": imu_hz, "abs": abs_hz}, "messages": counters,
              "queue_depths": depths, "dropped_by_queue": dropped,
              "nan_outputs": nan, "counters": dict(core.counters),
              "final_error_m": None if estimate is None else round(float(np.linalg.norm(estimate.t - _truth(T0 + seconds))), 4),
              "rss_mb": {"start": round(rss[0][1] / 2**20, 1), "end": round(rss[-1][1] / 2**20, 1),
                         "max": round(max(r[1] for r in rss) / 2**20, 1),
                         # the odometry / IMU history is full after buffer_seconds (30 s by default)
                         "at_60pct": round(next((r[1] for r in rss if r[0] >= 0.6 * seconds), rss[-1][1]) / 2**20, 1)},
              "rss_samples_mb": [(round(t, 1), round(b / 2**20, 1)) for t, b in rss],
              "buffers": {"odometry": len(core.fusion._sensors.odom_t), "imu": len(core.fusion._sensors.imu_t)}}
    def stats(values):
        v = np.asarray(values)
        tail = v[-max(1, len(v) // 6):]  # the last sixth: the last 10 s of a 60 s run
        return {"median": round(1000 * float(np.median(v)), 3), "p99": round(1000 * float(np.percentile(v, 99)), 3),
                "max": round(1000 * float(np.max(v)), 3), "last_sixth_median": round(1000 * float(np.median(tail)), 3),
                "last_sixth_p99": round(1000 * float(np.percentile(tail, 99)), 3)}
    result["work_ms"] = {k: stats(v) for k, v in work.items() if v}
    if paced:
        result["latency_ms"] = {k: stats(v) for k, v in latency.items() if v}
    return result
