"""Allocentric spatial memory: the rotation x translation matcher recovers known planar
shifts and rotations exactly, ground projection is consistent between the egocentric view
and the allocentric map, and the model trains, saves its memory and runs deployed."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from geo_helpers import TINY_INPUT, adam_losses, make_geo_scene, train_tiny
from vizloc_ros.training import train
from vizloc_ros.training.datasets import SevenScenes
from vizloc_ros.localize.models import CheckpointError, build_model, load_checkpoint, save_checkpoint
from vizloc_ros.localize.models.allocentric import (camera_level_attitude, cell_table, correlate, correlate_direct,
                                                    correlate_valid, crop_spectrum, fft_length, match_scores,
                                                    pose_from_scores,
                                                    rotate_view_cells, rotate_views, rotated_support, splat,
                                                    window_scores, window_scores_at)
from vizloc_ros.localize.preprocess import InputSpec
from vizloc_ros.training.recipes import recipe_for
from vizloc_ros.replay import cli as replay
from vizloc_ros.localize.estimator import PoseEstimator

SPEC = InputSpec.from_meta(TINY_INPUT)
RECIPE = recipe_for("allocentric")


#: every test here runs with conftest.fast_cpu (one thread, denormals flushed)
pytestmark = pytest.mark.usefixtures("fast_cpu")


def _egocentric_from_map(memory, r0, c0, yaw, S):
    """What a robot at cell (r0, c0) with heading ``yaw`` sees of ``memory``: view cell
    (i, j) at offset (j - h, i - h) cells in the robot frame, i.e. Rot(yaw) of it in the map."""
    C, H, W = memory.shape
    h = (S - 1) / 2
    idx = torch.arange(S, dtype=torch.float64) - h
    dy, dx = torch.meshgrid(idx, idx, indexing="ij")
    wx = c0 + math.cos(yaw) * dx - math.sin(yaw) * dy
    wy = r0 + math.sin(yaw) * dx + math.cos(yaw) * dy
    grid = torch.stack([wx / (W - 1) * 2 - 1, wy / (H - 1) * 2 - 1], -1).float()[None]
    return F.grid_sample(memory[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]


def test_fft_correlation_equals_the_convolution():
    torch.manual_seed(0)
    memory = torch.randn(2, 3, 12, 15)
    views = torch.randn(2, 4, 3, 5, 5)
    assert torch.allclose(correlate(memory, views), correlate_direct(memory, views), atol=1e-4)


@pytest.mark.parametrize("k0, r0, c0", [(0, 20, 25), (18, 31, 17), (7, 24, 30), (50, 18, 22), (36, 27, 26)])
def test_matcher_recovers_a_known_planar_shift_and_rotation_exactly(k0, r0, c0):
    torch.manual_seed(k0)
    rotations = 72
    # a smooth random map, like ground-projected features
    memory = F.avg_pool2d(torch.randn(4, 52, 56)[None], 3, 1, 1)[0]
    yaw = 2 * math.pi * k0 / rotations
    view = _egocentric_from_map(memory, r0, c0, yaw, 21)
    headings = torch.arange(rotations) * (2 * math.pi / rotations)
    scores = correlate(memory, rotate_views(view[None], headings))[0]
    best = int(scores.argmax())
    assert (best // (52 * 56), (best // 56) % 52, best % 56) == (k0, r0, c0)
    x, y, yaw_est, cov, cell, mass = pose_from_scores(scores, 0.01, (0.0, 0.0), 0.1)
    assert cell == (k0, r0, c0)
    assert abs(x - (c0 + 0.5) * 0.1) < 0.05 and abs(y - (r0 + 0.5) * 0.1) < 0.05
    assert abs(math.remainder(yaw_est - yaw, 2 * math.pi)) < math.radians(2.5)
    assert np.all(np.linalg.eigvalsh(cov) > 0)


def test_valid_correlation_of_a_crop_equals_the_full_correlation_there():
    """The global search's FFTs are only as large as the window plus the view: the
    circular wrap-around must not reach the outputs it returns."""
    torch.manual_seed(0)
    memory = torch.randn(3, 30, 34)
    views = torch.randn(4, 3, 9, 9)
    full = correlate(memory, views[None])[0]
    r_lo, c_lo, rows, cols = 6, 3, 11, 17
    crop = F.pad(memory, (4, 4, 4, 4))[:, r_lo:r_lo + rows + 8, c_lo:c_lo + cols + 8]
    fft_hw = (fft_length(crop.shape[1]), fft_length(crop.shape[2]))
    fast = correlate_valid(crop_spectrum(crop, fft_hw), views, fft_hw, (rows, cols))
    assert torch.allclose(fast, full[:, r_lo:r_lo + rows, c_lo:c_lo + cols], atol=1e-4)
    # 8 headings from the spectra of the first 4: the other half turn is the flipped grid
    view = torch.randn(1, 3, 9, 9)
    headings = torch.arange(8) * (2 * math.pi / 8)
    both = correlate_valid(crop_spectrum(crop, fft_hw), rotate_views(view, headings[:4])[0], fft_hw, (rows, cols),
                           half_turns=True)
    every = correlate_valid(crop_spectrum(crop, fft_hw), rotate_views(view, headings)[0], fft_hw, (rows, cols))
    assert both.shape == every.shape == (8, rows, cols) and torch.allclose(both, every, atol=1e-4)
    assert fft_length(71) == 72 and fft_length(37) == 40 and fft_length(4) == 4


def test_window_scores_equal_the_convolution_in_the_window_dense_and_sparse():
    torch.manual_seed(1)
    memory = torch.randn(6, 20, 24)
    view = torch.zeros(6, 11, 11)
    view[:, 3:8, 6:10] = torch.randn(6, 5, 4)                           # ahead of the camera only
    angles = torch.tensor([0.3, 0.4, 0.5])
    views = rotate_views(view[None], angles)[0]
    full = correlate_direct(memory, views[None])[0]
    rows, cols = range(3, 9), range(14, 24)
    dense = window_scores(memory, views, rows, cols, bands=2)
    assert torch.allclose(dense, full[:, 3:9, 14:24], atol=1e-4)
    cells = rotated_support(view, angles)
    assert len(cells) < 0.6 * 11 * 11
    sparse = window_scores_at(cell_table(F.pad(memory, (5, 5, 5, 5)), 2), (20, 24),
                              rotate_view_cells(view, angles, cells), cells, 11, rows, cols)
    assert torch.allclose(sparse, dense, atol=1e-4)


def test_windowed_match_scores_equal_the_full_match_in_the_window():
    """The training's global match scores the cells around the truth only: the same
    scores as the full match there, for centres near the middle and near the edge."""
    from vizloc_ros.training.recipes.allocentric import windowed_match_scores
    torch.manual_seed(2)
    memory = torch.randn(2, 6, 16, 16)
    view = torch.zeros(2, 6, 9, 9)
    view[:, :, 1:6, 4:9] = torch.randn(2, 6, 5, 5)
    counts = (view.reshape(2, 2, 3, 9, 9).abs().sum(2) > 0).float()
    angles = torch.tensor([0.0, 1.0, 2.5])
    full = match_scores(memory, view, counts, angles, bands=2)
    centre = torch.tensor([[8, 7], [3, 12]])                            # (column, row); the view reaches off the map
    window = windowed_match_scores(memory, view, counts, angles, 2, centre, 3)
    headings = torch.arange(6) * (2 * math.pi / 6)
    full_turn = match_scores(memory, view, counts, headings, bands=2)
    halves = windowed_match_scores(memory, view, counts, headings[:3], 2, centre, 3, half_turns=True)
    for b, (c, r) in enumerate(centre.tolist()):
        assert torch.allclose(window[b], full[b, :, r - 3:r + 4, c - 3:c + 4], atol=1e-4)
        assert torch.allclose(halves[b], full_turn[b, :, r - 3:r + 4, c - 3:c + 4], atol=1e-4)


def test_splat_averages_features_per_cell_and_height_band():
    points = torch.tensor([[[0.05, 0.05, 0.1], [0.07, 0.02, 0.2], [0.15, 0.05, 2.0], [5.0, 5.0, 0.0]]])
    feats = torch.tensor([[[1.0], [3.0], [5.0], [7.0]]])
    sums, counts = splat(points, feats, torch.ones(1, 4, dtype=torch.bool), torch.zeros(1, 2), 0.1, (2, 2), [1.0])
    assert counts[0, 0, 0, 0] == 2 and counts[0, 1, 0, 1] == 1 and counts.sum() == 3  # (5, 5) is outside
    assert sums[0, 0, 0, 0] == 4.0 and sums[0, 1, 0, 1] == 5.0


def _model(**kwargs):
    torch.manual_seed(0)
    args = dict(backbone="small", feat_dim=4, resolution=0.2, max_range=3.0, rotations=36,
                input_camera=[55.0, 55.0, 31.5, 23.5], camera_height=1.3)
    args.update(kwargs)
    return build_model("allocentric", **args).eval()


def test_a_frame_localises_against_a_memory_of_itself():
    """Ground projection: the allocentric splat at the true pose and the egocentric view
    (nominal mount) agree, so the matcher finds the pose back."""
    model = _model(camera_pitch=0.05)
    rng = np.random.default_rng(0)
    out = torch.cat([torch.randn(1, 4, 6, 8), torch.as_tensor(rng.uniform(1.0, 2.8, (1, 1, 6, 8)),
                                                               dtype=torch.float32)], 1)
    x, y, yaw = 0.9, -0.4, math.radians(70.0)
    t, q = model.pose_matrix(x, y, yaw)
    origin = torch.tensor([[-3.0, -3.0]])
    sums, counts = model.allocentric_splat(out, out[:, -1], torch.as_tensor(t)[None].float(),
                                           torch.as_tensor(q)[None].float(), origin, (30, 30))
    model.set_memory(sums[0], counts[0], [-3.0, -3.0])
    view, _ = model.egocentric_view(out)
    scores = correlate(model.memory(), rotate_views(view, model.headings()))[0]
    x_est, y_est, yaw_est, _, _, _ = pose_from_scores(scores, 0.05, model.map_origin, model.resolution)
    assert math.hypot(x_est - x, y_est - y) < 0.2
    assert abs(math.remainder(yaw_est - yaw, 2 * math.pi)) < math.radians(10.0)
    # the planar pose has the mount's height and tilt
    t2, q2 = model.pose_matrix(x_est, y_est, yaw_est)
    assert t2[2] == pytest.approx(1.3)
    att = camera_level_attitude(q2)
    assert att[1] == pytest.approx(0.05, abs=1e-9) and att[2] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("search_factor", [1, 2])
def test_localize_coarse_to_fine_finds_a_frame_in_a_memory_of_itself(search_factor):
    model = _model(resolution=0.1, rotations=72, search_factor=search_factor)
    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    out = torch.cat([torch.randn(1, 4, 6, 8), torch.as_tensor(rng.uniform(1.0, 2.8, (1, 1, 6, 8)),
                                                               dtype=torch.float32)], 1)
    x, y, yaw = -0.73, 0.41, math.radians(-128.0)
    t, q = model.pose_matrix(x, y, yaw)
    sums, counts = model.allocentric_splat(out, out[:, -1], torch.as_tensor(t)[None].float(),
                                           torch.as_tensor(q)[None].float(), torch.tensor([[-4.0, -4.0]]), (80, 80))
    model.set_memory(sums[0], counts[0], [-4.0, -4.0])
    model.forward = lambda images: out.expand(len(images), -1, -1, -1)
    t_est, q_est, cov = model.localize(torch.zeros(1, 3, 48, 64))
    assert np.hypot(*(t_est[0, :2].numpy() - [x, y])) < 0.12
    yaw_est = camera_level_attitude(q_est[0].double().numpy())[0]
    assert abs(math.remainder(yaw_est - yaw, 2 * math.pi)) < math.radians(6.0)
    assert np.all(np.linalg.eigvalsh(cov[0].numpy()) > 0)


def _memory_of_frames(model, poses, seed):
    """A memory of random-feature frames at planar poses (x, y, yaw): what each frame's
    network output is, and the map they make."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    outs = []
    for _ in poses:
        outs.append(torch.cat([torch.randn(1, model.feat_dim, 12, 16),
                               torch.as_tensor(rng.uniform(0.8, 2.9, (1, 1, 12, 16)), dtype=torch.float32)], 1))
    out = torch.cat(outs)
    t, q = zip(*(model.pose_matrix(*p) for p in poses))
    origin = [-4.5, -4.5]
    sums, counts = model.allocentric_splat(out, out[:, -1], torch.as_tensor(np.stack(t)).float(),
                                           torch.as_tensor(np.stack(q)).float(),
                                           torch.tensor([origin]).expand(len(poses), 2), (90, 90))
    return out, sums.sum(0), counts.sum(0), origin


def test_fast_search_finds_the_pose_of_the_exhaustive_one():
    """The global search at 4x coarser cells over the search region, the refinement of
    its 3 best candidates, and one exhaustive full-resolution search over every cell and
    heading of the map agree on frames of a memory with eight other frames in it."""
    poses = [(-1.2, 0.8, 0.4), (0.9, -0.3, 2.6), (0.2, 1.1, -1.9), (-0.6, -1.0, 1.2), (1.3, 0.9, -0.7),
             (-1.5, -0.2, 3.0), (0.5, -1.3, -2.8), (-0.1, 0.2, 0.9), (1.0, 0.4, 1.7)]
    fast = _model(resolution=0.1, rotations=72, max_range=3.0, search_factor=4, coarse_rotations=36, candidates=3)
    exhaustive = _model(resolution=0.1, rotations=72, max_range=3.0, search_factor=1, coarse_rotations=72,
                        candidates=1)
    for model in (fast, exhaustive):  # a sharp (trained-like) softmax: the mean is the best cell's pose
        with torch.no_grad():
            model.log_temperature.fill_(math.log(0.005))
    out, sums, counts, origin = _memory_of_frames(fast, poses, seed=3)
    fast.set_memory(sums, counts, origin, region=[-2.5, -2.3, 2.3, 2.1])
    exhaustive.set_memory(sums, counts, origin)
    assert exhaustive._search_index()["out_hw"] == (90, 90)
    assert fast._search_index()["out_hw"] == (12, 13)   # 0.4 m cells of the region
    for i in (0, 2, 5, 8):
        found = []
        for model in (fast, exhaustive):
            model.forward = lambda images, i=i: out[i:i + 1].expand(len(images), -1, -1, -1)
            t, q, cov = model.localize(torch.zeros(1, 3, 96, 128))
            found.append((*t[0, :2].double().numpy(), camera_level_attitude(q[0].double().numpy())[0]))
            assert np.all(np.linalg.eigvalsh(cov[0].numpy()) > 0)
        (xf, yf, af), (xe, ye, ae) = found
        assert math.hypot(xf - xe, yf - ye) < 0.03 and abs(math.remainder(af - ae, 2 * math.pi)) < math.radians(1)
        x, y, yaw = poses[i]
        assert math.hypot(xf - x, yf - y) < 0.1 and abs(math.remainder(af - yaw, 2 * math.pi)) < math.radians(5)


def test_planar_covariance_is_planar_with_the_mount_uncertainty():
    model = _model(height_sigma=0.1, tilt_sigma_deg=4.0)
    cov = model.planar_covariance(np.diag([0.01, 0.02, 0.03]))
    assert np.allclose(np.diag(cov), [0.01, 0.02, 0.01, math.radians(4) ** 2, math.radians(4) ** 2, 0.03])


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return make_geo_scene(tmp_path_factory.mktemp("alloc") / "scene", train_frames=30)


def _tiny_config(scene, out, *sets):
    return train.load_config(None, ["input.resize=48", "input.crop=[48,64]", "augment.random_crop=false",
                                    "augment.color_jitter=0", "model.args.backbone=small",
                                    "model.args.feat_dim=4", "model.args.resolution=0.2",
                                    "model.args.max_range=4.0", "loss.memory_frames=2",
                                    "loss.min_separation=5", "loss.memory_radius=1.0",
                                    "loss.train_rotations=12", *sets],
                             **{"data.root": str(scene), "model.name": "allocentric", "out": str(out),
                                "device": "cpu"})


def test_training_steps_lower_the_loss(scene, tmp_path):
    torch.manual_seed(0)
    config = _tiny_config(scene, tmp_path / "m", "loss.map_jitter=0.0")
    dataset = train.open_split(config, "train_split")
    model = build_model("allocentric", backbone="small", feat_dim=4, resolution=0.2, max_range=4.0)
    samples = RECIPE.samples(model, dataset, config, SPEC)
    assert model.camera_height == pytest.approx(dataset.poses()[0][:, 2].mean())
    loss_fn = RECIPE.loss(model, config)
    batch = train._collate([samples[i] for i in range(0, len(samples), 3)][:4])
    images = batch["image"]
    x = train.prepare_images(images.reshape(-1, *images.shape[-3:]), SPEC, "cpu", False, config,
                             torch.Generator())
    extras = {k: v for k, v in batch.items() if k != "image"}
    losses = adam_losses(model, lambda: loss_fn(model, x, extras), steps=10)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0]


def test_memory_round_trips_beside_the_checkpoint(scene, tmp_path):
    dataset = SevenScenes(scene, "train")
    model = _model()
    RECIPE.prepare(model, dataset, SPEC, "cpu")
    assert model.has_memory and model.memory_count.sum() > 0
    x = torch.randn(1, 3, 48, 64)
    t, q, cov = model.localize(x)
    assert t.shape == (1, 3) and cov.shape == (1, 6, 6)
    path = save_checkpoint(tmp_path / "al", model, {"input": TINY_INPUT}, dtype="fp16")
    assert json.loads((tmp_path / "al.json").read_text())["side_files"] == {"memory": "al.memory.safetensors"}
    loaded, _ = load_checkpoint(path)
    assert torch.equal(loaded.memory_count, model.memory_count)
    assert np.allclose(loaded.map_origin, model.map_origin)
    t2, q2, _ = loaded.localize(x)
    assert torch.allclose(t2, t, atol=1e-3)
    (tmp_path / "al.memory.safetensors").unlink()
    with pytest.raises(CheckpointError, match="memory"):
        load_checkpoint(path)


def test_online_update_integrates_the_view_into_the_memory(scene):
    dataset = SevenScenes(scene, "train")
    model = _model(online_update=True)
    RECIPE.prepare(model, dataset, SPEC, "cpu")
    before = model.memory_count.sum().item()
    model.localize(torch.randn(1, 3, 48, 64))
    assert model.memory_count.sum().item() > before


@pytest.fixture(scope="module")
def trained(scene, tmp_path_factory):
    return train_tiny(scene, "allocentric", tmp_path_factory.mktemp("alloc_w") / "allocentric",
                      {"model.args.backbone": "small", "model.args.feat_dim": "4",
                       "model.args.resolution": "0.2", "model.args.max_range": "3.0",
                       "model.args.rotations": "36", "loss.memory_frames": "2",
                       "loss.min_separation": "5", "loss.memory_radius": "1.0",
                       "loss.train_rotations": "12", "max_steps": "3", "storage_dtype": "fp16"})


def test_vizloc_train_saves_the_memory_and_the_estimator_and_replay_use_it(trained, scene, tmp_path):
    assert trained.with_name("allocentric.memory.safetensors").is_file()
    meta = json.loads(trained.with_suffix(".json").read_text())
    assert meta["model_config"]["camera_height"] > 1.0
    estimator = PoseEstimator(trained, device="cpu", cpu_threads=1)
    estimate = estimator.estimate(SevenScenes(scene, "test")[0]["image"])
    assert estimate.t[2] == pytest.approx(meta["model_config"]["camera_height"])
    scale = meta["validation_errors"]["model_cov_scale"]  # calibrated on the validation walk
    assert estimate.cov[2, 2] == pytest.approx(meta["model_config"]["height_sigma"] ** 2 * scale)
    options = replay.ReplayOptions(bag=scene / "bags" / "seq-05", out=tmp_path / "report", weights=trained,
                                   device="cpu", batch_size=4, progress=False)
    assert replay.run_replay(options)["frames"]["estimated"] == 8


def test_a_frozen_trunk_is_cached_for_the_recipes_samples_and_referenced(trained, scene, monkeypatch):
    """``trunk.cache`` with the allocentric recipe: the samples carry the trunk's output
    (computed once, on the thinned frames), the heads train on it, the checkpoint
    references the frozen trunk instead of storing it and loads with it."""
    from safetensors import safe_open

    monkeypatch.setenv("XDG_CACHE_HOME", str(trained.parent / "cache"))
    out = trained.parent / "cached"
    train_tiny(scene, "allocentric", out,
               {"model.args.backbone": "small", "model.args.feat_dim": "4", "model.args.resolution": "0.2",
                "model.args.max_range": "3.0", "model.args.rotations": "36", "loss.memory_frames": "2",
                "loss.min_separation": "4", "loss.memory_radius": "1.0", "loss.train_rotations": "12",
                "loss.frame_stride": "2", "max_steps": "2", "storage_dtype": "fp32", "model.args.depth_context": "true",
                "trunk.from": str(trained.with_suffix(".safetensors")), "trunk.copy": "[trunk]",
                "trunk.freeze": "[trunk]", "trunk.cache": "trunk"})
    cached = list((trained.parent / "cache" / "vizloc_ros" / "features").glob("trunk-*.npy"))
    assert len(cached) == 1 and len(np.load(cached[0])) == 15     # every 2nd of the 30 training frames
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["frozen_tensors"]["file"] == trained.with_suffix(".safetensors").name
    assert meta["training"]["trunk"]["cached"] == "trunk"
    with safe_open(str(out.with_suffix(".safetensors")), "pt") as stored:
        assert not any(name.startswith("trunk.") for name in stored.keys())
    source, _ = load_checkpoint(trained.with_suffix(".safetensors"))
    model, _ = load_checkpoint(out.with_suffix(".safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(model.trunk.state_dict().values(),
                                                 source.trunk.state_dict().values()))
    assert model.has_memory
    t, q, cov = model.localize(torch.randn(1, 3, 48, 64))
    assert torch.isfinite(t).all() and np.isfinite(cov.numpy()).all()
