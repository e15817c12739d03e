"""vizloc-train on a tiny 7-Scenes fixture: the loss falls, the checkpoint loads, bad configs fail clearly."""
import json
import math

import numpy as np
import pytest
import torch

from test_datasets import make_sevenscenes
from vizloc_ros.training import train
from vizloc_ros.localize.models import build_model, load_checkpoint
from vizloc_ros.training.losses import build_loss
from vizloc_ros.training.datasets import translation_stats

TINY = ["--set", "input.resize=32", "--set", "input.crop=[32,32]", "--set", "model.args.feat_dim=32",
        "--set", "augment.color_jitter=0", "--set", "augment.random_crop=false", "--device", "cpu",
        "--no-progress"]


@pytest.fixture()
def tiny_scene(tmp_path):
    (tmp_path / "scene").mkdir()
    make_sevenscenes(tmp_path / "scene", n=8)
    return tmp_path


def test_a_few_steps_lower_the_loss_and_write_a_loadable_checkpoint(tiny_scene):
    torch.manual_seed(0)
    config = train.load_config(None, ["input.resize=32", "input.crop=[32,32]",
                                      "model.args.feat_dim=32", "augment.color_jitter=0",
                                      "augment.random_crop=false", "loss.relative=false",
                                      "loss.combine=sum"],
                               **{"data.root": str(tiny_scene / "scene"), "model.name": "posenet_resnet18",
                                  "out": str(tiny_scene / "out" / "m"), "optim.batch_size": 8,
                                  "optim.lr": 1e-3, "device": "cpu"})
    dataset = train.open_split(config, "train_split")
    model = build_model("posenet_resnet18", feat_dim=32, dropout=0.0)
    model.set_pose_stats(*translation_stats(dataset))
    loss_fn = build_loss({"combine": "sum", "translation": "l1", "rotation": "logq"})
    spec = train.InputSpec.from_meta(config["input"])
    batch = train._collate([dataset[i] for i in range(len(dataset))])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    model.train()
    x = train.prepare_images(batch["image"], spec, "cpu", False, config, gen)
    target_t = model.normalize_translation(batch["t"])

    def batch_loss():
        return loss_fn(model(x), target_t, batch["q"])

    with torch.no_grad():
        before = float(batch_loss())
    for _ in range(8):
        opt.zero_grad()
        batch_loss().backward()
        opt.step()
    with torch.no_grad():
        after = float(batch_loss())
    assert after < 0.8 * before


def test_cli_writes_checkpoint_with_validation_metrics_and_resumes(tiny_scene):
    out = tiny_scene / "out" / "mapnet"
    args = ["--data", str(tiny_scene / "scene"), "--model", "posenet_resnet18", "--epochs", "1",
            "--batch-size", "2", "--out", str(out), "--set", "tuple.skip=2", *TINY]
    assert train.main(args) == 0
    model, meta = load_checkpoint(out)
    assert meta["architecture"] == "posenet_resnet18"
    assert meta["input"]["crop"] == [32, 32]
    assert meta["metrics"]["validation"]["frames"] == 8
    cov = np.array(meta["validation_errors"]["cov_ros"])
    assert cov.shape == (6, 6) and np.all(np.isfinite(cov))
    selected = meta["training"]["selected_by"]  # the rule the epoch was kept by, and its score
    assert selected["rule"] == "mean-pose" and np.isfinite(selected["score"])
    assert set(selected["mean_pose_baseline"]) == {"median_translation_m", "median_rotation_deg"}
    assert (out.parent / "mapnet.state.safetensors").is_file()
    assert train.main([*args[:5], "2", *args[6:], "--resume"]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["training"]["epoch"] >= 1


@pytest.mark.parametrize("override, message", [
    ("optim.lr=fast", "optim.lr"),
    ("optim.epochs=0", "epochs"),
    ("nonsense.key=1", "unknown config key"),
    ("amp=fp8", "amp must be none or bf16"),
    # empty values: one line naming the key, not a TypeError where the value is used
    ("out=", "out must be a non-empty string, got an empty value"),
    ("loss=", "loss must be a mapping of options, got an empty value"),
    ("threads=", "threads must be an integer >= 0, got an empty value"),
    # not "quaternion is zero or not finite" after training to NaN weights
    ("optim.lr=.inf", "optim.lr must be a finite number >= 0, got inf"),
    # not "checkpoint input block is malformed"
    ("input.resize=abc", "input.resize must be an integer >= 1, got 'abc'"),
    ("input.crop=[32]", "input.crop must be an integer or [height, width]"),
    ("seed=abc", "seed must be an integer >= 0, got 'abc'"),
    ("optim.select_by=best", "optim.select_by must be one of mean-pose, translation+rotation/10, "
                             "translation, rotation; got 'best'"),
])
def test_bad_config_values_are_clear_errors(tiny_scene, override, message, capsys):
    code = train.main(["--data", str(tiny_scene / "scene"), "--out", str(tiny_scene / "o" / "m"), *TINY,
                       "--set", override])  # last: TINY's own --set must not win over it
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tiny_scene / "o" / "m.safetensors").exists()


def test_an_empty_value_in_the_yaml_names_its_key(tiny_scene, capsys):
    config = tiny_scene / "train.yaml"
    config.write_text("threads:\n")
    assert train.main(["--config", str(config), "--data", str(tiny_scene / "scene"), "--out",
                       str(tiny_scene / "o" / "m"), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == "vizloc-train: threads must be an integer >= 0, got an empty value"


def test_an_existing_checkpoint_is_refused_before_any_work_unless_overwrite_or_resume(tmp_path, capsys):
    """The demo configs point `out` at the shipped weights: a plain run must not replace them."""
    (tmp_path / "m.safetensors").write_bytes(b"shipped")
    (tmp_path / "m.json").write_text("{}")
    args = ["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m"), *TINY]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "m.safetensors exists; pass --overwrite to replace it, --resume to continue" in err
    assert (tmp_path / "m.safetensors").read_bytes() == b"shipped"
    # with --overwrite the check passes and the next problem (no dataset) is the one reported
    assert train.main([*args, "--overwrite"]) == 2
    assert "TrainSplit.txt" in capsys.readouterr().err


def test_checkpoint_and_training_state_follow_the_umask_and_leave_no_temporary(tmp_path):
    """safetensors' own writer made 0600 files through mkstemp (a node running as another
    user could not read them) and left its .tmpXXXX behind when killed."""
    import os
    import stat

    from vizloc_ros.localize.models import save_checkpoint

    model = build_model("posenet_resnet18", feat_dim=32)
    loss = build_loss({"relative": False})
    optimizer = torch.optim.Adam(list(model.parameters()) + list(loss.parameters()), lr=1e-4)
    previous = os.umask(0o022)
    try:
        st_path = save_checkpoint(tmp_path / "m", model, {"input": {"resize": 32, "crop": [32, 32]}})
        train.save_train_state(tmp_path / "m.state.safetensors", model, optimizer, loss, 1, 1.0)
    finally:
        os.umask(previous)
    written = sorted(tmp_path.iterdir())
    assert [p.name for p in written] == ["m.json", "m.safetensors", "m.state.safetensors"]
    assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {0o644}
    assert load_checkpoint(st_path)[1]["architecture"] == "posenet_resnet18"


def test_resuming_another_architecture_is_one_line_naming_both():
    model = build_model("posenet_resnet18", feat_dim=32)
    loss = build_loss({"relative": False})
    optimizer = torch.optim.Adam(list(model.parameters()) + list(loss.parameters()), lr=1e-4)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        state = Path(folder) / "m.state.safetensors"
        train.save_train_state(state, model, optimizer, loss, 1, 1.0)
        other = build_model("mapnet", backbone="resnet18", feat_dim=32)
        with pytest.raises(train.ConfigError, match=r"^--resume: the training state .* is of a 'posenet_resnet18' "
                                                    r"model, not 'mapnet'[^\n]*$"):
            train.load_train_state(state, other, torch.optim.Adam(other.parameters()), loss)
        wider = build_model("posenet_resnet18", feat_dim=64)  # same name, other shapes
        with pytest.raises(train.ConfigError, match=r"^--resume: .* does not fit this posenet_resnet18[^\n]*$"):
            train.load_train_state(state, wider, torch.optim.Adam(wider.parameters()), loss)


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    assert train.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m"), *TINY]) == 2
    assert "TrainSplit.txt" in capsys.readouterr().err


def test_fixed_relative_weights_get_no_gradient():
    loss_fn = build_loss({"relative": True, "learn_relative_weights": False, "s_t_rel": 2.3,
                          "s_q_rel": -1.0})
    pred = torch.randn(2, 3, 6, requires_grad=True)
    q = torch.nn.functional.normalize(torch.randn(2, 3, 4), dim=-1)
    loss_fn(pred, torch.randn(2, 3, 3), q).backward()
    assert loss_fn.relative.s_t.grad is None and loss_fn.relative.s_q.grad is None
    assert loss_fn.absolute.s_t.grad is not None
    assert float(loss_fn.relative.s_t) == pytest.approx(2.3)


def test_init_from_starts_from_a_checkpoint_and_refuses_another_architecture(tiny_scene, capsys):
    first = tiny_scene / "out" / "first"
    base = ["--data", str(tiny_scene / "scene"), "--epochs", "1", "--batch-size", "4",
            "--set", "loss.relative=false", *TINY]
    assert train.main([*base, "--model", "posenet_resnet18", "--out", str(first)]) == 0
    second = tiny_scene / "out" / "second"
    assert train.main([*base, "--model", "posenet_resnet18", "--out", str(second),
                       "--set", f"model.init_from={first}.safetensors", "--set", "optim.lr=0"]) == 0
    a, _ = load_checkpoint(first)
    b, _ = load_checkpoint(second)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(x, y), name  # lr 0: the weights are the initial ones
    assert train.main([*base, "--model", "mapnet", "--out", str(tiny_scene / "out" / "third"),
                       "--set", f"model.init_from={first}.safetensors"]) == 2
    assert "does not fit" in capsys.readouterr().err


def test_bf16_autocast_and_loader_workers_train_to_a_finite_checkpoint(tiny_scene):
    """The GPU recipe's switches (bf16 autocast, DataLoader workers) work on any device."""
    out = tiny_scene / "out" / "bf16"
    args = ["--data", str(tiny_scene / "scene"), "--model", "mapnet", "--epochs", "1",
            "--batch-size", "2", "--out", str(out), "--set", "tuple.skip=1", "--set", "tuple.steps=2",
            "--set", "model.args.backbone=resnet18", "--set", "amp=bf16", "--set", "workers=1", *TINY]
    assert train.main(args) == 0
    model, meta = load_checkpoint(out)
    assert meta["training"]["config"]["amp"] == "bf16"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert np.isfinite(meta["metrics"]["validation"]["median_translation_m"])


def test_scientific_notation_without_a_dot_is_a_number(tiny_scene):
    """YAML reads 3e-4 as a string; `--set optim.lr=3e-4` is what users type."""
    config = train.load_config(None, ["optim.lr=3e-4", "optim.weight_decay=1e-5"],
                               **{"data.root": str(tiny_scene / "scene")})
    assert config["optim"]["lr"] == pytest.approx(3e-4)
    assert config["optim"]["weight_decay"] == pytest.approx(1e-5)
    with pytest.raises(train.ConfigError, match="optim.lr"):
        train.load_config(None, ["optim.lr=fast"], **{"data.root": str(tiny_scene / "scene")})


def test_pretrained_imagenet_trains_from_the_torch_cache_and_says_so_offline(tiny_scene, monkeypatch, capsys):
    """`model.args.pretrained: imagenet` fetches into the torch cache only when the file is
    missing; the checkpoint records the opt-in and loads without the network."""
    import urllib.error

    import torchvision

    from vizloc_ros.localize.models.backbones import torch_cache_path

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Network is unreachable")

    monkeypatch.setenv("TORCH_HOME", str(tiny_scene / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    out = tiny_scene / "out" / "m"
    args = ["--data", str(tiny_scene / "scene"), "--model", "posenet_resnet18", "--epochs", "1",
            "--batch-size", "4", "--out", str(out), *TINY, "--set", "loss.relative=false",
            "--set", "model.args.pretrained=imagenet"]
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vizloc-train: pretrained: imagenet could not fetch https://") and "\n" not in err
    assert "Network is unreachable" in err and "resnet18-f37072fd.pth" in err
    cached = torch_cache_path("resnet18")
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), cached)
    assert train.main(args) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["training"]["config"]["model"]["args"]["pretrained"] == "imagenet"
    model, _ = load_checkpoint(out)  # rebuilt without the ImageNet file: the downloader still fails
    assert model.architecture == "posenet_resnet18"


def test_a_resumed_best_score_of_another_selection_rule_is_not_compared(tmp_path):
    model = build_model("posenet_resnet18", feat_dim=8)
    loss_fn = build_loss({"relative": False})
    optimizer = torch.optim.Adam(list(model.parameters()) + list(loss_fn.parameters()))
    state = tmp_path / "m.state.safetensors"
    train.save_train_state(state, model, optimizer, loss_fn, 3, 1.25, "translation")
    assert train.load_train_state(state, model, optimizer, loss_fn, "translation") == (3, 1.25)
    # metres are not mean-pose ratios: the next validated epoch is kept, whatever its score
    assert train.load_train_state(state, model, optimizer, loss_fn, "mean-pose") == (3, math.inf)
