"""Relative motion between two stamps from the buffered sensors: odometry increments with
their covariance, IMU preintegration (or the gyro alone), the virtual constant-velocity
IMU, and the random walk used where no sensor covers an interval.

Why one place: the graph's edges, the prediction a measurement is gated against and the
consistency check of (re)initialisation all ask the same question, "how did the robot
move from ``sa`` to ``sb`` and how sure are we", and must get the same answer.
"""
from __future__ import annotations

import math

import gtsam
import numpy as np

from vizloc_ros.fusion.buffers import SensorBuffers
from vizloc_ros.fusion.config import FusionConfig
from vizloc_ros.fusion.conventions import pose3, ros_cov_to_gtsam


class MotionModel:
    """The configured motion sources over the sensor buffers, with the IMU parameters built
    once. ``nav`` says whether the graph carries velocity and bias states: with an IMU, or
    for the constant-velocity model when there is no odometry."""

    def __init__(self, config: FusionConfig, sensors: SensorBuffers):
        c = self.config = config
        self.sensors = sensors
        self.preint = c.use_imu and c.imu_mode == "preintegration"
        self.gyro = c.use_imu and c.imu_mode == "gyro"
        self.cv = not c.use_odom and c.motion_model == "constant_velocity"
        # Velocity and bias states exist with an IMU, or for the constant-velocity model.
        self.nav = self.preint or self.gyro or self.cv
        base_T_imu = pose3(*c.base_T_imu)
        if self.preint:
            self.imu_params = self._pim_params(
                c.gravity, c.gyro_noise_density, c.accel_noise_density, c.gyro_bias_walk,
                c.accel_bias_walk, base_T_imu)
        if self.nav:
            # "Virtual IMU": zero specific force without gravity is a constant-velocity
            # model whose accelerometer noise is the white-noise acceleration (and zero
            # rotation rate with motion_sigma_rot a rotation random walk). In gyro mode the
            # real gyro replaces the virtual one; the virtual IMU also bridges IMU gaps.
            gyro_walk = c.gyro_bias_walk if c.use_imu else 1e-4
            accel_walk = c.accel_bias_walk if self.preint else 1e-3
            self.virt_params = self._pim_params(
                (0.0, 0.0, 0.0), c.motion_sigma_rot, c.motion_sigma_acc, gyro_walk, accel_walk,
                gtsam.Pose3())
            if self.gyro:
                self.gyro_params = self._pim_params(
                    (0.0, 0.0, 0.0), c.gyro_noise_density, c.motion_sigma_acc, gyro_walk,
                    accel_walk, gtsam.Pose3(base_T_imu.rotation(), np.zeros(3)))
            self.bias_prior_sigmas = np.array(
                [c.accel_bias_sigma if self.preint else 1e-3] * 3
                + [c.gyro_bias_sigma if c.use_imu else 1e-3] * 3)
        self.imu_rot = base_T_imu.rotation().matrix()
        self.forget()

    def forget(self) -> None:
        """Drop the memos (they refer to samples of buffers that were just cleared)."""
        self.between_memo: dict = {}      # (id, id) -> (samples, relative motion)
        self.pim_memo = None              # last preintegration (prediction, then its edge)

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

    # ------------------------------------------------------------------ random walk

    def random_walk_noise(self, dt):
        c = self.config
        r = c.motion_sigma_rot * math.sqrt(dt)
        t = c.motion_sigma_trans * math.sqrt(dt)
        return gtsam.noiseModel.Diagonal.Sigmas(np.array([r, r, r, t, t, t]))

    def random_walk_cov(self, dt):
        c = self.config
        r = c.motion_sigma_rot ** 2 * dt
        t = c.motion_sigma_trans ** 2 * dt
        return np.diag([r, r, r, t, t, t])

    # ------------------------------------------------------------------ odometry

    def odom_at(self, s: float):
        return self.sensors.odom_at(s, self.config.odom_max_gap)

    def key_odom(self, key):
        """Odometry sample at a graph key's stamp, found once and kept on the key."""
        if key.odom is None and self.config.use_odom:
            key.odom = self.odom_at(key.stamp)
        return key.odom

    def odom_covers(self, key, s):
        return (self.config.use_odom and self.key_odom(key) is not None
                and self.odom_at(s) is not None)

    def relative(self, sa: float, sb: float, ka=None, kb=None):
        """Motion from ``sa`` to ``sb`` and its covariance (GTSAM order, frame at ``sb``):
        odometry where it covers both ends, else gyro rotation, else a random walk.
        ``ka`` / ``kb``: the graph keys at those stamps, if any (their odometry is kept)."""
        c = self.config
        dt = abs(sb - sa)
        if c.use_odom:
            oa = self.key_odom(ka) if ka is not None else self.odom_at(sa)
            ob = self.key_odom(kb) if kb is not None else self.odom_at(sb)
            if oa is not None and ob is not None:
                return self.odom_between(oa, ob)
        q = self.random_walk_cov(dt)
        if self.gyro:
            rot = self.gyro_rotation(sa, sb)
            if rot is not None:
                R, sig = rot
                q[:3, :3] = np.eye(3) * sig ** 2
                return gtsam.Pose3(R, np.zeros(3)), q
        return gtsam.Pose3(), q

    def odom_between(self, oa, ob):
        """Relative motion between two odometry samples and its covariance (GTSAM order,
        frame of the later pose): the growth of the accumulated covariance, floored."""
        memo_key = (id(oa), id(ob))
        got = self.between_memo.get(memo_key)
        if got is not None and got[0] is oa and got[1] is ob:
            return got[2]
        result = self._odom_between_inner(oa, ob)
        if len(self.between_memo) > 64:
            self.between_memo.clear()
        self.between_memo[memo_key] = (oa, ob, result)
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

    # ------------------------------------------------------------------ IMU

    def pim(self, sa, sb, bias):
        """Preintegrated motion a -> b and whether a real sensor measured it: the IMU
        (preintegration mode), the gyro with zero acceleration (gyro mode), else the
        virtual constant-velocity model."""
        memo = self.pim_memo
        if memo is not None and memo[0] == sa and memo[1] == sb and memo[2] is bias \
                and memo[3] == len(self.sensors.imu_t):
            return memo[4]
        got = self._pim_inner(sa, sb, bias)
        self.pim_memo = (sa, sb, bias, len(self.sensors.imu_t), got)
        return got

    def _pim_inner(self, sa, sb, bias):
        if self.preint:
            pim = self._preintegrate(sa, sb, bias, self.imu_params, zero_accel=False)
            if pim is not None:
                return pim, True
        elif self.gyro:
            pim = self._preintegrate(sa, sb, bias, self.gyro_params, zero_accel=True)
            if pim is not None:
                return pim, True
        pim = gtsam.PreintegratedCombinedMeasurements(self.virt_params, bias)
        dt = max(sb - sa, 1e-6)
        n = max(1, int(math.ceil(dt / 0.05)))
        zero = np.zeros(3)
        for _ in range(n):
            pim.integrateMeasurement(zero, zero, dt / n)
        return pim, False

    def _preintegrate(self, sa, sb, bias, params, zero_accel):
        sensors = self.sensors
        holds = sensors.imu_holds(sa, sb, self.config.imu_max_gap)
        if holds is None:
            return None
        pim = gtsam.PreintegratedCombinedMeasurements(params, bias)
        zero = np.zeros(3)
        for k, dt in holds:
            pim.integrateMeasurement(zero if zero_accel else sensors.imu_acc[k],
                                     sensors.imu_gyro[k], dt)
        return pim if pim.deltaTij() > 0.0 else None

    def gyro_rotation(self, sa, sb):
        """Rotation of the base from ``sa`` to ``sb`` from the gyro alone, and the standard
        deviation of each axis (white noise plus an unknown bias of gyro_bias_sigma)."""
        if sb < sa:
            got = self.gyro_rotation(sb, sa)
            if got is None:
                return None
            return got[0].inverse(), got[1]
        gyro = self.sensors.imu_gyro
        holds = self.sensors.imu_holds(sa, sb, self.config.imu_max_gap)
        if holds is None:
            return None
        R = gtsam.Rot3()
        Ri = self.imu_rot
        for k, dt in holds:
            R = R.compose(gtsam.Rot3.Expmap(Ri @ gyro[k] * dt))
        c = self.config
        dt = sb - sa
        sig = math.sqrt(c.gyro_noise_density ** 2 * dt + (c.gyro_bias_sigma * dt) ** 2 + 1e-12)
        return R, sig
