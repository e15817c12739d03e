"""Simulated measurement streams for testing and benchmarking :mod:`vizloc_ros.fusion`.

Why a simulator: the fusion targets (accuracy ratio, outlier rejection, kidnap recovery,
covariance consistency) need ground truth together with *every* sensor of a robot, which
no public dataset provides with a pose network in the loop. Starting from a real (or a
synthetic) trajectory, this module builds a self-consistent world:

* truth: the trajectory resampled on the IMU grid and smoothed (mocap noise would explode
  when differentiated twice); between grid points the truth follows the same constant
  angular-rate / constant-acceleration model as IMU preintegration, so the simulated IMU
  describes the truth exactly up to its noise;
* absolute poses: the camera pose (``base_T_camera`` extrinsic) with Gaussian noise of
  0.3 m / 5 deg in map axes, a share of outliers displaced 2-5 m, and a random latency
  so they arrive after the odometry of their stamp (and sometimes out of order);
* odometry: ``odom -> base_link`` accumulated from noisy increments (random walk in the
  distance travelled, a heading drift and an unmodelled 1 % scale error), with the step
  variances summed into the message's covariance, as simple wheel odometry drivers
  publish it;
* IMU: body rates and specific force from the truth's derivatives with white noise and
  random-walk biases;
* kidnap: optionally the truth jumps 5 m at a given time; odometry and IMU do not notice.

Odometry and IMU are drawn by the generators of ``vizloc-synth``
(:func:`~vizloc_ros.sim.sensors.simulate_visual_odometry`,
:func:`~vizloc_ros.sim.sensors.simulate_imu`) from the truth, with this harness's noise
(:attr:`SimConfig.odometry_noise`, :attr:`SimConfig.imu_noise`) and its random generator.

Events come out sorted by *arrival* time, the order a node or bag replay would see them.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np

from vizloc_ros.geometry import (matrix_to_quat, pose_compose, quat_exp, quat_multiply, quat_to_matrix,
                                 so3_exp, so3_log)
from vizloc_ros.metrics import nees
from vizloc_ros.sim.sensors import GRAVITY, ImuNoise, VoNoise, simulate_imu, simulate_visual_odometry
from vizloc_ros.sim.trajectories import (CAMERA_IN_BASE_Q, gaussian_smooth, resample, sorted_distinct,
                                         uniform_times)

#: the harness's camera mount: the optical frame of the synthetic world looking along base x,
#: 0.15 m ahead of and 0.25 m above the base origin
DEFAULT_BASE_T_CAMERA = ((0.15, 0.0, 0.25), tuple(CAMERA_IN_BASE_Q))

#: the sensor combinations the fusion is tested and benchmarked in: FusionConfig overrides
FUSION_MODES = {
    "abs": dict(use_odom=False, use_imu=False),
    "abs+odom": dict(use_odom=True, use_imu=False),
    "abs+imu": dict(use_odom=False, use_imu=True, imu_mode="preintegration"),
    "abs+gyro": dict(use_odom=False, use_imu=True, imu_mode="gyro"),
    "abs+odom+imu": dict(use_odom=True, use_imu=True, imu_mode="preintegration"),
}


@dataclass
class SimConfig:
    camera_rate: float = 10.0
    odom_rate: float = 50.0
    imu_rate: float = 200.0
    camera_offset: float = 0.0123            # camera clock not aligned with the IMU grid
    abs_sigma_trans: float = 0.3             # m
    abs_sigma_rot_deg: float = 5.0
    # s; 0: independent network errors. > 0: first-order Gauss-Markov errors (the same
    # sigmas, correlation exp(-dt / abs_correlation_time)), like the shipped MapNet's on a
    # held-out walk (correlation 0.92 between frames 1/15 s apart: about 0.8 s)
    abs_correlation_time: float = 0.0
    outlier_ratio: float = 0.1
    outlier_min: float = 2.0                 # m
    outlier_max: float = 5.0
    latency_min: float = 0.10                # s, network slower than odometry
    latency_max: float = 0.25
    odom_sigma_trans_per_sqrt_m: float = 0.02
    odom_sigma_rot_per_sqrt_m: float = 0.01
    odom_sigma_rot_per_sqrt_s: float = 0.002
    odom_sigma_floor: float = 1e-4           # m and rad per step, so a standing robot is not exact
    odom_scale_error: float = 0.01           # systematic, deliberately not in the covariance
    gyro_noise_density: float = 1.7e-4
    accel_noise_density: float = 2.0e-3
    gyro_bias_walk: float = 1.9e-5
    accel_bias_walk: float = 3.0e-3
    gyro_bias_sigma: float = 0.005           # initial biases drawn with these sigmas
    accel_bias_sigma: float = 0.05
    gravity: tuple = tuple(GRAVITY.tolist())
    smoothing_s: float = 0.1
    kidnap_time: float | None = None         # seconds after the start
    kidnap_distance: float = 5.0
    base_T_camera: tuple = DEFAULT_BASE_T_CAMERA
    duration: float | None = None            # seconds from the start (None: all)
    odom_outage: tuple | None = None         # (start, end) seconds after start: no odometry
    seed: int = 0

    @property
    def imu_noise(self) -> ImuNoise:
        """The IMU fields above as the shared IMU noise model."""
        return ImuNoise(gyro_noise_density=self.gyro_noise_density,
                        accel_noise_density=self.accel_noise_density,
                        gyro_bias_random_walk=self.gyro_bias_walk,
                        accel_bias_random_walk=self.accel_bias_walk,
                        gyro_initial_bias=self.gyro_bias_sigma,
                        accel_initial_bias=self.accel_bias_sigma)

    @property
    def odometry_noise(self) -> VoNoise:
        """The odometry fields above as the shared odometry noise model: isotropic rotation
        noise (heading as roll and pitch), no modelled scale walk (the scale error here is
        the constant, unmodelled ``odom_scale_error``), and the per-step floor
        ``odom_sigma_floor`` as the per-second floor that gives it at ``odom_rate``."""
        floor_variance_per_second = self.odom_sigma_floor ** 2 * self.odom_rate
        return VoNoise(translation=self.odom_sigma_trans_per_sqrt_m,
                       rotation=self.odom_sigma_rot_per_sqrt_m,
                       heading=self.odom_sigma_rot_per_sqrt_m,
                       scale=0.0,
                       translation_per_second=math.sqrt(floor_variance_per_second),
                       rotation_per_second=math.sqrt(self.odom_sigma_rot_per_sqrt_s ** 2
                                                     + floor_variance_per_second),
                       initial_std=0.0)


@dataclass
class Truth:
    """Piecewise constant-rate / constant-acceleration truth on a uniform grid."""

    t0: float
    dt: float
    p: np.ndarray          # (n, 3) positions
    R: np.ndarray          # (n, 3, 3)
    v: np.ndarray          # (n, 3) world velocity
    a: np.ndarray          # (n, 3) world acceleration over [k, k+1)
    w: np.ndarray          # (n, 3) body rate over [k, k+1)
    kidnap_time: float | None = None
    kidnap_offset: np.ndarray = field(default_factory=lambda: np.zeros(3))

    @property
    def t_end(self) -> float:
        return self.t0 + (len(self.p) - 1) * self.dt

    def _segment(self, t):
        """(times (n,), grid index k (n,), time since grid point k (n, 1)). A time within a
        thousandth of a period below a grid point belongs to that point, so a sensor clock
        that reaches it by ``t0 + k / rate`` gets its rate and acceleration: recordings are
        stamped in seconds since 1970, where a float64 time carries ~1e-7 s of rounding
        (1e-4 of a 200 Hz period)."""
        t = np.atleast_1d(np.asarray(t, dtype=float))
        k = np.clip(np.floor((t - self.t0) / self.dt + 1e-3).astype(int), 0, len(self.p) - 2)
        tau = np.clip(t - (self.t0 + k * self.dt), 0.0, None)[:, None]
        return t, k, tau

    def pose(self, t, kidnapped: bool = True):
        """Truth base pose at times ``t`` (array) -> (positions (n,3), quaternions (n,4))."""
        t, k, tau = self._segment(t)
        p = self.p[k] + self.v[k] * tau + 0.5 * self.a[k] * tau * tau
        if kidnapped and self.kidnap_time is not None:
            p = p + np.where(t[:, None] >= self.kidnap_time, self.kidnap_offset, 0.0)
        return p, matrix_to_quat(self.rotation(t))

    # The rest of :class:`~vizloc_ros.sim.sensors.Motion`, so the sensor generators sample it.

    def rotation(self, t) -> np.ndarray:
        """Body-to-map rotations (n, 3, 3) at times ``t``."""
        _, k, tau = self._segment(t)
        return self.R[k] @ so3_exp(self.w[k] * tau)

    def acceleration(self, t) -> np.ndarray:
        """World acceleration (n, 3), constant over each grid period."""
        return self.a[self._segment(t)[1]]

    def angular_velocity_body(self, t) -> np.ndarray:
        """Body rate (n, 3), constant over each grid period."""
        return self.w[self._segment(t)[1]]

    def sample_times(self, rate_hz: float, t_start: float | None = None, t_end: float | None = None):
        """Sensor times at ``rate_hz`` from ``t_start`` (default the start) to ``t_end``
        (default the last grid period's start: the truth has no motion beyond it)."""
        last = self.t0 + (len(self.p) - 2) * self.dt
        return uniform_times(self.t0 if t_start is None else t_start, last if t_end is None else t_end, rate_hz)

    def without_kidnap(self) -> "Truth":
        """The same motion with no kidnap: what odometry and IMU feel (shares the arrays)."""
        return replace(self, kidnap_time=None)


@dataclass
class SimSequence:
    events: list                  # (arrival, priority, kind, payload) sorted by arrival
    truth: Truth
    abs_stamps: np.ndarray
    abs_outlier: np.ndarray       # bool per absolute measurement
    config: SimConfig
    map_T_odom_true: tuple        # before any kidnap
    imu_bias_true: tuple | None = None   # initial (gyro, accel) biases


def synthetic_trajectory(duration: float = 30.0, rate: float = 100.0):
    """Smooth figure-of-eight (about 0.7 m/s) with heading along the path and gentle
    roll / pitch / height changes: a stand-in for a real trajectory in the tests."""
    s = np.arange(0.0, duration, 1.0 / rate)
    w = 2.0 * math.pi / 20.0
    x = 3.0 * np.sin(w * s)
    y = 2.0 * np.sin(2.0 * w * s)
    z = 1.0 + 0.2 * np.sin(0.5 * w * s)
    dx = 3.0 * w * np.cos(w * s)
    dy = 4.0 * w * np.cos(2.0 * w * s)
    yaw = np.unwrap(np.arctan2(dy, dx))
    roll = 0.05 * np.sin(1.3 * w * s)
    pitch = 0.05 * np.cos(0.7 * w * s)
    qz = quat_exp(np.stack([0 * s, 0 * s, 0.5 * yaw], -1))
    qy = quat_exp(np.stack([0 * s, 0.5 * pitch, 0 * s], -1))
    qx = quat_exp(np.stack([0.5 * roll, 0 * s, 0 * s], -1))
    q = quat_multiply(quat_multiply(qz, qy), qx)
    return s + 1000.0, np.stack([x, y, z], -1), q


def make_truth(stamps, t, q, rate: float = 200.0, smoothing_s: float = 0.1) -> Truth:
    """Resample a trajectory on a ``rate`` grid, smooth it, and make it kinematically
    consistent (positions re-integrated from the velocities the IMU will describe)."""
    stamps, t, q = sorted_distinct(stamps, t, q, min_step=1e-6)
    for i in range(1, len(q)):                      # sign-continuous quaternions
        if np.dot(q[i], q[i - 1]) < 0:
            q[i] = -q[i]
    dt = 1.0 / rate
    grid = np.arange(stamps[0], stamps[-1], dt)
    sig = smoothing_s * rate
    p = gaussian_smooth(resample(grid, stamps, t), sig)
    qg = gaussian_smooth(resample(grid, stamps, q), sig)
    qg /= np.linalg.norm(qg, axis=-1, keepdims=True)
    R = quat_to_matrix(qg)
    w = np.zeros((len(grid), 3))
    w[:-1] = so3_log(np.swapaxes(R[:-1], -1, -2) @ R[1:]) / dt
    v = np.gradient(p, dt, axis=0)
    a = np.zeros_like(v)
    a[:-1] = np.diff(v, axis=0) / dt
    # Re-integrate with the preintegration scheme so the truth and IMU agree exactly.
    steps = v[:-1] * dt + 0.5 * a[:-1] * dt * dt
    p_int = np.concatenate([p[:1], p[:1] + np.cumsum(steps, axis=0)], 0)
    return Truth(t0=float(grid[0]), dt=dt, p=p_int, R=R, v=v, a=a, w=w)


def simulate(stamps, t, q, config: SimConfig | None = None) -> SimSequence:
    """Build the sensor streams for one trajectory (see the module docstring)."""
    cfg = config if config is not None else SimConfig()
    rng = np.random.default_rng(cfg.seed)
    truth = make_truth(stamps, t, q, cfg.imu_rate, cfg.smoothing_s)
    t_start = truth.t0
    t_end = truth.t_end - 1e-6
    if cfg.duration is not None:
        t_end = min(t_end, t_start + cfg.duration)
    if cfg.kidnap_time is not None:
        ang = rng.uniform(0, 2 * math.pi)
        truth.kidnap_time = t_start + cfg.kidnap_time
        truth.kidnap_offset = cfg.kidnap_distance * np.array([math.cos(ang), math.sin(ang), 0.0])
    events = []

    # IMU and odometry: the generators of vizloc-synth, sampling the un-kidnapped truth
    # from this sequence's random generator. The IMU sits on the truth grid (zero-order
    # hold of rate and specific force, as preintegration assumes).
    motion = truth.without_kidnap()
    imu = simulate_imu(motion, cfg.imu_rate, cfg.imu_noise, rng, t_end=t_end,
                       gravity=np.asarray(cfg.gravity, dtype=float))
    for s, gyro, accel in zip(imu.times, imu.gyro, imu.accel):
        events.append((s, 0, "imu", (s, gyro, accel)))
    outage = None if cfg.odom_outage is None else (t_start + cfg.odom_outage[0], t_start + cfg.odom_outage[1])
    odom = simulate_visual_odometry(motion, cfg.odom_rate, cfg.odometry_noise, rng, t_end=t_end,
                                    scale_bias=cfg.odom_scale_error, covariance="summed", outage=outage)
    for s, odom_t, odom_q, cov in zip(odom.times, odom.t, odom.q, odom.pose_cov):
        events.append((s + 1e-4, 1, "odom", (s, odom_t, odom_q, cov)))

    # Absolute camera poses.
    a_stamps = np.arange(t_start + cfg.camera_offset, t_end, 1.0 / cfg.camera_rate)
    tp, tq = truth.pose(a_stamps)
    ct, cq = pose_compose(tp, tq, np.asarray(cfg.base_T_camera[0]), np.asarray(cfg.base_T_camera[1]))
    sig_r = math.radians(cfg.abs_sigma_rot_deg)
    cov_abs = np.diag([cfg.abs_sigma_trans ** 2] * 3 + [sig_r ** 2] * 3)
    outlier = rng.random(len(a_stamps)) < cfg.outlier_ratio
    keep = math.exp(-1.0 / (cfg.camera_rate * cfg.abs_correlation_time)) if cfg.abs_correlation_time > 0 else 0.0
    err_t = err_r = np.zeros(3)
    for j, s in enumerate(a_stamps):
        # the same draws with or without correlation: independent errors stay as they were
        err_t = keep * err_t + math.sqrt(1.0 - keep ** 2) * rng.normal(0, cfg.abs_sigma_trans, 3)
        err_r = keep * err_r + math.sqrt(1.0 - keep ** 2) * rng.normal(0, sig_r, 3)
        mt = ct[j] + err_t
        mq = quat_multiply(quat_exp(0.5 * err_r), cq[j])
        if outlier[j]:
            u = rng.normal(size=3)
            mt = mt + u / np.linalg.norm(u) * rng.uniform(cfg.outlier_min, cfg.outlier_max)
        arrival = s + rng.uniform(cfg.latency_min, cfg.latency_max)
        events.append((arrival, 2, "abs", (s, mt, mq, cov_abs.copy(), j)))
    events.sort(key=lambda e: (e[0], e[1]))
    return SimSequence(events=events, truth=truth, abs_stamps=a_stamps, abs_outlier=outlier,
                       config=cfg, map_T_odom_true=odom.map_T_odom,
                       imu_bias_true=(imu.gyro_bias[0], imu.accel_bias[0]))


# --------------------------------------------------------------------------- evaluation

def pose_error(truth_t, truth_q, est_t, est_q):
    """Error in ROS parent-frame order: (t_true - t_est, rotvec(R_true R_est^T))."""
    e_t = np.asarray(truth_t) - np.asarray(est_t)
    e_r = so3_log(quat_to_matrix(truth_q) @ quat_to_matrix(est_q).T)
    return np.concatenate([e_t, e_r])


@dataclass
class RunResult:
    abs_stamp: list = field(default_factory=list)
    status: list = field(default_factory=list)
    outlier: list = field(default_factory=list)
    raw_err: list = field(default_factory=list)
    fused_err: list = field(default_factory=list)      # NaN before initialisation
    fused_rot_err_deg: list = field(default_factory=list)
    nees: list = field(default_factory=list)
    est_stamp: list = field(default_factory=list)
    init_stamps: set = field(default_factory=set)
    update_times: list = field(default_factory=list)   # seconds per add_absolute+estimate
    odom_times: list = field(default_factory=list)


def run_sequence(fusion, seq: SimSequence, timing: bool = False) -> RunResult:
    """Feed a sequence through a fusion in arrival order; evaluate after every absolute
    measurement against the truth at the estimate's own stamp."""
    cfg = fusion.config
    res = RunResult()
    truth = seq.truth
    last_init = None
    clock = time.perf_counter
    for _, _, kind, payload in seq.events:
        if kind == "imu":
            if cfg.use_imu:
                fusion.add_imu(*payload)
            continue
        if kind == "odom":
            if cfg.use_odom:
                if timing:
                    t0 = clock()
                    fusion.add_odometry(*payload)
                    fusion.estimate()
                    res.odom_times.append(clock() - t0)
                else:
                    fusion.add_odometry(*payload)
            continue
        s, mt, mq, cov, j = payload
        t0 = clock()
        r = fusion.add_absolute(s, mt, mq, cov)
        est = fusion.estimate()
        res.update_times.append(clock() - t0)
        if fusion.initialised_from is not last_init:
            last_init = fusion.initialised_from
            res.init_stamps.update(last_init)
        tt, tq = truth.pose([s])
        ct, _ = pose_compose(tt[0], tq[0], np.asarray(seq.config.base_T_camera[0]),
                             np.asarray(seq.config.base_T_camera[1]))
        res.abs_stamp.append(s)
        res.status.append(r.status)
        res.outlier.append(bool(seq.abs_outlier[j]))
        res.raw_err.append(float(np.linalg.norm(mt - ct)))
        if est is None:
            res.fused_err.append(math.nan)
            res.fused_rot_err_deg.append(math.nan)
            res.nees.append(math.nan)
            res.est_stamp.append(math.nan)
            continue
        et, eq = truth.pose([est.stamp])
        e = pose_error(et[0], eq[0], est.t, est.q)
        res.fused_err.append(float(np.linalg.norm(e[:3])))
        res.fused_rot_err_deg.append(float(np.degrees(np.linalg.norm(e[3:]))))
        value = float(nees(e[None], est.cov_ros[None])[0])
        res.nees.append(value if math.isfinite(value) else math.inf)  # a singular covariance
        res.est_stamp.append(est.stamp)
    return res


def summarize(res: RunResult, seq: SimSequence) -> dict:
    """Targets of the fusion issue for one run."""
    raw = np.asarray(res.raw_err)
    out = np.asarray(res.outlier)
    fused = np.asarray(res.fused_err)
    nees = np.asarray(res.nees)
    valid = np.isfinite(fused)
    status = np.asarray(res.status)
    stamps = np.asarray(res.abs_stamp)
    init_outliers = int(sum(1 for s, o in zip(stamps, out) if o and s in res.init_stamps))
    outliers_accepted = int(np.sum(out & (status == "accepted"))) + init_outliers
    summary = {
        "n_absolute": int(len(raw)),
        "raw_median": float(np.median(raw)) if len(raw) else math.nan,
        "raw_inlier_median": float(np.median(raw[~out])) if np.any(~out) else math.nan,
        "fused_median": float(np.median(fused[valid])) if np.any(valid) else math.nan,
        "fused_rot_median_deg": float(np.nanmedian(res.fused_rot_err_deg)) if np.any(valid) else math.nan,
        "outliers": int(out.sum()),
        "outliers_accepted": outliers_accepted,
        "inliers_rejected": int(np.sum(~out & (status == "rejected"))),
        "nees_mean": float(np.mean(nees[valid])) if np.any(valid) else math.nan,
        "nees_median": float(np.median(nees[valid])) if np.any(valid) else math.nan,
    }
    summary["ratio"] = summary["fused_median"] / summary["raw_inlier_median"]
    summary["nees_per_dim"] = summary["nees_mean"] / 6.0
    kt = seq.truth.kidnap_time
    if kt is not None:
        after = np.where(stamps >= kt)[0]
        est_stamp = np.asarray(res.est_stamp)
        n = None
        for count, i in enumerate(after, start=1):
            if est_stamp[i] >= kt and fused[i] <= 0.5:
                n = count
                break
        summary["kidnap_recovery"] = n
    return summary
