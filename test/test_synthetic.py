"""Synthetic world: trajectories, sensors (IMU, visual odometry), the bag and 7-Scenes
outputs of vizloc-synth, the CLI and the demo cache. Small images, few frames."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vizloc_ros.ros_io import messages as m
from vizloc_ros.geometry import (pose_compose, pose_inverse, quat_rotate, quat_to_matrix, rotation_angle,
                                 so3_log)
from vizloc_ros.ros_io.bag_io import BagWriter, list_topics, read_messages, topic_message_counts
from vizloc_ros.ros_io.tum import read_tum, write_tum
from vizloc_ros.sim import synthetic as synth
from vizloc_ros.sim.fusion_sim import SimConfig, simulate, synthetic_trajectory
from vizloc_ros.sim.catalog import get_scene
from vizloc_ros.sim.sensors import (GRAVITY, ImuNoise, VoNoise, simulate_imu, simulate_visual_odometry,
                                    specific_force)
from vizloc_ros.sim.sevenscenes_writer import read_pose
from vizloc_ros.sim.trajectories import (BOX_MARGIN, CAMERA_IN_BASE_T, WALL_MARGIN, camera_poses,
                                         gaussian_smooth, moving_average, place_tum_trajectory, random_walk,
                                         sorted_distinct, static_trajectory, trajectory_from_tum)

SCENE = get_scene("demo")
SMALL = (80, 60)
FRAMES = 16


@pytest.fixture(scope="module")
def walk():
    return random_walk(SCENE, 20.0, seed=3)


# --------------------------------------------------------------------------- trajectories

def test_walk_is_deterministic_for_a_seed():
    a, b = random_walk(SCENE, 10.0, seed=11), random_walk(SCENE, 10.0, seed=11)
    np.testing.assert_array_equal(a.position_ctrl, b.position_ctrl)
    c = random_walk(SCENE, 10.0, seed=12)
    assert np.abs(a.position_ctrl - c.position_ctrl).max() > 0.1


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 101])
def test_walks_stay_inside_the_room_at_realistic_speed(seed):
    trajectory = random_walk(SCENE, 20.0, seed=seed)
    times = trajectory.sample_times(50.0)
    xyz = trajectory.position(times)
    assert np.all(SCENE.clearance(xyz[:, :2]) >= min(WALL_MARGIN, BOX_MARGIN) - 0.2)
    assert np.all((xyz[:, 2] > 0.8) & (xyz[:, 2] < 2.0))
    speed = np.linalg.norm(trajectory.velocity(times), axis=1)
    assert 0.3 <= np.median(speed) <= 0.8 and speed.max() < 1.2
    assert np.linalg.norm(trajectory.acceleration(times), axis=1).max() < 3.0
    euler = trajectory.euler(times)
    assert np.abs(euler[:, 1]).max() < 0.35 and np.abs(euler[:, 2]).max() < 0.15  # pitch, roll
    _, q_cam = camera_poses(trajectory, times)
    optical_axis = quat_rotate(q_cam, np.array([0.0, 0.0, 1.0]))
    assert np.abs(optical_axis[:, 2]).max() < 0.35  # mostly horizontal


def test_trajectory_is_smooth_and_derivatives_are_consistent(walk):
    dt = 1e-3
    times = np.linspace(0.5, 19.0, 40) + 0.0123  # off the knots (the third derivative jumps there)
    p0, p1 = walk.position(times - dt), walk.position(times + dt)
    np.testing.assert_allclose(walk.velocity(times), (p1 - p0) / (2 * dt), atol=1e-5)
    v0, v1 = walk.velocity(times - dt), walk.velocity(times + dt)
    np.testing.assert_allclose(walk.acceleration(times), (v1 - v0) / (2 * dt), atol=1e-4)
    R0, R1 = walk.rotation(times - dt), walk.rotation(times + dt)
    body_rate = so3_log(np.einsum("nji,njk->nik", R0, R1)) / (2 * dt)
    np.testing.assert_allclose(walk.angular_velocity_body(times), body_rate, atol=1e-4)
    # continuity at the knots (C2): no jump in acceleration across a knot
    knots = np.arange(1, 19) * walk.dt
    np.testing.assert_allclose(walk.acceleration(knots - 1e-7), walk.acceleration(knots + 1e-7), atol=1e-4)


def test_camera_is_the_base_pose_times_the_extrinsic(walk):
    times = np.array([0.0, 5.0, 10.0])
    t_base, q_base = walk.pose(times)
    t_cam, q_cam = camera_poses(walk, times)
    np.testing.assert_allclose(t_cam, t_base + quat_rotate(q_base, CAMERA_IN_BASE_T), atol=1e-12)
    # the optical axis (camera z) is the base's forward axis (base x)
    np.testing.assert_allclose(quat_rotate(q_cam, [0, 0, 1.0]), quat_rotate(q_base, [1.0, 0, 0]), atol=1e-12)
    np.testing.assert_allclose(quat_rotate(q_cam, [0, 1.0, 0]), quat_rotate(q_base, [0, 0, -1.0]), atol=1e-12)


def _synthetic_tum(path, seconds=25.0, rate=100.0, radii=(1.5, 1.5)):
    """A hand-held-like recording: circles (ellipses with ``radii``, x and y; 1.5 m by
    default) with shake, z up world."""
    t = np.arange(0.0, seconds, 1.0 / rate)
    angle = 0.3 * t
    xyz = np.stack([radii[0] * np.cos(angle) + 10.0, radii[1] * np.sin(angle) - 4.0,
                    1.2 + 0.05 * np.sin(2 * t)], -1)
    half = 0.5 * (angle + np.pi / 2)
    q = np.stack([np.cos(half), 0.02 * np.sin(5 * t), 0.02 * np.cos(3 * t), np.sin(half)], -1)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    write_tum(path, t + 1.3e9, xyz, q)
    return xyz


def test_tum_driven_trajectory_fits_the_room_and_keeps_the_timing(tmp_path):
    path = tmp_path / "circle.tum"
    _synthetic_tum(path)
    stamps, t, q = read_tum(path)
    trajectory = trajectory_from_tum(SCENE, stamps, t, q, duration=20.0)
    assert trajectory.duration == pytest.approx(20.0, abs=0.11)
    times = trajectory.sample_times(20.0)
    xyz = trajectory.position(times)
    assert np.all(SCENE.free_space_mask(xyz[:, :2], WALL_MARGIN - 0.05, BOX_MARGIN - 0.05))
    speed = np.linalg.norm(trajectory.velocity(times), axis=1)
    assert np.median(speed) <= 0.45 + 0.05  # 1.5 m * 0.3 rad/s, never faster (only shrunk)
    assert np.median(speed) > 0.05
    # yaw turns at the recording's rate, and the re-based attitude is about level
    yaw_rate = np.gradient(trajectory.euler(times)[:, 0], times)
    assert np.median(np.abs(yaw_rate)) == pytest.approx(0.3, abs=0.05)
    assert np.abs(trajectory.euler(times)[:, 1:]).max() < 0.1


def test_real_tum_files_drive_the_room_when_available():
    folder = Path(__file__).resolve().parents[2] / "shared" / "data" / "trajectories"
    files = sorted(folder.glob("*.tum"))
    if not files:
        pytest.skip("real trajectories not present beside the project")
    stamps, t, q = read_tum(files[0])
    trajectory = trajectory_from_tum(SCENE, stamps, t, q, duration=10.0)
    xyz = trajectory.position(trajectory.sample_times(20.0))
    assert np.all(SCENE.free_space_mask(xyz[:, :2], WALL_MARGIN - 0.05, BOX_MARGIN - 0.05))


def test_tum_window_longer_than_the_file_is_a_clear_error(tmp_path):
    path = tmp_path / "short.tum"
    _synthetic_tum(path, seconds=3.0)
    with pytest.raises(ValueError, match="does not fit|no .* window"):
        trajectory_from_tum(SCENE, *read_tum(path), duration=10.0)


# --------------------------------------------------------------------------- IMU

def test_imu_at_rest_measures_gravity_up_and_no_rotation():
    samples = simulate_imu(static_trajectory([0.0, 0.0, 1.2], yaw=0.7, duration=1.0), 200.0, ImuNoise.none())
    assert len(samples.times) == 201
    np.testing.assert_allclose(samples.accel, np.tile([0.0, 0.0, 9.81], (201, 1)), atol=1e-9)
    np.testing.assert_allclose(samples.gyro, 0.0, atol=1e-9)


def test_tilted_imu_at_rest_measures_gravity_in_its_own_axes():
    pitch = 0.3
    samples = simulate_imu(static_trajectory([0.0, 0.0, 1.2], pitch=pitch, duration=1.0), 200.0, ImuNoise.none())
    # nose down by `pitch` (positive pitch about base y tilts x down): the specific force
    # (pointing up, away from gravity) now has a component along -x in the body frame
    np.testing.assert_allclose(samples.accel[0], [-9.81 * math.sin(pitch), 0.0, 9.81 * math.cos(pitch)], atol=1e-9)


def test_imu_in_motion_matches_the_trajectory(walk):
    samples = simulate_imu(walk, 200.0, ImuNoise.none())
    i = np.arange(200, len(samples.times) - 200, 500)
    times = samples.times[i]
    dt = 1e-3
    accel_world = (walk.position(times + dt) - 2 * walk.position(times) + walk.position(times - dt)) / dt ** 2
    R = walk.rotation(times)
    expected = np.einsum("nji,nj->ni", R, accel_world - GRAVITY)
    np.testing.assert_allclose(samples.accel[i], expected, atol=1e-3)


def test_imu_noise_matches_its_reported_covariance():
    noise = ImuNoise(gyro_initial_bias=0.0, accel_initial_bias=0.0, gyro_bias_random_walk=0.0,
                     accel_bias_random_walk=0.0)
    samples = simulate_imu(static_trajectory([0, 0, 1.2], duration=10.0), 200.0, noise, seed=5)
    assert np.std(samples.gyro, axis=0) == pytest.approx(np.sqrt(np.diag(samples.gyro_cov)), rel=0.1)
    assert np.std(samples.accel, axis=0) == pytest.approx(np.sqrt(np.diag(samples.accel_cov)), rel=0.1)
    biased = simulate_imu(static_trajectory([0, 0, 1.2], duration=10.0), 200.0, ImuNoise(), seed=5)
    assert np.abs(biased.gyro_bias[-1] - biased.gyro_bias[0]).max() > 0  # the bias wanders


# --------------------------------------------------------------------------- visual odometry

def test_drift_free_odometry_is_the_relative_ground_truth(walk):
    odom = simulate_visual_odometry(walk, 30.0, VoNoise.none())
    t_map, q_map = walk.pose(odom.times)
    t_expected, q_expected = pose_compose(*pose_inverse(t_map[0], q_map[0]), t_map, q_map)
    np.testing.assert_allclose(odom.t, t_expected, atol=1e-9)
    assert rotation_angle(odom.q, q_expected).max() < 1e-6
    np.testing.assert_allclose(odom.t[0], 0.0, atol=1e-12)
    assert np.all(np.linalg.eigvalsh(odom.pose_cov) > 0)  # never a zero covariance


def test_odometry_drift_grows_and_its_covariance_is_honest(walk):
    final_errors, quarter_errors, nees = [], [], []
    for seed in range(20):
        odom = simulate_visual_odometry(walk, 30.0, VoNoise(), seed=seed)
        error = odom.t - odom.true_t
        quarter_errors.append(np.linalg.norm(error[len(error) // 4]))
        final_errors.append(np.linalg.norm(error[-1]))
        nees.append(error[-1] @ np.linalg.solve(odom.pose_cov[-1][:3, :3], error[-1]))
    assert np.mean(final_errors) > 1.5 * np.mean(quarter_errors)
    assert 0.02 < np.mean(final_errors) < 0.5  # ~10 m walked: centimetres to decimetres of drift
    assert 1.5 < np.mean(nees) < 5.0  # chi-square with 3 dof: mean 3 when the covariance is honest
    covs = odom.pose_cov
    assert np.trace(covs[-1]) > 100 * np.trace(covs[0])  # uncertainty grows with distance
    np.testing.assert_allclose(covs, np.swapaxes(covs, 1, 2))
    assert np.all(np.linalg.eigvalsh(covs) > 0)


def test_odometry_options_of_the_fusion_harness(walk):
    # a fixed scale error stretches every step and adds no variance
    stretched = simulate_visual_odometry(walk, 30.0, VoNoise(), seed=1, scale_bias=0.05, covariance="summed")
    exact = simulate_visual_odometry(walk, 30.0, VoNoise.none(), scale_bias=0.05)
    np.testing.assert_allclose(exact.t, 1.05 * exact.true_t, atol=1e-9)
    np.testing.assert_array_equal(stretched.pose_cov,
                                  simulate_visual_odometry(walk, 30.0, VoNoise(), seed=1, covariance="summed").pose_cov)
    # summed covariance: the initial variance plus every step's, in odom axes, nothing correlated
    noise = VoNoise()
    summed = simulate_visual_odometry(walk, 30.0, noise, seed=4, covariance="summed")
    steps = np.linalg.norm(np.diff(summed.true_t, axis=0), axis=1)
    expected = noise.initial_std ** 2 + np.cumsum([np.diag(noise.step_covariance(d, 1 / 30.0))[:6] for d in steps], 0)
    np.testing.assert_allclose(np.diagonal(summed.pose_cov, axis1=1, axis2=2)[1:], expected, rtol=1e-9)
    np.testing.assert_array_equal(summed.pose_cov, np.einsum("nii->ni", summed.pose_cov)[:, :, None] * np.eye(6))
    # the same draws whichever convention reports them; a Generator is used as given
    propagated = simulate_visual_odometry(walk, 30.0, noise, seed=np.random.default_rng(4))
    np.testing.assert_array_equal(propagated.t, summed.t)
    # an outage drops the messages, not the motion: the samples after it are unchanged
    gap = simulate_visual_odometry(walk, 30.0, noise, seed=4, covariance="summed", outage=(5.0, 7.0))
    kept = (summed.times < 5.0) | (summed.times >= 7.0)
    np.testing.assert_array_equal(gap.times, summed.times[kept])
    np.testing.assert_array_equal(gap.t, summed.t[kept])
    np.testing.assert_array_equal(gap.pose_cov, summed.pose_cov[kept])
    np.testing.assert_array_equal(gap.map_T_odom[0], summed.map_T_odom[0])  # odom still starts at the first sample
    with pytest.raises(ValueError, match="covariance"):
        simulate_visual_odometry(walk, 30.0, noise, covariance="diagonal")


def test_imu_shares_a_generator_and_stops_at_an_end(walk):
    by_seed = simulate_imu(walk, 200.0, ImuNoise(), seed=7)
    by_generator = simulate_imu(walk, 200.0, ImuNoise(), seed=np.random.default_rng(7), t_end=5.0)
    assert by_generator.times[-1] == pytest.approx(5.0) and len(by_generator.times) == 1001
    np.testing.assert_array_equal(by_generator.gyro_bias[0], by_seed.gyro_bias[0])  # the same first draws


# --------------------------------------------------------------------------- shared with the fusion harness

def test_fusion_harness_sensors_describe_its_truth_and_miss_the_kidnap():
    """With the noise off, the harness's IMU is the truth's rate and specific force on its
    grid, and its odometry the truth relative to the first odometry stamp, kidnap or not."""
    noiseless = dict(gyro_noise_density=0.0, accel_noise_density=0.0, gyro_bias_walk=0.0, accel_bias_walk=0.0,
                     gyro_bias_sigma=0.0, accel_bias_sigma=0.0, odom_sigma_trans_per_sqrt_m=0.0,
                     odom_sigma_rot_per_sqrt_m=0.0, odom_sigma_rot_per_sqrt_s=0.0, odom_sigma_floor=0.0,
                     odom_scale_error=0.0, duration=12.0, odom_outage=(4.0, 5.0))
    stamps, t, q = synthetic_trajectory(15.0)
    stamps = stamps + 1.52e9  # stamped like a real recording: ~1e-7 s of float rounding
    seq = simulate(stamps, t, q, SimConfig(**noiseless))
    kidnapped = simulate(stamps, t, q, SimConfig(kidnap_time=6.0, **noiseless))
    truth = seq.truth
    imu = [e[3] for e in seq.events if e[2] == "imu"]
    k = np.arange(len(imu))
    np.testing.assert_allclose([s for s, _, _ in imu], truth.t0 + k * truth.dt, rtol=0, atol=1e-6)
    np.testing.assert_allclose([g for _, g, _ in imu], truth.w[k], atol=1e-12)
    np.testing.assert_allclose([a for _, _, a in imu], specific_force(truth.R[k], truth.a[k]), atol=1e-9)
    assert imu[-1][0] <= truth.t0 + 12.0
    odom = [e[3] for e in seq.events if e[2] == "odom"]
    stamps = np.array([o[0] for o in odom])
    assert not np.any((stamps >= truth.t0 + 4.0) & (stamps < truth.t0 + 5.0))  # the outage
    t_map, q_map = truth.pose(stamps, kidnapped=False)
    t_rel, q_rel = pose_compose(*pose_inverse(*seq.map_T_odom_true), t_map, q_map)
    np.testing.assert_allclose([o[1] for o in odom], t_rel, atol=1e-9)
    assert rotation_angle(np.array([o[2] for o in odom]), q_rel).max() < 1e-6
    assert kidnapped.truth.kidnap_time == truth.t0 + 6.0
    np.testing.assert_allclose([e[3][1] for e in kidnapped.events if e[2] == "odom"], t_rel, atol=1e-9)


def test_recordings_are_sorted_and_stamps_too_close_dropped():
    stamps = [3.0, 1.0, 2.0, 1.0, 2.0 + 1e-8]
    values = np.array([[30.0], [10.0], [20.0], [11.0], [21.0]])
    kept, kept_values = sorted_distinct(stamps, values, min_step=1e-6)
    np.testing.assert_array_equal(kept, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(kept_values[:, 0], [10.0, 20.0, 30.0])  # of equal stamps the first


def test_smoothing_keeps_the_length_constants_and_straight_lines():
    ramp = np.stack([np.arange(50.0), np.full(50, 7.0)], -1)
    for smoothed in (moving_average(ramp, 5), gaussian_smooth(ramp, 2.0)):
        assert smoothed.shape == ramp.shape
        np.testing.assert_allclose(smoothed[:, 1], 7.0)
        np.testing.assert_allclose(smoothed[10:-10, 0], ramp[10:-10, 0], atol=1e-9)  # symmetric kernels
        assert 47.0 < smoothed[-1, 0] < 49.0  # the ends are held (49 beyond the last sample), not zero-padded
    assert moving_average(ramp, 1) is ramp
    copy = gaussian_smooth(ramp, 0.4)  # under half a sample: nothing to smooth
    np.testing.assert_array_equal(copy, ramp)
    assert copy is not ramp


def test_fusion_harness_noise_is_the_shared_model():
    config = SimConfig()
    imu = config.imu_noise
    assert imu.white_sigma(config.imu_rate) == pytest.approx(
        (config.gyro_noise_density * math.sqrt(config.imu_rate), config.accel_noise_density * math.sqrt(config.imu_rate)))
    assert (imu.gyro_initial_bias, imu.accel_initial_bias) == (config.gyro_bias_sigma, config.accel_bias_sigma)
    def step_sigma(distance):
        return np.sqrt(np.diag(config.odometry_noise.step_covariance(distance, 1.0 / config.odom_rate))[:6])

    # a standing robot: only the per-second rotation floor and the per-step floor
    standing = step_sigma(0.0)
    np.testing.assert_allclose(standing[:3], config.odom_sigma_floor)
    np.testing.assert_allclose(standing[3:], math.sqrt(config.odom_sigma_rot_per_sqrt_s ** 2 / config.odom_rate
                                                       + config.odom_sigma_floor ** 2))
    one_metre = step_sigma(1.0)
    np.testing.assert_allclose(one_metre[:3], math.hypot(config.odom_sigma_trans_per_sqrt_m, config.odom_sigma_floor))
    assert np.all(one_metre[3:] == one_metre[3])  # rotation noise is isotropic here, heading included
    assert config.gravity == tuple(GRAVITY)


# --------------------------------------------------------------------------- vizloc-synth outputs

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "demo"
    synth.generate_demo(root, split="all", fmt="both", frames=FRAMES, size=SMALL, progress=False)
    return root


def test_output_layout(dataset):
    assert sorted(p.name for p in dataset.iterdir()) == [
        "TestSplit.txt", "TrainSplit.txt", "bags", "scene.json", "seq-01", "seq-02", "seq-03", "seq-04",
        "seq-05", "trajectories"]
    assert (dataset / "TrainSplit.txt").read_text().split() == ["sequence1", "sequence2", "sequence3", "sequence4"]
    assert (dataset / "TestSplit.txt").read_text().split() == ["sequence5"]
    names = sorted(p.name for p in (dataset / "seq-05").iterdir())
    assert len(names) == 3 * FRAMES
    assert names[:3] == ["frame-000000.color.png", "frame-000000.depth.png", "frame-000000.pose.txt"]
    assert not [p for p in dataset.parent.iterdir() if p.name.startswith(".")]  # no staging left
    meta = json.loads((dataset / "scene.json").read_text())
    assert meta["camera"]["width"] == SMALL[0] and meta["frames"]["camera"] == "camera_optical_frame"
    assert [s["split"] for s in meta["sequences"]] == ["train"] * 4 + ["test"]
    assert len({tuple(s["map_T_odom"]["t"]) for s in meta["sequences"]}) == 5  # different paths


def test_sevenscenes_frames_are_consistent(dataset):
    meta = json.loads((dataset / "scene.json").read_text())
    cam = meta["camera"]
    colour = np.asarray(Image.open(dataset / "seq-05" / "frame-000007.color.png"))
    depth = np.asarray(Image.open(dataset / "seq-05" / "frame-000007.depth.png"))
    pose = read_pose(dataset / "seq-05" / "frame-000007.pose.txt")
    assert colour.shape == (SMALL[1], SMALL[0], 3) and colour.dtype == np.uint8
    assert depth.dtype == np.uint16 and depth.shape == SMALL[::-1]
    assert 300 < depth.min() and depth.max() < 8000  # millimetres inside a 6 x 5 m room
    np.testing.assert_allclose(pose[3], [0, 0, 0, 1])
    np.testing.assert_allclose(pose[:3, :3] @ pose[:3, :3].T, np.eye(3), atol=1e-8)
    # back-project the centre pixel with the depth and the camera-to-world pose: a point
    # inside the room (on a surface), in front of the camera
    v, u = SMALL[1] // 2, SMALL[0] // 2
    z = depth[v, u] / 1000.0
    point_cam = np.array([(u - cam["cx"]) / cam["fx"] * z, (v - cam["cy"]) / cam["fy"] * z, z])
    point = pose[:3, :3] @ point_cam + pose[:3, 3]
    lo, hi = np.array(meta["room"]["lo"]), np.array(meta["room"]["hi"])
    assert np.all(point >= lo - 0.01) and np.all(point <= hi + 0.01)
    # the camera of the pose file is the ground-truth base pose times the extrinsic
    stamps, t_base, q_base = read_tum(dataset / "trajectories" / "seq-05_ground_truth.tum")
    index = int(np.argmin(np.abs(stamps - stamps[0] - 7 / 15.0)))
    t_cam, _ = pose_compose(t_base[index], q_base[index], meta["base_to_camera"]["t"], meta["base_to_camera"]["q_wxyz"])
    np.testing.assert_allclose(pose[:3, 3], t_cam, atol=1e-6)


def test_bag_reads_back_with_anyreader(dataset):
    from rosbags.highlevel import AnyReader

    bag = dataset / "bags" / "seq-05"
    with AnyReader([bag], default_typestore=m.rosbags_typestore()) as reader:
        types = {c.topic: c.msgtype for c in reader.connections}
        assert types == synth.BAG_TOPICS
        stamps: dict[str, list[int]] = {}
        frames: dict[str, set] = {}
        first: dict[str, object] = {}
        for connection, log_time, raw in reader.messages():
            msg = reader.deserialize(raw, connection.msgtype)
            first.setdefault(connection.topic, msg)
            if connection.topic in (synth.TOPIC_TF, synth.TOPIC_TF_STATIC):
                header_ns = m.header_stamp_ns(msg.transforms[0])
                frames.setdefault(connection.topic, set()).add(
                    (msg.transforms[0].header.frame_id, msg.transforms[0].child_frame_id))
            else:
                header_ns = m.header_stamp_ns(msg)
                frames.setdefault(connection.topic, set()).add(msg.header.frame_id)
            assert header_ns == log_time  # bag time = header stamp (simulated clock)
            stamps.setdefault(connection.topic, []).append(log_time)
        tf_static_qos = [c.ext.offered_qos_profiles for c in reader.connections if c.topic == synth.TOPIC_TF_STATIC]
    duration = (FRAMES - 1) / 15.0
    assert len(stamps[synth.TOPIC_IMAGE]) == FRAMES == len(stamps[synth.TOPIC_CAMERA_INFO])
    assert len(stamps[synth.TOPIC_IMU]) == int(duration * 200) + 1
    assert len(stamps[synth.TOPIC_ODOM]) == int(duration * 30) + 1 == len(stamps[synth.TOPIC_GROUND_TRUTH])
    assert len(stamps[synth.TOPIC_TF_STATIC]) == 1
    assert stamps[synth.TOPIC_IMAGE][0] == synth.EPOCH_NS
    assert np.allclose(np.diff(stamps[synth.TOPIC_IMAGE]), 1e9 / 15, atol=1)
    assert np.allclose(np.diff(stamps[synth.TOPIC_IMU]), 5e6, atol=1)
    assert frames[synth.TOPIC_IMAGE] == {"camera_optical_frame"} == frames[synth.TOPIC_CAMERA_INFO]
    assert frames[synth.TOPIC_ODOM] == {"odom"} and first[synth.TOPIC_ODOM].child_frame_id == "base_link"
    assert frames[synth.TOPIC_TF] == {("odom", "base_link")}
    assert frames[synth.TOPIC_TF_STATIC] == {("base_link", "camera_optical_frame")}
    assert frames[synth.TOPIC_GROUND_TRUTH] == {"map"} and frames[synth.TOPIC_IMU] == {"base_link"}
    assert "TRANSIENT_LOCAL" in str(tf_static_qos).upper()

    image = first[synth.TOPIC_IMAGE]
    assert (image.encoding, image.width, image.height) == ("rgb8", SMALL[0], SMALL[1])
    colour = np.asarray(Image.open(dataset / "seq-05" / "frame-000000.color.png"))
    np.testing.assert_array_equal(m.image_to_numpy(image), colour)  # the same rendering in both outputs
    info = m.camera_info_to_intrinsics(first[synth.TOPIC_CAMERA_INFO])
    meta = json.loads((dataset / "scene.json").read_text())["camera"]
    assert info["fx"] == pytest.approx(meta["fx"]) and info["cx"] == pytest.approx(meta["cx"])
    t_static, q_static = m.pose_from_msg(first[synth.TOPIC_TF_STATIC].transforms[0])
    np.testing.assert_allclose(t_static, CAMERA_IN_BASE_T)
    np.testing.assert_allclose(quat_to_matrix(q_static)[:, 2], [1, 0, 0], atol=1e-12)  # optical z = base x


def test_bag_covariances_and_ground_truth(dataset):
    bag = dataset / "bags" / "seq-05"
    odom_covs, gt, odom_poses = [], [], []
    imu = None
    for record in read_messages(bag, [synth.TOPIC_ODOM, synth.TOPIC_IMU, synth.TOPIC_GROUND_TRUTH]):
        if record.topic == synth.TOPIC_ODOM:
            odom_covs.append(m.pose_covariance_from_msg(record.msg))
            odom_poses.append(m.pose_from_msg(record.msg))
        elif record.topic == synth.TOPIC_IMU:
            imu = m.imu_from_msg(record.msg)
        else:
            gt.append(m.pose_from_msg(record.msg))
    for cov in odom_covs:
        assert np.all(np.diag(cov) > 0) and np.all(np.linalg.eigvalsh(cov) > 0)
    assert np.trace(odom_covs[-1]) > np.trace(odom_covs[0])
    assert imu.gyro_cov is not None and np.all(np.diag(imu.gyro_cov) > 0)
    assert imu.accel_cov is not None and imu.orientation_wxyz is None
    assert abs(np.linalg.norm(imu.accel) - 9.81) < 1.5  # gravity dominates a walking IMU
    # odometry starts at the origin of odom; ground truth starts at map_T_odom
    np.testing.assert_allclose(odom_poses[0][0], 0.0, atol=1e-12)
    meta = json.loads((dataset / "scene.json").read_text())["sequences"][4]
    np.testing.assert_allclose(gt[0][0], meta["map_T_odom"]["t"], atol=1e-9)
    assert rotation_angle(gt[0][1], np.array(meta["map_T_odom"]["q_wxyz"])) < 1e-9


def test_bag_io_helpers_and_their_errors(dataset, tmp_path):
    bag = dataset / "bags" / "seq-01"
    assert list_topics(bag)[synth.TOPIC_IMU] == "sensor_msgs/msg/Imu"
    assert topic_message_counts(bag)[synth.TOPIC_IMAGE] == FRAMES
    times = [r.log_time_ns for r in read_messages(bag, [synth.TOPIC_IMU, synth.TOPIC_ODOM])]
    assert times == sorted(times)
    with pytest.raises(ValueError, match="has no topic /nope.*it has: /camera/camera_info"):
        list(read_messages(bag, ["/nope"]))
    with pytest.raises(ValueError, match="expected geometry_msgs/msg/PoseStamped"):
        list(read_messages(bag, [synth.TOPIC_ODOM], expected_types={synth.TOPIC_ODOM: "geometry_msgs/msg/PoseStamped"}))
    with pytest.raises(FileNotFoundError, match="no rosbag2"):
        list_topics(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a rosbag2"):
        list_topics(tmp_path)
    # a failing writer leaves nothing behind
    target = tmp_path / "broken"
    with pytest.raises(RuntimeError):
        with BagWriter(target) as writer:
            writer.add_topic("/x", "std_msgs/msg/Header")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_read_messages_in_header_stamp_order(tmp_path):
    """A recorder that received messages late: log order differs from stamp order."""
    types = m.rosbags_types()
    bag = tmp_path / "late"
    log_and_stamp = [(10, 5), (20, 15), (30, 12), (40, 35), (50, 45)]  # (log ms, stamp ms)
    with BagWriter(bag) as writer:
        writer.add_topic("/pose", "geometry_msgs/msg/PoseStamped")
        for log_ms, stamp_ms in log_and_stamp:
            writer.write("/pose", log_ms * 10**6,
                         m.make_pose_stamped(types, stamp_ms * 1e-3, "map", [stamp_ms, 0, 0], [1, 0, 0, 0]))
    by_log = [r.stamp_ns // 10**6 for r in read_messages(bag)]
    assert by_log == [5, 15, 12, 35, 45]
    by_stamp = list(read_messages(bag, order="header", reorder_window_ns=20 * 10**6))
    assert [r.stamp_ns // 10**6 for r in by_stamp] == [5, 12, 15, 35, 45]
    assert by_stamp[1].log_time_ns == 30 * 10**6
    with pytest.raises(ValueError, match="increase reorder_window_ns"):
        list(read_messages(bag, order="header", reorder_window_ns=1 * 10**6))


# --------------------------------------------------------------------------- CLI and cache

def test_cli_refuses_an_existing_output_and_bad_flags(tmp_path, capsys):
    existing = tmp_path / "out"
    existing.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        synth.main(["--out", str(existing), "--frames", "3", "--size", "40x30", "--quiet"])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    for bad in (["--size", "big"], ["--frames", "1"], ["--format", "zip"], ["--split", "val"],
                ["--trajectory", str(tmp_path / "none.tum")], ["--focal", "-3"]):
        with pytest.raises(SystemExit) as exit_info:
            synth.main(["--out", str(tmp_path / "new"), *bad])
        assert exit_info.value.code == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # a folder given as the recording
        synth.main(["--out", str(tmp_path / "new"), "--trajectory", str(existing)])
    assert exit_info.value.code == 2 and f"trajectory file {existing} is not a file" in capsys.readouterr().err
    binary = tmp_path / "binary.tum"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    assert synth.main(["--out", str(tmp_path / "new"), "--trajectory", str(binary), "--quiet"]) == 2
    assert f"{binary}: not a TUM text file" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_cli_demo_bag_prints_the_cached_bag_and_out_is_required_otherwise(tmp_path, monkeypatch, capsys):
    """`vizloc-synth --demo-bag`: what relocalize.launch.py demo:=true runs when `ros2 launch`'s
    Python cannot render the bag itself; the path is the only line on stdout."""
    calls = []

    def fake_cached_demo_bag(progress=False):
        calls.append(progress)
        return tmp_path / "demo" / "bags" / "seq-05"

    monkeypatch.setattr(synth, "cached_demo_bag", fake_cached_demo_bag)
    assert synth.main(["--demo-bag", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "demo" / "bags" / "seq-05")
    assert calls == [False]
    with pytest.raises(SystemExit) as exit_info:
        synth.main(["--quiet"])
    assert exit_info.value.code == 2 and "--out" in capsys.readouterr().err


def test_cli_writes_and_overwrites_atomically(tmp_path):
    out = tmp_path / "bags_only"
    args = ["--out", str(out), "--format", "bag", "--split", "test", "--frames", "3", "--size", "40x30", "--quiet"]
    assert synth.main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["bags", "scene.json", "trajectories"]
    assert synth.main(args + ["--overwrite", "--seed", "4"]) == 0
    assert json.loads((out / "scene.json").read_text())["sequences"][0]["seed"] == 4101
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bags_only"]


def test_cli_with_a_tum_trajectory_and_a_failing_one(tmp_path, capsys):
    good = tmp_path / "circle.tum"
    _synthetic_tum(good)
    out = tmp_path / "tum_out"
    assert synth.main(["--out", str(out), "--trajectory", str(good), "--frames", "5", "--size", "40x30",
                       "--format", "7scenes", "--quiet"]) == 0
    assert (out / "TestSplit.txt").read_text().split() == ["sequence1"]
    assert json.loads((out / "scene.json").read_text())["sequences"][0]["source"] == "tum:circle.tum"
    short = tmp_path / "short.tum"
    _synthetic_tum(short, seconds=1.0)
    failed = tmp_path / "failed"
    assert synth.main(["--out", str(failed), "--trajectory", str(short), "--frames", "60", "--size", "40x30",
                       "--quiet"]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert not failed.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _source_poses_from_metadata(ground_truth_tum, sequence_meta, epoch_ns):
    """The rendered walk mapped back to the recording with nothing but scene.json: the
    inverse written there, computed independently of TumPlacement.to_source."""
    stamps, t_map, q_map = read_tum(ground_truth_tum)
    block = sequence_meta["tum_placement"]
    transform = block["source_to_map"]
    R = quat_to_matrix(np.array(transform["q_wxyz"]))
    t_source = (t_map - np.array(transform["t"])) @ R / transform["scale"]
    base_in_body = quat_to_matrix(np.array(block["base_in_body_q_wxyz"]))
    R_source = R.T @ quat_to_matrix(q_map) @ base_in_body.T
    return stamps - epoch_ns * 1e-9 + block["source_start_stamp"], t_source, R_source


@pytest.mark.parametrize("radii, frames, keep_scale", [((1.0, 3.5), 61, False), ((1.5, 1.5), 41, True)])
def test_tum_placement_in_scene_json_maps_the_walk_back_to_the_recording(tmp_path, capsys, radii, frames,
                                                                         keep_scale):
    """Shrunk (12 s of an ellipse larger than the room) or kept at its real scale (8 s of
    a circle), both rotated: the logged and stored scale, rotation and offset recover the
    recording from the rendered ground truth."""
    path = tmp_path / "ellipse.tum"
    _synthetic_tum(path, seconds=25.0, radii=radii)
    out = tmp_path / "out"
    args = ["--out", str(out), "--trajectory", str(path), "--frames", str(frames), "--camera-hz", "5",
            "--size", "16x12",
            "--format", "bag", "--quiet"] + (["--keep-scale"] if keep_scale else [])
    assert synth.main(args) == 0
    err = capsys.readouterr().err
    meta = json.loads((out / "scene.json").read_text())
    block = meta["sequences"][0]["tum_placement"]
    assert (block["scale"] == 1.0) == keep_scale and 0.0 < block["scale"] <= 1.0
    assert block["keep_scale"] == keep_scale and block["yaw_deg"] % 360.0 > 1.0  # a rotation to undo
    log_line = [line for line in err.splitlines() if "seq-01 <- ellipse.tum" in line]
    assert len(log_line) == 1
    assert f"{block['yaw_deg']:.1f} deg" in log_line[0]
    assert ("shrunk to scale" in log_line[0]) == (not keep_scale)
    stamps, t_source, R_source = _source_poses_from_metadata(
        out / "trajectories" / "seq-01_ground_truth.tum", meta["sequences"][0], meta["epoch_ns"])
    rec_stamps, rec_t, rec_q = read_tum(path)
    assert rec_stamps[0] <= stamps[0] and stamps[-1] <= rec_stamps[-1]
    expected_t = np.stack([np.interp(stamps, rec_stamps, rec_t[:, d]) for d in range(3)], -1)
    # off by the smoothing over 0.1 s only (most at the window's ends, where it is one-sided)
    assert np.abs(t_source - expected_t).max() < 0.02 and np.median(np.abs(t_source - expected_t)) < 0.002
    nearest = np.abs(rec_stamps[None, :] - stamps[:, None]).argmin(axis=1)
    angles = so3_log(np.einsum("nji,njk->nik", quat_to_matrix(rec_q[nearest]), R_source))
    assert np.degrees(np.linalg.norm(angles, axis=1)).max() < 0.5


def test_keep_scale_refuses_a_recording_larger_than_the_room(tmp_path, capsys):
    path = tmp_path / "big.tum"
    _synthetic_tum(path, seconds=25.0, radii=(1.0, 3.5))
    failed = tmp_path / "failed"
    assert synth.main(["--out", str(failed), "--trajectory", str(path), "--frames", "111", "--camera-hz", "5",
                       "--size", "16x12",
                       "--keep-scale", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vizloc-synth: error: big.tum:")
    assert "spans 2.00 x 6.98 m" in err or "spans 2.00 x 7.00 m" in err, err
    assert "4.80 x 3.80 m free" in err and "6.00 x 5.00 m" in err
    assert not failed.exists()
    with pytest.raises(SystemExit) as exit_info:  # no TUM walk to keep at scale
        synth.main(["--out", str(failed), "--keep-scale", "--quiet"])
    assert exit_info.value.code == 2 and "--trajectory" in capsys.readouterr().err


def test_place_tum_trajectory_placement_inverts_the_walk(tmp_path):
    """TumPlacement.to_source (the library's inverse) agrees with the recording too, here
    on a whole loop shrunk to a third."""
    path = tmp_path / "ellipse.tum"
    _synthetic_tum(path, seconds=25.0, radii=(1.0, 3.5))
    stamps, t, q = read_tum(path)
    trajectory, placement = place_tum_trajectory(SCENE, stamps, t, q, duration=22.0)
    assert placement.scale < 0.5
    times = trajectory.sample_times(10.0)
    t_source, q_source = placement.to_source(*trajectory.pose(times))
    source_times = times + placement.source_start_stamp
    expected_t = np.stack([np.interp(source_times, stamps, t[:, d]) for d in range(3)], -1)
    assert np.abs(t_source - expected_t).max() < 0.02 and np.median(np.abs(t_source - expected_t)) < 0.002
    nearest = np.abs(stamps[None, :] - source_times[:, None]).argmin(axis=1)
    assert np.degrees(rotation_angle(q_source, q[nearest])).max() < 0.5


def test_cached_demo_bag_honours_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert synth.demo_cache_dir() == tmp_path / "cache" / "vizloc_ros" / "demo"
    bag = synth.cached_demo_bag(frames=4, size=(40, 30))
    assert bag.is_relative_to(tmp_path / "cache" / "vizloc_ros" / "demo") and bag.name == "seq-05"
    assert list_topics(bag)[synth.TOPIC_IMAGE] == "sensor_msgs/msg/Image"
    stamp = os.stat(bag / "metadata.yaml").st_mtime_ns
    assert synth.cached_demo_bag(frames=4, size=(40, 30)) == bag  # second call: no rebuild
    assert os.stat(bag / "metadata.yaml").st_mtime_ns == stamp
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert synth.demo_cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "vizloc_ros" / "demo"


def test_parallel_rendering_writes_the_same_bytes(tmp_path):
    """--jobs renders sequences in worker processes; the output must not depend on it."""
    common = ["--format", "both", "--split", "all", "--train-walks", "2", "--frames", "3",
              "--size", "40x30", "--quiet"]
    assert synth.main(["--out", str(tmp_path / "serial"), *common]) == 0
    assert synth.main(["--out", str(tmp_path / "parallel"), "--jobs", "3", *common]) == 0
    serial = sorted(p.relative_to(tmp_path / "serial") for p in (tmp_path / "serial").rglob("*") if p.is_file())
    parallel = sorted(p.relative_to(tmp_path / "parallel") for p in (tmp_path / "parallel").rglob("*") if p.is_file())
    assert serial == parallel and len(serial) > 20
    for rel in serial:
        if rel.suffix in (".png", ".txt", ".tum"):
            assert (tmp_path / "serial" / rel).read_bytes() == (tmp_path / "parallel" / rel).read_bytes(), rel


def test_a_failing_sequence_with_jobs_leaves_no_output(tmp_path, monkeypatch):
    specs = synth.demo_sequences("all", frames=3, train_walks=2)
    broken = [synth.SequenceSpec(s.number, s.split, s.seed, s.frames, str(tmp_path / "missing.tum"))
              if s.number == 2 else s for s in specs]
    with pytest.raises((FileNotFoundError, OSError, ValueError)):
        synth.generate(tmp_path / "out", broken, synth.SynthConfig(width=40, height=30), fmt="7scenes",
                       progress=False, jobs=2)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_only_an_earlier_output(tmp_path, capsys):
    """--overwrite with a folder that is not a vizloc-synth output (say `--out .`) refuses."""
    precious = tmp_path / "work"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    args = ["--format", "7scenes", "--split", "test", "--frames", "3", "--size", "40x30", "--quiet"]
    assert synth.main(["--out", str(precious), "--overwrite", *args]) == 2
    assert "no scene.json" in capsys.readouterr().err
    assert (precious / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert synth.main(["--out", str(a_file), "--overwrite", *args]) == 2
    assert a_file.read_text() == "x"
    earlier = tmp_path / "earlier"
    assert synth.main(["--out", str(earlier), *args]) == 0
    assert synth.main(["--out", str(earlier), "--overwrite", "--seed", "2", *args]) == 0
