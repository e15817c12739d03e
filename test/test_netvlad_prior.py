"""benchmarks/netvlad_prior.py end to end on a tiny kidnap walk with untrained networks:
it renders the walk, replays it with and without the NetVLAD prior and reports how many
network frames the fusion needs to come back (the figures mean nothing here)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vizloc_ros.localize.models import build_model, save_checkpoint
from vizloc_ros.sim.kidnap import simulate_kidnap
from vizloc_ros.sim.synthetic import SequenceSpec, SynthConfig

pytestmark = pytest.mark.usefixtures("fast_cpu")
BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "netvlad_prior.py"
TINY_INPUT = {"resize": 48, "crop": [48, 64]}


def _benchmark():
    spec = importlib.util.spec_from_file_location("netvlad_prior", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_odometry_does_not_see_the_carry_but_truth_and_images_do():
    sim, kidnap = simulate_kidnap(SequenceSpec(1, "test", 101, 60), SynthConfig(), at_frame=30, distance=3.0)
    assert abs(kidnap.distance_m - 3.0) <= 0.1 and kidnap.at_time_s == 2.0
    assert len(sim.frame_times) == 60 and np.all(np.diff(sim.odom.times) > 0)
    assert np.linalg.norm(np.diff(sim.odom.t, axis=0), axis=1).max() < 0.1   # no jump in the odometry
    jump = np.linalg.norm(np.diff(sim.ground_truth_t, axis=0), axis=1)
    assert jump.max() > 2.5 and sim.ground_truth_times[jump.argmax() + 1] == pytest.approx(2.0)
    camera_steps = np.linalg.norm(np.diff(sim.camera_t, axis=0), axis=1)
    assert camera_steps.argmax() + 1 == 30 and camera_steps.max() > 2.5
    with pytest.raises(ValueError, match="never comes"):
        simulate_kidnap(SequenceSpec(1, "test", 101, 60), SynthConfig(), at_frame=30, distance=40.0)


def test_benchmark_renders_replays_and_reports_with_an_untrained_netvlad(tmp_path, capsys, monkeypatch):
    from vizloc_ros.replay import report

    monkeypatch.setattr(report, "_plots", lambda folder, result: False)  # the benchmark reads no plot
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "pose", build_model("posenet_resnet18", feat_dim=8).eval(), {"input": TINY_INPUT})
    netvlad = build_model("netvlad", backbone="small", feat_dim=8, clusters=4).eval()
    rng = np.random.default_rng(0)
    yaw = rng.uniform(-np.pi, np.pi, 6)
    netvlad.set_database(torch.nn.functional.normalize(torch.randn(6, netvlad.descriptor_dim), dim=1),
                         np.c_[rng.uniform(-2, 2, (6, 2)), np.full(6, 1.3)],
                         np.c_[np.cos(yaw / 2), np.zeros((6, 2)), np.sin(yaw / 2)])
    save_checkpoint(tmp_path / "netvlad", netvlad, {"input": TINY_INPUT})
    args = ["--prior-weights", str(tmp_path / "netvlad.safetensors"), "--weights", str(tmp_path / "pose.safetensors"),
            "--work", str(tmp_path / "work"), "--json", str(tmp_path / "result.json"), "--frames", "24",
            "--at-frame", "12", "--distance", "1.0", "--size", "64x48", "--single-process", "--quiet"]
    assert _benchmark().main(args) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["kidnap"]["at_frame"] == 12 and abs(result["kidnap"]["distance_m"] - 1.0) <= 0.1
    for name in ("with_prior", "without_prior"):
        run = result["runs"][name]
        assert run["frames_after_carry"] == 12 and np.isfinite(run["error_first_frame_m"])
        assert run["frames_until_back"] is None or 1 <= run["frames_until_back"] <= 12
    assert result["runs"]["with_prior"]["counts"]  # the prior reached the fusion
    assert "back within 0.5 m" in capsys.readouterr().out
    assert _benchmark().main(args[:2] + ["--weights", str(tmp_path / "missing.safetensors")]) == 2
