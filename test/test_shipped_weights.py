"""Every shipped checkpoint in weights/ works through every entry point a user has: the
estimator, vizloc-eval and vizloc-replay; a referenced frozen trunk with another hash is
a clear error, never other weights silently."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from vizloc_ros.localize.estimator import PoseEstimator
from vizloc_ros.localize.models import load_checkpoint
from vizloc_ros.localize.models.checkpoint import CheckpointError
from vizloc_ros.replay import cli as replay
from vizloc_ros.sim.synthetic import SequenceSpec, SynthConfig, generate
from vizloc_ros.training import evaluate

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
#: the relocalizers shipped for the demo room (side files such as X.database.safetensors
#: have two suffixes and are not checkpoints of their own)
SHIPPED = sorted(p for p in WEIGHTS.glob("*_demo.safetensors") if p.name.count(".") == 1)


def test_the_demo_checkpoints_are_shipped():
    assert {"mapnet_demo.safetensors", "posenet_demo.safetensors"} <= {p.name for p in SHIPPED}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """Six frames of the demo room's held-out walk at the shipped networks' 320x240."""
    root = tmp_path_factory.mktemp("seven") / "scene"
    generate(root, [SequenceSpec(5, "test", 101, 6)], SynthConfig(width=320, height=240, camera_hz=10.0),
             fmt="7scenes", progress=False)
    return root


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_estimator_gives_finite_poses_and_covariances(path, fast_cpu):
    estimator = PoseEstimator(path, device="cpu")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (240, 320, 3), dtype=np.uint8) for _ in range(3)]
    for k, result in enumerate(estimator.estimate_batch(images, stamps=[0.1 * k for k in range(3)])):
        assert np.all(np.isfinite(result.t)) and np.all(np.isfinite(result.q))
        assert np.all(np.isfinite(result.cov)) and np.all(np.linalg.eigvalsh(result.cov) > 0), k


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_vizloc_eval_scores_every_frame(path, tiny_folder, tmp_path, fast_cpu):
    out = tmp_path / "m.json"
    assert evaluate.main([str(path), str(tiny_folder), "--split", "test", "--device", "cpu", "--no-progress",
                          "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["frames"] > 0 and np.isfinite(metrics["median_translation_m"])


@pytest.fixture(scope="module")
def demo_size_bag(tmp_path_factory):
    """Twelve frames of the demo room as a bag (odometry, IMU, ground truth) at the shipped
    networks' 320x240."""
    root = tmp_path_factory.mktemp("bag")
    generate(root / "scene", [SequenceSpec(5, "test", 101, 12)], SynthConfig(width=320, height=240),
             fmt="bag", progress=False)
    return root / "scene" / "bags" / "seq-05"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_replay_of_a_small_bag_publishes_finite_poses(path, demo_size_bag, tmp_path, fast_cpu):
    options = replay.ReplayOptions(bag=demo_size_bag, out=tmp_path / "report", weights=path, device="cpu",
                                   batch_size=8, progress=False)
    metrics = replay.run_replay(options)
    assert metrics["frames"]["images"] == 12
    for name in ("absolute.tum", "fused.tum"):
        rows = np.loadtxt(tmp_path / "report" / name, ndmin=2)
        assert len(rows) > 0 and np.all(np.isfinite(rows)), name


REFERENCING = [p for p in SHIPPED if json.loads(p.with_suffix(".json").read_text()).get("frozen_tensors")]


@pytest.mark.parametrize("path", REFERENCING, ids=lambda p: p.stem)
def test_a_referenced_trunk_with_another_hash_is_refused(path, tmp_path):
    meta = json.loads(path.with_suffix(".json").read_text())
    for own in path.parent.glob(f"{path.stem}.*"):  # the checkpoint, its JSON and its side files
        if not own.name.endswith(".state.safetensors"):
            shutil.copy(own, tmp_path / own.name)
    trunk = meta["frozen_tensors"]["file"]
    # a same-named file beside the copy is looked at first: here, another checkpoint's tensors
    other = next(p for p in SHIPPED if p.name != trunk)
    shutil.copy(other, tmp_path / trunk)
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tmp_path / path.name)
    (tmp_path / trunk).unlink()
    model, _ = load_checkpoint(tmp_path / path.name)  # found among the shipped weights
    assert model is not None


SEQUENCE = [p for p in SHIPPED if json.loads(p.with_suffix(".json").read_text())["architecture"] == "vidloc"]


@pytest.mark.parametrize("path", SEQUENCE, ids=lambda p: p.stem)
def test_vidloc_online_equals_offline_on_the_shipped_checkpoint(path, fast_cpu):
    """Frame by frame in stamp order (the node, the replay) gives, for every frame, the
    offline output of the clip that ends with it (the last clip_length frames)."""
    import torch

    from vizloc_ros.localize.preprocess import InputSpec, preprocess

    estimator = PoseEstimator(path, device="cpu")
    model, meta = load_checkpoint(path)
    spec = InputSpec.from_meta(meta["input"])
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 255, (240, 320, 3), dtype=np.uint8) for _ in range(model.clip_length + 3)]
    online = [estimator.estimate(image, stamp=0.1 * k) for k, image in enumerate(images)]
    x = preprocess(torch.from_numpy(np.stack(images)), spec)
    with torch.no_grad():
        for k in range(len(images)):
            clip = x[max(0, k + 1 - model.clip_length):k + 1][None]
            t, q = model.decode(model.forward_clips(clip)["pose"][0, -1:])
            np.testing.assert_allclose(online[k].t, t[0].numpy(), atol=1e-4)
            np.testing.assert_allclose(abs(online[k].q @ q[0].numpy()), 1.0, atol=1e-5)
