"""Smooth 6-DoF trajectories of the robot base in the synthetic room.

Why uniform cubic B-splines: position and the ZYX Euler angles (yaw, pitch, roll) of
``base_link`` in ``map`` are C2 functions of time with analytic first and second
derivatives, so the IMU simulation gets exact velocities, accelerations and body rates
(no noisy finite differences), and the camera poses, the odometry and the IMU all come
from one continuous motion.

Two kinds of trajectory:

* :func:`random_walk`: a seeded wander through the free space of the room at a
  hand-held / robot speed (0.3-0.8 m/s), camera mostly horizontal with some pitch and
  roll, staying clear of walls and boxes;
* :func:`trajectory_from_tum`: a real recording (TUM file: hand-held camera, MAV)
  recentred, rotated and, if needed, shrunk into the room, keeping its real timing, shake
  and turn rates. Its orientation is re-based with one constant rotation so that the
  mean orientation is level and looks along the base x axis.
  :func:`place_tum_trajectory` also returns that placement (:class:`TumPlacement`), so
  that what was evaluated can be mapped back to the recording.

Base frame (REP-103): x forward, y left, z up. The camera optical frame sits on the
base with the fixed extrinsic :data:`CAMERA_IN_BASE_T` / :data:`CAMERA_IN_BASE_Q`; the
camera pose (camera-to-world) is base pose * extrinsic (:func:`camera_poses`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vizloc_ros.geometry import matrix_to_quat, pose_compose, quat_to_matrix
from vizloc_ros.ros_io.camera_mount import OPTICAL_IN_BODY_R
from vizloc_ros.sim.scene import Scene

#: base_link -> camera_optical_frame: the camera 0.1 m ahead of the base origin, optical
#: z along base x (forward), optical x along -base y (right), optical y along -base z (down).
CAMERA_IN_BASE_T = np.array([0.1, 0.0, 0.0])
OPTICAL_IN_BASE_R = OPTICAL_IN_BODY_R
CAMERA_IN_BASE_Q = matrix_to_quat(OPTICAL_IN_BASE_R)

#: margins used to keep a trajectory clear of the walls and of the box footprints (m)
WALL_MARGIN = 0.6
BOX_MARGIN = 0.5
#: the base stays in this height band (hand-held camera) (m)
HEIGHT_RANGE = (1.1, 1.6)
#: a fitted recording may climb or drop at most this much (m)
MAX_HEIGHT_EXTENT = 2.0
#: longest tracking dropout of a TUM file that is bridged by interpolation (s)
MAX_TUM_GAP = 0.5


def _basis(u: np.ndarray, derivative: int) -> np.ndarray:
    """Uniform cubic B-spline basis (N, 4) at u in [0, 1] (derivatives with respect to u)."""
    if derivative == 0:
        return np.stack([(1 - u) ** 3, 3 * u ** 3 - 6 * u ** 2 + 4,
                         -3 * u ** 3 + 3 * u ** 2 + 3 * u + 1, u ** 3], -1) / 6.0
    if derivative == 1:
        return np.stack([-(1 - u) ** 2, 3 * u ** 2 - 4 * u, -3 * u ** 2 + 2 * u + 1, u ** 2], -1) / 2.0
    if derivative == 2:
        return np.stack([1 - u, 3 * u - 2, 1 - 3 * u, u], -1)
    raise ValueError("derivative must be 0, 1 or 2")


def euler_zyx_to_matrix(yaw, pitch, roll) -> np.ndarray:
    """R = Rz(yaw) Ry(pitch) Rx(roll) (..., 3, 3); positive pitch tilts base x downwards."""
    cy, sy = np.cos(yaw), np.sin(yaw)
    cp, sp = np.cos(pitch), np.sin(pitch)
    cr, sr = np.cos(roll), np.sin(roll)
    return np.stack([
        np.stack([cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr], -1),
        np.stack([sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr], -1),
        np.stack([-sp, cp * sr, cp * cr], -1),
    ], -2)


def matrix_to_euler_zyx(R) -> np.ndarray:
    """Inverse of :func:`euler_zyx_to_matrix` -> (..., 3) (yaw, pitch, roll)."""
    R = np.asarray(R, dtype=float)
    yaw = np.arctan2(R[..., 1, 0], R[..., 0, 0])
    pitch = -np.arcsin(np.clip(R[..., 2, 0], -1.0, 1.0))
    roll = np.arctan2(R[..., 2, 1], R[..., 2, 2])
    return np.stack([yaw, pitch, roll], -1)


@dataclass
class Trajectory:
    """Continuous-time pose of ``base_link`` in ``map``.

    Position and (yaw, pitch, roll) are uniform cubic B-splines with knots every ``dt``
    seconds from ``t0``; control point k sits near the value at ``t0 + k dt``. Valid on
    [t0, t_end].
    """

    t0: float
    dt: float
    position_ctrl: np.ndarray  # (K, 3)
    euler_ctrl: np.ndarray  # (K, 3) yaw (unwrapped), pitch, roll

    def __post_init__(self):
        self.position_ctrl = np.asarray(self.position_ctrl, dtype=float)
        self.euler_ctrl = np.asarray(self.euler_ctrl, dtype=float)
        if len(self.position_ctrl) < 2 or self.position_ctrl.shape != self.euler_ctrl.shape:
            raise ValueError("a trajectory needs >= 2 control points of position and Euler angles")
        ctrl = np.concatenate([self.position_ctrl, self.euler_ctrl], axis=1)
        # pad by linear extrapolation: one point before, two after
        self._ctrl = np.concatenate([2 * ctrl[:1] - ctrl[1:2], ctrl,
                                     2 * ctrl[-1:] - ctrl[-2:-1], 3 * ctrl[-1:] - 2 * ctrl[-2:-1]])

    @property
    def t_end(self) -> float:
        return self.t0 + (len(self.position_ctrl) - 1) * self.dt

    @property
    def duration(self) -> float:
        return self.t_end - self.t0

    def _evaluate(self, times, derivative: int) -> np.ndarray:
        times = np.atleast_1d(np.asarray(times, dtype=float))
        if np.any(times < self.t0 - 1e-9) or np.any(times > self.t_end + 1e-9):
            raise ValueError(f"times outside the trajectory [{self.t0}, {self.t_end}]")
        s = np.clip((times - self.t0) / self.dt, 0.0, len(self.position_ctrl) - 1)
        index = np.minimum(np.floor(s).astype(np.int64), len(self.position_ctrl) - 1)
        u = s - index
        basis = _basis(u, derivative)  # (N, 4)
        ctrl = self._ctrl[index[:, None] + np.arange(4)[None, :]]  # (N, 4, 6); padded index = i - 1 + j + 1
        return np.einsum("nj,njd->nd", basis, ctrl) / self.dt ** derivative

    def position(self, times) -> np.ndarray:
        return self._evaluate(times, 0)[:, :3]

    def velocity(self, times) -> np.ndarray:
        """World-frame velocity (N, 3) m/s."""
        return self._evaluate(times, 1)[:, :3]

    def acceleration(self, times) -> np.ndarray:
        """World-frame acceleration (N, 3) m/s^2 (gravity not included)."""
        return self._evaluate(times, 2)[:, :3]

    def euler(self, times) -> np.ndarray:
        return self._evaluate(times, 0)[:, 3:]

    def rotation(self, times) -> np.ndarray:
        yaw, pitch, roll = np.moveaxis(self.euler(times), -1, 0)
        return euler_zyx_to_matrix(yaw, pitch, roll)

    def pose(self, times) -> tuple[np.ndarray, np.ndarray]:
        """Base pose in map: (t (N, 3), q_wxyz (N, 4))."""
        return self.position(times), matrix_to_quat(self.rotation(times))

    def angular_velocity_body(self, times) -> np.ndarray:
        """Angular velocity (N, 3) rad/s expressed in the base frame (what a gyro measures)."""
        values = self._evaluate(times, 0)[:, 3:]
        rates = self._evaluate(times, 1)[:, 3:]
        _, pitch, roll = values.T
        yaw_d, pitch_d, roll_d = rates.T
        return np.stack([
            roll_d - yaw_d * np.sin(pitch),
            pitch_d * np.cos(roll) + yaw_d * np.sin(roll) * np.cos(pitch),
            -pitch_d * np.sin(roll) + yaw_d * np.cos(roll) * np.cos(pitch),
        ], -1)

    def sample_times(self, rate_hz: float, t_start: float | None = None, t_end: float | None = None) -> np.ndarray:
        """Uniform sample times at ``rate_hz`` within the trajectory (relative seconds)."""
        return uniform_times(self.t0 if t_start is None else t_start, self.t_end if t_end is None else t_end,
                             rate_hz)


def uniform_times(t_start: float, t_end: float, rate_hz: float) -> np.ndarray:
    """Sample times ``t_start + k / rate_hz`` up to and including ``t_end`` (within 1e-9 of a
    period): the one sensor clock of the synthetic world and of the fusion harness."""
    count = int(math.floor((t_end - t_start) * rate_hz + 1e-9)) + 1
    return t_start + np.arange(count) / rate_hz


def camera_poses(trajectory: Trajectory, times) -> tuple[np.ndarray, np.ndarray]:
    """Camera optical frame pose in map (camera-to-world) = base pose * extrinsic."""
    t_base, q_base = trajectory.pose(times)
    return pose_compose(t_base, q_base, CAMERA_IN_BASE_T, CAMERA_IN_BASE_Q)


def static_trajectory(position, yaw: float = 0.0, duration: float = 2.0, pitch: float = 0.0,
                      roll: float = 0.0) -> Trajectory:
    """A base that does not move (for checks: the IMU must measure gravity only)."""
    count = max(2, int(math.ceil(duration)) + 1)
    dt = duration / (count - 1)
    return Trajectory(0.0, dt, np.tile(np.asarray(position, float), (count, 1)),
                      np.tile([yaw, pitch, roll], (count, 1)))


# --------------------------------------------------------------------------- random walk

def _segment_free(scene: Scene, a: np.ndarray, b: np.ndarray, wall: float, box: float) -> bool:
    samples = a[None, :] + np.linspace(0.0, 1.0, 12)[:, None] * (b - a)[None, :]
    return bool(np.all(scene.free_space_mask(samples, wall, box)))


def random_walk(scene: Scene, duration: float, seed: int, speed_range=(0.3, 0.8),
                knot_dt: float = 1.0, height_range=HEIGHT_RANGE, max_attempts: int = 200) -> Trajectory:
    """A seeded smooth wander of ``duration`` seconds through the free space of ``scene``.

    Control points one second apart take random steps (speed drawn in ``speed_range``)
    with a randomly turning heading, turning away from obstacles; the yaw follows the
    heading plus a slowly varying look-around offset, pitch is a few degrees (mostly
    looking slightly down), roll small. The dense curve is checked against the walls and
    boxes and redrawn if it comes too close.
    """
    if duration <= 0:
        raise ValueError(f"duration must be positive, got {duration}")
    rng = np.random.default_rng(seed)
    knots = int(math.ceil(duration / knot_dt)) + 1
    lo, hi = scene.room_lo[:2] + WALL_MARGIN + 0.2, scene.room_hi[:2] - WALL_MARGIN - 0.2
    for _ in range(max_attempts):
        while True:
            start = rng.uniform(lo, hi)
            if scene.free_space_mask(start, WALL_MARGIN + 0.2, BOX_MARGIN + 0.2):
                break
        xy = [start]
        heading = rng.uniform(-np.pi, np.pi)
        for _ in range(knots - 1):
            step = rng.uniform(*speed_range) * knot_dt
            heading += rng.normal(0.0, 0.35)
            for turn in [0.0] + [sign * k * 0.35 for k in range(1, 10) for sign in (1, -1)]:
                candidate = xy[-1] + step * np.array([np.cos(heading + turn), np.sin(heading + turn)])
                if _segment_free(scene, xy[-1], candidate, WALL_MARGIN + 0.1, BOX_MARGIN + 0.1):
                    heading += turn
                    xy.append(candidate)
                    break
            else:
                xy.append(xy[-1].copy())  # boxed in: pause here; the next knot turns round
                heading += np.pi
        xy = np.array(xy)
        z = np.clip(np.mean(height_range) + np.cumsum(rng.normal(0.0, 0.05, knots)), *height_range)
        motion = np.gradient(xy, axis=0)
        headings = np.unwrap(np.arctan2(motion[:, 1], motion[:, 0]))
        offset = np.zeros(knots)
        for k in range(1, knots):  # slowly varying look-around, |offset| <= 0.9 rad
            offset[k] = np.clip(0.8 * offset[k - 1] + rng.normal(0.0, 0.3), -0.9, 0.9)
        yaw = headings + offset
        pitch = np.clip(rng.normal(0.05, 0.08, knots), -0.2, 0.3)
        roll = np.clip(rng.normal(0.0, 0.04, knots), -0.1, 0.1)
        trajectory = Trajectory(0.0, knot_dt, np.column_stack([xy, z]), np.column_stack([yaw, pitch, roll]))
        dense = trajectory.position(trajectory.sample_times(20.0))
        if np.all(scene.free_space_mask(dense[:, :2], WALL_MARGIN - 0.15, BOX_MARGIN - 0.15)):
            return trajectory
    raise RuntimeError(f"could not draw a collision-free walk of {duration} s in scene "
                       f"{scene.spec.name!r} (seed {seed})")


# --------------------------------------------------------------------------- recordings
# Shared with the fusion harness (vizloc_ros.sim.fusion_sim), which derives its truth from
# a recording the same way: sort, resample on a uniform grid, smooth.

def sorted_distinct(stamps, *columns, min_step: float):
    """Sort a recording by stamp (stable: of equal stamps the first stays) and drop every
    sample less than ``min_step`` after its predecessor -> (stamps, *columns) as float arrays."""
    stamps = np.asarray(stamps, dtype=float).reshape(-1)
    order = np.argsort(stamps, kind="stable")
    keep = np.concatenate([[True], np.diff(stamps[order]) > min_step])
    return (stamps[order][keep], *(np.asarray(c, dtype=float)[order][keep] for c in columns))


def resample(grid: np.ndarray, stamps: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Linear interpolation of every column of ``values`` (N, D) at the times ``grid``."""
    return np.stack([np.interp(grid, stamps, values[:, d]) for d in range(values.shape[1])], -1)


def smooth(values: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Filter every column of ``values`` (N, D) with ``kernel``, the ends held (edge padding),
    so that the output keeps N samples."""
    before = len(kernel) // 2
    padded = np.pad(values, ((before, len(kernel) - 1 - before), (0, 0)), mode="edge")
    return np.stack([np.convolve(padded[:, d], kernel, mode="valid") for d in range(values.shape[1])], -1)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Box filter over ``window`` samples (``values`` itself when ``window`` <= 1)."""
    if window <= 1:
        return values
    return smooth(values, np.ones(window) / window)


def gaussian_smooth(values: np.ndarray, sigma_samples: float) -> np.ndarray:
    """Gaussian filter of standard deviation ``sigma_samples`` (a copy when under half a sample)."""
    if sigma_samples <= 0.5:
        return values.copy()
    half = int(math.ceil(4 * sigma_samples))
    kernel = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma_samples) ** 2)
    kernel /= kernel.sum()
    return smooth(values, kernel)


# --------------------------------------------------------------------------- TUM-driven

def _chordal_mean_rotation(R: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(np.sum(R, axis=0))
    mean = u @ vt
    if np.linalg.det(mean) < 0:
        mean = u @ np.diag([1.0, 1.0, -1.0]) @ vt
    return mean


@dataclass(frozen=True)
class TumPlacement:
    """How a recording was placed in the room: enough to map the rendered walk back.

    Positions: ``p_map = scale * R(yaw) p_source + offset`` (R(yaw) a rotation about z).
    Orientations: ``R_base_in_map = R(yaw) R_body_in_source C`` with C =
    ``base_in_body_q_wxyz`` (the constant re-basing that levels the mean attitude).
    Times: the walk's second 0 is the source's stamp ``source_start_stamp``. The walk
    itself is the source smoothed over one knot interval, so mapping back recovers the
    source up to that smoothing.
    """

    scale: float
    yaw: float  # rad, about the room's z axis
    offset: np.ndarray  # (3,) m, in map
    base_in_body_q_wxyz: np.ndarray  # (4,)
    source_start_stamp: float  # the source file's stamp at the walk's time 0
    window: tuple[float, float]  # seconds from the source's first stamp
    keep_scale: bool  # True when shrinking was not allowed (--keep-scale)

    def rotation(self) -> np.ndarray:
        return euler_zyx_to_matrix(self.yaw, 0.0, 0.0)

    def to_source(self, t_map, q_map_wxyz) -> tuple[np.ndarray, np.ndarray]:
        """Base poses in map (N, 3), (N, 4) -> the source body poses they came from."""
        rot = self.rotation()
        t_source = ((np.reshape(t_map, (-1, 3)) - self.offset) / self.scale) @ rot
        R_source = rot.T @ quat_to_matrix(np.reshape(q_map_wxyz, (-1, 4))) @ quat_to_matrix(self.base_in_body_q_wxyz).T
        return t_source, matrix_to_quat(R_source)

    def metadata(self) -> dict:
        """The JSON block of ``scene.json`` (per TUM-driven sequence)."""
        return {
            "scale": float(self.scale),
            "yaw_deg": math.degrees(self.yaw),
            "offset": [float(v) for v in self.offset],
            "source_to_map": {"scale": float(self.scale),
                              "q_wxyz": matrix_to_quat(self.rotation()).tolist(),
                              "t": [float(v) for v in self.offset]},
            "base_in_body_q_wxyz": [float(v) for v in self.base_in_body_q_wxyz],
            "source_start_stamp": float(self.source_start_stamp),
            "source_window_s": [float(self.window[0]), float(self.window[1])],
            "keep_scale": bool(self.keep_scale),
            "inverse": ("p_source = R(q)^T (p_map - t) / scale; R_body_in_source = R(q)^T R_base_in_map "
                        "R(base_in_body_q_wxyz)^T; source stamp = stamp - epoch_ns * 1e-9 + source_start_stamp"),
        }

    def describe(self) -> str:
        """One line for the log: what was done to the recording."""
        how = ("kept at its real scale" if self.scale == 1.0
               else f"shrunk to scale {self.scale:.3f} to fit the room")
        x, y, z = self.offset
        return (f"window [{self.window[0]:.2f}, {self.window[1]:.2f}] s {how}, rotated {math.degrees(self.yaw):.1f} "
                f"deg about z, offset ({x:.3f}, {y:.3f}, {z:.3f}) m (p_map = scale * R p_source + offset)")


def trajectory_from_tum(scene: Scene, stamps, t, q_wxyz, duration: float | None = None,
                        start: float | None = None, knot_dt: float = 0.1) -> Trajectory:
    """The walk of :func:`place_tum_trajectory` (without its placement)."""
    return place_tum_trajectory(scene, stamps, t, q_wxyz, duration, start, knot_dt)[0]


def place_tum_trajectory(scene: Scene, stamps, t, q_wxyz, duration: float | None = None,
                         start: float | None = None, knot_dt: float = 0.1,
                         keep_scale: bool = False) -> tuple[Trajectory, TumPlacement]:
    """Drive the base with a real recording, fitted into the room -> (walk, placement).

    ``stamps``/``t``/``q_wxyz`` as returned by :func:`vizloc_ros.ros_io.tum.read_tum`
    (body-to-world, the file's world assumed z-up as in EuRoC, TUM-VI and TUM RGB-D).
    The window [start, start + duration] of the recording (seconds from its first stamp;
    ``start=None`` picks the first window without a tracking gap longer than
    :data:`MAX_TUM_GAP`) is smoothed over ``knot_dt`` (removes motion-capture jitter before the IMU
    differentiates it twice), its orientation re-based so the mean is level, then
    rotated about z, shifted and, only if it does not fit, scaled down so that the whole
    path stays clear of walls and boxes. Timing is kept: speeds are real or smaller.
    ``keep_scale`` never shrinks: a recording that does not fit at its real scale is a
    ``ValueError`` naming its extent and the room's. The placement says what was done
    (the CLI logs it and writes it into ``scene.json``).
    """
    stamps, t, q_wxyz = sorted_distinct(stamps, np.reshape(t, (-1, 3)), np.reshape(q_wxyz, (-1, 4)),
                                        min_step=1e-9)
    first_stamp = float(stamps[0])
    stamps = stamps - stamps[0]
    if duration is not None and duration > stamps[-1]:
        raise ValueError(f"the TUM trajectory spans {stamps[-1]:.2f} s; a window of {duration:.2f} s "
                         f"does not fit in it")
    if start is None:
        start = _first_window_without_gaps(stamps, duration, MAX_TUM_GAP)
    end = stamps[-1] if duration is None else start + duration
    if start < 0 or end > stamps[-1] + 1e-6 or end - start < 2 * knot_dt:
        raise ValueError(f"the TUM trajectory spans {stamps[-1]:.2f} s; the window "
                         f"[{start:.2f}, {end:.2f}] s does not fit in it")
    gaps = np.diff(stamps[(stamps >= start - 1) & (stamps <= end + 1)])
    if gaps.size and gaps.max() > MAX_TUM_GAP:
        raise ValueError(f"the TUM trajectory has a gap of {gaps.max():.2f} s (more than "
                         f"{MAX_TUM_GAP} s) in the window [{start:.2f}, {end:.2f}] s")

    # Uniform fine grid, then a moving average over one knot interval.
    fine_dt = 0.005
    fine = np.arange(start, end + 1e-9, fine_dt)
    positions = resample(fine, stamps, t)
    rotations = quat_to_matrix(q_wxyz)
    nearest = np.clip(np.searchsorted(stamps, fine), 0, len(stamps) - 1)
    # Re-base: one constant body rotation C so that R C is level on average.
    mean = _chordal_mean_rotation(rotations[nearest])
    mean_yaw = math.atan2(mean[1, 0], mean[0, 0])
    correction = mean.T @ euler_zyx_to_matrix(mean_yaw, 0.0, 0.0)
    euler = matrix_to_euler_zyx(rotations @ correction)
    euler[:, 0] = np.unwrap(euler[:, 0])
    euler[:, 2] = np.unwrap(euler[:, 2])
    # interpolate Euler angles at the fine grid (unwrapped, so interpolation is safe)
    euler_fine = resample(fine, stamps, euler)
    window = max(1, int(round(knot_dt / fine_dt)))
    positions = moving_average(positions, window)
    euler_fine = moving_average(euler_fine, window)
    step = window
    ctrl_positions = positions[::step]
    ctrl_euler = euler_fine[::step]
    if len(ctrl_positions) < 2:
        raise ValueError("the TUM window is too short")

    fit = _fit_into_room(scene, ctrl_positions, scales=(1.0,) if keep_scale else None)
    if fit is None:
        if keep_scale:
            raise ValueError(_does_not_fit_at_real_scale(scene, ctrl_positions, start, end))
        raise ValueError("could not fit the TUM trajectory into the room, even shrunk")
    angle, scale, offset = fit
    rot = euler_zyx_to_matrix(angle, 0.0, 0.0)
    centre = _path_centre(ctrl_positions)
    placed = (scale * (ctrl_positions - centre)) @ rot.T + offset
    ctrl_euler = ctrl_euler.copy()
    ctrl_euler[:, 0] += angle
    placement = TumPlacement(scale=float(scale), yaw=float(angle), offset=offset - scale * (rot @ centre),
                             base_in_body_q_wxyz=matrix_to_quat(correction),
                             source_start_stamp=first_stamp + float(start), window=(float(start), float(end)),
                             keep_scale=keep_scale)
    return Trajectory(0.0, fine_dt * step, placed, ctrl_euler), placement


def _does_not_fit_at_real_scale(scene: Scene, positions: np.ndarray, start: float, end: float) -> str:
    """The one-line error of ``keep_scale``: the recording's extent against the room's."""
    extent = positions.max(axis=0) - positions.min(axis=0)
    free = (scene.room_hi[:2] - scene.room_lo[:2]) - 2 * WALL_MARGIN
    room = scene.room_hi[:2] - scene.room_lo[:2]
    return (f"the TUM window [{start:.2f}, {end:.2f}] s spans {extent[0]:.2f} x {extent[1]:.2f} m "
            f"(height {extent[2]:.2f} m) and does not fit at its real scale in room {scene.spec.name!r}: "
            f"{free[0]:.2f} x {free[1]:.2f} m free ({room[0]:.2f} x {room[1]:.2f} m less {WALL_MARGIN} m "
            f"from the walls, {BOX_MARGIN} m from the boxes; height at most {MAX_HEIGHT_EXTENT} m); "
            f"drop --keep-scale to shrink it, or use fewer --frames")


def _first_window_without_gaps(stamps: np.ndarray, duration: float | None, max_gap: float) -> float:
    """Earliest start (s) whose window holds no gap above ``max_gap`` (motion-capture dropouts)."""
    if duration is None:
        return 0.0
    gap_ends = np.where(np.diff(stamps) > max_gap)[0] + 1
    for candidate in np.concatenate([[0.0], stamps[gap_ends]]):
        window = stamps[(stamps >= candidate) & (stamps <= candidate + duration)]
        if candidate + duration <= stamps[-1] + 1e-6 and (window.size < 2 or np.diff(window).max() <= max_gap):
            return float(candidate)
    raise ValueError(f"no {duration:.1f} s window of the TUM trajectory is free of gaps over {max_gap} s")


def _path_centre(positions: np.ndarray) -> np.ndarray:
    return 0.5 * (positions.min(axis=0) + positions.max(axis=0))


def _fit_into_room(scene: Scene, positions: np.ndarray, scales=None):
    """Search rotation about z, scale (largest first, never above 1; ``scales`` replaces
    the default ladder) and offset so that the path keeps clear of walls and boxes and
    stays in the height band -> (angle, scale, offset of the path centre) or None."""
    centred = positions - _path_centre(positions)
    free_lo = scene.room_lo[:2] + WALL_MARGIN
    free_hi = scene.room_hi[:2] - WALL_MARGIN
    height_mid = np.mean(HEIGHT_RANGE)
    # candidate offsets: a grid over the free part of the room
    gx = np.arange(free_lo[0], free_hi[0] + 1e-9, 0.2)
    gy = np.arange(free_lo[1], free_hi[1] + 1e-9, 0.2)
    offsets_xy = np.stack(np.meshgrid(gx, gy), -1).reshape(-1, 2)
    room_centre = 0.5 * (free_lo + free_hi)
    offsets_xy = offsets_xy[np.argsort(np.linalg.norm(offsets_xy - room_centre, axis=1))]
    radius = np.max(np.linalg.norm(centred[:, :2], axis=1)) + 1e-9
    max_scale = min(1.0, 0.5 * float(np.min(free_hi - free_lo)) / radius * 1.4)
    subsample = centred[:: max(1, len(centred) // 150)]
    ladder = max_scale * np.array([1.0, 0.85, 0.7, 0.55, 0.4, 0.3, 0.2, 0.1]) if scales is None else scales
    for scale in ladder:
        z_extent = scale * (subsample[:, 2].max() - subsample[:, 2].min())
        if z_extent > MAX_HEIGHT_EXTENT:
            continue
        for angle in np.linspace(0.0, 2 * np.pi, 12, endpoint=False):
            c, s = math.cos(angle), math.sin(angle)
            xy = scale * subsample[:, :2] @ np.array([[c, s], [-s, c]])
            # cheap pre-filter: the path's bounding box must fit between the walls
            inside = np.all((offsets_xy + xy.min(axis=0) >= free_lo) & (offsets_xy + xy.max(axis=0) <= free_hi), axis=1)
            if not inside.any():
                continue
            candidates = xy[None, :, :] + offsets_xy[inside][:, None, :]  # (O, N, 2)
            ok = np.all(scene.free_space_mask(candidates, WALL_MARGIN, BOX_MARGIN), axis=1)
            if ok.any():
                best = int(np.argmax(ok))
                return angle, scale, np.array([*offsets_xy[inside][best], height_mid])
    return None
