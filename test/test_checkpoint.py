"""Checkpoints: exact round trips, fp16 storage, the JSON schema, clear errors, no unpickling."""
import json
import pathlib
import pickle

import pytest
import torch
from safetensors import safe_open

from vizloc_ros.localize.models import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    available_models,
    build_model,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from vizloc_ros.localize.models.checkpoint import describe_tensors

SCHEMA_KEYS = {"format", "architecture", "backbone", "model_config", "rotation_format", "input",
               "pose_stats", "scene", "map_frame", "storage_dtype", "training", "metrics",
               "validation_errors"}


#: every test here runs with conftest.fast_cpu (one thread, denormals flushed)
pytestmark = pytest.mark.usefixtures("fast_cpu")


def trained_like(name, images, **kwargs):
    """A model whose batch-norm statistics and pose stats are not the defaults."""
    torch.manual_seed(1)
    model = build_model(name, feat_dim=32, **kwargs)
    model.train()
    with torch.no_grad():
        model(images)
    model.set_pose_stats([1.5, -2.0, 0.25], [3.0, 0.5, 1.25])
    return model.eval()


@pytest.fixture(scope="module")
def small(images):
    return trained_like("posenet_resnet18", images)


@pytest.fixture
def saved(small, tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", small, {"scene": "chess"})
    return path


@pytest.mark.parametrize("name", sorted(available_models()))
def test_fp32_round_trip_is_bit_exact(name, images, tmp_path):
    model = trained_like(name, images)
    path = save_checkpoint(tmp_path / name, model, {"scene": "synthetic"})
    loaded, meta = load_checkpoint(path)
    assert not loaded.training and type(loaded) is type(model)
    assert loaded.architecture == name == meta["architecture"]
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert meta["rotation_format"] == model.rotation_format
    assert meta["backbone"] == model.backbone_name
    assert meta["model_config"] == model.config()


def test_fp16_storage_round_trip_is_close(images, tmp_path):
    model = trained_like("mapnet", images)
    path = save_checkpoint(tmp_path / "half", model, dtype="fp16")
    with safe_open(str(path), framework="pt") as handle:
        assert handle.get_tensor("fc_t.weight").dtype == torch.float16
        assert handle.get_tensor("t_mean").dtype == torch.float32  # metres need fp32
    assert path.stat().st_size < 0.6 * sum(v.numel() * v.element_size() for v in model.state_dict().values())
    loaded, meta = load_checkpoint(path)
    assert meta["storage_dtype"] == "fp16"
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.equal(loaded.t_mean, model.t_mean)
    with torch.no_grad():
        t_ref, q_ref = model.predict(images)
        t, q = loaded.predict(images)
    assert torch.allclose(t, t_ref, rtol=1e-2, atol=1e-2 * t_ref.abs().max())
    assert torch.allclose(q, q_ref, atol=1e-2)


def test_json_schema_and_defaults(saved, small):
    meta = json.loads(saved.with_suffix(".json").read_text())
    assert SCHEMA_KEYS <= set(meta)
    assert meta["format"] == CHECKPOINT_FORMAT == "vizloc_ros/checkpoint-v1"
    assert meta["architecture"] == "posenet_resnet18" and meta["backbone"] == "resnet18"
    assert meta["model_config"] == {"backbone": "resnet18", "feat_dim": 32, "dropout": 0.5}
    assert meta["input"] == {"resize": 256, "crop": [224, 224], "mean": [0.485, 0.456, 0.406],
                             "std": [0.229, 0.224, 0.225]}
    assert meta["pose_stats"]["t_mean"] == pytest.approx([1.5, -2.0, 0.25])
    assert meta["pose_stats"]["t_std"] == pytest.approx([3.0, 0.5, 1.25])
    assert meta["scene"] == "chess" and meta["map_frame"] == "map" and meta["storage_dtype"] == "fp32"
    assert meta["training"] == {} and meta["metrics"] == {} and meta["validation_errors"] == {}
    assert read_checkpoint_meta(saved) == meta


def test_caller_meta_is_merged(small, tmp_path):
    meta_in = {"input": {"crop": [128, 160]}, "scene": "office", "training": {"epochs": 3},
               "metrics": {"median_t_m": 0.12, "bad": float("nan")}, "validation_errors": {"t": [0.1]},
               "notes": "extra keys are kept"}
    path = save_checkpoint(tmp_path / "m.safetensors", small, meta_in)
    _, meta = load_checkpoint(path)
    assert meta["input"]["crop"] == [128, 160] and meta["input"]["resize"] == 256
    assert meta["training"] == {"epochs": 3} and meta["notes"] == "extra keys are kept"
    assert meta["metrics"] == {"median_t_m": 0.12, "bad": None}  # strict JSON: NaN -> null
    with pytest.raises(ValueError, match="architecture"):
        save_checkpoint(tmp_path / "x", small, {"architecture": "mapnet"})
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path / "y", small, {"training": {"obj": object()}})
    assert list(tmp_path.glob("x*")) == [] and list(tmp_path.glob("y*")) == []


def test_refuses_to_save_what_cannot_be_loaded(small, tmp_path):
    with pytest.raises(TypeError, match="PoseRegressor"):
        save_checkpoint(tmp_path / "lin", torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="dtype"):
        save_checkpoint(tmp_path / "bf", small, dtype="bf16")
    unregistered = build_model("posenet_resnet18", feat_dim=8)
    unregistered.architecture = "not_registered_anywhere"
    with pytest.raises(ValueError, match="not registered"):
        save_checkpoint(tmp_path / "u", unregistered)
    assert list(tmp_path.iterdir()) == []


def test_path_forms_and_no_temporary_leftovers(saved, small, images):
    folder = saved.parent
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt.json", "ckpt.safetensors"]
    for form in (saved, str(saved), folder / "ckpt", str(folder / "ckpt"), folder / "ckpt.json"):
        model, _ = load_checkpoint(form)
        with torch.no_grad():
            assert torch.equal(model(images), small(images))
    # overwriting in place leaves one complete pair
    save_checkpoint(folder / "ckpt.safetensors", small, {"scene": "again"})
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt.json", "ckpt.safetensors"]
    assert read_checkpoint_meta(folder / "ckpt")["scene"] == "again"


# ------------------------------------------------------------------ errors

def expect_error(path, *fragments):
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert isinstance(err.value, ValueError)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)
    return str(err.value)


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nothing", "not found", "nothing.safetensors")


def test_missing_json_sidecar(saved):
    saved.with_suffix(".json").unlink()
    expect_error(saved, "JSON sidecar missing", "ckpt.json")


def test_truncated_safetensors(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    expect_error(saved, "truncated")
    saved.write_bytes(data[:5])
    expect_error(saved, "truncated")


def test_corrupt_header(saved):
    data = bytearray(saved.read_bytes())
    data[8:24] = b"\xff" * 16
    saved.write_bytes(bytes(data))
    expect_error(saved, "corrupt")


class _TouchOnUnpickle:
    """Unpickling this creates a file: proof of whether anything was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_pickle_is_refused_without_unpickling(saved, tmp_path):
    marker = tmp_path / "unpickled"
    saved.write_bytes(pickle.dumps({"weights": _TouchOnUnpickle(marker)}))
    expect_error(saved, "pickle/torch file", "refusing to unpickle")
    assert not marker.exists()
    # torch.save's zip container too, and a legacy .pt handed over directly
    torch.save({"w": torch.zeros(2)}, saved)
    expect_error(saved, "pickle/torch file")
    legacy = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    expect_error(legacy, "pickle/torch file")


def edit_json(path, change):
    json_path = path.with_suffix(".json")
    meta = json.loads(json_path.read_text())
    change(meta)
    json_path.write_text(json.dumps(meta))


def test_json_missing_keys_are_named(saved):
    def drop(meta):
        del meta["architecture"], meta["pose_stats"], meta["input"]["mean"]
    edit_json(saved, drop)
    expect_error(saved, "lacks required keys", "architecture", "pose_stats", "input.mean")


def test_invalid_json_and_wrong_format(saved):
    json_path = saved.with_suffix(".json")
    text = json_path.read_text()
    json_path.write_text(text[:40])
    expect_error(saved, "not valid JSON")
    json_path.write_text(text)
    edit_json(saved, lambda m: m.update(format="vizloc_ros/checkpoint-v9"))
    expect_error(saved, "checkpoint-v9", CHECKPOINT_FORMAT)


def test_unknown_architecture(saved):
    edit_json(saved, lambda m: m.update(architecture="posenet_vgg16"))
    message = expect_error(saved, "unknown architecture", "posenet_vgg16")
    assert "mapnet" in message and "posenet_resnet18" in message


def test_architecture_mismatch_names_both(saved):
    edit_json(saved, lambda m: m.update(architecture="mapnet", rotation_format="logq",
                                        model_config={"backbone": "resnet34", "feat_dim": 32,
                                                      "dropout": 0.5}))
    expect_error(saved, "architecture mismatch", "'mapnet'", "resnet34",
                 "backbone resnet18", "4 outputs (quat)")


def test_config_mismatch_names_shapes(saved):
    edit_json(saved, lambda m: m["model_config"].update(feat_dim=64))
    expect_error(saved, "architecture mismatch", "feat_dim 32", "fc_feat.weight")


def test_rotation_format_contradiction(saved):
    edit_json(saved, lambda m: m.update(rotation_format="logq"))
    expect_error(saved, "rotation_format")


def test_bad_model_config(saved):
    edit_json(saved, lambda m: m["model_config"].update(colour="red"))
    expect_error(saved, "cannot build", "colour")


def test_describe_tensors():
    shapes = {k: tuple(v.shape) for k, v in build_model("mapnet", feat_dim=8).state_dict().items()}
    assert describe_tensors(shapes) == "backbone resnet34, rotation head of 3 outputs (logq), feat_dim 8"
    assert "googlenet" in describe_tensors({"backbone.inception3a.x": (1,)})
    assert "unknown network" in describe_tensors({"foo": (1,)})


def test_sidecar_values_of_the_wrong_type_are_named(tmp_path):
    import json

    path = tmp_path / "m"
    save_checkpoint(path, build_model("posenet_resnet18", feat_dim=16).eval(), {"input": {"resize": 32, "crop": [32, 32]}})
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["validation_errors"] = "not an object"
    path.with_suffix(".json").write_text(json.dumps(meta))
    try:
        load_checkpoint(path)
    except CheckpointError as exc:
        assert "validation_errors (must be an object, got str)" in str(exc)
    else:
        raise AssertionError("a wrong-typed sidecar value was accepted")


# --------------------------------------------------------------------------- stored uncertainty

def _with_validation_errors(path, **block):
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["validation_errors"].update(block)
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path


def _diag(*values):
    import numpy as np

    return np.diag(values).tolist()


_NON_PSD = _diag(0.09, 0.09, 0.09, 0.01, 0.01, 0.01)
_NON_PSD[0][1] = _NON_PSD[1][0] = 0.2  # a correlation of 2.2
_ASYMMETRIC = _diag(0.09, 0.09, 0.09, 0.01, 0.01, 0.01)
_ASYMMETRIC[0][1] = 0.05


@pytest.mark.parametrize("key, value, words", [
    ("cov_ros", _diag(*[-1.0] * 6), "negative variances"),  # -I once loaded as a fully confident network
    ("cov_ros", _diag(*[0.0] * 6), "zero variances"),
    ("cov_ros", _diag(0.09, 0.09, 0.0, 0.01, 0.01, 0.01), "zero variances (z 0)"),
    ("cov_ros", _ASYMMETRIC, "not symmetric"),
    ("cov_ros", _NON_PSD, "not positive semi-definite"),
    ("cov_ros", [[None] * 6] * 6, "NaN, inf or null"),
    ("cov_ros", [1.0, 2.0, 3.0], "6x6 matrix (36 numbers)"),
    ("cov_ros", "diag(0.1)", "6x6 matrix of numbers"),
    ("relative_cov_ros", _diag(*[-1.0] * 6), "negative variances"),
    ("model_cov_scale", -1.0, "finite number > 0"),
    ("mc_dropout_scale", "big", "finite number > 0"),
    ("mc_dropout_scale", 0, "finite number > 0"),
])
def test_a_stored_covariance_that_is_not_one_is_refused_naming_file_and_key(saved, key, value, words):
    _with_validation_errors(saved, **{key: value})
    for load in (load_checkpoint, read_checkpoint_meta):  # exported networks read only the sidecar
        with pytest.raises(CheckpointError) as raised:
            load(saved)
        message = str(raised.value)
        assert words in message and f"validation_errors.{key}" in message, message
        assert str(saved.with_suffix(".json")) in message and "\n" not in message


def test_a_repairable_stored_covariance_loads_and_says_what_was_repaired():
    import numpy as np

    from vizloc_ros.localize.models.checkpoint import check_stored_covariance

    good = np.diag([0.09] * 3 + [1e-6] * 3)  # metres and radians: a precise rotation is not singular
    cov, repairs = check_stored_covariance(good.tolist(), "w.json: validation_errors.cov_ros")
    assert repairs == [] and np.array_equal(cov, good)
    rounding = good.copy()
    rounding[0, 1] = 1e-7
    cov, repairs = check_stored_covariance(rounding.tolist(), "w.json: validation_errors.cov_ros")
    assert np.array_equal(cov, cov.T) and cov[0, 1] == pytest.approx(5e-8)
    assert len(repairs) == 1 and "symmetrised" in repairs[0] and "w.json" in repairs[0]
    error = np.random.default_rng(0).normal(size=(1, 6)) * np.array([0.3] * 3 + [0.1] * 3)
    one_frame = error.T @ error  # a 1-frame validation split, as an older trainer saved it
    cov, repairs = check_stored_covariance(one_frame.tolist(), "w.json: validation_errors.cov_ros")
    assert len(repairs) == 1 and "singular (rank 1 of 6" in repairs[0]
    assert np.linalg.eigvalsh(cov).min() > 0
    np.testing.assert_allclose(np.diag(cov)[:3] - np.diag(one_frame)[:3], np.trace(one_frame[:3, :3]) / 3)
