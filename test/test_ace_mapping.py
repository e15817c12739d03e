"""Scene-coordinate mapping (ACE on a CPU): the buffer, the reprojection loss, the frozen
encoder, a short mapping run, and localization from coordinates."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vizloc_ros import geometry
from vizloc_ros.localize.camera import cell_centres
from vizloc_ros.localize.models import build_model, load_checkpoint
from vizloc_ros.localize.models.ace import CoordinateHead, SceneEncoder
from vizloc_ros.localize.pnp import FAILED_COVARIANCE, PnpSettings, localize_from_coordinates
from vizloc_ros.localize.preprocess import InputSpec
from vizloc_ros.mapping.buffer import Augmentation, BufferBuilder, _warp, samples_per_frame
from vizloc_ros.mapping.head_training import HeadTrainingConfig, reprojection_loss, train_head
from vizloc_ros.mapping.mapper import MapFrame, MapOptions, make_map, split_frames
from vizloc_ros.mapping.pretrain import write_encoder
from vizloc_ros.sim.catalog import get_scene
from vizloc_ros.sim.render import PinholeCamera, Renderer
from vizloc_ros.sim.trajectories import camera_poses, random_walk

K = np.array([[60.0, 0.0, 31.5], [0.0, 60.0, 23.5], [0.0, 0.0, 1.0]])


def _look(yaw: float, t=(0.5, 0.2, 1.2)):
    """A camera pose in map (optical z forward along map yaw), as (t, q)."""
    R_base = geometry.quat_to_matrix(np.array([math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)]))
    R_opt = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # optical -> base
    return np.asarray(t, float), geometry.quat_hemisphere(geometry.matrix_to_quat(R_base @ R_opt))


def _points_seen(t, q, pixels, depth):
    R = geometry.quat_to_matrix(q)
    cam = np.stack([(pixels[:, 0] - K[0, 2]) / K[0, 0] * depth, (pixels[:, 1] - K[1, 2]) / K[1, 1] * depth, depth], 1)
    return cam @ R.T + t


def test_localization_recovers_a_known_pose_from_perfect_coordinates():
    t, q = _look(0.7)
    pixels = cell_centres(6, 8, 8).reshape(-1, 2)
    X = _points_seen(t, q, pixels, np.random.default_rng(0).uniform(1.0, 4.0, len(pixels)))
    result = localize_from_coordinates(X, pixels, K, PnpSettings(min_inliers=10))
    assert result is not None and result.inliers.all()
    np.testing.assert_allclose(result.t_map_cam, t, atol=1e-6)
    assert abs(abs(float(np.dot(result.q_map_cam, q))) - 1.0) < 1e-9
    assert np.all(np.linalg.eigvalsh(result.covariance) > 0)
    assert np.sqrt(result.covariance[0, 0]) < 0.05  # exact coordinates: confident (0.5 px floor, 48 cells)


def test_outliers_are_rejected_and_no_inliers_gives_the_pessimistic_covariance():
    t, q = _look(-0.4)
    pixels = cell_centres(6, 8, 8).reshape(-1, 2)
    X = _points_seen(t, q, pixels, np.random.default_rng(3).uniform(1.0, 4.0, len(pixels)))
    X_bad = X.copy()
    X_bad[::3] += np.random.default_rng(1).normal(0, 2.0, X_bad[::3].shape)
    result = localize_from_coordinates(X_bad, pixels, K, PnpSettings(min_inliers=10))
    np.testing.assert_allclose(result.t_map_cam, t, atol=1e-6)
    assert not result.inliers[::3].any()
    noise = np.random.default_rng(2).normal(0, 3.0, X.shape)  # coordinates that support no pose
    assert localize_from_coordinates(X + noise, pixels, K, PnpSettings(min_inliers=10)) is None
    model = build_model("ace", input_camera=[60.0, 60.0, 31.5, 23.5], min_inliers=10).eval()
    with torch.no_grad():  # an untrained head puts every cell on one point: no pose
        _, _, cov = model.localize(torch.zeros(1, 3, 48, 64))
    np.testing.assert_allclose(cov[0].numpy(), FAILED_COVARIANCE)


def test_buffer_holds_what_was_encoded_and_its_bound():
    encoder = SceneEncoder().eval()
    spec = InputSpec(resize=48, crop=(48, 64))
    assert samples_per_frame(3, 48, 100) == 33 and samples_per_frame(3, 48, 1000) == 48
    builder = BufferBuilder(encoder, spec, K, frames=3, max_samples=100, seed=0)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(3)]
    poses = [_look(y) for y in (0.0, 0.5, 1.0)]
    for image, (t, q) in zip(images, poses):
        builder.add(image, t, q)
    buffer = builder.finish()
    assert len(buffer) == 3 * 33 <= 100
    assert buffer.features.dtype == torch.float16 and buffer.features.shape[1] == encoder.feature_dim
    from vizloc_ros.localize.preprocess import preprocess  # the features are the encoder's, cell by cell

    with torch.no_grad():
        feats = encoder(preprocess(torch.from_numpy(images[1])[None], spec))[0].flatten(1).T
    rows = (buffer.frames == 1).nonzero().flatten()
    grid = torch.from_numpy(cell_centres(6, 8, 8).reshape(-1, 2).astype(np.float32))
    for row in rows[:5]:
        cell = int(((grid - buffer.pixels[row]).abs().sum(1) == 0).nonzero()[0])
        torch.testing.assert_close(buffer.features[row].float(), feats[cell].half().float())
    np.testing.assert_allclose(buffer.camera_centres(), np.stack([p[0] for p in poses]), atol=1e-5)


def test_the_fast_cpu_head_path_agrees_with_the_float32_convolutions():
    """forward() runs the head as matrix products (bf16 hidden layers where the CPU does
    bf16 natively): the coordinates must be the convolutional float32 ones, to rounding."""
    model = build_model("ace", input_camera=[60.0, 60.0, 31.5, 23.5], head_width=64).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.head.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
        x = torch.randn(2, 3, 48, 64, generator=generator)
        exact = model.coordinates_from_head(model.head(model.encoder(x)))
        fast = model(x)
    assert fast.shape == exact.shape == (2, 3, 6, 8)
    assert float((fast - exact).abs().max()) <= 0.02 * float(exact.abs().max())


def test_augmented_views_are_stored_at_the_original_pixels_they_show():
    """A view scaled and rolled about the principal point shows, at its pixel p', what the
    original image shows at back(p'): checked on an image whose channels are its own
    pixel coordinates, so a wrong mapping shows as a wrong value."""
    h, w = 48, 64
    vv, uu = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    x = torch.from_numpy(np.stack([uu, vv, np.zeros_like(uu)])[None])
    for scale, angle in ((1.4, math.radians(12.0)), (0.7, math.radians(-9.0)), (2.0, math.radians(15.0)),
                         (0.5, math.radians(-15.0))):  # and the ends of the default range
        warped, back = _warp(x, scale, angle, (K[0, 2], K[1, 2]), 8)
        assert warped.shape[2] % 8 == 0 and warped.shape[3] % 8 == 0
        assert abs(warped.shape[3] - w * scale) <= 8
        grid = cell_centres(warped.shape[2] // 8, warped.shape[3] // 8, 8).reshape(-1, 2)
        original = back(grid)
        inside = ((original[:, 0] > 1) & (original[:, 0] < w - 2) & (original[:, 1] > 1) & (original[:, 1] < h - 2))
        assert inside.sum() > 10
        seen = warped[0, :2].numpy()[:, grid[inside, 1].astype(int), grid[inside, 0].astype(int)].T
        # the value is read at the pixel left-above the half-pixel cell centre: half a warped
        # pixel per axis, 0.5 / scale original pixels (rolled: up to 0.71 / scale)
        np.testing.assert_allclose(seen, original[inside], atol=max(1.0, 0.75 / scale))


def test_augmented_buffer_keeps_its_bound_and_true_targets():
    encoder = SceneEncoder().eval()
    spec = InputSpec(resize=48, crop=(48, 64))
    t, q = _look(0.2)
    depth = 2.0  # a wall 2 m ahead, parallel to the image: the true point of any pixel is known

    def targets_at(pixels):
        return _points_seen(t, q, np.asarray(pixels, float), np.full(len(pixels), depth))

    builder = BufferBuilder(encoder, spec, K, frames=2, max_samples=400, seed=0,
                            augmentation=Augmentation(copies=3))
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    for _ in range(2):
        builder.add(image, t, q, targets_at)
    buffer = builder.finish()
    assert 48 * 2 <= len(buffer) <= 400  # every view kept some cells, the bound holds
    pixels = buffer.pixels.numpy()
    assert (pixels >= 0).all() and (pixels[:, 0] <= 63).all() and (pixels[:, 1] <= 47).all()
    # augmented cells sit off the grid, and their targets are the points at those pixels
    on_grid = np.isclose((pixels - 3.5) / 8.0, np.round((pixels - 3.5) / 8.0)).all(axis=1)
    assert (~on_grid).sum() > 0
    np.testing.assert_allclose(buffer.targets.numpy(), targets_at(pixels), atol=1e-4)
    with pytest.raises(ValueError):
        Augmentation(copies=-1)


def test_reprojection_loss_is_zero_at_the_true_points_and_trains_only_the_head():
    t, q = _look(0.3)
    pixels = cell_centres(6, 8, 8).reshape(-1, 2)
    X = _points_seen(t, q, pixels, np.full(len(pixels), 2.0))
    R = geometry.quat_to_matrix(q)
    R_cw = torch.from_numpy(np.repeat(R.T[None], len(pixels), 0)).float()
    t_cw = torch.from_numpy(np.repeat((-R.T @ t)[None], len(pixels), 0)).float()
    Xt, Kt, pt = torch.from_numpy(X).float(), torch.from_numpy(K).float(), torch.from_numpy(pixels).float()
    loss, valid, median = reprojection_loss(Xt, pt, R_cw, t_cw, Kt, 10.0, Xt.clone(), HeadTrainingConfig())
    assert float(loss) < 1e-3 and valid == 1.0 and median < 1e-3
    # gradients reach the head only: the encoder has none, the buffer features are constants
    encoder, head = SceneEncoder().eval(), CoordinateHead()
    for p in encoder.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        feats = encoder(torch.zeros(1, 3, 48, 64))[0].flatten(1).T
    pred = head.forward_flat(feats) + Xt
    loss, _, _ = reprojection_loss(pred, pt, R_cw, t_cw, Kt, 10.0, None, HeadTrainingConfig())
    loss.backward()
    assert all(p.grad is None for p in encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_validation_blocks_are_contiguous_and_held_out():
    mapping, validation = split_frames(200, 0.1, 20)
    assert len(validation) == 20 and set(mapping).isdisjoint(validation)
    assert np.all(np.diff(validation) == 1)
    assert split_frames(15, 0.1, 20)[1].size == 0


def _tiny_room_frames(count=24):
    scene = get_scene("room:3000")
    camera = PinholeCamera.from_fov(64, 48, 60.0)
    renderer = Renderer(scene, camera)
    walk = random_walk(scene, 12.0, seed=3)
    t, q = camera_poses(walk, np.linspace(0.5, 11.0, count))
    frames = []
    for k in range(count):
        result = renderer.render(t[k], q[k])
        frames.append(MapFrame(image=result.rgb, t=t[k], q=q[k], depth=result.depth))
    cam = {"fx": camera.fx, "fy": camera.fy, "cx": camera.cx, "cy": camera.cy, "width": 64, "height": 48}
    return frames, cam


def test_a_short_mapping_run_lowers_the_loss_keeps_the_encoder_frozen_and_writes_a_loadable_map(tmp_path):
    torch.manual_seed(0)
    encoder = SceneEncoder()
    write_encoder(tmp_path / "encoder", encoder.eval(), {"made_by": "test"})
    frames, camera = _tiny_room_frames()
    options = MapOptions(steps=60, encoder=tmp_path / "encoder.safetensors", input_height=48,
                         head=HeadTrainingConfig(batch=256), validation_share=0.0, threads=1)
    seen = []
    summary = make_map(frames, camera, tmp_path / "map", options,
                       progress=lambda stage, done, total, info: seen.append((stage, info)))
    history = [info for stage, info in seen if stage == "head" and info]
    assert history[-1]["loss"] < history[0]["loss"]
    model, meta = load_checkpoint(tmp_path / "map")
    assert meta["architecture"] == "ace" and meta["training"]["depth_supervised"]
    reference = {k: v.half().float() for k, v in encoder.state_dict().items() if v.is_floating_point()}
    for name, value in model.encoder.state_dict().items():  # the map carries the frozen encoder unchanged
        if name in reference and "running" not in name:
            torch.testing.assert_close(value.float(), reference[name], atol=1e-3, rtol=1e-3)
    from vizloc_ros.localize.estimator import PoseEstimator  # the run-time path loads it as any checkpoint

    estimate = PoseEstimator(str(tmp_path / "map.safetensors"), device="cpu").estimate(frames[0].image)
    assert np.all(np.isfinite(estimate.t)) and estimate.cov.shape == (6, 6) and np.all(np.isfinite(estimate.cov))
    assert summary["checkpoint"].endswith("map.safetensors")


@pytest.mark.parametrize("bad", [[1.0, 2.0], [0.0, 1.0, 1.0, 1.0], [float("nan"), 1.0, 1.0, 1.0]])
def test_ace_refuses_malformed_intrinsics(bad):
    with pytest.raises(ValueError):
        build_model("ace", input_camera=bad)


def test_train_head_needs_a_budget():
    with pytest.raises(ValueError):
        train_head(CoordinateHead(), None, torch.zeros(3), 1.0)
