"""PoseEstimator: agreement with a float64 reference, covariance sanity, bad input, ONNX export."""
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from vizloc_ros import geometry
from vizloc_ros.localize.estimator import PoseEstimator, make_psd, mean_and_covariance, resolve_device
from vizloc_ros.localize.models import CheckpointError, build_model, load_checkpoint, save_checkpoint
from vizloc_ros.localize.preprocess import InputSpec, preprocess
from vizloc_ros.training import evaluate, export
from test_datasets import make_sevenscenes
from vizloc_ros.localize import runners

SPEC = InputSpec(resize=48, crop=(48, 64))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("mapnet", feat_dim=64)
    model.set_pose_stats([1.0, 2.0, 0.5], [2.0, 1.5, 0.3])
    cov = np.diag([0.04, 0.04, 0.01, 1e-3, 1e-3, 2e-3]).tolist()
    path = tmp_path_factory.mktemp("ckpt") / "mapnet_tiny"
    save_checkpoint(path, model.eval(), {"input": SPEC.to_meta(), "scene": "test",
                                         "validation_errors": {"cov_ros": cov}})
    return path, model


def _image(seed, h=60, w=80):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_fp32_cpu_path_matches_float64_reference(checkpoint):
    path, model = checkpoint
    estimator = PoseEstimator(path, device="cpu")
    reference = build_model("mapnet", feat_dim=64)
    reference.load_state_dict(model.state_dict())
    reference = reference.double().eval()
    for seed in range(3):  # fresh inputs per check
        image = _image(100 + seed)
        result = estimator.estimate(image)
        x = preprocess(torch.from_numpy(image[None]), SPEC).double()
        with torch.no_grad():
            t_ref, q_ref = reference.decode(reference(x))
        t_ref, q_ref = t_ref[0].numpy(), q_ref[0].numpy()
        assert np.linalg.norm(result.t - t_ref) / np.linalg.norm(t_ref) < 1e-5
        assert np.linalg.norm(result.q - q_ref) < 1e-5


def test_validation_covariance_is_used_without_mc_dropout(checkpoint):
    estimator = PoseEstimator(checkpoint[0], device="cpu")
    result = estimator.estimate(_image(1))
    np.testing.assert_allclose(np.diag(result.cov)[:3], [0.04, 0.04, 0.01])
    assert result.latency_s > 0 and result.q[0] >= 0


def test_mc_dropout_covariance_is_spd_and_finite(checkpoint):
    estimator = PoseEstimator(checkpoint[0], device="cpu", mc_dropout_samples=8)
    result = estimator.estimate(_image(2))
    assert np.all(np.isfinite(result.cov))
    np.testing.assert_allclose(result.cov, result.cov.T)
    assert np.linalg.eigvalsh(result.cov).min() > 0
    assert np.abs(result.cov - estimator._validation_cov).max() > 0  # really from samples


def test_batch_equals_single_images(checkpoint):
    estimator = PoseEstimator(checkpoint[0], device="cpu")
    images = [_image(s) for s in range(3)]
    batch = estimator.estimate_batch(images)
    for image, result in zip(images, batch):
        np.testing.assert_allclose(estimator.estimate(image).t, result.t, rtol=1e-5, atol=1e-6)


def test_mono_images_are_accepted(checkpoint):
    estimator = PoseEstimator(checkpoint[0], device="cpu")
    mono = _image(3)[..., 0]
    a = estimator.estimate(mono, encoding="mono8")
    b = estimator.estimate(np.repeat(mono[..., None], 3, axis=2))
    np.testing.assert_allclose(a.t, b.t, atol=1e-6)


@pytest.mark.parametrize("image, encoding", [
    (np.zeros((0, 0, 3), np.uint8), "rgb8"),
    (np.zeros((60, 80, 3), np.float32), "rgb8"),
    (np.zeros((60, 80, 4), np.uint8), "rgb8"),
    (np.zeros((60, 80, 2), np.uint8), "rgb8"),
    (np.zeros((60, 80, 3), np.uint8), "bayer_rggb8"),
    (np.full((60, 80, 3), np.nan), "rgb8"),
    (np.zeros((20, 30, 3), np.uint8), "rgb8"),  # smaller than the crop
])
def test_bad_input_is_a_value_error_and_leaves_no_damage(checkpoint, image, encoding):
    estimator = PoseEstimator(checkpoint[0], device="cpu")
    good = _image(5)
    before = estimator.estimate(good).t
    with pytest.raises(ValueError):
        estimator.estimate(image, encoding=encoding)
    np.testing.assert_allclose(estimator.estimate(good).t, before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA fallback")
def test_cuda_request_without_cuda_falls_back_once_or_fails_when_required(caplog, monkeypatch):
    # under `colcon test` launch_testing's plugin imports launch first, whose LaunchLogger
    # class makes every logger created afterwards non-propagating: caplog's root handler
    # would not see this one
    monkeypatch.setattr(logging.getLogger("vizloc_ros.localize.estimator"), "propagate", True)
    with caplog.at_level(logging.WARNING):
        assert resolve_device("cuda").type == "cpu"
    assert sum("CUDA is not available" in r.message for r in caplog.records) == 1
    with pytest.raises(RuntimeError, match="required"):
        resolve_device("cuda", require=True)
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")


def test_psd_floor_repairs_degenerate_and_nan_covariances():
    assert np.linalg.eigvalsh(make_psd(np.zeros((6, 6)))).min() > 0
    assert np.all(np.isfinite(make_psd(np.full((6, 6), np.nan))))
    bad = -np.eye(6)
    assert np.linalg.eigvalsh(make_psd(bad)).min() > 0


def test_sample_covariance_of_known_rotations():
    rng = np.random.default_rng(0)
    rot = rng.normal(scale=0.02, size=(4000, 3))
    q = geometry.quat_hemisphere(geometry.quat_exp(0.5 * rot))
    t = rng.normal(scale=0.1, size=(4000, 3))
    _, _, cov = mean_and_covariance(t, q)
    np.testing.assert_allclose(np.diag(cov), [0.01] * 3 + [4e-4] * 3, rtol=0.1)


def test_onnx_export_validates_and_runs_in_the_estimator(checkpoint, tmp_path):
    pytest.importorskip("onnxruntime")

    out = tmp_path / "exported"
    assert export.main([str(checkpoint[0]), "--out", str(out), "--tensorrt", "no"]) == 0
    onnx_estimator = PoseEstimator(out.with_suffix(".onnx"))
    torch_estimator = PoseEstimator(checkpoint[0], device="cpu")
    for batch in (1, 3):
        images = [_image(50 + k) for k in range(batch)]
        for a, b in zip(onnx_estimator.estimate_batch(images), torch_estimator.estimate_batch(images)):
            assert np.abs(a.t - b.t).max() < 1e-4
            assert np.abs(a.q - b.q).max() < 1e-4


def test_mc_samples_share_the_backbone_and_match_repeated_forwards(checkpoint):
    _, model = checkpoint
    x = torch.randn(2, 3, 48, 64)
    model.mc_dropout(True)
    try:
        torch.manual_seed(3)
        shared = model.forward_samples(x, 4)
        model.mc_dropout(False)
        model.eval()
        assert shared.shape == (8, model.output_dim)
        # without dropout every sample equals the plain forward pass
        torch.manual_seed(3)
        plain = model.forward_samples(x, 4)
        np.testing.assert_allclose(plain.detach().numpy(), model(x).repeat(4, 1).detach().numpy(),
                                   rtol=1e-5, atol=1e-5)
        assert not torch.allclose(shared[:2], shared[2:4])  # dropout made the samples differ
    finally:
        model.mc_dropout(False)


def test_vizloc_eval_records_metrics_in_the_sidecar(checkpoint, tmp_path):
    import json
    import shutil

    weights = tmp_path / "w"
    for suffix in (".safetensors", ".json"):
        shutil.copy(checkpoint[0].with_suffix(suffix), weights.with_suffix(suffix))
    scene = tmp_path / "scene"
    scene.mkdir()
    make_sevenscenes(scene, n=3)
    # fixture images are 6x8: too small for the 48x64 crop, so each is refused clearly
    assert evaluate.main([str(weights), str(scene), "--no-progress"]) == 2
    from PIL import Image
    for png in scene.glob("seq-*/*.color.png"):
        Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(png)
    assert evaluate.main([str(weights), str(scene), "--no-progress", "--record", "test"]) == 0
    meta = json.loads(weights.with_suffix(".json").read_text())
    assert meta["metrics"]["test"]["frames"] == 3 and meta["metrics"]["test"]["split"] == "test"


# ----------------------------------------------------------------------------- CUDA (run on a GPU machine)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _reference_pose(model, image):
    reference = build_model("mapnet", feat_dim=64)
    reference.load_state_dict(model.state_dict())
    reference = reference.double().eval()
    x = preprocess(torch.from_numpy(image[None]), SPEC).double()
    with torch.no_grad():
        t_ref, q_ref = reference.decode(reference(x))
    return t_ref[0].numpy(), q_ref[0].numpy()


SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "mapnet_demo.safetensors"


@needs_cuda
@pytest.mark.skipif(not SHIPPED.is_file(), reason="needs the shipped MapNet")
@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-5), ("fp16", 1e-3)])
def test_cuda_graph_path_matches_float64_reference(precision, tolerance):
    """The shipped network (a trained one: an untrained net's tiny, noisy outputs make
    fp16's relative error meaningless) through the captured graph vs float64 on the CPU."""
    estimator = PoseEstimator(SHIPPED, device="cuda", precision=precision, require_device=True)
    reference, meta = load_checkpoint(SHIPPED)
    reference = reference.double().eval()
    spec = InputSpec.from_meta(meta["input"])
    for seed in range(3):  # fresh inputs per check
        image = _image(200 + seed, 240, 320)
        result = estimator.estimate(image)
        with torch.no_grad():
            t_ref, q_ref = reference.decode(reference(preprocess(torch.from_numpy(image[None]), spec).double()))
        t_ref, q_ref = t_ref[0].numpy(), q_ref[0].numpy()
        assert np.linalg.norm(result.t - t_ref) / np.linalg.norm(t_ref) < tolerance
        assert np.linalg.norm(result.q - q_ref) < tolerance


@needs_cuda
def test_cuda_chunked_batches_equal_single_frames(checkpoint):
    estimator = PoseEstimator(checkpoint[0], device="cuda", require_device=True)
    images = [_image(300 + s) for s in range(19)]  # two full chunks and a partial one
    batch = estimator.estimate_batch(images)
    for image, result in zip(images, batch):
        np.testing.assert_allclose(estimator.estimate(image).t, result.t, rtol=1e-5, atol=1e-6)
    again = estimator.estimate_batch(images[::-1])  # buffers reused with other contents
    np.testing.assert_allclose(again[0].t, batch[-1].t, rtol=1e-5, atol=1e-6)


@needs_cuda
def test_cuda_graph_mc_dropout_draws_fresh_masks(checkpoint):
    estimator = PoseEstimator(checkpoint[0], device="cuda", mc_dropout_samples=8, require_device=True)
    image = _image(4)
    first, second = estimator.estimate(image), estimator.estimate(image)
    assert np.abs(first.t - second.t).max() > 0  # the replayed graph advanced the generator
    for result in (first, second):
        assert np.all(np.isfinite(result.cov)) and np.linalg.eigvalsh(result.cov).min() > 0


def test_the_adapter_is_chosen_once_by_what_the_weights_are(tmp_path):
    cpu = torch.device("cpu")
    cases = {"mapnet": (build_model("mapnet", feat_dim=8), runners.RegressorRunner),
             "vlocnet": (build_model("vlocnet", feat_dim=16), runners.SequenceRunner),
             "dsac": (build_model("dsac", backbone="small"), runners.LocalizingRunner)}
    for name, (model, kind) in cases.items():
        runner = runners.model_runner(model, SPEC, cpu)
        assert type(runner) is kind, name
        assert (runner.stream is not None) == (kind is runners.SequenceRunner)
    assert runners.is_exported("x.onnx") and runners.is_exported("x.engine") and not runners.is_exported("x")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="tensorrt Python package is not installed"):
            runners.exported_runner(tmp_path / "x.engine", SPEC)


def test_exported_weights_that_cannot_be_used_are_one_clear_error(checkpoint, tmp_path):
    """A missing exported file, one without its JSON sidecar, and a corrupt .onnx each fail
    at construction with an error naming the file, not a runtime's own exception."""
    with pytest.raises(CheckpointError, match="exported network not found"):
        PoseEstimator(tmp_path / "absent.onnx", device="cpu")
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(b"not a network")
    with pytest.raises(CheckpointError, match="needs the checkpoint's JSON sidecar beside it"):
        PoseEstimator(lonely, device="cpu")
    pytest.importorskip("onnxruntime")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a network")
    path, _ = checkpoint
    corrupt.with_suffix(".json").write_text(path.with_name(path.name + ".json").read_text())
    with pytest.raises(RuntimeError, match="corrupt.onnx: ONNX Runtime cannot load it"):
        PoseEstimator(corrupt, device="cpu")


# --------------------------------------------------------------------------- stored and sampled uncertainty

def _copy_with_cov(checkpoint, folder, cov):
    import json
    import shutil

    st = folder / "copy.safetensors"
    shutil.copy(Path(checkpoint[0]).with_suffix(".safetensors"), st)
    meta = json.loads(Path(checkpoint[0]).with_suffix(".json").read_text())
    meta["validation_errors"]["cov_ros"] = cov
    st.with_suffix(".json").write_text(json.dumps(meta))
    return st


def test_a_singular_stored_covariance_is_floored_with_a_warning(checkpoint, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("vizloc_ros.localize.estimator"), "propagate", True)
    error = np.array([[0.2, -0.1, 0.05, 0.01, 0.02, -0.03]])
    st = _copy_with_cov(checkpoint, tmp_path, (error.T @ error).tolist())  # one validation frame
    with caplog.at_level(logging.WARNING):
        estimator = PoseEstimator(st, device="cpu", warmup=False)
    assert [r.message for r in caplog.records if "singular (rank 1 of 6" in r.message and str(st) in r.message]
    eigenvalues = np.linalg.eigvalsh(estimator._validation_cov)
    # each block's mean variance added: far above the 1 cm / 0.2 deg floor of make_psd alone
    assert eigenvalues.min() >= np.sum(error[0, 3:] ** 2) / 3 * 0.999


def test_a_negative_stored_covariance_is_refused_not_floored(checkpoint, tmp_path):
    from vizloc_ros.pipeline.regressor import load_estimator

    st = _copy_with_cov(checkpoint, tmp_path, (-np.eye(6)).tolist())
    with pytest.raises(ValueError, match=r"validation_errors.cov_ros has negative variances") as raised:
        load_estimator(st, device="cpu", warmup=False)
    assert str(st.with_suffix(".json")) in str(raised.value)


def test_mc_dropout_samples_above_the_limit_name_the_setting_not_the_weights(checkpoint):
    from vizloc_ros.localize.estimator import MAX_MC_DROPOUT_SAMPLES
    from vizloc_ros.pipeline.regressor import load_estimator

    for samples, words in ((100_000, f"mc_dropout_samples = 100000 is more than {MAX_MC_DROPOUT_SAMPLES}"),
                           (-1, "mc_dropout_samples must be an integer >= 0"),
                           (2.5, "mc_dropout_samples must be an integer >= 0")):
        with pytest.raises(ValueError) as raised:
            load_estimator(checkpoint[0], device="cpu", mc_dropout_samples=samples)
        assert words in str(raised.value) and "cannot load weights" not in str(raised.value)


def test_mc_dropout_samples_with_a_silenced_rotation_head_are_left_out():
    rng = np.random.default_rng(3)
    q = geometry.quat_hemisphere(geometry.quat_exp(0.5 * rng.normal(scale=0.02, size=(200, 3))))
    t = rng.normal(scale=0.1, size=(200, 3))
    q_bad = q.copy()
    q_bad[[5, 70]] = 0.0  # what a dropout mask that silences the head gives (2 in 100000 for a tiny head)
    t_all, q_all, cov_all = mean_and_covariance(t, q)
    keep = np.ones(200, bool)
    keep[[5, 70]] = False
    t_kept, q_kept, cov_kept = mean_and_covariance(t[keep], q[keep])
    t_m, q_m, cov_m = mean_and_covariance(t, q_bad)
    np.testing.assert_allclose(t_m, t_kept) and np.testing.assert_allclose(cov_m, cov_kept)
    np.testing.assert_allclose(q_m, q_kept)
    q_bad[:150] = 0.0
    with pytest.raises(ValueError, match="only 50 of 200 samples gave a rotation"):
        mean_and_covariance(t, q_bad)


def test_validation_covariance_of_fewer_frames_than_dimensions_is_floored(caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("vizloc_ros.training.evaluate"), "propagate", True)
    rng = np.random.default_rng(4)
    t_gt = rng.normal(size=(12, 3))
    q_gt = geometry.quat_hemisphere(geometry.quat_exp(0.5 * rng.normal(scale=0.3, size=(12, 3))))
    t_est = t_gt + rng.normal(scale=0.1, size=(12, 3))
    q_est = geometry.quat_hemisphere(geometry.quat_multiply(
        geometry.quat_exp(0.5 * rng.normal(scale=0.02, size=(12, 3))), q_gt))
    full = np.array(evaluate.validation_covariance(t_est, q_est, t_gt, q_gt))
    assert np.linalg.eigvalsh(full).min() > 0
    with caplog.at_level(logging.WARNING):
        one = np.array(evaluate.validation_covariance(t_est[:1], q_est[:1], t_gt[:1], q_gt[:1]))
    assert any("singular" in r.message and "1 frame" in r.message for r in caplog.records)
    corr = one / np.sqrt(np.outer(np.diag(one), np.diag(one)))
    assert np.linalg.eigvalsh(corr).min() > 0.1  # definite, not merely floored at rounding
    assert evaluate.validation_covariance(t_gt[:0], q_gt[:0], t_gt[:0], q_gt[:0]) is None
    assert evaluate.validation_covariance(t_gt[:2], q_gt[:2], t_gt[:2], q_gt[:2]) is None  # no error: unmeasured


def test_the_eval_table_shows_how_many_frames_were_scored_and_warns_when_few():
    scored = {"frames": 1, "median_translation_m": 0.5, "median_rotation_deg": 3.0,
              **{evaluate.threshold_key(m, d): 0.0 for m, d in evaluate.THRESHOLDS},
              "frames_left_out": {"without ground truth": 29}}
    table = evaluate.format_table(scored, "w on bag (test)").splitlines()
    assert table[1].split() == ["frames", "scored", "1", "of", "30", "(29", "without", "ground", "truth)"]
    assert table[-1].startswith("WARNING: only 1 of 30 frames could be scored (29 without ground truth)")
    full = dict(scored, frames=300, frames_left_out={})
    assert evaluate.format_table(full).splitlines()[0].split() == ["frames", "scored", "300"]
    assert "WARNING" not in evaluate.format_table(full)
