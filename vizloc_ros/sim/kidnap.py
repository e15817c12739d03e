"""A walk of a synthetic room whose robot is carried away mid-walk: the kidnapped robot,
with images.

Why: a coarse relocalizer (NetVLAD as ``vizloc-replay --prior-weights``) is there to bring
the fusion back after the robot was picked up and set down elsewhere (issue #18: carried
3 m, the fused pose back within 0.5 m within 10 frames). The fusion's own harness
(:mod:`vizloc_ros.sim.fusion_sim`) kidnaps poses, not images; measuring a relocalizer
needs the camera to see where the robot really is while the odometry does not notice.

How: one seeded walk is simulated longer than the bag. Until ``at_frame`` the bag is that
walk; from there it is the same walk ``shift`` seconds later, chosen where the walk is
``distance`` metres (within ``tolerance``) from where the robot was taken. Ground truth,
images and IMU jump with it; the odometry goes on from its last pose with the later
stretch's own increments, so it never sees the carry (as wheel or visual odometry would
not: the robot was lifted). Stamps stay continuous.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from vizloc_ros import geometry
from vizloc_ros.sim.catalog import get_scene
from vizloc_ros.sim.sensors import ImuSamples, OdometrySamples
from vizloc_ros.sim.synthetic import SequenceSpec, SimulatedSequence, SynthConfig, simulate_sequence
from vizloc_ros.sim.trajectories import camera_poses

#: how much longer than the bag the walk is simulated, to find a place ``distance`` away
SEARCH_SECONDS = 90.0


@dataclass(frozen=True)
class Kidnap:
    """Where and how far the robot was carried (stamps in seconds from the walk's start)."""

    at_frame: int
    at_time_s: float
    shift_s: float          # the walk resumes this much later
    distance_m: float       # between the base poses before and after
    from_xyz: tuple
    to_xyz: tuple

    def metadata(self) -> dict:
        return {"at_frame": self.at_frame, "at_time_s": self.at_time_s, "shift_s": self.shift_s,
                "distance_m": self.distance_m, "from_xyz": list(self.from_xyz), "to_xyz": list(self.to_xyz)}


def _shift_frames(sim: SimulatedSequence, at_time: float, frames_after: int, hz: float,
                  distance: float, tolerance: float) -> int:
    """The smallest whole number of camera frames to skip so that the base is ``distance``
    (within ``tolerance``) from where it was at ``at_time``, with the walk long enough."""
    trajectory = sim.trajectory
    last_start = trajectory.t_end - 0.5 - (frames_after - 1) / hz  # a margin for the splines' end
    shifts = np.arange(1, int(np.floor((last_start - at_time) * hz)) + 1)
    if len(shifts) == 0:
        raise ValueError("the walk is too short to carry the robot anywhere")
    here = trajectory.position([at_time])[0]
    there = trajectory.position(at_time + shifts / hz)
    gap = np.abs(np.linalg.norm(there - here, axis=1) - distance)
    ok = np.flatnonzero(gap <= tolerance)
    if len(ok) == 0:
        raise ValueError(f"the walk never comes {distance} m (within {tolerance} m) from its pose at "
                         f"{at_time:.2f} s; try another seed, at_frame or distance")
    return int(shifts[ok[0]])


def _splice(before, after, names: list[str]):
    """Per-sample fields of two sample sets (dataclasses), concatenated."""
    return {name: np.concatenate([getattr(before, name), getattr(after, name)]) for name in names}


def _select(samples, keep: np.ndarray, names: list[str]):
    return replace(samples, **{name: getattr(samples, name)[keep] for name in names})


def kidnap_sequence(sim: SimulatedSequence, frames: int, at_frame: int, distance: float,
                    config: SynthConfig, tolerance: float = 0.1) -> tuple[SimulatedSequence, Kidnap]:
    """``frames`` camera frames of ``sim`` (simulated longer) with the robot carried
    ``distance`` metres at ``at_frame``; see the module docstring."""
    hz = config.camera_hz
    if not 0 < at_frame < frames - 1:
        raise ValueError(f"at_frame must lie inside the walk (1 .. {frames - 2}), got {at_frame}")
    at_time = at_frame / hz
    shift_frames = _shift_frames(sim, at_time, frames - at_frame, hz, distance, tolerance)
    shift = shift_frames / hz
    end = (frames - 1) / hz + 0.25  # as simulate_sequence covers its last frame

    def split(times):
        before = times < at_time - 1e-9
        after = (times >= at_time + shift - 1e-9) & (times - shift <= end + 1e-9)
        return before, after

    # odometry: after the carry, the later stretch's increments from the last pose before it
    odom = sim.odom
    per_sample = [f.name for f in fields(OdometrySamples) if f.name != "map_T_odom"]
    before, after = split(odom.times)
    last, first_after = np.flatnonzero(before)[-1], np.flatnonzero(after)[0]
    a, b = _select(odom, before, per_sample), _select(odom, after, per_sample)
    b = replace(b, times=b.times - shift)
    for t_name, q_name in (("t", "q"), ("true_t", "true_q")):
        anchor_t, anchor_q = getattr(odom, t_name)[first_after - 1], getattr(odom, q_name)[first_after - 1]
        step_t, step_q = geometry.pose_relative(anchor_t, anchor_q, getattr(b, t_name), getattr(b, q_name))
        moved = geometry.pose_compose(getattr(odom, t_name)[last], getattr(odom, q_name)[last], step_t, step_q)
        b = replace(b, **{t_name: moved[0], q_name: moved[1]})
    odom = replace(odom, **_splice(a, b, per_sample))

    imu = sim.imu
    imu_fields = ["times", "gyro", "accel", "gyro_bias", "accel_bias"]
    before, after = split(imu.times)
    b = _select(imu, after, imu_fields)
    imu = replace(imu, **_splice(_select(imu, before, imu_fields), replace(b, times=b.times - shift), imu_fields))

    before, after = split(sim.ground_truth_times)
    gt_times = np.concatenate([sim.ground_truth_times[before], sim.ground_truth_times[after] - shift])
    gt_t = np.concatenate([sim.ground_truth_t[before], sim.ground_truth_t[after]])
    gt_q = np.concatenate([sim.ground_truth_q[before], sim.ground_truth_q[after]])

    frame_times = np.arange(frames) / hz
    walk_times = np.where(np.arange(frames) < at_frame, frame_times, frame_times + shift)
    camera_t, camera_q = camera_poses(sim.trajectory, walk_times)
    here, there = sim.trajectory.position([at_time, at_time + shift])
    kidnap = Kidnap(at_frame, float(at_time), float(shift), float(np.linalg.norm(there - here)),
                    tuple(float(v) for v in here), tuple(float(v) for v in there))
    spliced = replace(sim, spec=replace(sim.spec, frames=frames), frame_times=frame_times, camera_t=camera_t,
                      camera_q=camera_q, odom=odom, imu=imu, ground_truth_times=gt_times, ground_truth_t=gt_t,
                      ground_truth_q=gt_q)
    return spliced, kidnap


def simulate_kidnap(spec: SequenceSpec, config: SynthConfig, at_frame: int, distance: float = 3.0,
                    tolerance: float = 0.1) -> tuple[SimulatedSequence, Kidnap]:
    """The walk of ``spec`` (a seeded random walk) with the robot carried ``distance``
    metres at ``at_frame``; ready for :func:`vizloc_ros.sim.synthetic.write_simulated`."""
    if spec.tum_file is not None:
        raise ValueError("a kidnapped walk is a seeded random walk, not a TUM recording")
    longer = replace(spec, frames=spec.frames + int(np.ceil(SEARCH_SECONDS * config.camera_hz)))
    sim = simulate_sequence(longer, config, get_scene(config.scene))
    return kidnap_sequence(sim, spec.frames, at_frame, distance, config, tolerance)
