"""A network's noise figures for the fusion: measured by the map on its validation frames,
carried in the checkpoint's JSON, read by the fusion (node, replay, calibrate) in place of
the parameter file's values unless ``noise_from_weights`` is off; and the walk-long bias
held at the network's typical covariance, not the newest pose's."""
import json

import numpy as np
import pytest

from vizloc_ros.localize.weights import network_noise, shipped_weights, sidecar_json
from vizloc_ros.mapping.mapper import fusion_noise
from vizloc_ros.metrics import correlation_time
from vizloc_ros.nodes import params as node_params
from vizloc_ros.pipeline.fusion_core import FusionCore, FusionSettings
from vizloc_ros.training.datasets import SevenScenes, _synthetic_camera_rate

pytest.importorskip("gtsam")


def _ar1_blocks(blocks, length, period, tau, seed=0):
    """``blocks`` separate runs of an exponentially correlated error (time constant tau)."""
    rng = np.random.default_rng(seed)
    keep = np.exp(-period / tau)
    errors, stamps, labels = [], [], []
    for b in range(blocks):
        e = rng.normal(size=6)
        for k in range(length):
            if k:
                e = keep * e + np.sqrt(1 - keep ** 2) * rng.normal(size=6)
            errors.append(e.copy())
            stamps.append(100.0 * b + k * period)
            labels.append(b)
    return np.array(stamps), np.array(errors), np.array(labels)


def test_correlation_time_inside_separate_runs_is_their_time_constant():
    stamps, errors, labels = _ar1_blocks(400, 40, 1 / 15, 0.3)
    cov = np.broadcast_to(np.eye(6), (len(stamps), 6, 6))
    assert correlation_time(stamps, errors, cov, segments=labels) == pytest.approx(0.3, rel=0.3)
    white = np.random.default_rng(1).normal(size=errors.shape)
    assert correlation_time(stamps, white, cov, segments=labels) < 0.03
    with pytest.raises(ValueError):
        correlation_time(stamps, errors, cov, segments=labels[:-1])


def test_fusion_noise_splits_runs_at_index_and_time_gaps():
    stamps, errors, labels = _ar1_blocks(300, 20, 1 / 15, 0.3, seed=2)
    indices = np.arange(len(stamps)) + 10 * labels   # every block 10 frames after the last
    cov = np.broadcast_to(np.eye(6), (len(stamps), 6, 6))
    noise = fusion_noise(stamps, indices, errors, cov)
    assert noise["runs"] == 300 and noise["frames"] == len(stamps)
    assert noise["abs_correlation_time"] == pytest.approx(0.3, rel=0.35)
    assert 0.0 <= noise["validation_bias_share"] < 0.05 and "abs_bias_share" not in noise   # recorded, not handed on
    # nothing to measure: too few frames, or no two consecutive ones
    assert fusion_noise(stamps[:2], indices[:2], errors[:2], cov[:2]) is None
    assert fusion_noise(stamps[::2][:5], np.arange(5) * 2, errors[:5], cov[:5]) is None


def _checkpoint_json(tmp_path, block):
    (tmp_path / "map.safetensors").write_bytes(b"")
    meta = {"format": "vizloc_ros/checkpoint-v1", "validation_errors": {}}
    if block is not None:
        meta["validation_errors"]["fusion_noise"] = block
    (tmp_path / "map.json").write_text(json.dumps(meta))
    return tmp_path / "map.safetensors"


def test_network_noise_reads_the_checkpoint_json_and_refuses_bad_values(tmp_path):
    weights = _checkpoint_json(tmp_path, {"abs_correlation_time": 0.2, "abs_bias_share": 0.05, "frames": 90})
    assert sidecar_json(weights) == tmp_path / "map.json" and sidecar_json(tmp_path / "m.onnx").name == "m.json"
    assert network_noise(weights) == {"abs_correlation_time": 0.2, "abs_bias_share": 0.05}
    assert network_noise(tmp_path / "none.safetensors") == {}          # no JSON at all
    assert network_noise(_checkpoint_json(tmp_path, None)) == {}       # a JSON without the block
    for bad in ({"abs_correlation_time": -1.0}, {"abs_bias_share": 2.0}, {"abs_bias_share": "x"}, [1, 2]):
        with pytest.raises(ValueError, match="fusion_noise"):
            network_noise(_checkpoint_json(tmp_path, bad))
    (tmp_path / "map.json").write_text("{ not json")
    with pytest.raises(ValueError, match="map.json"):
        network_noise(weights)
    for document, words in (([1, 2], "not a mapping"), ({"validation_errors": [1]}, "validation_errors")):
        (tmp_path / "map.json").write_text(json.dumps(document))
        with pytest.raises(ValueError, match=words):
            network_noise(weights)


def test_the_fusion_takes_the_figures_of_its_network_unless_told_not_to(tmp_path):
    weights = _checkpoint_json(tmp_path, {"abs_correlation_time": 0.2, "abs_bias_share": 0.05})
    core = FusionCore({"abs_correlation_time": 1.0, "abs_bias_share": 0.5},
                      FusionSettings(network_weights=str(weights)))
    assert core.config.abs_correlation_time == 0.2 and core.config.abs_bias_share == 0.05
    assert core.network_noise == {"abs_correlation_time": 0.2, "abs_bias_share": 0.05}
    kept = FusionCore({"abs_correlation_time": 1.0, "abs_bias_share": 0.5},
                      FusionSettings(network_weights=str(weights), noise_from_weights=False))
    assert kept.config.abs_correlation_time == 1.0 and kept.config.abs_bias_share == 0.5 and not kept.network_noise
    assert FusionCore().network_noise == {}   # no network named: the parameters as given


def test_the_fusion_node_reads_the_shipped_default_when_no_weights_are_named():
    resolved = node_params.with_network_weights(FusionSettings())
    assert resolved.network_weights == str(shipped_weights())
    named = FusionSettings(network_weights="/robot/map.safetensors")
    assert node_params.with_network_weights(named) is named
    off = FusionSettings(noise_from_weights=False)
    assert node_params.with_network_weights(off).network_weights == ""


def test_a_synthetic_seven_scenes_folder_is_stamped_at_its_camera_rate(tmp_path):
    assert _synthetic_camera_rate(tmp_path) is None
    (tmp_path / "scene.json").write_text(json.dumps({"rates_hz": {"camera": 15.0}}))
    assert _synthetic_camera_rate(tmp_path) == 15.0
    (tmp_path / "scene.json").write_text(json.dumps({"rates_hz": {"camera": -3}}))
    assert _synthetic_camera_rate(tmp_path) is None
    seq = tmp_path / "seq-01"
    seq.mkdir()
    (tmp_path / "TrainSplit.txt").write_text("sequence1\n")
    (tmp_path / "scene.json").write_text(json.dumps({"rates_hz": {"camera": 15.0}}))
    for k in range(2):
        np.savetxt(seq / f"frame-{k:06d}.pose.txt", np.eye(4))
        (seq / f"frame-{k:06d}.color.png").write_bytes(b"")
    stamps = [item[3] for item in SevenScenes(tmp_path, "train").items]
    assert stamps[1] - stamps[0] == pytest.approx(1 / 15)


def test_one_uncertain_pose_does_not_set_the_walk_long_bias():
    """The bias term is abs_bias_share of the network's typical covariance: after 20 poses
    of 10 cm sigma, one of 1 m sigma (agreeing, so accepted) must not multiply the
    published covariance."""
    from vizloc_ros.fusion import FusionConfig, SlidingWindowFusion

    fusion = SlidingWindowFusion(FusionConfig(use_odom=False, abs_bias_share=0.5, abs_correlation_time=0.0,
                                              abs_cov_adaptive_window=0))
    q = np.array([1.0, 0.0, 0.0, 0.0])
    small = np.diag([0.01] * 3 + [0.001] * 3)
    for k in range(20):
        fusion.add_absolute(k * 0.1, np.zeros(3), q, small)
    before = fusion.estimate().cov_ros[:3, :3].trace()
    result = fusion.add_absolute(2.0, np.zeros(3), q, 100.0 * small)
    assert result.accepted
    after = fusion.estimate().cov_ros[:3, :3].trace()
    # the newest pose's share alone would add 0.5 * 1 m^2 a axis; the typical level adds
    # 0.5 * 0.0105 m^2 (21 poses' mean information)
    assert after < 2.0 * before and after < 0.1


class _NoisyLocalizer:
    """Stands in for a map: the true pose of frame k (its image's pixels hold k) plus the
    k-th error, with a fixed covariance."""

    def __init__(self, truths, errors):
        self.truths, self.errors = truths, errors

    def localize(self, x):
        import torch

        k = int(round(float(x[0, 0, 0, 0]) * 1000))
        t, q = self.truths[k]
        return (torch.tensor(t + self.errors[k][:3])[None], torch.tensor(q)[None],
                torch.tensor(np.diag([0.01] * 3 + [0.001] * 3))[None])


def test_validating_a_map_measures_its_noise_for_the_fusion(monkeypatch):
    """validate_map: the held-out frames' errors -> ``fusion_noise`` in the map's JSON."""
    from vizloc_ros.mapping import mapper
    from vizloc_ros.mapping.mapper import MapFrame, validate_map

    stamps, errors, labels = _ar1_blocks(30, 20, 1 / 15, 0.3, seed=4)
    errors = 0.1 * errors
    frames, truths = [], []
    for k, stamp in enumerate(stamps):
        truths.append((np.array([k * 0.01, 0.0, 1.0]), np.array([1.0, 0.0, 0.0, 0.0])))
        frames.append(MapFrame(image=np.full((4, 4, 3), k, np.uint16), t=truths[-1][0], q=truths[-1][1],
                               stamp=float(stamp)))
    # the image's first value carries the frame's number to the stand-in map
    monkeypatch.setattr(mapper, "preprocess", lambda image, spec: image.double().permute(0, 3, 1, 2) / 1000)
    indices = np.arange(len(frames)) + 5 * labels   # held-out blocks, 5 frames apart
    by_index = {int(i): f for i, f in zip(indices, frames)}
    _, validation_errors = validate_map(_NoisyLocalizer(truths, errors), by_index, indices, spec=None)
    noise = validation_errors["fusion_noise"]
    assert noise["runs"] == 30 and noise["frames"] == len(frames)
    assert noise["abs_correlation_time"] == pytest.approx(0.3, rel=0.5)
