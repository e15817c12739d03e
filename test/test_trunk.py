"""vizloc-train's ``trunk`` block: a head trained on a frozen trunk copied from another
checkpoint, its output cached once, the trunk referenced (not copied) by the checkpoint."""
import json

import numpy as np
import pytest
import torch

from test_datasets import make_sevenscenes
from torch_determinism import deterministic_torch
from vizloc_ros.localize.models import build_model, load_checkpoint, save_checkpoint
from vizloc_ros.localize.models.checkpoint import CheckpointError
from vizloc_ros.training import train
from vizloc_ros.training.trunk import TrunkError, TrunkPlan

TINY = ["--set", "input.resize=32", "--set", "input.crop=[32,32]", "--set", "augment.color_jitter=0",
        "--set", "augment.random_crop=false", "--device", "cpu", "--no-progress", "--set", "threads=1"]


@pytest.fixture()
def scene_and_trunk(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "scene").mkdir()
    make_sevenscenes(tmp_path / "scene", n=8)
    with deterministic_torch(0):
        source = build_model("mapnet", backbone="resnet18", feat_dim=32)
    save_checkpoint(tmp_path / "trunk" / "source", source, {"input": {"resize": 32, "crop": [32, 32]}},
                    dtype="fp16")
    return tmp_path


def _vidloc_args(root, out, *extra):
    return ["--data", str(root / "scene"), "--model", "vidloc", "--epochs", "2", "--batch-size", "2",
            "--out", str(out), "--set", "model.args={backbone: resnet18, feat_dim: 32, hidden: 8, clip_length: 3}",
            "--set", "tuple={steps: 3, skip: 1, stride: 1}",
            "--set", f"trunk={{from: {root / 'trunk' / 'source.safetensors'}, copy: [backbone, fc_feat], "
                     "freeze: [backbone], cache: backbone}", *TINY, *extra]


def test_head_trains_on_a_frozen_cached_trunk_that_the_checkpoint_references(scene_and_trunk):
    root = scene_and_trunk
    out = root / "out" / "vidloc"
    with deterministic_torch(0):
        assert train.main(_vidloc_args(root, out)) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["frozen_tensors"]["file"] == "source.safetensors"
    assert meta["frozen_tensors"]["prefixes"] == {"backbone.": "backbone."}
    assert meta["training"]["trunk"]["cached"] == "backbone"
    from safetensors import safe_open
    with safe_open(str(out.with_suffix(".safetensors")), framework="pt") as handle:
        stored = set(handle.keys())
    assert stored and not any(k.startswith("backbone.") for k in stored)  # the trunk is not copied
    assert any(k.startswith("fc_feat.") for k in stored)                   # the trained head is
    # the referenced file sits beside neither: it is found through the path in the same folder only
    (root / "out" / "source.safetensors").symlink_to(root / "trunk" / "source.safetensors")
    model, _ = load_checkpoint(out)
    source, _ = load_checkpoint(root / "trunk" / "source.safetensors")
    for name, tensor in source.state_dict().items():
        if name.startswith("backbone."):
            assert torch.equal(model.state_dict()[name], tensor), name   # frozen: bit for bit
    assert not torch.equal(model.fc_feat.weight, source.fc_feat.weight)  # copied, then trained
    clip = torch.rand(1, 3, 3, 32, 32)
    assert torch.isfinite(model.forward_clips(clip)["pose"]).all()
    # the features were cached on disk: a second run reads them back
    assert list((root / "cache" / "vizloc_ros" / "features").glob("backbone-*.npy"))


def test_a_referenced_trunk_with_another_hash_or_missing_is_a_clear_error(scene_and_trunk):
    root = scene_and_trunk
    out = root / "out" / "vidloc"
    with deterministic_torch(0):
        assert train.main(_vidloc_args(root, out, "--set", "optim.epochs=1")) == 0
    with pytest.raises(CheckpointError, match="neither beside"):
        load_checkpoint(out)
    other = build_model("mapnet", backbone="resnet18", feat_dim=32)
    save_checkpoint(root / "out" / "source", other, {"input": {"resize": 32, "crop": [32, 32]}}, dtype="fp16")
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(out)


@pytest.mark.parametrize("block, message", [
    ({"from": "x", "copy": []}, "trunk.copy"),
    ({"copy": ["backbone"]}, "need trunk.from"),
    ({"from": "x", "copy": ["backbone"], "freeze": ["fc_feat"]}, "not copied"),
    ({"from": "x", "copy": ["backbone"], "freeze": ["backbone"], "cache": "fc_feat"}, "must be frozen"),
    ({"from": "x", "copy": ["backbone"], "frozen": ["backbone"]}, "unknown trunk option"),
    ({"from": "x", "copy": "backbone"}, "list of module names"),
    (5, "must be a mapping"),
])
def test_bad_trunk_blocks_are_one_line_errors(block, message):
    with pytest.raises(TrunkError, match=message):
        TrunkPlan.from_config(block)


def test_cache_with_augmentation_is_refused(scene_and_trunk, capsys):
    root = scene_and_trunk
    code = train.main(_vidloc_args(root, root / "out" / "v", "--set", "augment.color_jitter=0.1"))
    assert code != 0
    assert "augment.color_jitter: 0" in capsys.readouterr().err


def test_copy_into_a_differently_named_module_and_freeze_it(scene_and_trunk):
    """VLocNet's trunk holds ResNet's conv1 .. layer3 under other names than MapNet's backbone."""
    root = scene_and_trunk
    plan = TrunkPlan.from_config({
        "from": str(root / "trunk" / "source.safetensors"),
        "copy": {"trunk.0": "backbone.conv1", "trunk.1": "backbone.bn1", "trunk.4": "backbone.layer1",
                 "trunk.5": "backbone.layer2", "trunk.6": "backbone.layer3", "global_block": "backbone.layer4"},
        "freeze": ["trunk", "global_block"], "cache": "trunk"})
    from vizloc_ros.training.trunk import apply_trunk
    model = build_model("vlocnet", backbone="resnet18", feat_dim=32)
    frozen = apply_trunk(model, plan)
    source, _ = load_checkpoint(root / "trunk" / "source.safetensors")
    assert torch.equal(model.trunk[6].state_dict()["0.conv1.weight"], source.backbone.layer3[0].conv1.weight)
    assert not any(p.requires_grad for p in model.trunk.parameters())
    assert all(p.requires_grad for p in model.odom_block.parameters())
    names = frozen.check_unchanged(model.state_dict())
    assert "trunk.6.0.conv1.weight" in names and "global_block.1.bn2.running_mean" in names
    with torch.no_grad():
        model.trunk[0].weight.add_(1.0)
    with pytest.raises(ValueError, match="changed after it was copied"):
        frozen.check_unchanged(model.state_dict())


def test_an_unwritable_feature_cache_is_warned_and_training_goes_on(scene_and_trunk, monkeypatch, caplog):
    root = scene_and_trunk
    blocker = root / "cache-is-a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    out = root / "out" / "vidloc"
    with deterministic_torch(0), caplog.at_level("WARNING"):
        assert train.main(_vidloc_args(root, out, "--set", "optim.epochs=1")) == 0
    assert "trunk features not cached" in caplog.text
    assert out.with_suffix(".json").is_file()
