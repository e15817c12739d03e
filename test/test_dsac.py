"""DSAC / DSAC++: scene coordinate targets, PnP-RANSAC with soft inliers, the
differentiable expected loss, training, checkpoints and the deployed path."""
import json

import numpy as np
import pytest
import torch

from geo_helpers import TINY_INPUT, adam_losses, make_geo_scene, train_tiny
from vizloc_ros import geometry
from vizloc_ros.training import evaluate, export, train
from vizloc_ros.training.datasets import SevenScenes, translation_stats
from vizloc_ros.training.recipes import recipe_for
from vizloc_ros.training.recipes.dsac import SceneCoordinateLoss, dsac_expected_loss
from vizloc_ros.training.scene_geometry import dataset_camera, depth_path, grid_scene_coordinates, load_depth
from vizloc_ros.localize.camera import cell_centres, input_camera, intrinsic_matrix
from vizloc_ros.localize.models import build_model, load_checkpoint, save_checkpoint
from vizloc_ros.localize.models.dsac import pnp_ransac, pose_covariance
from vizloc_ros.localize.preprocess import InputSpec
from vizloc_ros.localize.estimator import PoseEstimator
from vizloc_ros.replay import cli as replay

SPEC = InputSpec.from_meta(TINY_INPUT)
RECIPE = recipe_for("dsac")


#: every test here runs with conftest.fast_cpu (one thread, denormals flushed)
pytestmark = pytest.mark.usefixtures("fast_cpu")


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return make_geo_scene(tmp_path_factory.mktemp("dsac") / "scene")


def _scene_points(rng, K, pixels, t, q, outliers=0):
    depth = rng.uniform(1.5, 4.0, len(pixels))
    cam = np.stack([(pixels[:, 0] - K[0, 2]) / K[0, 0] * depth,
                    (pixels[:, 1] - K[1, 2]) / K[1, 1] * depth, depth], -1)
    X = cam @ geometry.quat_to_matrix(q).T + t
    X[:outliers] += rng.normal(0.0, 1.0, (outliers, 3))
    return X


def _camera_pose(rng):
    q = geometry.quat_hemisphere(geometry.quat_normalize(np.array([0.5, -0.5, 0.5, -0.5])
                                                         + rng.normal(0, 0.05, 4)))
    return np.array([0.3, -0.2, 1.4]), q


def test_network_shapes_and_registry():
    model = build_model("dsac", backbone="small", input_camera=[50.0, 50.0, 31.5, 23.5]).eval()
    assert model.architecture == "dsac" and model.custom_inference
    with torch.no_grad():
        coords = model(torch.randn(2, 3, 48, 64))
    assert coords.shape == (2, 3, 6, 8)
    assert model.output_size(48, 64) == (6, 8)
    assert model.pixel_grid(6, 8).shape == (48, 2)


def test_targets_from_depth_reproject_onto_the_cell_centres(scene):
    dataset = SevenScenes(scene, "train")
    camera = dataset_camera(dataset)
    assert camera["width"] == 80 and camera["height"] == 60
    sample = dataset[3]
    depth = load_depth(depth_path(dataset.items[3][0]))
    coords = grid_scene_coordinates(depth, camera, SPEC, sample["t"], sample["q"], (6, 8), 8)
    assert coords.shape == (6, 8, 3) and np.isfinite(coords).all()
    K = intrinsic_matrix(*input_camera(camera, SPEC))
    R_cw = geometry.quat_to_matrix(sample["q"])
    cam = (coords.reshape(-1, 3) - sample["t"]) @ R_cw
    uv = cam[:, :2] / cam[:, 2:] @ K[:2, :2].T + K[:2, 2]
    # the depth is read at the nearest original pixel: within half an original pixel,
    # 0.8 network-input pixels at this scale
    assert np.abs(uv - cell_centres(6, 8, 8).reshape(-1, 2)).max() < 0.45


def test_ransac_recovers_the_pose_despite_outliers_and_reports_its_uncertainty():
    rng = np.random.default_rng(0)
    K = intrinsic_matrix(138.0, 138.0, 79.5, 59.5)
    pixels = cell_centres(8, 10, 16).reshape(-1, 2)
    t, q = _camera_pose(rng)
    X = _scene_points(rng, K, pixels, t, q, outliers=20) + rng.normal(0, 0.005, (80, 3))
    R_wc, t_wc, inliers, residuals = pnp_ransac(X, pixels, K, 128, 2.0, 2.5, np.random.default_rng(1))
    assert not inliers[:20].any() or inliers[:20].sum() <= 2
    assert inliers[20:].mean() > 0.9
    centre = -R_wc.T @ t_wc
    assert np.linalg.norm(centre - t) < 0.03
    assert np.degrees(geometry.rotation_angle(geometry.matrix_to_quat(R_wc.T), q)) < 0.5
    cov = pose_covariance(X, K, R_wc, t_wc, inliers, residuals)
    assert np.all(np.linalg.eigvalsh(cov) > 0)
    assert np.sqrt(np.diag(cov)[:3]).max() < 0.05
    # fewer correspondences -> larger uncertainty
    few = inliers.copy()
    few[np.flatnonzero(few)[8:]] = False
    assert np.trace(pose_covariance(X, K, R_wc, t_wc, few, residuals)) > np.trace(cov)


def test_expected_loss_distribution_sums_to_one_and_has_gradients_into_the_network():
    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    model = build_model("dsac", backbone="small", input_camera=[50.0, 50.0, 31.5, 23.5])
    t, q = _camera_pose(rng)
    model.set_pose_stats(t, [1.0, 1.0, 1.0])
    coords = model(torch.randn(1, 3, 48, 64))[0].reshape(3, -1).T
    # pull the predictions towards a consistent scene so hypotheses are meaningful
    K = model.intrinsics()
    pixels = model.pixel_grid(6, 8)
    X = torch.as_tensor(_scene_points(rng, K, pixels.numpy(), t, q), dtype=torch.float32)
    pred = X + 0.05 * coords
    out = dsac_expected_loss(pred, pixels, K, torch.as_tensor(t), torch.as_tensor(q), hypotheses=32,
                             threshold=3.0, rng=np.random.default_rng(0))
    probs = out["probs"]
    assert len(probs) > 16
    assert torch.isclose(probs.sum(), torch.tensor(1.0, dtype=probs.dtype), atol=1e-9)
    assert (probs >= 0).all() and torch.isfinite(out["loss"])
    # the loss is the expectation of the per-hypothesis losses
    assert torch.isclose(out["loss"], (probs * out["losses"]).sum())
    out["loss"].backward()
    grads = [p.grad for p in model.head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert model.head[-1].weight.grad.abs().sum() > 0


def _tiny_config(scene, out, *sets):
    return train.load_config(None, ["input.resize=48", "input.crop=[48,64]", "augment.random_crop=false",
                                    "augment.color_jitter=0", "model.args.backbone=small", *sets],
                             **{"data.root": str(scene), "model.name": "dsac", "out": str(out),
                                "device": "cpu"})


def test_training_steps_lower_the_coordinate_loss(scene, tmp_path):
    torch.manual_seed(0)
    config = _tiny_config(scene, tmp_path / "m")
    dataset = train.open_split(config, "train_split")
    model = build_model("dsac", backbone="small")
    model.set_pose_stats(*translation_stats(dataset))
    samples = RECIPE.samples(model, dataset, config, SPEC)
    assert model.input_camera is not None and samples.has_depth
    loss_fn = RECIPE.loss(model, config)
    assert isinstance(loss_fn, SceneCoordinateLoss) and loss_fn.current_stage() == "coords"
    batch = train._collate([samples[i] for i in range(8)])
    x = train.prepare_images(batch["image"], SPEC, "cpu", False, config, torch.Generator())
    extras = {k: v for k, v in batch.items() if k != "image"}
    losses = adam_losses(model, lambda: loss_fn(model, x, extras), steps=12)
    assert losses[-1] < 0.7 * losses[0]
    # the other stages run on the same batch and give finite losses with gradients
    for stage in ("reprojection", "e2e"):
        stage_loss = RECIPE.loss(model, _tiny_config(scene, tmp_path / "m", f"loss.stage={stage}",
                                                      "loss.hypotheses=8"))
        value = stage_loss(model, x[:2], {k: v[:2] for k, v in extras.items()})
        assert torch.isfinite(value)
        value.backward()


def test_schedule_switches_to_e2e_and_bad_options_are_named(scene, tmp_path):
    model = build_model("dsac", backbone="small")
    loss = RECIPE.loss(model, _tiny_config(scene, tmp_path / "m", "loss.stage=coords+e2e", "loss.e2e_after=2"))
    assert loss.current_stage() == "coords"
    loss.steps += 2
    assert loss.current_stage() == "e2e"
    with pytest.raises(ValueError, match="hypothesis_count"):
        RECIPE.loss(model, _tiny_config(scene, tmp_path / "m", "loss.hypothesis_count=3"))
    config = _tiny_config(scene, tmp_path / "m", "augment.random_crop=true")
    with pytest.raises(ValueError, match="random_crop"):
        RECIPE.samples(model, SevenScenes(scene, "train"), config, SPEC)


def test_checkpoint_round_trip_keeps_the_camera_and_the_poses(tmp_path):
    torch.manual_seed(0)
    model = build_model("dsac", backbone="small", input_camera=[50.0, 50.0, 31.5, 23.5],
                        hypotheses=16).eval()
    model.set_pose_stats([0.0, 0.0, 1.3], [1.0, 1.0, 0.5])
    save_checkpoint(tmp_path / "d", model, {"input": TINY_INPUT})
    loaded, meta = load_checkpoint(tmp_path / "d")
    assert meta["architecture"] == "dsac" and meta["model_config"]["input_camera"] == [50.0, 50.0, 31.5, 23.5]
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    t1, q1, c1 = model.localize(x)
    t2, q2, c2 = loaded.localize(x)
    assert torch.equal(t1, t2) and torch.equal(q1, q2)


@pytest.fixture(scope="module")
def trained(scene, tmp_path_factory):
    return train_tiny(scene, "dsac", tmp_path_factory.mktemp("dsac_w") / "dsac",
                      {"model.args.backbone": "small", "model.args.hypotheses": "32",
                       "loss.stage": "coords+e2e", "loss.e2e_after": "3", "loss.hypotheses": "8",
                       "max_steps": "5", "storage_dtype": "fp16"})


def test_vizloc_train_writes_a_checkpoint_the_estimator_and_eval_use(trained, scene, tmp_path):
    meta = json.loads(trained.with_suffix(".json").read_text())
    assert meta["architecture"] == "dsac" and len(meta["model_config"]["input_camera"]) == 4
    assert meta["validation_errors"]["model_cov_scale"] > 0  # inlier covariances calibrated
    assert meta["storage_dtype"] == "fp16"
    estimator = PoseEstimator(trained, device="cpu", cpu_threads=1)
    image = SevenScenes(scene, "test")[0]["image"]
    estimate = estimator.estimate(image)
    assert estimate.t.shape == (3,) and abs(np.linalg.norm(estimate.q) - 1) < 1e-9
    assert estimate.cov.shape == (6, 6) and np.all(np.linalg.eigvalsh(estimate.cov) > 0)
    # the covariance is the model's own (from inliers), not the stored validation one
    assert not np.allclose(estimate.cov, estimator._validation_cov)
    assert evaluate.main([str(trained), str(scene), "--device", "cpu", "--no-progress",
                          "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["frames"] == 8


def test_vizloc_replay_runs_dsac_end_to_end(trained, scene, tmp_path):
    options = replay.ReplayOptions(bag=scene / "bags" / "seq-05", out=tmp_path / "report", weights=trained,
                                   device="cpu", batch_size=4, progress=False)
    metrics = replay.run_replay(options)
    assert metrics["frames"]["estimated"] == 8
    assert (tmp_path / "report" / "report.md").is_file()


def test_export_refuses_dsac_with_a_reason(trained, capsys):
    assert export.main([str(trained)]) == 2
    assert "RANSAC" in capsys.readouterr().err


def test_ground_truth_coordinates_give_the_ground_truth_pose_through_the_model_camera(scene):
    """The oracle check of the whole geometric chain: targets from depth, the network-input
    camera and the cell centres must let PnP recover the true pose."""
    dataset = SevenScenes(scene, "test")
    camera = dataset_camera(dataset)
    K = intrinsic_matrix(*input_camera(camera, SPEC))
    pixels = cell_centres(6, 8, 8).reshape(-1, 2)
    for index in (0, 5):
        sample = dataset[index]
        depth = load_depth(depth_path(dataset.items[index][0]))
        X = grid_scene_coordinates(depth, camera, SPEC, sample["t"], sample["q"], (6, 8), 8)
        R_wc, t_wc, inliers, _ = pnp_ransac(X.reshape(-1, 3).astype(float), pixels, K, 64, 2.0, 2.5,
                                            np.random.default_rng(0))
        assert inliers.mean() > 0.9
        assert np.linalg.norm(-R_wc.T @ t_wc - sample["t"]) < 0.03
        assert np.degrees(geometry.rotation_angle(geometry.matrix_to_quat(R_wc.T), sample["q"])) < 1.0


def test_model_covariance_scale_recovers_a_known_miscalibration():
    rng = np.random.default_rng(0)
    n = 4000
    true_cov = np.diag([0.02, 0.01, 0.03, 1e-3, 2e-3, 1e-3])
    err = rng.multivariate_normal(np.zeros(6), true_cov, n)
    t_gt = rng.normal(size=(n, 3))
    q_gt = geometry.quat_hemisphere(geometry.quat_normalize(rng.normal(size=(n, 4))))
    t_est = t_gt - err[:, :3]
    # R_gt = exp(dr) R_est  ->  R_est = exp(-dr) R_gt
    R_est = geometry.so3_exp(-err[:, 3:]) @ geometry.quat_to_matrix(q_gt)
    q_est = geometry.matrix_to_quat(R_est)
    scale = train.model_covariance_scale(t_est, q_est, t_gt, q_gt, [true_cov / 9.0] * n)
    assert scale == pytest.approx(9.0, rel=0.1)
