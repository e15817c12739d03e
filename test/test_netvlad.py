"""NetVLAD: the layer's normalisation and order invariance, the weakly supervised triplet
loss, the database beside the checkpoint, training and the deployed path."""
import json

import numpy as np
import pytest
import torch

from geo_helpers import TINY_INPUT, make_geo_scene, train_tiny
from vizloc_ros import geometry
from vizloc_ros.training import train
from vizloc_ros.training.datasets import SevenScenes
from vizloc_ros.localize.models import CheckpointError, build_model, load_checkpoint, save_checkpoint
from vizloc_ros.localize.models.netvlad import NetVLAD
from vizloc_ros.training.recipes import recipe_for
from vizloc_ros.training.recipes.netvlad import TripletSamples, thin_database, triplet_loss
from vizloc_ros.training.scene_geometry import farthest_distance, neighbours_within
from vizloc_ros.localize.preprocess import InputSpec, preprocess
from vizloc_ros.replay import cli as replay
from vizloc_ros.localize.estimator import PoseEstimator

SPEC = InputSpec.from_meta(TINY_INPUT)
RECIPE = recipe_for("netvlad")


#: every test here runs with conftest.fast_cpu (one thread, denormals flushed)
pytestmark = pytest.mark.usefixtures("fast_cpu")


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return make_geo_scene(tmp_path_factory.mktemp("netvlad") / "scene", train_frames=24)


def test_descriptor_is_l2_normalised_intra_normalised_and_order_invariant():
    torch.manual_seed(0)
    layer = NetVLAD(clusters=8, dim=16, alpha=10.0)
    features = torch.randn(3, 16, 5, 7)
    out = layer(features)
    assert out.shape == (3, 8 * 16)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-6)
    blocks = out.reshape(3, 8, 16).norm(dim=2)
    assert torch.allclose(blocks, torch.full_like(blocks, 8 ** -0.5), atol=1e-5)
    flat = features.flatten(2)
    permuted = flat[:, :, torch.randperm(35)]
    assert torch.allclose(layer(permuted), out, atol=1e-6)
    assert torch.allclose(layer(permuted.reshape(3, 16, 7, 5)), out, atol=1e-6)


def test_kmeans_initialisation_assigns_features_to_their_cluster():
    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    features = torch.cat([c + 0.01 * torch.randn(50, 8) for c in centres])
    layer = NetVLAD(clusters=4, dim=8, alpha=50.0)
    layer.init_clusters(features)
    soft = torch.softmax(layer.assign(torch.nn.functional.normalize(features, dim=1).T[None]), dim=1)[0]
    labels = soft.argmax(dim=0).reshape(4, 50)
    assert all(len(set(row.tolist())) == 1 for row in labels)
    assert len({int(row[0]) for row in labels}) == 4


def test_triplet_loss_takes_the_best_positive_and_hinges_on_the_margin():
    q = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.0]]), dim=1)
    good, bad = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    far = torch.tensor([[-1.0, 0.0, 0.0]])
    positives = torch.stack([torch.cat([bad, good])])
    assert float(triplet_loss(q, positives, far[None], margin=0.1)) == 0.0  # min over positives
    near_negative = torch.tensor([[[0.9, 0.1, 0.0]]])
    loss = triplet_loss(q, positives, near_negative, margin=0.1)
    d_neg = ((q - near_negative[0]) ** 2).sum()
    assert torch.isclose(loss, 0.1 - d_neg)


def test_triplet_samples_respect_the_radii(scene):
    dataset = SevenScenes(scene, "train")
    samples = TripletSamples(dataset, 2, 3, pos_radius=0.1, neg_radius=0.3, seed=0)
    t, _ = dataset.poses()
    for index in range(len(samples)):
        i = samples.queries[index]
        assert all(np.linalg.norm(t[j] - t[i]) <= 0.1 for j in samples.pos[i])
        assert all(np.linalg.norm(t[j] - t[i]) > 0.3 for j in samples._negatives(i))
    sample = samples[0]
    assert sample["image"].shape == (6, 60, 80, 3)
    with pytest.raises(ValueError, match="neg_radius"):
        TripletSamples(dataset, 2, 3, pos_radius=0.1, neg_radius=100.0)


def test_thinning_keeps_one_image_per_place_and_direction():
    t = np.array([[0, 0, 0], [0.05, 0, 0], [0.5, 0, 0], [0.02, 0, 0]], dtype=float)
    yaw = np.radians([0, 5, 0, 90])
    q = np.stack([np.cos(yaw / 2), 0 * yaw, 0 * yaw, np.sin(yaw / 2)], 1)
    assert thin_database(t, q, 0.25, 15.0).tolist() == [0, 2, 3]


def _tiny_config(scene, out, *sets):
    return train.load_config(None, ["input.resize=48", "input.crop=[48,64]", "augment.random_crop=false",
                                    "augment.color_jitter=0", "model.args.backbone=small",
                                    "loss.pos_radius=0.1", "loss.neg_radius=0.3", "loss.positives=2",
                                    "loss.negatives=3", *sets],
                             **{"data.root": str(scene), "model.name": "netvlad", "out": str(out),
                                "device": "cpu"})


def test_training_steps_lower_the_triplet_loss(scene, tmp_path):
    torch.manual_seed(0)
    config = _tiny_config(scene, tmp_path / "m")
    dataset = train.open_split(config, "train_split")
    model = build_model("netvlad", backbone="small", feat_dim=16, clusters=4)
    samples = RECIPE.samples(model, dataset, config, SPEC)
    loss_fn = RECIPE.loss(model, config)
    batch = train._collate([samples[i] for i in range(0, len(samples), 4)][:4])
    images = batch["image"]
    x = train.prepare_images(images.reshape(-1, *images.shape[-3:]), SPEC, "cpu", False, config,
                             torch.Generator())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(10):
        loss = loss_fn(model, x, {})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


def test_database_query_of_a_mapping_image_returns_its_pose_and_round_trips(scene, tmp_path):
    torch.manual_seed(0)
    dataset = SevenScenes(scene, "train")
    model = build_model("netvlad", backbone="small", feat_dim=16, clusters=4, top_k=1,
                        database_spacing=0.0).eval()
    RECIPE.prepare(model, dataset, SPEC, "cpu")
    assert model.database_size == len(dataset)
    x = preprocess(torch.from_numpy(np.stack([dataset[i]["image"] for i in (3, 11)])), SPEC)
    t, q, cov = model.localize(x)
    t_gt, q_gt = dataset.poses()
    np.testing.assert_allclose(t.numpy(), t_gt[[3, 11]], atol=1e-5)
    assert np.degrees(geometry.rotation_angle(q.double().numpy(), q_gt[[3, 11]])).max() < 0.01
    assert cov.shape == (2, 6, 6) and (torch.linalg.eigvalsh(cov) > 0).all()
    path = save_checkpoint(tmp_path / "nv", model, {"input": TINY_INPUT}, dtype="fp16")
    side = tmp_path / "nv.database.safetensors"
    assert side.is_file()
    meta = json.loads((tmp_path / "nv.json").read_text())
    assert meta["side_files"] == {"database": "nv.database.safetensors"}
    loaded, _ = load_checkpoint(path)
    assert loaded.database_size == len(dataset)
    np.testing.assert_allclose(loaded.db_t, model.db_t)
    t2, _, _ = loaded.localize(x)
    np.testing.assert_allclose(t2.numpy(), t.numpy(), atol=1e-5)
    side.unlink()
    with pytest.raises(CheckpointError, match="database"):
        load_checkpoint(path)


def test_without_a_database_localize_says_how_to_build_one():
    model = build_model("netvlad", backbone="small", feat_dim=8, clusters=2).eval()
    with pytest.raises(RuntimeError, match="no database"):
        model.localize(torch.randn(1, 3, 48, 64))


@pytest.fixture(scope="module")
def trained(scene, tmp_path_factory):
    return train_tiny(scene, "netvlad", tmp_path_factory.mktemp("netvlad_w") / "netvlad",
                      {"model.args.backbone": "small", "model.args.feat_dim": "16",
                       "model.args.clusters": "4", "loss.pos_radius": "0.1",
                       "loss.neg_radius": "0.3", "loss.positives": "2", "loss.negatives": "2",
                       "max_steps": "3", "storage_dtype": "fp16"})


def test_vizloc_train_saves_the_database_and_the_estimator_and_replay_use_it(trained, scene, tmp_path):
    assert trained.with_name("netvlad.database.safetensors").is_file()
    estimator = PoseEstimator(trained, device="cpu", cpu_threads=1)
    estimate = estimator.estimate(SevenScenes(scene, "test")[0]["image"])
    assert estimate.t.shape == (3,) and np.all(np.linalg.eigvalsh(estimate.cov) > 0)
    options = replay.ReplayOptions(bag=scene / "bags" / "seq-05", out=tmp_path / "report", weights=trained,
                                   device="cpu", batch_size=4, progress=False)
    assert replay.run_replay(options)["frames"]["estimated"] == 8


def test_replay_takes_netvlad_as_the_coarse_prior_of_the_fusion(trained, scene, tmp_path):
    options = replay.ReplayOptions(bag=scene / "bags" / "seq-05", out=tmp_path / "report", weights=trained,
                                   prior_weights=trained, device="cpu", batch_size=4, progress=False)
    metrics = replay.run_replay(options)
    counts = json.dumps(metrics["counts"])
    assert "coarse_" in counts


def test_chunked_neighbour_search_equals_brute_force():

    rng = np.random.default_rng(0)
    points = rng.uniform(0, 3, (50, 2))
    dist = np.linalg.norm(points[:, None] - points[None], axis=-1)
    got = neighbours_within(points, 0.5, chunk=7)
    assert all(np.array_equal(row, np.flatnonzero(d <= 0.5)) for row, d in zip(got, dist))
    np.testing.assert_allclose(farthest_distance(points, chunk=7), dist.max(axis=1))


def test_query_stride_draws_one_query_per_block_of_frames(scene):
    dataset = SevenScenes(scene, "train")
    every = TripletSamples(dataset, 2, 3, pos_radius=0.1, neg_radius=0.3, seed=0)
    strided = TripletSamples(dataset, 2, 3, pos_radius=0.1, neg_radius=0.3, seed=0, query_stride=5)
    assert len(strided) == -(-len(every) // 5)
    for index in range(len(strided)):
        block = every.queries[5 * index:5 * index + 5]
        t, _ = dataset.poses()
        first = strided[index]["t"]
        assert any(np.allclose(first, t[i]) for i in block)
    with pytest.raises(IndexError):
        strided[len(strided)]
    with pytest.raises(ValueError, match="query_stride"):
        RECIPE.loss(None, {"loss": {"query_stride": 0}})


def test_mined_negatives_are_the_most_similar_database_images_beyond_the_radius(scene):
    dataset = SevenScenes(scene, "train")
    samples = TripletSamples(dataset, 2, 2, pos_radius=0.1, neg_radius=0.3, seed=0)
    t, q = dataset.poses()
    descriptors = torch.nn.functional.normalize(torch.randn(len(t), 16, generator=torch.Generator().manual_seed(0)),
                                                dim=1)
    samples.mine(descriptors, np.arange(len(t)), hard_pool=3, spacing=0.0, max_angle_deg=15.0)
    sims = (descriptors @ descriptors.T).numpy()
    for i in samples.queries:
        assert samples.place_of[i] == i  # every frame is in this database: its own place
        far = np.flatnonzero(np.linalg.norm(t - t[i], axis=1) > 0.3)
        pool = set(far[np.argsort(-sims[i, far])[:3]].tolist())
        negatives = samples._negatives(i)
        assert len(set(negatives.tolist())) == 2 and set(negatives.tolist()) <= pool
    with pytest.raises(ValueError, match="hard_pool"):
        RECIPE.loss(None, {"loss": {"negatives": 4, "hard_pool": 2}})


def test_triplet_training_on_a_frozen_referenced_trunk_builds_the_database_through_it(scene, tmp_path):
    """The CPU recipe's path (config/train_netvlad_demo.yaml): the trunk copied from another
    checkpoint under other names, frozen (batch-norm statistics included) and referenced,
    no cache (the triplet loss trains on its own samples), the database built through it."""
    from safetensors import safe_open

    from vizloc_ros.training.recipes.netvlad import describe_dataset

    torch.manual_seed(0)
    source = build_model("mapnet", backbone="resnet18", feat_dim=16)
    save_checkpoint(tmp_path / "trunk" / "source", source, {"input": TINY_INPUT}, dtype="fp16")
    out = tmp_path / "out" / "netvlad"
    copy = ("{trunk.0: backbone.conv1, trunk.1: backbone.bn1, trunk.4: backbone.layer1, "
            "trunk.5: backbone.layer2, trunk.6: backbone.layer3}")
    train_tiny(scene, "netvlad", out, {
        "model.args.feat_dim": "8", "model.args.clusters": "4", "loss.pos_radius": "0.1",
        "loss.neg_radius": "0.3", "loss.positives": "2", "loss.negatives": "2", "loss.query_stride": "2",
        "loss.hard_pool": "2",
        "optim.batch_size": "2", "max_steps": "2", "storage_dtype": "fp16",
        "trunk": f"{{from: {tmp_path / 'trunk' / 'source.safetensors'}, copy: {copy}, freeze: [trunk]}}"})
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["frozen_tensors"]["file"] == "source.safetensors"
    assert meta["frozen_tensors"]["prefixes"]["trunk.6."] == "backbone.layer3."
    assert meta["training"]["trunk"]["cached"] is None
    assert out.with_name("netvlad.database.safetensors").is_file()
    with safe_open(str(out.with_suffix(".safetensors")), framework="pt") as handle:
        stored = set(handle.keys())
    assert not any(k.startswith("trunk.") for k in stored) and any(k.startswith("vlad.") for k in stored)

    (out.parent / "source.safetensors").symlink_to(tmp_path / "trunk" / "source.safetensors")
    model, _ = load_checkpoint(out)
    source, _ = load_checkpoint(tmp_path / "trunk" / "source.safetensors")
    theirs = source.backbone.state_dict()
    for ours, prefix in zip((model.trunk[0], model.trunk[1], model.trunk[4], model.trunk[5], model.trunk[6]),
                            ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.")):
        for name, tensor in ours.state_dict().items():
            assert torch.equal(tensor, theirs[prefix + name]), prefix + name  # bit for bit, BN statistics too
    # the saved database is what the saved network gives for the mapping images: it was
    # built through the real (frozen) trunk
    dataset = SevenScenes(scene, "train")
    t, q = dataset.poses()
    keep = thin_database(t, q, model.database_spacing, model.database_angle_deg)
    np.testing.assert_allclose(model.db_t, t[keep])
    again = describe_dataset(model, dataset, SPEC, "cpu", keep)
    torch.testing.assert_close(again, model.db_descriptors.float(), atol=2e-3, rtol=0)
    pose_t, _, cov = model.localize(preprocess(torch.from_numpy(np.array(dataset[0]["image"][None])), SPEC))
    assert torch.isfinite(pose_t).all() and torch.isfinite(cov).all()
