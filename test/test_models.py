"""Pose regressors: registry, shapes, decoding, determinism, MC dropout, ImageNet init."""
import importlib
import json
import math
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from vizloc_ros.geometry import torch_quat_log
from vizloc_ros.localize.models import (
    MapNet,
    PoseNet,
    PoseRegressor,
    available_backbones,
    available_models,
    build_model,
    register_model,
)
from vizloc_ros.localize.models.backbones import imagenet_weights_url, torch_cache_path
from vizloc_ros.localize.models.registry import trained_by
from vizloc_ros.training.recipes import available_recipes, recipe_for

EXPECTED_MODELS = {"posenet": ("googlenet", "quat"), "posenet_resnet18": ("resnet18", "quat"),
                   "posenet_resnet34": ("resnet34", "quat"), "posenet_resnet50": ("resnet50", "quat"),
                   "mapnet": ("resnet34", "logq")}


#: every test here runs with conftest.fast_cpu (one thread, denormals flushed)
pytestmark = pytest.mark.usefixtures("fast_cpu")


@pytest.fixture(scope="module", params=sorted(EXPECTED_MODELS))
def model(request):
    torch.manual_seed(0)
    return build_model(request.param, feat_dim=64).eval()


def test_registry_lists_the_builtin_models():
    assert set(EXPECTED_MODELS) <= set(available_models())
    assert available_models() == sorted(available_models())
    assert {"googlenet", "resnet18", "resnet34", "resnet50"} <= set(available_backbones())


def test_unknown_model_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown model 'posenet_vgg'") as err:
        build_model("posenet_vgg")
    for name in EXPECTED_MODELS:
        assert name in str(err.value)


def test_register_model_rejects_duplicates_and_non_regressors():
    with pytest.raises(ValueError, match="already registered"):
        register_model("posenet")(lambda **kw: None)

    @register_model("test_models_not_a_regressor")
    def bad(**kwargs):
        return nn.Linear(2, 2)

    with pytest.raises(TypeError, match="not a PoseRegressor"):
        build_model("test_models_not_a_regressor")


def test_model_contract(model, images):
    name = model.architecture
    backbone, rotation_format = EXPECTED_MODELS[name]
    assert isinstance(model, PoseRegressor)
    assert model.rotation_format == rotation_format and model.backbone_name == backbone
    assert isinstance(model, MapNet if rotation_format == "logq" else PoseNet)
    with torch.no_grad():
        raw = model(images)
        t, q = model.predict(images)
        again = model(images)
    assert raw.shape == (2, 3 + (4 if rotation_format == "quat" else 3))
    assert t.shape == (2, 3) and q.shape == (2, 4)
    assert torch.allclose(q.norm(dim=-1), torch.ones(2), atol=1e-6)
    assert (q[:, 0] >= 0).all()
    assert torch.equal(raw, again), "eval mode must be deterministic"
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_config_is_json_and_rebuilds_the_same_network(model):
    config = json.loads(json.dumps(model.config()))
    rebuilt = build_model(model.architecture, **config)
    assert type(rebuilt) is type(model) and rebuilt.config() == model.config()
    ours = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == ours
    assert "t_mean" in ours and "t_std" in ours


def test_mc_dropout_varies_outputs_and_leaves_batch_norm_alone(model, images):
    model.eval()
    bn = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bn, "backbones have batch norm"
    stats_before = [m.running_mean.clone() for m in bn]
    try:
        model.mc_dropout(True)
        with torch.no_grad():
            a, b = model(images), model(images)
        assert not torch.equal(a, b), "dropout should sample different masks"
        assert all(not m.training for m in bn)
        assert all(torch.equal(m.running_mean, s) for m, s in zip(bn, stats_before))
        assert all(d.training for d in model.dropout_modules())
        model.eval()  # the MC setting survives a later eval()
        assert all(d.training for d in model.dropout_modules()) and all(not m.training for m in bn)
    finally:
        model.mc_dropout(False)
    assert not any(d.training for d in model.dropout_modules())
    with torch.no_grad():
        assert torch.equal(model(images), model(images))


def test_mc_dropout_off_restores_training_mode_dropout():
    net = build_model("posenet_resnet18", feat_dim=16).train()
    net.mc_dropout(True).mc_dropout(False)
    assert all(d.training for d in net.dropout_modules())


def test_decode_uses_pose_stats_and_hemisphere():
    net = build_model("posenet_resnet18", feat_dim=16)
    net.set_pose_stats([1.0, 2.0, 3.0], [2.0, 0.5, 1.0])
    raw = torch.tensor([[1.0, 2.0, -1.0, -2.0, 0.0, 0.0, 0.0]])
    t, q = net.decode(raw)
    assert torch.allclose(t, torch.tensor([[3.0, 3.0, 2.0]]))
    assert torch.allclose(q, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert torch.allclose(net.normalize_translation(t), raw[:, :3])
    mapnet = build_model("mapnet", feat_dim=16)
    angle = 2.5  # radians about z; log-quaternion = axis * angle / 2
    t, q = mapnet.decode(torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, angle / 2]]))
    assert torch.allclose(q, torch.tensor([[math.cos(angle / 2), 0, 0, math.sin(angle / 2)]]), atol=1e-6)
    assert torch.allclose(torch_quat_log(q), torch.tensor([[0.0, 0.0, angle / 2]]), atol=1e-6)
    with pytest.raises(ValueError, match="expects raw output"):
        mapnet.decode(raw)


def test_set_pose_stats_validates():
    net = build_model("posenet_resnet18", feat_dim=16)
    with pytest.raises(ValueError):
        net.set_pose_stats([0.0, 0.0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError):
        net.set_pose_stats([0.0, 0.0, 0.0], [1.0, 0.0, 1.0])
    net.set_pose_stats(torch.tensor([1.0, 2.0, 3.0]), (1.0, 1.0, 2.0))
    assert net.t_std.tolist() == [1.0, 1.0, 2.0]


def test_googlenet_trains_without_aux_outputs(images):
    torch.manual_seed(0)
    net = build_model("posenet", feat_dim=16).train()
    out = net(images)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 7)
    out.sum().backward()
    assert net.fc_q.weight.grad is not None


def test_constructor_arguments():
    assert build_model("posenet", backbone="resnet18", feat_dim=8).backbone_name == "resnet18"
    with pytest.raises(ValueError, match="resnet18"):
        build_model("posenet_resnet18", backbone="resnet34")
    with pytest.raises(ValueError, match="unknown backbone"):
        build_model("posenet", backbone="vgg16")
    with pytest.raises(ValueError, match="dropout"):
        build_model("mapnet", dropout=1.5)
    assert build_model("mapnet", dropout=0.3).config() == {"backbone": "resnet34", "feat_dim": 2048,
                                                           "dropout": 0.3}


# ------------------------------------------------------------------ ImageNet initialisation (offline)

def _fake_imagenet_resnet18(path):
    torch.manual_seed(123)
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), path)
    return reference


def test_pretrained_from_a_local_file(tmp_path):
    reference = _fake_imagenet_resnet18(tmp_path / "r18.pth")
    net = build_model("posenet_resnet18", feat_dim=8, pretrained=str(tmp_path / "r18.pth"))
    assert torch.equal(net.backbone.conv1.weight, reference.conv1.weight)
    assert torch.equal(net.backbone.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
    assert "pretrained" not in net.config(), "a checkpoint must rebuild without the ImageNet file"


def test_pretrained_from_torch_cache_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = torch_cache_path("resnet18")
    assert str(expected).startswith(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not in the torch cache") as err:
        build_model("posenet_resnet18", pretrained="torch-cache")
    assert str(expected) in str(err.value) and "never downloads" in str(err.value)
    expected.parent.mkdir(parents=True)
    reference = _fake_imagenet_resnet18(expected)
    net = build_model("posenet_resnet18", feat_dim=8, pretrained="torch-cache")
    assert torch.equal(net.backbone.conv1.weight, reference.conv1.weight)


def _no_network(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def test_pretrained_imagenet_uses_a_filled_cache_without_the_network(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    cached = torch_cache_path("resnet18")
    assert cached.name == "resnet18-f37072fd.pth"  # the name torchvision's downloader writes
    cached.parent.mkdir(parents=True)
    reference = _fake_imagenet_resnet18(cached)
    net = build_model("posenet_resnet18", feat_dim=8, pretrained="imagenet")
    assert torch.equal(net.backbone.conv1.weight, reference.conv1.weight)
    assert net.pretrained == "imagenet" and "pretrained" not in net.config()


def test_pretrained_imagenet_fetches_into_the_torch_cache_when_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):  # what a successful fetch leaves
        calls.append((url, dst, hash_prefix))
        _fake_imagenet_resnet18(dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    build_model("posenet_resnet18", feat_dim=8, pretrained="imagenet")
    assert calls == [(imagenet_weights_url("resnet18"), str(torch_cache_path("resnet18")), "f37072fd")]
    build_model("posenet_resnet18", feat_dim=8, pretrained="imagenet")
    assert len(calls) == 1, "a cached file is not fetched again"


def test_pretrained_imagenet_offline_is_one_line_naming_the_url_and_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    with pytest.raises(FileNotFoundError) as err:
        build_model("posenet_resnet18", feat_dim=8, pretrained="imagenet")
    message = str(err.value)
    assert "\n" not in message
    assert imagenet_weights_url("resnet18") in message and "Temporary failure in name resolution" in message
    assert str(torch_cache_path("resnet18").parent) in message and "resnet18-f37072fd.pth" in message


def test_pretrained_file_that_does_not_fit(tmp_path):
    _fake_imagenet_resnet18(tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="does not fit backbone 'resnet34'"):
        build_model("mapnet", feat_dim=8, pretrained=str(tmp_path / "r18.pth"))
    with pytest.raises(FileNotFoundError, match="not found"):
        build_model("mapnet", pretrained=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("module", ["dsac", "netvlad", "allocentric"])
def test_own_loss_options_refuse_unknown_keys_and_ignore_pose_loss_keys(module):
    mod = importlib.import_module(f"vizloc_ros.training.recipes.{module}")
    options = mod.loss_options({"translation": "l1", "s_t": 0.0})  # the pose-loss defaults pass through
    assert set(options) == set(mod.LOSS_OPTIONS)
    with pytest.raises(ValueError, match=f"unknown {module} loss option.*'typo'"):
        mod.loss_options({"typo": 1})


def test_every_builtin_model_has_a_training_recipe_under_its_name():
    builtin = [name for name in available_models() if not name.startswith("test_")]
    trained = [name for name in builtin if trained_by(name) == "vizloc-train"]
    assert set(trained) <= set(available_recipes())
    assert trained_by("ace") == "vizloc-map" and "ace" not in available_recipes()
    with pytest.raises(ValueError, match="not trained by vizloc-train: make it with vizloc-map"):
        recipe_for("ace")
    assert recipe_for("dsac").loss(build_model("dsac", backbone="small"),
                                   {"loss": {"stage": "coords"}}) is not None
    assert recipe_for("mapnet").loss(build_model("mapnet", feat_dim=8), {"loss": {}}) is None
    with pytest.raises(ValueError, match="no training recipe for model 'posenet_vgg'"):
        recipe_for("posenet_vgg")
