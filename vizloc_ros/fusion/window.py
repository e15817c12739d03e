"""Sliding-window pose-graph fusion of absolute camera poses with odometry and IMU.

Why a fixed-lag smoother: the network's absolute poses are noisy (decimetres), arrive
late (inference is slower than odometry) and sometimes wildly wrong. A pose graph over
the last few measurement stamps lets each absolute pose be inserted at its *own* stamp,
ties the poses together with the much more precise relative motion from odometry or an
IMU, and keeps a bounded cost because GTSAM's ``IncrementalFixedLagSmoother``
marginalises everything older than the window into a prior instead of dropping it.

Design choices (DESIGN.md is the contract):

* Graph keys are robot (``base_link``) poses at absolute-measurement stamps, plus
  velocity and IMU-bias states when IMU preintegration is on. Odometry and IMU samples
  are buffered and interpolated / integrated between those stamps, so the graph grows at
  the camera rate, not at the odometry rate. A new estimate is still available on every
  odometry message: the newest graph pose is propagated with the odometry increment.
* Every absolute measurement is gated (Mahalanobis, chi-square with 6 dof) against the
  prediction *before* it touches the graph, so a rejected measurement can never move the
  estimate; accepted ones additionally sit under a robust kernel.
* Quaternions are (w, x, y, z). ROS covariances are 6x6 over (x, y, z, rot_x, rot_y,
  rot_z) with the axes of the *parent* frame (``map`` / ``odom``), the robot_localization
  and AMCL habit; GTSAM's Pose3 covariances are over (rot, trans) in the body frame.
  :func:`gtsam_cov_to_ros` / :func:`ros_cov_to_gtsam` are the only place where the
  order is swapped (``_swap_rot_trans``) and where the body/parent axes are changed.
* Nothing here imports ROS: the node, bag replay and tests share this code. Stamps are
  message header stamps (float seconds), never the wall clock.
* No public method lets an exception out: bad input is a counted drop, a GTSAM failure
  (e.g. an indeterminant linear system) rebuilds the graph from the last good estimate,
  and no output ever contains NaN.

:class:`SlidingWindowFusion` is the facade: it validates messages, counts what happened and
decides the order of things; the parts do one job each: :mod:`.buffers` (odometry / IMU
samples), :mod:`.motion` (relative motion and preintegration), :mod:`.graph` (keys,
edges, smoother), :mod:`.prediction`, :mod:`.gating` (gate, (re)initialisation) and
:mod:`.estimate` (results and the fused estimate).
"""
from __future__ import annotations

import math

import gtsam
import numpy as np

from vizloc_ros.fusion.adaptive import NoiseScale
from vizloc_ros.fusion.buffers import SensorBuffers
from vizloc_ros.fusion.config import FusionConfig
from vizloc_ros.fusion.conventions import pose3
from vizloc_ros.fusion.estimate import EstimateAssembler, FusedEstimate, MeasurementResult
from vizloc_ros.fusion.gating import Gate
from vizloc_ros.fusion.graph import GraphFailure, WindowGraph
from vizloc_ros.fusion.measurements import (DUPLICATE_S, Measurement, as_cov, as_quat, as_stamp,
                                            as_vector, pose_measurement)
from vizloc_ros.fusion.motion import MotionModel
from vizloc_ros.fusion.prediction import Predictor

__all__ = ["SlidingWindowFusion", "MeasurementResult", "FusedEstimate"]

_COUNTER_NAMES = ("accepted", "rejected", "dropped", "reinitialisations", "initialising",
                  "initialisations", "initial_poses", "odometry", "odometry_dropped",
                  "imu", "imu_dropped", "resets", "time_jumps", "graph_failures", "errors",
                  "fallback_edges", "edges_upgraded", "coarse_priors", "coarse_ignored")


class SlidingWindowFusion:
    """Fixed-lag pose graph over absolute camera poses, odometry and IMU.

    Plain numpy in and out; see the module docstring for conventions. Typical use::

        fusion = SlidingWindowFusion(FusionConfig(window_size=20))
        fusion.add_odometry(stamp, t, q_wxyz, cov_ros)      # odom_T_base, every message
        result = fusion.add_absolute(stamp, t_cam, q_cam, cov_ros)   # map_T_camera
        est = fusion.estimate()                               # FusedEstimate or None
    """

    def __init__(self, config: FusionConfig | None = None):
        self.config = config if config is not None else FusionConfig()
        if not isinstance(self.config, FusionConfig):
            raise ValueError("config must be a FusionConfig")
        c = self.config
        self.counters = {name: 0 for name in _COUNTER_NAMES}
        base_T_cam = pose3(*c.base_T_camera)
        self._cam_T_base = base_T_cam.inverse()
        self._ad_base_cam = base_T_cam.AdjointMap()
        self._floor_abs = np.diag([c.min_abs_sigma_rot ** 2] * 3 + [c.min_abs_sigma_trans ** 2] * 3)
        self._sensors = SensorBuffers()
        self._motion = MotionModel(c, self._sensors)
        self._graph = WindowGraph(c, self._motion, self.counters, on_failure=self._recover)
        self._predictor = Predictor(self._graph, self._motion)
        self._gate = Gate(c, self._motion)
        self._output = EstimateAssembler(c, base_T_cam, self._graph, self._motion, self._predictor)
        self._noise_scale = NoiseScale(c.abs_cov_adaptive_window)
        self.initialised_from: list[float] = []   # stamps used by the last (re)initialisation

    # ------------------------------------------------------------------ state handling

    def _clear_window(self):
        """Forget the graph and what was gathered against it (the sensors stay)."""
        self._graph.clear()
        self._gate.clear()
        self._output.clear()

    def reset(self) -> None:
        """Forget the graph and the sensor history (counters are kept)."""
        self._sensors.clear()
        self._motion.forget()
        self._clear_window()
        self._gate.too_old_streak = 0
        self._noise_scale.clear()
        self.counters["resets"] += 1

    @property
    def initialised(self) -> bool:
        return self._graph.latest is not None

    # ------------------------------------------------------------------ public: sensors

    def add_odometry(self, stamp, t, q_wxyz, cov_ros=None) -> MeasurementResult:
        """Record an ``odom -> base_link`` pose (nav_msgs/Odometry). Zero covariance is
        fine (the configured floor applies). Never raises."""
        try:
            s = as_stamp(stamp)
            if not self.config.use_odom:
                return MeasurementResult("dropped", "odometry not used (use_odom is false)", s)
            t = as_vector(t, 3, "odometry translation")
            q = as_quat(q_wxyz, "odometry quaternion")
            cov = np.zeros((6, 6)) if cov_ros is None else as_cov(cov_ros, "odometry covariance")
            sensors = self._sensors
            if sensors.odom_t:
                last = sensors.odom_t[-1]
                if s < last - self.config.time_jump_s:
                    self._time_jump(s)
                elif s <= last:
                    self.counters["odometry_dropped"] += 1
                    return MeasurementResult("dropped", "odometry stamp not after the previous one", s)
            sensors.add_odometry(s, pose3(t, q), cov)
            self.counters["odometry"] += 1
            sensors.trim(self.config.buffer_seconds)
            self._graph.upgrade_pending()
            return MeasurementResult("accepted", "odometry recorded", s)
        except Exception as exc:  # noqa: BLE001 - never let anything out of an update
            return self._internal_error(stamp, exc, "odometry_dropped")

    def add_imu(self, stamp, gyro, accel) -> MeasurementResult:
        """Record an IMU sample (rad/s and m/s^2 in the IMU frame, ``base_T_imu``). The
        sample is held until the next one (zero-order hold). Never raises."""
        try:
            s = as_stamp(stamp)
            if not self.config.use_imu:
                return MeasurementResult("dropped", "IMU not used (use_imu is false)", s)
            g = as_vector(gyro, 3, "gyro")
            a = as_vector(accel, 3, "accel")
            sensors = self._sensors
            if sensors.imu_t:
                last = sensors.imu_t[-1]
                if s < last - self.config.time_jump_s:
                    self._time_jump(s)
                elif s <= last:
                    self.counters["imu_dropped"] += 1
                    return MeasurementResult("dropped", "IMU stamp not after the previous one", s)
            sensors.add_imu(s, g, a)
            self.counters["imu"] += 1
            if len(sensors.imu_t) % 64 == 0:
                sensors.trim(self.config.buffer_seconds)
                self._graph.upgrade_pending()
            elif self._graph.has_pending():
                self._graph.upgrade_pending()
            return MeasurementResult("accepted", "IMU sample recorded", s)
        except Exception as exc:  # noqa: BLE001
            return self._internal_error(stamp, exc, "imu_dropped")

    def _time_jump(self, s):
        """A stamp far in the past: a looping bag or a restarted clock. Start over cleanly."""
        self.counters["time_jumps"] += 1
        self.reset()

    # ------------------------------------------------------------------ public: absolute

    def _base_measurement(self, s, t_cam, q_cam_wxyz, cov_ros, what: str) -> Measurement:
        """A ``map -> camera`` pose message as a validated ``map -> base_link`` measurement
        (ValueError naming the bad field); its stamp now counts as seen."""
        m_cam, cov_cam = pose_measurement(t_cam, q_cam_wxyz, cov_ros, what)
        A = self._ad_base_cam
        meas = Measurement(s, m_cam.compose(self._cam_T_base),
                           self.config.abs_cov_scale * (A @ cov_cam @ A.T) + self._floor_abs)
        self._sensors.newest = max(self._sensors.newest, s)
        return meas

    def add_absolute(self, stamp, t_cam, q_cam_wxyz, cov_ros) -> MeasurementResult:
        """Fuse one ``map -> camera`` pose from the network with its 6x6 covariance (ROS
        order, map axes). Inserted at its own stamp, gated, robustly weighted. Never raises."""
        try:
            s = as_stamp(stamp)
            try:
                meas = self._base_measurement(s, t_cam, q_cam_wxyz, cov_ros, "")
            except ValueError as exc:
                return self._drop(s, str(exc))
            network_cov = meas.cov
            meas.cov = self._noise_scale.apply(network_cov)
            return self._process(meas, network_cov)
        except Exception as exc:  # noqa: BLE001
            return self._internal_error(stamp, exc, "dropped")

    def add_coarse_prior(self, stamp, t_cam, q_cam_wxyz, cov_ros) -> MeasurementResult:
        """A coarse ``map -> camera`` pose (image retrieval such as NetVLAD) used only to
        initialise and to recover from kidnapping, never to refine a running estimate.

        While the window is empty it takes part in the initialisation like an absolute
        measurement (with its own, large covariance). Once running, one that agrees with the
        estimate is ignored (status ``dropped``, counted as ``coarse_ignored``); one that
        fails the gate counts towards the kidnapped-robot check with the rejected absolute
        measurements, so ``kidnap_consecutive`` mutually consistent ones restart the window
        there. Never raises."""
        try:
            s = as_stamp(stamp)
            try:
                meas = self._base_measurement(s, t_cam, q_cam_wxyz, cov_ros, "coarse prior ")
            except ValueError as exc:
                return self._drop(s, str(exc))
            self.counters["coarse_priors"] += 1
            if not self.initialised:
                return self._initialise_step(meas)
            if s < self._graph.window_start():
                return self._drop(s, "older than the window")
            pred, cov_pred = self._predictor.predict(s)
            d2 = self._gate.mahalanobis2(pred, cov_pred, meas)
            if d2 <= self._gate.threshold:
                self.counters["coarse_ignored"] += 1
                return MeasurementResult("dropped", "coarse prior agrees with the estimate (not fused)", s, d2)
            self.counters["rejected"] += 1
            result = self._kidnap_check(meas, d2)
            if result is not None:
                return result
            return MeasurementResult("rejected", f"coarse prior failed the {self.config.gate_probability:.3g} "
                                     f"gate (d2={d2:.1f} > {self._gate.threshold:.1f})", s, d2)
        except Exception as exc:  # noqa: BLE001
            return self._internal_error(stamp, exc, "dropped")

    def set_initial_pose(self, stamp, t_base, q_base, cov_ros) -> MeasurementResult:
        """``/initialpose``: restart the graph from this ``map -> base_link`` pose and its
        covariance (ROS order). Sensor history is kept. A stamp <= 0 (rviz sometimes sends
        none) means "now": just before the newest stamp seen, so that a network pose
        stamped like that newest message (cameras and odometry often share stamps) is
        still fused rather than dropped as a duplicate of the initial pose. Never raises."""
        try:
            s = float(stamp)
            newest = self._sensors.newest
            if not math.isfinite(s) or s <= 0.0:
                s = newest - 2 * DUPLICATE_S if math.isfinite(newest) else 0.0
            try:
                pose, cov_g = pose_measurement(t_base, q_base, cov_ros, "initial pose ")
            except ValueError as exc:
                return self._drop(s, str(exc))
            latest = self._graph.latest
            bias = latest.bias if (latest is not None and self._motion.nav) else None
            self._clear_window()
            self._gate.too_old_streak = 0
            self._graph.start(Measurement(s, pose, cov_g + self._floor_abs), robust=False, bias=bias)
            self.counters["initial_poses"] += 1
            self.initialised_from = [s]
            return MeasurementResult("accepted", "initial pose set", s)
        except Exception as exc:  # noqa: BLE001
            return self._internal_error(stamp, exc, "dropped")

    # ------------------------------------------------------------------ absolute logic

    def _drop(self, s, reason) -> MeasurementResult:
        self.counters["dropped"] += 1
        return MeasurementResult("dropped", reason, float(s) if math.isfinite(float(s)) else math.nan)

    def _internal_error(self, stamp, exc, counter) -> MeasurementResult:
        self.counters["errors"] += 1
        self.counters[counter] += 1
        self._recover()
        try:
            s = float(stamp)
        except (TypeError, ValueError):
            s = math.nan
        return MeasurementResult("dropped", f"internal error: {type(exc).__name__}: {exc}", s)

    def _process(self, meas: Measurement, network_cov: np.ndarray) -> MeasurementResult:
        """An absolute measurement while running: drop, gate, then insert (or restart).
        ``network_cov``: its covariance before the online scale, for that scale's update."""
        s = meas.stamp
        if not self.initialised:
            return self._initialise_step(meas)
        graph, gate = self._graph, self._gate
        if s < graph.window_start():
            gate.too_old_streak += 1
            if gate.too_old_streak >= 3 and s < graph.key_stamps[-1] - self.config.time_jump_s:
                # Several in a row far in the past: the clock jumped back (bag loop).
                self.counters["time_jumps"] += 1
                self._clear_window()
                gate.too_old_streak = 0
                return self._initialise_step(meas)
            return self._drop(s, "older than the window")
        gate.too_old_streak = 0
        if graph.has_key_at(s):
            return self._drop(s, "duplicate stamp (a pose already exists at this time)")
        pred, cov_pred = self._predictor.predict(s)
        d2 = gate.mahalanobis2(pred, cov_pred, meas)
        if d2 <= gate.kidnap_threshold:  # outliers and kidnaps say nothing of the network's noise
            self._noise_scale.observe(gtsam.Pose3.Logmap(pred.between(meas.pose)), cov_pred, network_cov)
        if d2 > gate.threshold:
            self.counters["rejected"] += 1
            result = self._kidnap_check(meas, d2)
            if result is not None:
                return result
            return MeasurementResult("rejected", f"failed the {self.config.gate_probability:.3g} "
                                     f"gate (d2={d2:.1f} > {gate.threshold:.1f})", s, d2)
        try:
            graph.insert(meas, pred)
        except GraphFailure as exc:
            return self._drop(s, f"optimiser failure, rebuilt from the last estimate: {exc}")
        self.counters["accepted"] += 1
        gate.streak.clear()
        gate.rejected_since = None
        return MeasurementResult("accepted", "fused", s, d2)

    def _candidate_horizon(self, meas: Measurement) -> float:
        """Oldest stamp a (re)initialisation candidate may have next to ``meas``."""
        return meas.stamp - max(self._graph.window_span_estimate(), 1.0)

    def _initialise_step(self, meas: Measurement) -> MeasurementResult:
        """Buffer measurements until ``init_consistent`` of them agree, then start from them."""
        c = self.config
        subset = self._gate.offer_initial(meas, self._candidate_horizon(meas))
        if subset is None:
            self.counters["initialising"] += 1
            return MeasurementResult("initialising", f"waiting for {c.init_consistent} mutually "
                                     "consistent measurements", meas.stamp)
        self._start_from(subset)
        self.counters["initialisations"] += 1
        self.counters["accepted"] += 1      # the others were counted as "initialising"
        return MeasurementResult("accepted", f"initialised from {len(subset)} consistent "
                                 "measurements", meas.stamp)

    def _kidnap_check(self, meas: Measurement, d2: float) -> MeasurementResult | None:
        """Kidnapped robot: consecutive rejected measurements that agree with each other
        mean the estimate, not the network, is wrong; restart from them."""
        gate = self._gate
        if gate.rejected_since is None:
            gate.rejected_since = meas.stamp
        subset = gate.offer_rejected(meas, self._candidate_horizon(meas))
        if subset is None:
            return None
        # A network error correlated over seconds also gives consistent rejected poses, but
        # not for long and rarely far: restart at once only far beyond the gate, otherwise
        # once the gate has rejected every pose for longer than such an error lasts.
        far = d2 > gate.kidnap_threshold
        lasting = meas.stamp - gate.rejected_since >= self.config.abs_correlation_time
        if not (far or lasting):
            return None
        self.counters["rejected"] -= 1        # this one is used after all
        self._start_from(subset, keep_bias=True)
        self.counters["reinitialisations"] += 1
        self.counters["accepted"] += 1
        return MeasurementResult("accepted", f"re-initialised from {len(subset)} consistent "
                                 "rejected measurements (kidnapped robot)", meas.stamp, d2)

    def _start_from(self, subset: list[Measurement], keep_bias: bool = False):
        latest = self._graph.latest
        bias = latest.bias if (keep_bias and latest is not None and self._motion.nav) else None
        self._clear_window()
        self._graph.start(subset[0], robust=True, bias=bias)
        for m in subset[1:]:
            pred, _ = self._predictor.predict(m.stamp)
            self._graph.insert(m, pred)
        self.initialised_from = [m.stamp for m in subset]

    def _recover(self):
        """Clean restart from the last good estimate (or uninitialised if there is none)."""
        latest = self._graph.latest
        self._clear_window()
        if latest is None:
            return
        try:
            self._graph.start(Measurement(latest.stamp, latest.pose, latest.cov * 1.5
                                          + self._floor_abs), robust=False,
                              bias=latest.bias if self._motion.nav else None)
            self.counters["resets"] += 1
        except Exception:  # noqa: BLE001 - give up on the graph, start over
            self._clear_window()

    # ------------------------------------------------------------------ output

    def estimate(self) -> FusedEstimate | None:
        """Newest fused pose: the newest graph pose propagated to the newest odometry (or,
        without odometry, IMU) stamp. None before initialisation. Never raises, never NaN."""
        try:
            return self._output.estimate()
        except Exception:  # noqa: BLE001
            self.counters["errors"] += 1
            return self._output.plain_estimate()
