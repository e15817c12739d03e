"""benchmarks/model_zoo.py: its figures are vizloc-eval's (issue #18's "Checked by"), its
KITTI recipe drops the demo recipes' loss weights, and a checkpoint that references a
frozen trunk is sized without it."""
import importlib.util
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from test_datasets import make_sevenscenes

from vizloc_ros.training import evaluate
from vizloc_ros.training.datasets import open_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zoo():
    spec = importlib.util.spec_from_file_location("model_zoo", ROOT / "benchmarks" / "model_zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _scene(root: Path) -> Path:
    """A 7-Scenes folder of 4 test frames with 60x80 images (the tiny network's input)."""
    root.mkdir()
    make_sevenscenes(root, n=4)
    rng = np.random.default_rng(0)
    for png in sorted(root.glob("seq-*/*.color.png")):
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(png)
    return root


class _Given:
    """Checkpoints that hand out one file, as the zoo's shipped-weights path does."""

    def __init__(self, weights):
        self.weights = weights

    def get(self, name, dataset):
        return self.weights, "shipped"


def test_a_zoo_row_is_what_vizloc_eval_prints(zoo, tiny_weights, tmp_path, fast_cpu):
    scene = _scene(tmp_path / "scene")
    printed = tmp_path / "eval.json"
    assert evaluate.main([str(tiny_weights), str(scene), "--split", "test", "--device", "cpu", "--no-progress",
                          "--json", str(printed)]) == 0
    expected = json.loads(printed.read_text())

    walk = {"name": "tiny walk", "slug": "tiny", "bag": None,
            "open": lambda: open_dataset("7scenes", scene, split="test")}
    args = SimpleNamespace(device="cpu", fused=False, work_path=tmp_path)
    (row,) = zoo.method_rows("posenet_resnet18", {"name": "demo"}, [walk], args, _Given(tiny_weights))
    assert "note" not in row
    assert row["frames"] == expected["frames"] == 4
    for key in zoo.RAW_KEYS:
        assert row[key] == pytest.approx(expected[key], rel=1e-9), key
    assert np.isfinite(row["nees_per_dof"]) and row["cpu_ms"] > 0


def test_kitti_runs_drop_the_demo_loss_weights_and_take_the_trunk_trained_there(zoo, tmp_path):
    args = SimpleNamespace(device="auto", quick=False, kitti_epochs=40)
    dataset = {"name": "kitti/x", "kind": "kitti", "train": tmp_path / "even", "val": tmp_path / "odd"}
    mapnet = zoo.zoo_config("mapnet", dataset, args, tmp_path / "mapnet", lambda source: None)
    assert not set(zoo.KITTI_DROPPED_LOSS_KEYS) & set(mapnet["loss"])  # vizloc-train's defaults apply
    assert mapnet["max_steps"] is None and mapnet["optim"]["epochs"] == 40 and mapnet["optim"]["batch_size"] == 8
    assert mapnet["input"] == zoo.KITTI_INPUT
    dsac = zoo.zoo_config("dsac", dataset, args, tmp_path / "dsac", lambda source: None)
    assert dsac["optim"]["epochs"] == 40 * zoo.KITTI_EPOCH_FACTOR["dsac"]  # from scratch: more epochs
    asked = []
    shipped = ROOT / "weights" / "posenet_demo.safetensors"  # stands in for a KITTI-trained PoseNet

    def source(name):
        asked.append(name)
        return shipped

    lstm = zoo.zoo_config("lstm_posenet", dataset, args, tmp_path / "lstm", source)
    assert asked == ["posenet"] and lstm["trunk"]["from"] == str(shipped)
    demo = {"name": "demo", "kind": "7scenes", "train": tmp_path, "val": tmp_path}
    on_demo = zoo.zoo_config("lstm_posenet", demo, args, tmp_path / "lstm", source)
    assert on_demo["trunk"]["from"] == str(ROOT / "weights" / "posenet_demo.safetensors")
    assert on_demo["loss"]["s_q"] == -3.0  # the demo recipe as written


def test_checkpoint_size_counts_its_own_files_and_names_the_shared_trunk(zoo, tmp_path):
    weights = tmp_path / "m.safetensors"
    weights.write_bytes(b"x" * 1_000_000)
    (tmp_path / "m.database.safetensors").write_bytes(b"x" * 500_000)
    (tmp_path / "m.state.safetensors").write_bytes(b"x" * 9_000_000)  # resume state: not shipped
    meta = {"side_files": {"database": "m.database.safetensors"},
            "frozen_tensors": {"file": "mapnet_demo.safetensors", "sha256": "0" * 64}}
    weights.with_suffix(".json").write_text(json.dumps(meta))
    megabytes, trunk = zoo.checkpoint_size(weights)
    assert megabytes == pytest.approx(1.5, abs=0.01) and trunk == "mapnet_demo.safetensors"


def test_a_demo_bag_of_another_walk_is_refused(zoo, tmp_path):
    folder, bag_root = tmp_path / "demo7", tmp_path / "cache"
    (folder / "trajectories").mkdir(parents=True)
    (bag_root / "trajectories").mkdir(parents=True)
    (bag_root / "bags" / "seq-05").mkdir(parents=True)
    (folder / "trajectories" / "seq-05_ground_truth.tum").write_text("0 0 0 0 0 0 0 1\n")
    (bag_root / "trajectories" / "seq-05_ground_truth.tum").write_text("0 1 0 0 0 0 0 1\n")
    with pytest.raises(zoo.ZooError, match="not the walk"):
        zoo.held_out_walk(folder, bag_root / "bags" / "seq-05")
    shutil.copy(folder / "trajectories" / "seq-05_ground_truth.tum", bag_root / "trajectories")
    assert zoo.held_out_walk(folder, bag_root / "bags" / "seq-05")["bag"] == bag_root / "bags" / "seq-05"


def test_every_table_line_has_every_column(zoo):
    rows = [{"model": "vlocnet", "method": "VLocNet", "data": "demo, held-out walk", "training": "shipped",
             "median_translation_m": 0.2, "median_rotation_deg": 3.0, "within_25cm_2deg": 0.5,
             "within_5cm_5deg": 0.1, "nees_per_dof": 1.1, "fused_median_translation_m": 0.1,
             "fused_vo_median_translation_m": 0.15, "fused_vo_median_rotation_deg": 2.0, "cpu_ms": 30.0,
             "train_minutes": 12.0, "checkpoint_mb": 2.6, "shared_trunk": "mapnet_demo.safetensors"},
            {"model": "ace", "method": "ace", "data": "kitti/x", "note": "skipped: made by vizloc-map"}]
    table = [line for line in zoo.markdown(rows, [], quick=False).splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3  # header, rule, VLocNet, its visual-odometry line, ace
    assert {line.count("|") for line in table} == {len(zoo.COLUMNS) + 1}
    assert "0.150" in table[3] and "own visual odometry" in table[3]
    assert "2.6 + shared trunk mapnet_demo.safetensors" in table[2] and "skipped" in table[4]


def test_ace_on_a_kitti_folder_is_mapped_by_vizloc_map_and_timed_by_its_total(zoo, tmp_path, monkeypatch):
    from vizloc_ros.mapping import cli as mapping_cli

    calls = []

    def fake_map(argv):
        calls.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        out.write_bytes(b"map")
        out.with_suffix(".json").write_text(json.dumps({"training": {"timings": {"total_s": 90.0}}}))
        return 0

    monkeypatch.setattr(mapping_cli, "main", fake_map)
    args = SimpleNamespace(quick=False, kitti_map_minutes=4.0, weights=None, map=None, train_gpu_recipes=False)
    dataset = {"name": "kitti/seq", "kind": "kitti", "train": tmp_path / "even", "val": tmp_path / "odd"}
    weights, how = zoo.Checkpoints(args, tmp_path / "work").get("ace", dataset)
    assert calls == [[str(tmp_path / "even"), "--out", str(weights), "--minutes", "4", "--threads", "1",
                      "--overwrite", "--no-progress", "--quiet"]]
    assert how.startswith("mapped here (vizloc-map)") and zoo.training_minutes(weights) == 1.5
    # on the demo without --map, and in quick mode, a map is still left to vizloc-map
    with pytest.raises(zoo.Skipped, match="vizloc-map"):
        zoo.Checkpoints(args, tmp_path / "work").get("ace", {"name": "demo", "kind": "7scenes"})
    monkeypatch.setattr(mapping_cli, "main", lambda argv: 2)
    with pytest.raises(zoo.ZooError, match="vizloc-map failed"):
        zoo.Checkpoints(args, tmp_path / "work2").get("ace", {**dataset, "name": "kitti/other"})
    monkeypatch.setattr(mapping_cli, "main", lambda argv: 130)  # Ctrl-C in the mapping stops the zoo
    with pytest.raises(KeyboardInterrupt):
        zoo.Checkpoints(args, tmp_path / "work3").get("ace", {**dataset, "name": "kitti/third"})
    for bad in ("0", "-1", "nan", "inf", "x"):  # one usage line, exit 2
        with pytest.raises(SystemExit) as stopped:
            zoo.build_parser().parse_args(["--kitti-map-minutes", bad])
        assert stopped.value.code == 2
    assert zoo.build_parser().parse_args(["--kitti-map-minutes", "0.5"]).kitti_map_minutes == 0.5
