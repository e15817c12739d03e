"""Samples from a bag equal the 7-Scenes export of the same sequence (camera poses, images)."""
import numpy as np
import pytest

from vizloc_ros import geometry
from vizloc_ros.training.bag_dataset import BagDataset
from vizloc_ros.training.datasets import DatasetError, SevenScenes
from vizloc_ros.sim.synthetic import SequenceSpec, SynthConfig, generate


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("scene") / "demo"
    generate(root, [SequenceSpec(5, "test", 101, 12)], SynthConfig(width=64, height=48), fmt="both",
             progress=False)
    return root


def test_bag_samples_match_the_sevenscenes_export(scene):
    _assert_same_samples(BagDataset(scene / "bags" / "seq-05"), SevenScenes(scene, "test"))


def _assert_same_samples(from_bag, folder):
    assert len(from_bag) == len(folder) == 12
    for i in (0, 5, 11):
        a, b = from_bag[i], folder[i]
        np.testing.assert_allclose(a["t"], b["t"], atol=1e-5)
        assert geometry.rotation_angle(a["q"], b["q"]) < 1e-5
        assert np.array_equal(a["image"], b["image"])


def test_tf_chain_ground_truth_and_subsampling(scene):
    # odom -> base_link on /tf is not map -> base_link, but it exercises the chain reader
    data = BagDataset(scene / "bags" / "seq-05", gt_topic="tf:odom->base_link", every=2)
    assert len(data) == 6


def test_missing_topic_names_the_topics_the_bag_has(scene):
    with pytest.raises(DatasetError, match=r"not in .*it has: .*/camera/image_raw"):
        BagDataset(scene / "bags" / "seq-05", gt_topic="/nope")


def test_not_a_bag_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError):
        BagDataset(tmp_path)


def test_a_ros1_recording_with_a_tf_chain_gives_the_same_samples(scene, tmp_path):
    """ROS 1, tf/tfMessage, '/world', a mocap chain, the camera mount only on /tf: the same
    camera poses as the 7-Scenes export."""
    from ros1_bags import as_ros1_bag

    ros1 = tmp_path / "tum_style.bag"
    as_ros1_bag(scene / "bags" / "seq-05", ros1, (np.array([0.05, -0.02, 0.3]),
                                                  geometry.quat_normalize(np.array([0.9, 0.1, 0.0, 0.2]))))
    _assert_same_samples(BagDataset(ros1, image_topic="/camera/rgb/image_color", gt_topic="tf:world->base_link"),
                         SevenScenes(scene, "test"))
