"""Dataset loaders on tiny fixtures built here: conventions of DESIGN.md and clear errors."""
import numpy as np
import pytest
from PIL import Image

from vizloc_ros import geometry
from vizloc_ros.training.datasets import (Cambridge, DatasetError, KittiOdometry, SevenScenes,
                                      TupleDataset, translation_stats)

RNG = np.random.default_rng(3)


def _random_pose():
    q = geometry.quat_hemisphere(geometry.quat_normalize(RNG.normal(size=4)))
    return RNG.normal(size=3), q


def _png(path, grey=False):
    data = RNG.integers(0, 255, size=(6, 8) if grey else (6, 8, 3), dtype=np.uint8)
    Image.fromarray(data).save(path)
    return data


def make_sevenscenes(root, n=3):
    poses = []
    for seq, split in ((1, "TrainSplit.txt"), (2, "TestSplit.txt")):
        (root / split).write_text(f"sequence{seq}\n")
        folder = root / f"seq-{seq:02d}"
        folder.mkdir()
        for k in range(n):
            t, q = _random_pose()
            np.savetxt(folder / f"frame-{k:06d}.pose.txt", geometry.pose_to_matrix(t, q))
            _png(folder / f"frame-{k:06d}.color.png")
            poses.append((seq, t, q))
    return poses


def test_sevenscenes_reads_camera_to_world_poses(tmp_path):
    poses = make_sevenscenes(tmp_path)
    train = SevenScenes(tmp_path, "train")
    test = SevenScenes(tmp_path, "test")
    assert len(train) == 3 and len(test) == 3
    sample = test[1]
    _, t, q = poses[4]
    assert sample["image"].shape == (6, 8, 3) and sample["image"].dtype == np.uint8
    np.testing.assert_allclose(sample["t"], t, atol=1e-9)
    np.testing.assert_allclose(sample["q"], q, atol=1e-9)
    assert sample["q"][0] >= 0


def test_cambridge_inverts_world_to_camera_rotation(tmp_path):
    (tmp_path / "seq1").mkdir()
    t, q_c2w = _random_pose()
    q_w2c = geometry.quat_conjugate(q_c2w)
    _png(tmp_path / "seq1" / "frame00001.png")
    header = "Visual Landmark Dataset V1\nImageFile, Camera Position [X Y Z W P Q R]\n\n"
    row = "seq1/frame00001.png " + " ".join(f"{v:.12f}" for v in (*t, *q_w2c))
    (tmp_path / "dataset_train.txt").write_text(header + row + "\n")
    sample = Cambridge(tmp_path, "train")[0]
    np.testing.assert_allclose(sample["t"], t, atol=1e-9)
    assert geometry.rotation_angle(sample["q"], q_c2w) < 1e-6


def test_kitti_reads_3x4_rows_and_grey_images(tmp_path):
    (tmp_path / "image_l").mkdir()
    rows = []
    for i in range(4):
        t, q = _random_pose()
        rows.append(geometry.pose_to_matrix(t, q)[:3].reshape(-1))
        _png(tmp_path / "image_l" / f"{i:06d}.png", grey=True)
    np.savetxt(tmp_path / "poses.txt", np.array(rows))
    data = KittiOdometry(tmp_path, frames=[1, 3])
    assert len(data) == 2
    sample = data[1]
    assert sample["image"].shape == (6, 8, 3)
    np.testing.assert_allclose(geometry.pose_to_matrix(sample["t"], sample["q"])[:3].reshape(-1),
                               rows[3], atol=1e-9)


def test_tuples_carry_relative_poses(tmp_path):
    make_sevenscenes(tmp_path, n=5)
    base = SevenScenes(tmp_path, "train")
    tuples = TupleDataset(base, steps=3, skip=2)
    assert len(tuples) == 1
    item = tuples[0]
    assert item["image"].shape == (3, 6, 8, 3)
    t_rel, q_rel = geometry.pose_relative(item["t"][0], item["q"][0], item["t"][1], item["q"][1])
    np.testing.assert_allclose(item["t_rel"][0], t_rel, atol=1e-9)
    mean, std = translation_stats(base)
    assert mean.shape == (3,) and np.all(std >= 0.01)


def test_missing_image_is_a_clear_error(tmp_path):
    make_sevenscenes(tmp_path)
    (tmp_path / "seq-01" / "frame-000001.color.png").unlink()
    with pytest.raises(DatasetError, match="missing.*frame-000001.color.png"):
        SevenScenes(tmp_path, "train")


def test_unreadable_image_is_a_clear_error(tmp_path):
    make_sevenscenes(tmp_path)
    (tmp_path / "seq-01" / "frame-000000.color.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="unreadable"):
        SevenScenes(tmp_path, "train")[0]


def test_nan_pose_and_wrong_columns_are_clear_errors(tmp_path):
    make_sevenscenes(tmp_path)
    (tmp_path / "seq-02" / "frame-000002.pose.txt").write_text("nan " * 16)
    with pytest.raises(DatasetError, match="frame-000002.pose.txt"):
        SevenScenes(tmp_path, "test")
    kitti = tmp_path / "kitti"
    (kitti / "image_0").mkdir(parents=True)
    (kitti / "poses.txt").write_text("1 0 0 0 0 1 0 0 0 0 1\n")
    with pytest.raises(DatasetError, match="12 columns"):
        KittiOdometry(kitti)


def test_missing_split_file_names_it(tmp_path):
    with pytest.raises(DatasetError, match="TrainSplit.txt"):
        SevenScenes(tmp_path, "train")


def test_a_split_of_mixed_image_sizes_names_the_odd_file_before_training(tmp_path):
    make_sevenscenes(tmp_path, n=4)
    train = SevenScenes(tmp_path, "train")
    assert train.check_image_sizes() == (8, 6)
    odd = tmp_path / "seq-01" / "frame-000002.color.png"
    Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(odd)
    for dataset in (train, SevenScenes(tmp_path, "train").preload()):  # from the headers, or from memory
        with pytest.raises(DatasetError) as raised:
            dataset.check_image_sizes()
        message = str(raised.value)
        assert message.startswith(f"{odd}: image is 7x5, but 3 of the split's 4 images are 8x6")
        assert "training batches need one size" in message


def test_a_decompression_bomb_in_a_folder_is_a_clear_error(tmp_path, monkeypatch):
    make_sevenscenes(tmp_path, n=2)
    bomb = tmp_path / "seq-02" / "frame-000001.color.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses above twice this
    test = SevenScenes(tmp_path, "test")
    for read in (lambda: test[1], test.check_image_sizes):
        with pytest.raises(DatasetError, match=f"image file is unreadable: {bomb}"):
            read()



def _kitti_folder(root, n=4, stamps=None):
    (root / "image_0").mkdir(parents=True)
    rows = []
    for i in range(n):
        t, q = _random_pose()
        rows.append(geometry.pose_to_matrix(t, q)[:3].reshape(-1))
        _png(root / "image_0" / f"{i:06d}.png", grey=True)
    rows = np.array(rows)
    np.savetxt(root / "poses.txt", rows if stamps is None else np.column_stack([stamps, rows]))
    return rows


def test_kitti_poses_with_a_leading_timestamp_column_are_read_with_a_note(tmp_path, caplog):
    stamps = [100.0, 100.25, 100.5, 100.75]
    rows = _kitti_folder(tmp_path, stamps=stamps)
    with caplog.at_level("INFO"):
        data = KittiOdometry(tmp_path)
    assert data.stamps().tolist() == stamps  # no times.txt: the first column is the stamp
    np.testing.assert_allclose(geometry.pose_to_matrix(data[2]["t"], data[2]["q"])[:3].reshape(-1),
                               rows[2], atol=1e-9)
    notes = [r.getMessage() for r in caplog.records if "first column is taken as a timestamp" in r.getMessage()]
    assert len(notes) == 1 and "poses.txt" in notes[0]


def test_kitti_times_txt_wins_over_a_timestamp_column(tmp_path):
    _kitti_folder(tmp_path, stamps=[1.0, 2.0, 3.0, 4.0])
    np.savetxt(tmp_path / "times.txt", [0.0, 0.1, 0.2, 0.3])
    np.testing.assert_allclose(KittiOdometry(tmp_path).stamps(), [0.0, 0.1, 0.2, 0.3])


@pytest.mark.parametrize("content, message", [
    ("1 " * 14 + "\n", "poses.txt:1: expected 12 columns (a 3x4 pose) or 13 (a timestamp, then the pose), found 14"),
    # one format per file: a 12-number line after 13-number ones is a broken line, not a stamp-less pose
    ("0 1 0 0 0 0 1 0 0 0 0 1 0\n1 0 0 0 0 1 0 0 0 0 1 0\n", "poses.txt:2: expected 13 columns like the lines before, found 12"),
    ("nan 1 0 0 0 0 1 0 0 0 0 1 0\n", "the timestamp (first column) of pose 1 is not finite"),
])
def test_kitti_other_column_counts_are_one_line_errors(tmp_path, content, message):
    _kitti_folder(tmp_path, n=2)
    (tmp_path / "poses.txt").write_text(content)
    with pytest.raises(DatasetError) as info:
        KittiOdometry(tmp_path)
    assert message in str(info.value) and "\n" not in str(info.value)
