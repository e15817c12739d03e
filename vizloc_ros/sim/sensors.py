"""The sensor noise models of the synthetic world: IMU and odometry.

One copy of each model and one generator per sensor, used twice: :func:`simulate_imu`
and :func:`simulate_visual_odometry` sample a :class:`Motion` -- the spline
:class:`~vizloc_ros.sim.trajectories.Trajectory` for ``vizloc-synth``, the resampled
recording (:class:`~vizloc_ros.sim.fusion_sim.Truth`) for the fusion test harness
(:mod:`vizloc_ros.sim.fusion_sim`), which adds the options it needs (a shared random
generator, a shorter end, an odometry outage, a fixed scale error, covariance summed per
step).

Why these models: fusion needs odometry that drifts the way real visual odometry
drifts (scale and heading wander, error growing with distance) *and* says honestly how
uncertain it is, and an IMU whose readings follow from the same motion (exact
derivatives of the spline trajectory) with the usual white noise and bias random walk.

Visual odometry: poses ``odom_T_base`` (frame ``odom``, child ``base_link``; ``odom``
coincides with the base pose at the first sample, REP-105). Each step's true relative
motion is corrupted by a scale error that is a random walk in distance travelled, by
white translation noise, and by rotation noise whose yaw part makes the heading a random
walk. The reported pose covariance is the first-order propagation of exactly these
errors (a 7-state error model: position, rotation, scale) in the ROS convention:
position error in ``odom`` axes, rotation error about the ``odom`` axes, ROS order
(x, y, z, rot_x, rot_y, rot_z).

IMU: at the base origin, axes of ``base_link``. The gyro measures the body angular
velocity, the accelerometer the specific force ``R^T (a - g)`` with
``g = (0, 0, -9.81)`` in ``map`` (so a level IMU at rest reads +9.81 on z), each plus a
bias that is a random walk and discrete white noise with
``sigma = noise_density * sqrt(rate)``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Protocol

import numpy as np

from vizloc_ros.geometry import hat, matrix_to_quat, pose_relative, quat_to_matrix, so3_exp, so3_log

#: gravity in ``map`` (z up), m/s^2
GRAVITY = np.array([0.0, 0.0, -9.81])


def specific_force(rotations: np.ndarray, acceleration: np.ndarray, gravity=GRAVITY) -> np.ndarray:
    """What an accelerometer measures: ``R^T (a - g)`` (N, 3) in the body axes, from the
    body-to-map rotations (N, 3, 3) and the world accelerations (N, 3)."""
    return np.einsum("nji,nj->ni", rotations, acceleration - gravity)


class Motion(Protocol):
    """What the generators sample: the true motion of ``base_link`` in ``map``. A spline
    :class:`~vizloc_ros.sim.trajectories.Trajectory` is one; the fusion harness's
    piecewise constant-acceleration truth is another (its IMU then describes the truth
    exactly between samples, as preintegration assumes)."""

    def sample_times(self, rate_hz: float, t_start: float | None = None,
                     t_end: float | None = None) -> np.ndarray: ...

    def pose(self, times) -> tuple[np.ndarray, np.ndarray]: ...

    def rotation(self, times) -> np.ndarray: ...

    def acceleration(self, times) -> np.ndarray: ...

    def angular_velocity_body(self, times) -> np.ndarray: ...


def _sample_times(trajectory: Motion, rate_hz: float, sensor: str, t_end: float | None) -> np.ndarray:
    """The sensor's sample times from the start of the motion to ``t_end`` (None: its end),
    with a clear error for a bad rate."""
    if rate_hz <= 0:
        raise ValueError(f"{sensor} rate must be positive, got {rate_hz}")
    return trajectory.sample_times(rate_hz, t_end=t_end)


# --------------------------------------------------------------------------- IMU

@dataclass(frozen=True)
class ImuNoise:
    """Continuous-time IMU noise (EuRoC's ADIS16448 datasheet values, doubled)."""

    gyro_noise_density: float = 3.4e-4  # rad/s/sqrt(Hz)
    accel_noise_density: float = 4.0e-3  # m/s^2/sqrt(Hz)
    gyro_bias_random_walk: float = 3.8e-5  # rad/s^2/sqrt(Hz)
    accel_bias_random_walk: float = 6.0e-3  # m/s^3/sqrt(Hz)
    gyro_initial_bias: float = 2e-3  # rad/s, std of the turn-on bias
    accel_initial_bias: float = 2e-2  # m/s^2

    @classmethod
    def none(cls) -> "ImuNoise":
        """A perfect IMU (for checks)."""
        return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)

    def white_sigma(self, rate_hz: float) -> tuple[float, float]:
        """(gyro, accel) standard deviation of one sample's white noise at ``rate_hz``."""
        return self.gyro_noise_density * np.sqrt(rate_hz), self.accel_noise_density * np.sqrt(rate_hz)

    def bias_step_sigma(self, rate_hz: float) -> tuple[float, float]:
        """(gyro, accel) standard deviation of one sample period's bias random-walk step."""
        dt = 1.0 / rate_hz
        return self.gyro_bias_random_walk * np.sqrt(dt), self.accel_bias_random_walk * np.sqrt(dt)


@dataclass
class ImuSamples:
    times: np.ndarray  # (N,) trajectory seconds
    gyro: np.ndarray  # (N, 3) rad/s in base_link
    accel: np.ndarray  # (N, 3) m/s^2 specific force in base_link
    gyro_bias: np.ndarray  # (N, 3) the true biases, for evaluation
    accel_bias: np.ndarray
    gyro_cov: np.ndarray  # (3, 3) white-noise covariance of one sample (goes in the message)
    accel_cov: np.ndarray


def simulate_imu(trajectory: Motion, rate_hz: float = 200.0, noise: ImuNoise = ImuNoise(),
                 seed: int | np.random.Generator = 0, *, t_end: float | None = None,
                 gravity=GRAVITY) -> ImuSamples:
    """IMU samples at ``rate_hz`` over the trajectory (up to ``t_end`` if given). ``seed`` is
    a seed or a generator to draw from (the fusion harness shares one across its sensors)."""
    times = _sample_times(trajectory, rate_hz, "IMU", t_end)
    rng = np.random.default_rng(seed)  # a Generator comes back as is
    n = len(times)
    accel_true = specific_force(trajectory.rotation(times), trajectory.acceleration(times), gravity)
    gyro_true = trajectory.angular_velocity_body(times)

    def bias_walk(initial_std, step_std):
        start = rng.normal(0.0, initial_std, 3) if initial_std > 0 else np.zeros(3)
        steps = rng.normal(0.0, step_std, (n, 3)) if step_std > 0 else np.zeros((n, 3))
        steps[0] = 0.0
        return start + np.cumsum(steps, axis=0)

    gyro_step, accel_step = noise.bias_step_sigma(rate_hz)
    gyro_bias = bias_walk(noise.gyro_initial_bias, gyro_step)
    accel_bias = bias_walk(noise.accel_initial_bias, accel_step)
    gyro_sigma, accel_sigma = noise.white_sigma(rate_hz)
    gyro = gyro_true + gyro_bias + (rng.normal(0.0, gyro_sigma, (n, 3)) if gyro_sigma > 0 else 0.0)
    accel = accel_true + accel_bias + (rng.normal(0.0, accel_sigma, (n, 3)) if accel_sigma > 0 else 0.0)
    # A perfect IMU still reports a tiny variance: a zero covariance means "unknown" in ROS.
    return ImuSamples(times, gyro, accel, gyro_bias, accel_bias,
                      np.eye(3) * max(gyro_sigma, 1e-6) ** 2, np.eye(3) * max(accel_sigma, 1e-6) ** 2)


# --------------------------------------------------------------------------- visual odometry

@dataclass(frozen=True)
class VoNoise:
    """Odometry error model; rates per metre travelled (random walks in distance) plus a
    small per-second floor so that a standing robot is not infinitely certain. The
    visual odometry of ``vizloc-synth`` uses it as is; the fusion harness's odometry uses
    it without the scale walk (``SimConfig.odometry_noise``)."""

    translation: float = 0.01  # m / sqrt(m), white, per axis
    rotation: float = 0.003  # rad / sqrt(m) about roll and pitch
    heading: float = 0.015  # rad / sqrt(m) about yaw: the heading random walk
    scale: float = 0.02  # 1 / sqrt(m): the scale-error random walk
    translation_per_second: float = 0.001  # m / sqrt(s)
    rotation_per_second: float = 0.0005  # rad / sqrt(s)
    initial_std: float = 1e-3  # m and rad: the pose at the odom origin is known this well

    @classmethod
    def none(cls) -> "VoNoise":
        """Drift-free odometry (still reports a tiny covariance: zero would mean "unknown")."""
        return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1e-3)

    def step_covariance(self, distance: float, dt: float) -> np.ndarray:
        """7x7 covariance of one step's noise: (translation (3), rotation (3), scale)."""
        trans = self.translation ** 2 * distance + self.translation_per_second ** 2 * dt
        rot = self.rotation ** 2 * distance + self.rotation_per_second ** 2 * dt
        yaw = self.heading ** 2 * distance + self.rotation_per_second ** 2 * dt
        return np.diag([trans, trans, trans, rot, rot, yaw, self.scale ** 2 * distance])


@dataclass
class OdometrySamples:
    times: np.ndarray  # (N,) trajectory seconds
    t: np.ndarray  # (N, 3) odom_T_base translation
    q: np.ndarray  # (N, 4) wxyz
    pose_cov: np.ndarray  # (N, 6, 6) ROS order, odom axes
    linear: np.ndarray  # (N, 3) body-frame velocity (base_link), as in nav_msgs/Odometry.twist
    angular: np.ndarray  # (N, 3)
    twist_cov: np.ndarray  # (N, 6, 6)
    true_t: np.ndarray  # (N, 3) the exact odom_T_base, for evaluation
    true_q: np.ndarray
    map_T_odom: tuple[np.ndarray, np.ndarray]  # the base pose at the first sample
    scale_error: np.ndarray  # (N,) the simulated scale error (the walk, without a fixed bias)

    def select(self, keep: np.ndarray) -> "OdometrySamples":
        """The samples where ``keep`` (bool (N,)) is true; ``map_T_odom`` stays."""
        return replace(self, **{f.name: getattr(self, f.name)[keep] for f in fields(self)
                                if f.name != "map_T_odom"})


#: how the odometry reports its pose covariance: first-order propagation of the error model
#: (honest, as visual odometry does it), or the step variances summed in the ``odom`` axes
#: (as simple wheel-odometry drivers do it; the fusion harness)
ODOMETRY_COVARIANCES = ("propagated", "summed")


def simulate_visual_odometry(trajectory: Motion, rate_hz: float = 30.0, noise: VoNoise = VoNoise(),
                             seed: int | np.random.Generator = 0, *, t_end: float | None = None,
                             scale_bias: float = 0.0, covariance: str = "propagated",
                             outage: tuple[float, float] | None = None) -> OdometrySamples:
    """Drifting odometry of ``base_link`` in ``odom`` at ``rate_hz`` (up to ``t_end`` if given).

    ``seed``: a seed or a generator to draw from. ``scale_bias``: a fixed scale error on top
    of the modelled walk, deliberately not in the covariance (real odometry is miscalibrated
    without knowing it). ``covariance``: one of :data:`ODOMETRY_COVARIANCES`. ``outage``:
    ``(start, end)`` in trajectory seconds without messages; the odometry keeps integrating
    through it, so the first pose after it includes the motion during it.
    """
    if covariance not in ODOMETRY_COVARIANCES:
        raise ValueError(f"covariance must be one of {ODOMETRY_COVARIANCES}, got {covariance!r}")
    propagated = covariance == "propagated"
    times = _sample_times(trajectory, rate_hz, "odometry", t_end)
    rng = np.random.default_rng(seed)  # a Generator comes back as is
    n = len(times)
    dt = 1.0 / rate_hz
    t_map, q_map = trajectory.pose(times)
    true_t, true_q = pose_relative(t_map[0], q_map[0], t_map, q_map)
    true_R = quat_to_matrix(true_q)

    # Per-step true motion, noise and scale walk, all at once; only the recursion is a loop.
    delta_R = np.einsum("nji,njk->nik", true_R[:-1], true_R[1:])
    delta_t = np.einsum("nji,nj->ni", true_R[:-1], true_t[1:] - true_t[:-1])
    distance = np.linalg.norm(delta_t, axis=1)
    step_std = np.sqrt(np.stack([np.diag(noise.step_covariance(d, dt)) for d in distance]))  # (n-1, 7)
    sample = rng.normal(0.0, 1.0, step_std.shape) * step_std
    scale_error = np.cumsum(sample[:, 6])
    measured_t = (1.0 + scale_bias + scale_error)[:, None] * delta_t + sample[:, :3]
    measured_R = delta_R @ so3_exp(sample[:, 3:6])

    out_t = np.zeros((n, 3))
    out_R = np.zeros((n, 3, 3))
    out_cov = np.zeros((n, 6, 6))
    R = np.eye(3)
    p = np.zeros(3)
    cov = np.diag([noise.initial_std ** 2] * 6 + [0.0])
    out_R[0], out_cov[0] = R, cov[:6, :6]
    scale_var = np.zeros(n)
    F = np.eye(7)
    G = np.zeros((7, 7))
    G[6, 6] = 1.0
    for k in range(1, n):
        step = k - 1
        R_next = R @ measured_R[step]
        if propagated:
            # first-order propagation of the error (dp, dtheta, ds), position and rotation
            # errors in odom axes; this step's scale increment already acts on this step
            lever = R @ delta_t[step]
            F[0:3, 3:6] = -hat(R @ measured_t[step])
            F[0:3, 6] = lever
            G[0:3, 0:3] = R
            G[3:6, 3:6] = R_next
            G[0:3, 6] = lever
            cov = F @ cov @ F.T + (G * step_std[step] ** 2) @ G.T
            out_cov[k] = 0.5 * (cov[:6, :6] + cov[:6, :6].T)
            scale_var[k] = cov[6, 6]
        p = p + R @ measured_t[step]
        R = R_next
        out_t[k], out_R[k] = p, R
    if not propagated:
        summed = np.diag(cov) + np.cumsum(step_std ** 2, axis=0)  # (n - 1, 7)
        out_cov[1:] = np.einsum("ni,ij->nij", summed[:, :6], np.eye(6))
        scale_var[1:] = summed[:, 6]

    # Twist in base_link, as VO reports it: the measured step over the period.
    out_linear = np.zeros((n, 3))
    out_angular = np.zeros((n, 3))
    out_linear[1:] = measured_t / dt
    out_angular[1:] = so3_log(measured_R) / dt
    out_linear[0], out_angular[0] = out_linear[1 % n], out_angular[1 % n]
    twist_var = np.zeros((n, 6))
    twist_var[1:] = step_std[:, :6] ** 2 / dt ** 2
    twist_var[1:, :3] += (scale_var[1:] * (distance / dt) ** 2)[:, None]
    twist_var[0] = np.diag(noise.step_covariance(0.0, dt))[:6] / dt ** 2
    out_twist_cov = np.einsum("ni,ij->nij", twist_var, np.eye(6))
    scales = np.concatenate([[0.0], scale_error])
    samples = OdometrySamples(times, out_t, matrix_to_quat(out_R), out_cov, out_linear, out_angular,
                              out_twist_cov, true_t, true_q, (t_map[0], q_map[0]), scales)
    if outage is None:
        return samples
    return samples.select(~((times >= outage[0]) & (times < outage[1])))
