"""Fixtures shared by the model and replay tests."""
import pytest
import torch


@pytest.fixture(scope="module")
def fast_cpu():
    """One intra-op thread: on the shared 2-core test machine OpenMP threads spin against
    other processes and tiny forward passes take seconds instead of milliseconds. Flush
    denormals: untrained backbones with fresh batch-norm statistics produce denormal
    floats, ~30x slower on CPU (trained weights do not). Both are restored afterwards
    (hypothesis refuses to run with denormals flushed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(0)
    return torch.randn(2, 3, 64, 64)


# -- a small generated bag and an untrained network, for the replay tests -------------------

def _render_bag(root, frames: int, width: int, height: int, seed: int):
    """One test walk of the synthetic world as a rosbag2, with odometry, IMU and ground truth."""
    from vizloc_ros.sim.synthetic import SequenceSpec, SynthConfig, generate

    generate(root / "scene", [SequenceSpec(5, "test", seed, frames)], SynthConfig(width=width, height=height),
             fmt="bag", progress=False)
    return root / "scene" / "bags" / "seq-05"


@pytest.fixture(scope="module")
def small_bag(tmp_path_factory):
    """24 frames of the synthetic world at 80x60."""
    return _render_bag(tmp_path_factory.mktemp("bag"), 24, 80, 60, seed=101)


@pytest.fixture(scope="module")
def longer_bag(tmp_path_factory):
    """8 s of the synthetic world at 48x36 (120 frames): odometry at 30 Hz, IMU at 200 Hz."""
    return _render_bag(tmp_path_factory.mktemp("longer"), 120, 48, 36, seed=7)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """An untrained ResNet-18 PoseNet at 48x64: fast, deterministic, bad poses."""
    import numpy as np

    from vizloc_ros.localize.models import build_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model("posenet_resnet18", feat_dim=32)
    model.set_pose_stats([0.0, 0.0, 1.3], [1.0, 1.0, 0.2])
    path = tmp_path_factory.mktemp("w") / "tiny"
    cov = np.diag([0.09, 0.09, 0.09, 0.01, 0.01, 0.01]).tolist()
    save_checkpoint(path, model.eval(), {"input": {"resize": 48, "crop": [48, 64]},
                                         "validation_errors": {"cov_ros": cov}})
    return path.with_suffix(".safetensors")
