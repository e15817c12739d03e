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
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import gtsam
import numpy as np

from vizloc_ros.fusion.config import FusionConfig
from vizloc_ros.fusion.conventions import chi2_quantile, gtsam_cov_to_ros, map_to_odom, ros_cov_to_gtsam

try:  # GTSAM >= 4.3 ships the fixed-lag smoothers in the main module
    from gtsam import IncrementalFixedLagSmoother
except ImportError:  # pragma: no cover - GTSAM 4.2 keeps them in gtsam_unstable
    from gtsam_unstable import IncrementalFixedLagSmoother

try:
    from gtsam import FixedLagSmootherKeyTimestampMap
except ImportError:  # pragma: no cover - GTSAM 4.2
    try:
        from gtsam_unstable import FixedLagSmootherKeyTimestampMap
    except ImportError:
        FixedLagSmootherKeyTimestampMap = None

__all__ = ["SlidingWindowFusion", "MeasurementResult", "FusedEstimate"]

_DUPLICATE_S = 1e-3      # two poses closer than this in time would make a singular edge


def _pose3(t, q_wxyz) -> gtsam.Pose3:
    return gtsam.Pose3(gtsam.Rot3.Quaternion(float(q_wxyz[0]), float(q_wxyz[1]),
                                             float(q_wxyz[2]), float(q_wxyz[3])),
                       np.asarray(t, dtype=float))


def _tq(pose: gtsam.Pose3):
    """gtsam.Pose3 -> (t, q_wxyz) with w >= 0."""
    x, y, z, w = pose.rotation().toQuaternion().coeffs()
    q = np.array([w, x, y, z])
    if w < 0.0:
        q = -q
    return np.array(pose.translation(), dtype=float), q / np.linalg.norm(q)


def _transport(cov: np.ndarray, delta: gtsam.Pose3) -> np.ndarray:
    """Covariance of X * delta (GTSAM right perturbation) given the covariance of X."""
    A = delta.inverse().AdjointMap()
    return A @ cov @ A.T


def _finite(a: np.ndarray) -> bool:
    """All entries finite (a NaN or inf anywhere makes the sum non-finite)."""
    return math.isfinite(float(np.sum(a)))


def _as_vector(x, n: int, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=float).reshape(-1)
    if a.shape != (n,):
        raise ValueError(f"{name} must have {n} elements, got {a.size}")
    if not _finite(a):
        raise ValueError(f"{name} is not finite")
    return a


def _as_cov(x, name: str) -> np.ndarray:
    c = np.asarray(x, dtype=float)
    if c.size == 36:
        c = c.reshape(6, 6)
    if c.shape != (6, 6):
        raise ValueError(f"{name} must be 6x6 (or 36 values), got shape {c.shape}")
    if not _finite(c):
        raise ValueError(f"{name} is not finite")
    return 0.5 * (c + c.T)


def _as_quat(x, name: str) -> np.ndarray:
    q = _as_vector(x, 4, name)
    n = float(np.linalg.norm(q))
    if n < 1e-9:
        raise ValueError(f"{name} is a zero quaternion")
    return q / n


def _pose_measurement(t, q_wxyz, cov_ros, what: str):
    """Validated (Pose3, covariance in GTSAM tangent order and body axes) of a pose message;
    ValueError naming the problem (``what`` prefixes the field names)."""
    t = _as_vector(t, 3, f"{what}translation")
    q = _as_quat(q_wxyz, f"{what}quaternion")
    cov = _as_cov(cov_ros, f"{what}covariance")
    pose = _pose3(t, q)
    cov_g = ros_cov_to_gtsam(cov, rotation=pose.rotation().matrix())
    try:
        np.linalg.cholesky(cov_g)
    except np.linalg.LinAlgError:
        raise ValueError(f"{what}covariance is not positive definite") from None
    return pose, cov_g


def _stamp(x, name: str = "stamp") -> float:
    s = float(x)
    if not math.isfinite(s):
        raise ValueError(f"{name} is not finite")
    return s


# --------------------------------------------------------------------------- results

@dataclass(frozen=True)
class MeasurementResult:
    """What happened to one message: ``status`` is accepted | rejected | dropped |
    initialising; ``reason`` says why in words; ``mahalanobis2`` is the gate statistic."""

    status: str
    reason: str
    stamp: float
    mahalanobis2: float | None = None

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"


@dataclass(frozen=True)
class FusedEstimate:
    """Fused ``map -> base_link`` pose at ``stamp`` with its 6x6 covariance in ROS order
    (parent-frame axes), the camera pose (``map_T_base * base_T_camera``) and, when odometry
    is fused, the REP-105 ``map -> odom`` transform. ``graph_stamp`` is the stamp of the
    newest graph pose; ``stamp`` is later when odometry / IMU propagated it."""

    stamp: float
    t: np.ndarray
    q: np.ndarray
    cov_ros: np.ndarray
    t_cam: np.ndarray
    q_cam: np.ndarray
    map_T_odom: tuple | None
    graph_stamp: float
    velocity: np.ndarray | None = None     # map frame, IMU preintegration only
    imu_bias: np.ndarray | None = None     # (accel xyz, gyro xyz), IMU preintegration only


# --------------------------------------------------------------------------- internals

class _Meas:
    """An absolute measurement already mapped to the base frame (GTSAM types)."""

    __slots__ = ("stamp", "pose", "cov")

    def __init__(self, stamp, pose, cov):
        self.stamp = stamp
        self.pose = pose
        self.cov = cov


class _Key:
    __slots__ = ("idx", "stamp", "odom")

    def __init__(self, idx, stamp):
        self.idx = idx
        self.stamp = stamp
        self.odom = None      # (odom_T_base Pose3, cov ROS/odom axes) at this stamp, lazily


class _Edge:
    __slots__ = ("a", "b", "factors", "complete", "pending")

    def __init__(self, a, b, factors, complete):
        self.a = a            # _Key
        self.b = b
        self.factors = factors
        self.complete = complete
        self.pending = not complete


class _GraphFailure(RuntimeError):
    pass


class _Smoother:
    """The handful of IncrementalFixedLagSmoother calls used here, across GTSAM wrappers.

    GTSAM 4.3 has everything on the smoother (setSmootherLag, marginalCovariance,
    typed calculateEstimate*, getISAM2Result, dict timestamps). The 4.2 wrapper
    (gtsam_unstable) lacks some of them; the fallbacks below go through the ISAM2 object
    or the factor count instead. Only the 4.3 path is exercised by the tests here.
    """

    def __init__(self, lag: float, params):
        self.s = IncrementalFixedLagSmoother(lag, params)
        self.lag = lag
        self.can_set_lag = hasattr(self.s, "setSmootherLag")
        self._has_result = hasattr(self.s, "getISAM2Result")
        self._dict_stamps = FixedLagSmootherKeyTimestampMap is None

    def set_lag(self, lag: float) -> None:
        if self.can_set_lag and lag != self.lag:
            self.s.setSmootherLag(lag)
            self.lag = lag

    def update(self, graph, values, stamps: dict, remove: list) -> list[int]:
        """Run one update; returns the slots the new factors got (needed to remove them)."""
        n_before = None if self._has_result else self.s.getFactors().size()
        if self._dict_stamps:
            self.s.update(graph, values, stamps, remove)
        else:
            try:
                self.s.update(graph, values, stamps, remove)
                self._dict_stamps = True
            except TypeError:  # pragma: no cover - GTSAM 4.2 wants its own map type
                m = FixedLagSmootherKeyTimestampMap()
                for k, v in stamps.items():
                    m.insert((k, v))
                self.s.update(graph, values, m, remove)
        if self._has_result:
            return list(self.s.getISAM2Result().getNewFactorsIndices())
        return list(range(n_before, n_before + graph.size()))  # pragma: no cover - 4.2

    def pose(self, key) -> gtsam.Pose3:
        try:
            return self.s.calculateEstimatePose3(key)
        except AttributeError:  # pragma: no cover - 4.2
            return self.s.calculateEstimate().atPose3(key)

    def vector(self, key) -> np.ndarray:
        try:
            return np.asarray(self.s.calculateEstimateVector(key), dtype=float)
        except AttributeError:  # pragma: no cover - 4.2
            return np.asarray(self.s.calculateEstimate().atVector(key), dtype=float)

    def bias(self, key):
        try:
            return self.s.calculateEstimateConstantBias(key)
        except AttributeError:  # pragma: no cover - 4.2
            return self.s.calculateEstimate().atConstantBias(key)

    def marginal(self, key) -> np.ndarray:
        try:
            cov = self.s.marginalCovariance(key)
        except AttributeError:  # pragma: no cover - 4.2
            cov = self.s.getISAM2().marginalCovariance(key)
        return np.asarray(cov, dtype=float)


def _X(i):
    return gtsam.symbol("x", i)


def _V(i):
    return gtsam.symbol("v", i)


def _B(i):
    return gtsam.symbol("b", i)


_COUNTER_NAMES = ("accepted", "rejected", "dropped", "reinitialisations", "initialising",
                  "initialisations", "initial_poses", "odometry", "odometry_dropped",
                  "imu", "imu_dropped", "resets", "time_jumps", "graph_failures", "errors",
                  "fallback_edges", "edges_upgraded", "coarse_priors", "coarse_ignored")


# --------------------------------------------------------------------------- fusion

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
        self._gate = chi2_quantile(c.gate_probability, 6)
        self._base_T_cam = _pose3(*c.base_T_camera)
        self._cam_T_base = self._base_T_cam.inverse()
        self._ad_base_cam = self._base_T_cam.AdjointMap()
        self._floor_abs = np.diag([c.min_abs_sigma_rot ** 2] * 3 + [c.min_abs_sigma_trans ** 2] * 3)
        if c.robust_kernel == "huber":
            self._kernel = gtsam.noiseModel.mEstimator.Huber.Create(c.robust_param)
        elif c.robust_kernel == "cauchy":
            self._kernel = gtsam.noiseModel.mEstimator.Cauchy.Create(c.robust_param)
        else:
            self._kernel = None
        self._preint = c.use_imu and c.imu_mode == "preintegration"
        self._gyro = c.use_imu and c.imu_mode == "gyro"
        self._cv = not c.use_odom and c.motion_model == "constant_velocity"
        # Velocity and bias states exist with an IMU, or for the constant-velocity model.
        self._nav = self._preint or self._gyro or self._cv
        base_T_imu = _pose3(*c.base_T_imu)
        if self._preint:
            self._imu_params = self._pim_params(
                c.gravity, c.gyro_noise_density, c.accel_noise_density, c.gyro_bias_walk,
                c.accel_bias_walk, base_T_imu)
        if self._nav:
            # "Virtual IMU": zero specific force without gravity is a constant-velocity
            # model whose accelerometer noise is the white-noise acceleration (and zero
            # rotation rate with motion_sigma_rot a rotation random walk). In gyro mode the
            # real gyro replaces the virtual one; the virtual IMU also bridges IMU gaps.
            gyro_walk = c.gyro_bias_walk if c.use_imu else 1e-4
            accel_walk = c.accel_bias_walk if self._preint else 1e-3
            self._virt_params = self._pim_params(
                (0.0, 0.0, 0.0), c.motion_sigma_rot, c.motion_sigma_acc, gyro_walk, accel_walk,
                gtsam.Pose3())
            if self._gyro:
                self._gyro_params = self._pim_params(
                    (0.0, 0.0, 0.0), c.gyro_noise_density, c.motion_sigma_acc, gyro_walk,
                    accel_walk, gtsam.Pose3(base_T_imu.rotation(), np.zeros(3)))
            self._bias_prior_sigmas = np.array(
                [c.accel_bias_sigma if self._preint else 1e-3] * 3
                + [c.gyro_bias_sigma if c.use_imu else 1e-3] * 3)
        self._imu_rot = _pose3(*c.base_T_imu).rotation().matrix()
        self._isam_params = gtsam.ISAM2Params()
        self._isam_params.setRelinearizeThreshold(c.relinearize_threshold)
        self._isam_params.relinearizeSkip = 1
        # QR instead of Cholesky: with stiff IMU factors next to decimetre-level absolute
        # poses, Cholesky of the squared system reported "indeterminant" on well-posed
        # graphs; QR costs about nothing here and about 20 % with IMU.
        self._isam_params.setFactorization("QR")
        self._clear_sensors()
        self._clear_graph()
        self._too_old_streak = 0
        self.initialised_from: list[float] = []   # stamps used by the last (re)initialisation

    def _pim_params(self, gravity, gyro_density, accel_density, gyro_walk, accel_walk, body_P_sensor):
        c = self.config
        I3 = np.eye(3)
        p = gtsam.PreintegrationCombinedParams(np.asarray(gravity, dtype=float))
        p.setGyroscopeCovariance(gyro_density ** 2 * I3)
        p.setAccelerometerCovariance(accel_density ** 2 * I3)
        p.setIntegrationCovariance(c.imu_integration_sigma ** 2 * I3)
        p.setBiasAccCovariance(accel_walk ** 2 * I3)
        p.setBiasOmegaCovariance(gyro_walk ** 2 * I3)
        if not body_P_sensor.equals(gtsam.Pose3(), 1e-12):
            p.setBodyPSensor(body_P_sensor)
        return p

    # ------------------------------------------------------------------ state handling

    def _clear_sensors(self):
        self._odom_t: list[float] = []
        self._odom_pose: list[gtsam.Pose3] = []
        self._odom_cov: list[np.ndarray] = []
        self._imu_t: list[float] = []
        self._imu_gyro: list[np.ndarray] = []
        self._imu_acc: list[np.ndarray] = []
        self._newest = -math.inf
        self._odom_at_memo: dict = {}      # stamp -> interpolated sample (immutable once found)
        self._between_memo: dict = {}      # (id, id) -> (samples, relative motion)
        self._pim_memo = None              # last preintegration (prediction, then its edge)

    def _clear_graph(self):
        self._smoother = None
        self._keys: list[_Key] = []
        self._key_stamps: list[float] = []
        self._edges: dict[int, _Edge] = {}     # earlier key idx -> edge to the next key
        self._next_idx = 0
        self._latest = None                   # cache for the newest key, see _refresh
        self._version = 0
        self._est_cache = None
        self._init_buf: list[_Meas] = []
        self._streak: list[_Meas] = []
        self._last_map_T_odom = None

    def reset(self) -> None:
        """Forget the graph and the sensor history (counters are kept)."""
        self._clear_sensors()
        self._clear_graph()
        self._too_old_streak = 0
        self.counters["resets"] += 1

    @property
    def initialised(self) -> bool:
        return self._latest is not None

    def _window_lag(self) -> float:
        c = self.config
        if c.window_seconds is not None:
            return c.window_seconds
        if len(self._keys) > c.window_size:
            newest = self._key_stamps[-1]
            return max(newest - self._key_stamps[-c.window_size], 0.0) + 1e-9
        return 1e12

    def _window_start(self) -> float:
        """Oldest stamp a new pose may have and still stay in the window."""
        if not self._keys:
            return -math.inf
        c = self.config
        if c.window_seconds is not None:
            return self._key_stamps[-1] - c.window_seconds
        if len(self._keys) >= c.window_size:
            return self._key_stamps[-c.window_size]
        return -math.inf

    # ------------------------------------------------------------------ public: sensors

    def add_odometry(self, stamp, t, q_wxyz, cov_ros=None) -> MeasurementResult:
        """Record an ``odom -> base_link`` pose (nav_msgs/Odometry). Zero covariance is
        fine (the configured floor applies). Never raises."""
        try:
            s = _stamp(stamp)
            if not self.config.use_odom:
                return MeasurementResult("dropped", "odometry not used (use_odom is false)", s)
            t = _as_vector(t, 3, "odometry translation")
            q = _as_quat(q_wxyz, "odometry quaternion")
            cov = np.zeros((6, 6)) if cov_ros is None else _as_cov(cov_ros, "odometry covariance")
            if self._odom_t:
                last = self._odom_t[-1]
                if s < last - self.config.time_jump_s:
                    self._time_jump(s)
                elif s <= last:
                    self.counters["odometry_dropped"] += 1
                    return MeasurementResult("dropped", "odometry stamp not after the previous one", s)
            self._odom_t.append(s)
            self._odom_pose.append(_pose3(t, q))
            self._odom_cov.append(cov)
            self._newest = max(self._newest, s)
            self.counters["odometry"] += 1
            self._trim_buffers()
            self._upgrade_pending()
            return MeasurementResult("accepted", "odometry recorded", s)
        except Exception as exc:  # noqa: BLE001 - never let anything out of an update
            return self._internal_error(stamp, exc, "odometry_dropped")

    def add_imu(self, stamp, gyro, accel) -> MeasurementResult:
        """Record an IMU sample (rad/s and m/s^2 in the IMU frame, ``base_T_imu``). The
        sample is held until the next one (zero-order hold). Never raises."""
        try:
            s = _stamp(stamp)
            if not self.config.use_imu:
                return MeasurementResult("dropped", "IMU not used (use_imu is false)", s)
            g = _as_vector(gyro, 3, "gyro")
            a = _as_vector(accel, 3, "accel")
            if self._imu_t:
                last = self._imu_t[-1]
                if s < last - self.config.time_jump_s:
                    self._time_jump(s)
                elif s <= last:
                    self.counters["imu_dropped"] += 1
                    return MeasurementResult("dropped", "IMU stamp not after the previous one", s)
            self._imu_t.append(s)
            self._imu_gyro.append(g)
            self._imu_acc.append(a)
            self._newest = max(self._newest, s)
            self.counters["imu"] += 1
            if len(self._imu_t) % 64 == 0:
                self._trim_buffers()
                self._upgrade_pending()
            elif self._has_pending():
                self._upgrade_pending()
            return MeasurementResult("accepted", "IMU sample recorded", s)
        except Exception as exc:  # noqa: BLE001
            return self._internal_error(stamp, exc, "imu_dropped")

    def _time_jump(self, s):
        """A stamp far in the past: a looping bag or a restarted clock. Start over cleanly."""
        self.counters["time_jumps"] += 1
        self.reset()

    def _trim_buffers(self):
        horizon = self._newest - self.config.buffer_seconds
        for stamps, *lists in ((self._odom_t, self._odom_pose, self._odom_cov),
                               (self._imu_t, self._imu_gyro, self._imu_acc)):
            if len(stamps) > 256 and stamps[128] < horizon:
                n = bisect.bisect_left(stamps, horizon) - 1
                if n > 0:
                    del stamps[:n]
                    for lst in lists:
                        del lst[:n]

    # ------------------------------------------------------------------ public: absolute

    def add_absolute(self, stamp, t_cam, q_cam_wxyz, cov_ros) -> MeasurementResult:
        """Fuse one ``map -> camera`` pose from the network with its 6x6 covariance (ROS
        order, map axes). Inserted at its own stamp, gated, robustly weighted. Never raises."""
        try:
            s = _stamp(stamp)
            try:
                m_cam, cov_cam = _pose_measurement(t_cam, q_cam_wxyz, cov_ros, "")
            except ValueError as exc:
                return self._drop(s, str(exc))
            pose = m_cam.compose(self._cam_T_base)
            A = self._ad_base_cam
            meas = _Meas(s, pose, A @ cov_cam @ A.T + self._floor_abs)
            self._newest = max(self._newest, s)
            return self._process(meas)
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
            s = _stamp(stamp)
            try:
                m_cam, cov_cam = _pose_measurement(t_cam, q_cam_wxyz, cov_ros, "coarse prior ")
            except ValueError as exc:
                return self._drop(s, str(exc))
            A = self._ad_base_cam
            meas = _Meas(s, m_cam.compose(self._cam_T_base), A @ cov_cam @ A.T + self._floor_abs)
            self._newest = max(self._newest, s)
            self.counters["coarse_priors"] += 1
            if not self.initialised:
                return self._initialise_step(meas)
            if s < self._window_start():
                return self._drop(s, "older than the window")
            pred, cov_pred = self._predict(s)
            d2 = self._mahalanobis2(pred, cov_pred, meas)
            if d2 <= self._gate:
                self.counters["coarse_ignored"] += 1
                return MeasurementResult("dropped", "coarse prior agrees with the estimate (not fused)", s, d2)
            self.counters["rejected"] += 1
            result = self._kidnap_check(meas, d2)
            if result is not None:
                return result
            return MeasurementResult("rejected", f"coarse prior failed the {self.config.gate_probability:.3g} "
                                     f"gate (d2={d2:.1f} > {self._gate:.1f})", s, d2)
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
            if not math.isfinite(s) or s <= 0.0:
                s = self._newest - 2 * _DUPLICATE_S if math.isfinite(self._newest) else 0.0
            try:
                pose, cov_g = _pose_measurement(t_base, q_base, cov_ros, "initial pose ")
            except ValueError as exc:
                return self._drop(s, str(exc))
            bias = self._latest["bias"] if (self._latest and self._nav) else None
            self._clear_graph()
            self._too_old_streak = 0
            self._start_graph(_Meas(s, pose, cov_g + self._floor_abs), robust=False, bias=bias)
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

    def _process(self, meas: _Meas) -> MeasurementResult:
        s = meas.stamp
        if not self.initialised:
            return self._initialise_step(meas)
        if s < self._window_start():
            self._too_old_streak += 1
            if self._too_old_streak >= 3 and s < self._key_stamps[-1] - self.config.time_jump_s:
                # Several in a row far in the past: the clock jumped back (bag loop).
                self.counters["time_jumps"] += 1
                self._clear_graph()
                self._too_old_streak = 0
                return self._initialise_step(meas)
            return self._drop(s, "older than the window")
        self._too_old_streak = 0
        pos = bisect.bisect_left(self._key_stamps, s)
        for j in (pos - 1, pos):
            if 0 <= j < len(self._keys) and abs(self._key_stamps[j] - s) < _DUPLICATE_S:
                return self._drop(s, "duplicate stamp (a pose already exists at this time)")
        pred, cov_pred = self._predict(s)
        d2 = self._mahalanobis2(pred, cov_pred, meas)
        if d2 > self._gate:
            self.counters["rejected"] += 1
            result = self._kidnap_check(meas, d2)
            if result is not None:
                return result
            return MeasurementResult("rejected", f"failed the {self.config.gate_probability:.3g} "
                                     f"gate (d2={d2:.1f} > {self._gate:.1f})", s, d2)
        try:
            self._insert(meas, pred)
        except _GraphFailure as exc:
            return self._drop(s, f"optimiser failure, rebuilt from the last estimate: {exc}")
        self.counters["accepted"] += 1
        self._streak.clear()
        return MeasurementResult("accepted", "fused", s, d2)

    def _mahalanobis2(self, pred: gtsam.Pose3, cov_pred: np.ndarray, meas: _Meas) -> float:
        e = gtsam.Pose3.Logmap(pred.between(meas.pose))
        S = cov_pred + meas.cov
        try:
            d2 = float(e @ np.linalg.solve(S, e))
        except np.linalg.LinAlgError:
            return math.inf
        return d2 if math.isfinite(d2) else math.inf

    def _initialise_step(self, meas: _Meas) -> MeasurementResult:
        """Buffer measurements until ``init_consistent`` of them agree, then start from them."""
        c = self.config
        horizon = meas.stamp - max(self._window_span_estimate(), 1.0)
        self._init_buf = [m for m in self._init_buf
                          if m.stamp >= horizon and abs(m.stamp - meas.stamp) >= _DUPLICATE_S]
        self._init_buf.append(meas)
        self._init_buf.sort(key=lambda m: m.stamp)
        self._init_buf = self._init_buf[-3 * c.init_consistent:]
        subset = self._consistent_subset(self._init_buf, meas, c.init_consistent)
        if subset is None:
            self.counters["initialising"] += 1
            return MeasurementResult("initialising", f"waiting for {c.init_consistent} mutually "
                                     "consistent measurements", meas.stamp)
        self._start_from(subset)
        self.counters["initialisations"] += 1
        self.counters["accepted"] += 1      # the others were counted as "initialising"
        return MeasurementResult("accepted", f"initialised from {len(subset)} consistent "
                                 "measurements", meas.stamp)

    def _window_span_estimate(self) -> float:
        c = self.config
        if c.window_seconds is not None:
            return c.window_seconds
        if len(self._keys) >= 2:
            return self._key_stamps[-1] - self._key_stamps[0]
        return 5.0

    def _kidnap_check(self, meas: _Meas, d2: float) -> MeasurementResult | None:
        """Kidnapped robot: consecutive rejected measurements that agree with each other
        mean the estimate, not the network, is wrong; restart from them."""
        c = self.config
        horizon = meas.stamp - max(self._window_span_estimate(), 1.0)
        self._streak = [m for m in self._streak if m.stamp >= horizon
                        and abs(m.stamp - meas.stamp) >= _DUPLICATE_S]
        self._streak.append(meas)
        self._streak.sort(key=lambda m: m.stamp)
        self._streak = self._streak[-3 * c.kidnap_consecutive:]
        subset = self._consistent_subset(self._streak, meas, c.kidnap_consecutive)
        if subset is None:
            return None
        self.counters["rejected"] -= 1        # this one is used after all
        self._start_from(subset, keep_bias=True)
        self.counters["reinitialisations"] += 1
        self.counters["accepted"] += 1
        return MeasurementResult("accepted", f"re-initialised from {len(subset)} consistent "
                                 "rejected measurements (kidnapped robot)", meas.stamp, d2)

    def _consistent_subset(self, cands: list[_Meas], newest: _Meas, n: int):
        """Largest greedy set containing ``newest`` whose members pass the gate pairwise and
        jointly (chi-square of all residuals about their fused mean), or None if < n."""
        if n <= 1:
            return [newest]
        if len(cands) < n:
            return None
        members = [newest]
        for m in sorted(cands, key=lambda m: -m.stamp):
            if m is newest:
                continue
            if all(self._pair_d2(m, o) <= self._gate for o in members):
                members.append(m)
        if len(members) < n:
            return None
        members.sort(key=lambda m: m.stamp)
        while len(members) >= n:
            worst, worst_d2, total = None, -1.0, 0.0
            ref = members[-1]
            # Fuse all members at the newest one's stamp, then sum their squared residuals.
            moved = []
            info = np.zeros((6, 6))
            vec = np.zeros(6)
            for m in members:
                delta, q = self._relative(m.stamp, ref.stamp)
                p = m.pose.compose(delta)
                cov = _transport(m.cov, delta) + q
                W = np.linalg.inv(cov)
                x = gtsam.Pose3.Logmap(ref.pose.between(p))
                moved.append((m, x, W))
                info += W
                vec += W @ x
            mean = np.linalg.solve(info, vec)
            for m, x, W in moved:
                r = x - mean
                d2 = float(r @ W @ r)
                total += d2
                if d2 > worst_d2:
                    worst, worst_d2 = m, d2
            if total <= chi2_quantile(self.config.gate_probability, 6 * (len(members) - 1)):
                return members
            if worst is newest:
                return None
            members.remove(worst)
        return None

    def _pair_d2(self, a: _Meas, b: _Meas) -> float:
        if a.stamp > b.stamp:
            a, b = b, a
        delta, q = self._relative(a.stamp, b.stamp)
        pred = a.pose.compose(delta)
        return self._mahalanobis2(pred, _transport(a.cov, delta) + q, b)

    # ------------------------------------------------------------------ graph building

    def _new_smoother(self):
        c = self.config
        if c.window_seconds is not None:
            lag = c.window_seconds
        else:
            # The pose-count window sets the lag before every update; a wrapper without
            # setSmootherLag (GTSAM 4.2) gets a time window of window_size camera periods.
            lag = 1e12
            probe = _Smoother(lag, self._isam_params)
            if not probe.can_set_lag:  # pragma: no cover - 4.2
                lag = c.window_size * self._key_period()
            else:
                self._smoother = probe
                return
        self._smoother = _Smoother(lag, self._isam_params)

    def _key_period(self) -> float:  # pragma: no cover - 4.2 only
        if len(self._key_stamps) >= 2:
            return max(float(np.median(np.diff(self._key_stamps))), 1e-3)
        return 0.1

    def _start_from(self, subset: list[_Meas], keep_bias: bool = False):
        bias = self._latest["bias"] if (keep_bias and self._latest and self._nav) else None
        self._clear_graph()
        self._start_graph(subset[0], robust=True, bias=bias)
        for m in subset[1:]:
            pred, _ = self._predict(m.stamp)
            self._insert(m, pred)
        self.initialised_from = [m.stamp for m in subset]

    def _start_graph(self, meas: _Meas, robust: bool, bias=None):
        """First pose of a graph, held by the measurement (or /initialpose) as a prior."""
        c = self.config
        self._new_smoother()
        key = _Key(self._next_idx, meas.stamp)
        self._next_idx += 1
        graph = gtsam.NonlinearFactorGraph()
        values = gtsam.Values()
        graph.add(gtsam.PriorFactorPose3(_X(key.idx), meas.pose, self._abs_noise(meas.cov, robust)))
        values.insert(_X(key.idx), meas.pose)
        stamps = {_X(key.idx): meas.stamp}
        if self._nav:
            v_sigma = gtsam.noiseModel.Isotropic.Sigma(3, c.init_velocity_sigma)
            graph.add(gtsam.PriorFactorVector(_V(key.idx), np.zeros(3), v_sigma))
            values.insert(_V(key.idx), np.zeros(3))
            b0 = bias if bias is not None else gtsam.imuBias.ConstantBias()
            b_sigma = gtsam.noiseModel.Diagonal.Sigmas(self._bias_prior_sigmas)
            graph.add(gtsam.PriorFactorConstantBias(_B(key.idx), b0, b_sigma))
            values.insert(_B(key.idx), b0)
            stamps[_V(key.idx)] = meas.stamp
            stamps[_B(key.idx)] = meas.stamp
        self._keys = [key]
        self._key_stamps = [meas.stamp]
        self._update(graph, values, stamps, [])
        self._refresh()

    def _abs_noise(self, cov: np.ndarray, robust: bool = True):
        noise = gtsam.noiseModel.Gaussian.Covariance(cov)
        if robust and self._kernel is not None:
            return gtsam.noiseModel.Robust.Create(self._kernel, noise)
        return noise

    def _insert(self, meas: _Meas, pred: gtsam.Pose3):
        """Add a pose at ``meas.stamp`` with its absolute factor, splicing it into the chain
        (out-of-order stamps replace the edge they fall into by two edges)."""
        key = _Key(self._next_idx, meas.stamp)
        self._next_idx += 1
        pos = bisect.bisect_left(self._key_stamps, meas.stamp)
        prev = self._keys[pos - 1] if pos > 0 else None
        nxt = self._keys[pos] if pos < len(self._keys) else None
        graph = gtsam.NonlinearFactorGraph()
        values = gtsam.Values()
        stamps = {_X(key.idx): meas.stamp}
        values.insert(_X(key.idx), pred)
        graph.add(gtsam.PriorFactorPose3(_X(key.idx), meas.pose, self._abs_noise(meas.cov)))
        new_bias = None
        if self._nav:
            ref = prev if prev is not None else nxt
            new_bias = self._bias_of(ref)
            values.insert(_V(key.idx), self._velocity_of(ref))
            values.insert(_B(key.idx), new_bias)
            stamps[_V(key.idx)] = meas.stamp
            stamps[_B(key.idx)] = meas.stamp
        remove = []
        if prev is not None and nxt is not None:
            old = self._edges.pop(prev.idx, None)
            if old is not None:
                remove.extend(old.factors)
        new_edges = []
        if prev is not None:
            new_edges.append(self._edge(prev, key, graph))
        if nxt is not None:
            new_edges.append(self._edge(key, nxt, graph, bias_a=new_bias))
        self._keys.insert(pos, key)
        self._key_stamps.insert(pos, meas.stamp)
        indices = self._update(graph, values, stamps, remove)
        self._assign_indices(new_edges, indices, first=1)
        self._prune_marginalised()
        self._refresh()

    def _assign_indices(self, edges, indices, first):
        """Record which graph slots hold each edge's factors (needed to replace it)."""
        i = first
        for e in edges:
            n = len(e.factors)
            e.factors = list(indices[i:i + n])
            i += n
            self._edges[e.a.idx] = e

    def _edge(self, a: _Key, b: _Key, graph, bias_a=None) -> _Edge:
        """Relative factors between consecutive poses; ``factors`` first holds the count."""
        factors, complete = self._relative_factors(a, b, bias_a)
        for f in factors:
            graph.add(f)
        if not complete:
            self.counters["fallback_edges"] += 1
        e = _Edge(a, b, [None] * len(factors), complete)
        return e

    def _relative_factors(self, a: _Key, b: _Key, bias_a=None):
        """Factors for the motion a -> b and whether every configured sensor covered it."""
        c = self.config
        dt = max(b.stamp - a.stamp, 1e-6)
        out = []
        have_odom = False
        have_imu = False
        if c.use_odom:
            oa, ob = self._key_odom(a), self._key_odom(b)
            if oa is not None and ob is not None:
                delta, q = self._odom_between(oa, ob)
                out.append(gtsam.BetweenFactorPose3(_X(a.idx), _X(b.idx), delta,
                                                    gtsam.noiseModel.Gaussian.Covariance(q)))
                have_odom = True
        if self._nav:
            pim, have_imu = self._pim(a.stamp, b.stamp,
                                      bias_a if bias_a is not None else self._bias_of(a))
            out.append(gtsam.CombinedImuFactor(_X(a.idx), _V(a.idx), _X(b.idx), _V(b.idx),
                                               _B(a.idx), _B(b.idx), pim))
            have_motion = True
        else:
            have_motion = have_odom
        if not have_motion:
            out.append(gtsam.BetweenFactorPose3(_X(a.idx), _X(b.idx), gtsam.Pose3(),
                                                self._random_walk_noise(dt)))
        complete = (have_odom or not c.use_odom) and (have_imu or not c.use_imu)
        return out, complete

    def _random_walk_noise(self, dt):
        c = self.config
        r = c.motion_sigma_rot * math.sqrt(dt)
        t = c.motion_sigma_trans * math.sqrt(dt)
        return gtsam.noiseModel.Diagonal.Sigmas(np.array([r, r, r, t, t, t]))

    def _random_walk_cov(self, dt):
        c = self.config
        r = c.motion_sigma_rot ** 2 * dt
        t = c.motion_sigma_trans ** 2 * dt
        return np.diag([r, r, r, t, t, t])

    def _has_pending(self) -> bool:
        return any(e.pending for e in self._edges.values())

    def _upgrade_pending(self):
        """Rebuild fallback edges once the odometry / IMU that covers them has arrived."""
        if self._smoother is None or not self._edges:
            return
        pending = [e for e in self._edges.values() if e.pending]
        if not pending:
            return
        c = self.config
        odom_new = self._odom_t[-1] if self._odom_t else -math.inf
        imu_new = self._imu_t[-1] if self._imu_t else -math.inf
        sensors_newest = min(odom_new if c.use_odom else math.inf,
                             imu_new if c.use_imu else math.inf)
        todo = []
        for e in pending:
            if sensors_newest < e.b.stamp:
                continue      # not yet covered; wait
            factors, complete = self._relative_factors(e.a, e.b)
            if complete:
                todo.append((e, factors))
            e.pending = False  # covered by time now: upgrade once, or give up (a sensor gap)
        if not todo:
            return
        graph = gtsam.NonlinearFactorGraph()
        remove = []
        new_edges = []
        for e, factors in todo:
            remove.extend(e.factors)
            for f in factors:
                graph.add(f)
            ne = _Edge(e.a, e.b, [None] * len(factors), True)
            new_edges.append(ne)
        try:
            indices = self._update(graph, gtsam.Values(), {}, remove)
        except _GraphFailure:
            return
        self._assign_indices(new_edges, indices, first=0)
        self.counters["edges_upgraded"] += len(new_edges)
        self._prune_marginalised()
        self._refresh()

    def _update(self, graph, values, stamps, remove):
        """One smoother update; on any GTSAM failure rebuild cleanly and raise _GraphFailure."""
        try:
            self._smoother.set_lag(self._window_lag())
            return self._smoother.update(graph, values, stamps, remove)
        except Exception as exc:  # noqa: BLE001 - IndeterminantLinearSystem and friends
            self.counters["graph_failures"] += 1
            self._recover()
            raise _GraphFailure(f"{type(exc).__name__}: {exc}") from exc

    def _prune_marginalised(self):
        """Forget keys the smoother has marginalised (stamps before newest - lag)."""
        if not self._keys:
            return
        cutoff = self._key_stamps[-1] - self._smoother.lag
        n = bisect.bisect_left(self._key_stamps, cutoff)
        if n <= 0:
            return
        for k in self._keys[:n]:
            self._edges.pop(k.idx, None)
        del self._keys[:n]
        del self._key_stamps[:n]

    def _recover(self):
        """Clean restart from the last good estimate (or uninitialised if there is none)."""
        latest = self._latest
        self._clear_graph()
        if latest is None:
            return
        try:
            self._start_graph(_Meas(latest["stamp"], latest["pose"], latest["cov"] * 1.5
                                    + self._floor_abs), robust=False,
                              bias=latest["bias"] if self._nav else None)
            self.counters["resets"] += 1
        except Exception:  # noqa: BLE001 - give up on the graph, start over
            self._clear_graph()

    def _refresh(self):
        """Cache the newest pose, its marginal covariance (and velocity / bias)."""
        try:
            self._refresh_inner()
        except Exception as exc:  # noqa: BLE001 - e.g. IndeterminantLinearSystem
            self.counters["graph_failures"] += 1
            self._recover()
            raise _GraphFailure(f"{type(exc).__name__}: {exc}") from exc

    def _refresh_inner(self):
        key = self._keys[-1]
        pose = self._smoother.pose(_X(key.idx))
        cov = self._smoother.marginal(_X(key.idx))
        if not (np.all(np.isfinite(cov)) and np.all(np.isfinite(pose.matrix()))):
            raise _GraphFailure("non-finite estimate")
        latest = {"stamp": key.stamp, "key": key, "pose": pose, "cov": 0.5 * (cov + cov.T),
                  "vel": None, "bias": None}
        if self._nav:
            latest["vel"] = self._est_vector(_V(key.idx))
            latest["bias"] = self._est_bias(_B(key.idx))
        self._latest = latest
        self._version += 1
        self._est_cache = None

    def _est_vector(self, k):
        return self._smoother.vector(k)

    def _est_bias(self, k):
        return self._smoother.bias(k)

    def _velocity_of(self, key: _Key):
        if self._latest is not None and self._latest["key"] is key:
            return self._latest["vel"]
        return self._est_vector(_V(key.idx))

    def _bias_of(self, key: _Key):
        if self._latest is not None and self._latest["key"] is key:
            return self._latest["bias"]
        return self._est_bias(_B(key.idx))

    def _key_state(self, key: _Key):
        if self._latest is not None and self._latest["key"] is key:
            return self._latest["pose"], self._latest["cov"]
        return self._smoother.pose(_X(key.idx)), self._smoother.marginal(_X(key.idx))

    # ------------------------------------------------------------------ prediction

    def _predict(self, s: float):
        """Pose and covariance (GTSAM order, body axes) at stamp ``s`` from the graph."""
        pos = bisect.bisect_right(self._key_stamps, s)
        if pos > 0:
            ref = self._keys[pos - 1]
            pose, cov = self._key_state(ref)
            if self._nav and not self._odom_covers(ref, s):
                return self._nav_predict(ref, pose, cov, s)
            delta, q = self._relative(ref.stamp, s, ref)
            return pose.compose(delta), _transport(cov, delta) + q
        ref = self._keys[0]
        pose, cov = self._key_state(ref)
        delta, q = self._relative(s, ref.stamp, None, ref)
        inv = delta.inverse()
        A = delta.AdjointMap()
        return pose.compose(inv), A @ (cov + q) @ A.T

    def _odom_covers(self, key, s):
        return (self.config.use_odom and self._key_odom(key) is not None
                and self._odom_at(s) is not None)

    def _relative(self, sa: float, sb: float, ka: _Key | None = None, kb: _Key | None = None):
        """Motion from ``sa`` to ``sb`` and its covariance (GTSAM order, frame at ``sb``):
        odometry where it covers both ends, else gyro rotation, else a random walk."""
        c = self.config
        dt = abs(sb - sa)
        if c.use_odom:
            oa = self._key_odom(ka) if ka is not None else self._odom_at(sa)
            ob = self._key_odom(kb) if kb is not None else self._odom_at(sb)
            if oa is not None and ob is not None:
                return self._odom_between(oa, ob)
        q = self._random_walk_cov(dt)
        if self._gyro:
            rot = self._gyro_rotation(sa, sb)
            if rot is not None:
                R, sig = rot
                q[:3, :3] = np.eye(3) * sig ** 2
                return gtsam.Pose3(R, np.zeros(3)), q
        return gtsam.Pose3(), q

    def _nav_predict(self, key: _Key, pose, cov, s, require_imu: bool = False):
        """Prediction with the velocity state and the (real or virtual) preintegration."""
        pim, real = self._pim(key.stamp, s, self._bias_of(key))
        if require_imu and not real:
            return None
        vel = self._velocity_of(key)
        state = pim.predict(gtsam.NavState(pose, vel), self._bias_of(key))
        pred = state.pose()
        delta = pose.between(pred)
        R = delta.rotation().matrix()
        Q = np.asarray(pim.preintMeasCov(), dtype=float)[:6, :6]
        B = np.zeros((6, 6))
        B[:3, :3] = R.T
        B[3:, 3:] = R.T
        q = B @ Q @ B.T
        dt = s - key.stamp
        try:
            cov_v = self._smoother.marginal(_V(key.idx))
        except Exception:  # noqa: BLE001
            cov_v = np.eye(3) * self.config.init_velocity_sigma ** 2
        Rb = pred.rotation().matrix()
        q[3:, 3:] += Rb.T @ cov_v @ Rb * dt * dt
        return pred, _transport(cov, delta) + q

    # ------------------------------------------------------------------ odometry / IMU

    def _key_odom(self, key: _Key):
        if key.odom is None and self.config.use_odom:
            key.odom = self._odom_at(key.stamp)
        return key.odom

    def _odom_at(self, s: float):
        """Odometry pose and covariance at ``s``, interpolated between the two bracketing
        messages; None if ``s`` is outside the buffer or in a gap > ``odom_max_gap``."""
        got = self._odom_at_memo.get(s)
        if got is not None:
            return got
        ts = self._odom_t
        if not ts or s < ts[0] or s > ts[-1]:
            return None
        i = bisect.bisect_left(ts, s)
        if ts[i] == s:
            got = (self._odom_pose[i], self._odom_cov[i])
        else:
            t0, t1 = ts[i - 1], ts[i]
            if t1 - t0 > self.config.odom_max_gap:
                return None
            a = (s - t0) / (t1 - t0)
            p0, p1 = self._odom_pose[i - 1], self._odom_pose[i]
            got = (p0.slerp(a, p1),
                   self._odom_cov[i - 1] + a * (self._odom_cov[i] - self._odom_cov[i - 1]))
        if len(self._odom_at_memo) > 64:
            self._odom_at_memo.clear()
        self._odom_at_memo[s] = got
        return got

    def _odom_between(self, oa, ob):
        """Relative motion between two odometry samples and its covariance (GTSAM order,
        frame of the later pose): the growth of the accumulated covariance, floored."""
        memo_key = (id(oa), id(ob))
        got = self._between_memo.get(memo_key)
        if got is not None and got[0] is oa and got[1] is ob:
            return got[2]
        result = self._odom_between_inner(oa, ob)
        if len(self._between_memo) > 64:
            self._between_memo.clear()
        self._between_memo[memo_key] = (oa, ob, result)
        return result

    def _odom_between_inner(self, oa, ob):
        c = self.config
        pa, ca = oa
        pb, cb = ob
        delta = pa.between(pb)
        t = delta.translation()
        dist = math.sqrt(float(t @ t))
        w = gtsam.Rot3.Logmap(delta.rotation())
        ang = math.sqrt(float(w @ w))
        fr = (c.odom_floor_rot + c.odom_floor_rot_per_rad * ang) ** 2
        ft = (c.odom_floor_trans + c.odom_floor_trans_per_m * dist) ** 2
        dcov = cb - ca
        if not np.count_nonzero(dcov):
            q = np.zeros((6, 6))
        else:
            dcov = 0.5 * (dcov + dcov.T)
            d = np.diagonal(dcov)
            if np.count_nonzero(dcov) == np.count_nonzero(d):     # diagonal: the usual case
                q = ros_cov_to_gtsam(np.diag(np.maximum(d, 0.0)), rotation=pb.rotation().matrix())
            else:
                # Correlated (or indefinite) growth: clip the eigenvalues at the smaller
                # floor so the relative factor is always positive definite.
                q = ros_cov_to_gtsam(dcov, rotation=pb.rotation().matrix())
                ev, vecs = np.linalg.eigh(q)
                q = (vecs * np.maximum(ev, min(fr, ft))) @ vecs.T
        for i in range(6):
            f = fr if i < 3 else ft
            if q[i, i] < f:
                q[i, i] = f
        return delta, q

    def _imu_span(self, sa, sb):
        """Index range of IMU samples whose hold intervals cover [sa, sb], or None."""
        ts = self._imu_t
        if not ts or ts[0] > sa or ts[-1] < sb or sb <= sa:
            return None
        i0 = bisect.bisect_right(ts, sa) - 1
        i1 = bisect.bisect_left(ts, sb)
        gap = self.config.imu_max_gap
        for k in range(i0, i1):
            if ts[k + 1] - ts[k] > gap:
                return None
        return i0, i1

    def _pim(self, sa, sb, bias):
        """Preintegrated motion a -> b and whether a real sensor measured it: the IMU
        (preintegration mode), the gyro with zero acceleration (gyro mode), else the
        virtual constant-velocity model."""
        memo = self._pim_memo
        if memo is not None and memo[0] == sa and memo[1] == sb and memo[2] is bias \
                and memo[3] == len(self._imu_t):
            return memo[4]
        got = self._pim_inner(sa, sb, bias)
        self._pim_memo = (sa, sb, bias, len(self._imu_t), got)
        return got

    def _pim_inner(self, sa, sb, bias):
        if self._preint:
            pim = self._preintegrate(sa, sb, bias, self._imu_params, zero_accel=False)
            if pim is not None:
                return pim, True
        elif self._gyro:
            pim = self._preintegrate(sa, sb, bias, self._gyro_params, zero_accel=True)
            if pim is not None:
                return pim, True
        pim = gtsam.PreintegratedCombinedMeasurements(self._virt_params, bias)
        dt = max(sb - sa, 1e-6)
        n = max(1, int(math.ceil(dt / 0.05)))
        zero = np.zeros(3)
        for _ in range(n):
            pim.integrateMeasurement(zero, zero, dt / n)
        return pim, False

    def _preintegrate(self, sa, sb, bias, params, zero_accel):
        span = self._imu_span(sa, sb)
        if span is None:
            return None
        i0, i1 = span
        ts = self._imu_t
        pim = gtsam.PreintegratedCombinedMeasurements(params, bias)
        zero = np.zeros(3)
        t = sa
        for k in range(i0, i1):
            end = min(ts[k + 1], sb)
            dt = end - t
            if dt > 0.0:
                pim.integrateMeasurement(zero if zero_accel else self._imu_acc[k],
                                         self._imu_gyro[k], dt)
            t = end
        return pim if pim.deltaTij() > 0.0 else None

    def _gyro_rotation(self, sa, sb):
        """Rotation of the base from ``sa`` to ``sb`` from the gyro alone, and the standard
        deviation of each axis (white noise plus an unknown bias of gyro_bias_sigma)."""
        if sb < sa:
            got = self._gyro_rotation(sb, sa)
            if got is None:
                return None
            return got[0].inverse(), got[1]
        span = self._imu_span(sa, sb)
        if span is None:
            return None
        i0, i1 = span
        ts = self._imu_t
        R = gtsam.Rot3()
        t = sa
        Ri = self._imu_rot
        for k in range(i0, i1):
            end = min(ts[k + 1], sb)
            dt = end - t
            if dt > 0.0:
                R = R.compose(gtsam.Rot3.Expmap(Ri @ self._imu_gyro[k] * dt))
            t = end
        c = self.config
        dt = sb - sa
        sig = math.sqrt(c.gyro_noise_density ** 2 * dt + (c.gyro_bias_sigma * dt) ** 2 + 1e-12)
        return R, sig

    # ------------------------------------------------------------------ output

    def estimate(self) -> FusedEstimate | None:
        """Newest fused pose: the newest graph pose propagated to the newest odometry (or,
        without odometry, IMU) stamp. None before initialisation. Never raises, never NaN."""
        try:
            if self._latest is None:
                return None
            tag = (self._version, len(self._odom_t), self._odom_t[-1] if self._odom_t else None,
                   len(self._imu_t), self._imu_t[-1] if self._imu_t else None)
            if self._est_cache is not None and self._est_cache[0] == tag:
                return self._est_cache[1]
            est = self._compute_estimate()
            self._est_cache = (tag, est)
            return est
        except Exception:  # noqa: BLE001
            self.counters["errors"] += 1
            return self._plain_estimate()

    def _plain_estimate(self):
        try:
            lt = self._latest
            if lt is None:
                return None
            return self._make_estimate(lt["stamp"], lt["pose"], lt["cov"], None, lt["stamp"], lt["vel"])
        except Exception:  # noqa: BLE001
            return None

    def _compute_estimate(self):
        lt = self._latest
        key = lt["key"]
        pose, cov, stamp, vel = lt["pose"], lt["cov"], lt["stamp"], lt["vel"]
        map_T_odom = None
        if self.config.use_odom and self._odom_t:
            ok = self._key_odom(key)
            if ok is not None:
                odom_pose = ok[0]
                mto = pose.compose(odom_pose.inverse())
                map_T_odom = _tq(mto)
                self._last_map_T_odom = map_T_odom
                newest = self._odom_t[-1]
                if newest > stamp:
                    delta, q = self._odom_between(ok, (self._odom_pose[-1], self._odom_cov[-1]))
                    cov = _transport(cov, delta) + q
                    pose = pose.compose(delta)
                    stamp = newest
            else:
                map_T_odom = self._last_map_T_odom
        elif self._preint and self._imu_t and self._imu_t[-1] > stamp:
            got = self._nav_predict(key, pose, cov, self._imu_t[-1], require_imu=True)
            if got is not None:
                pose, cov = got
                stamp = self._imu_t[-1]
        return self._make_estimate(stamp, pose, cov, map_T_odom, lt["stamp"], vel)

    def _make_estimate(self, stamp, pose, cov, map_T_odom, graph_stamp, vel):
        t, q = _tq(pose)
        cam_t, cam_q = _tq(pose.compose(self._base_T_cam))
        cov_ros = gtsam_cov_to_ros(cov, rotation=pose.rotation().matrix())
        if not (np.all(np.isfinite(t)) and np.all(np.isfinite(q)) and np.all(np.isfinite(cov_ros))):
            raise ValueError("non-finite estimate")
        if map_T_odom is not None and not (np.all(np.isfinite(map_T_odom[0]))
                                           and np.all(np.isfinite(map_T_odom[1]))):
            map_T_odom = None
        v = None if vel is None else np.array(vel, dtype=float)
        bias = self._latest.get("bias") if (self._latest and self.config.use_imu) else None
        b = None if bias is None else np.asarray(bias.vector(), dtype=float)
        return FusedEstimate(stamp=float(stamp), t=t, q=q, cov_ros=cov_ros, t_cam=cam_t,
                             q_cam=cam_q, map_T_odom=map_T_odom, graph_stamp=float(graph_stamp),
                             velocity=v, imu_bias=b)
