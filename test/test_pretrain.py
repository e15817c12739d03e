"""Encoder pretraining (vizloc_ros.mapping.pretrain): exact cell targets, a tiny run that
writes the encoder and a resumable state, resuming, and one-line errors for bad flags."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vizloc_ros.geometry import quat_to_matrix
from vizloc_ros.localize.models.ace import SceneEncoder
from vizloc_ros.mapping import pretrain as P
from vizloc_ros.sim.catalog import get_scene
from vizloc_ros.sim.render import PinholeCamera, Renderer
from vizloc_ros.sim.trajectories import camera_poses, random_walk

TINY = ["--rooms", "2", "--frames", "4", "--walks", "2", "--steps", "3", "--batch", "2", "--threads", "1"]


def test_cell_targets_are_the_points_seen_at_the_cell_centres():
    scene = get_scene("room:3000")
    camera = PinholeCamera.from_fov(64, 48, 60.0)
    cells = P.cell_camera(camera)
    assert (cells.width, cells.height) == (8, 6)
    t, q = camera_poses(random_walk(scene, 5.0, seed=1), np.array([2.0]))
    depth = Renderer(scene, cells, shading=False).render(t[0], q[0]).depth
    points = P.cell_coordinates(depth, cells, t[0], quat_to_matrix(q[0]))
    # each point projects back onto its cell's centre pixel (8 j + 3.5, 8 i + 3.5) of the full camera
    cam = (points.reshape(-1, 3) - t[0]) @ quat_to_matrix(q[0])
    u = camera.fx * cam[:, 0] / cam[:, 2] + camera.cx
    v = camera.fy * cam[:, 1] / cam[:, 2] + camera.cy
    i, j = np.meshgrid(np.arange(6), np.arange(8), indexing="ij")
    np.testing.assert_allclose(u, (8 * j + 3.5).ravel(), atol=1e-3)
    np.testing.assert_allclose(v, (8 * i + 3.5).ravel(), atol=1e-3)


def test_a_tiny_run_writes_the_encoder_and_a_state_that_resumes(tmp_path):
    out = tmp_path / "enc"
    assert P.main(["--out", str(out), *TINY]) == 0
    meta = json.loads((tmp_path / "enc.json").read_text())
    blob = (tmp_path / "enc.safetensors").read_bytes()
    assert meta["sha256"] == hashlib.sha256(blob).hexdigest() and meta["room_seeds"] == [1000, 1001]
    encoder = SceneEncoder()
    encoder.load_state_dict({k: v.float() for k, v in load_file(str(tmp_path / "enc.safetensors")).items()})
    with torch.no_grad():
        assert torch.isfinite(encoder.eval()(torch.zeros(1, 3, 48, 64))).all()
    state = json.loads((tmp_path / "enc.state.json").read_text())
    assert state["step"] == 3
    # resuming to 5 steps continues from step 3, not from scratch
    assert P.main(["--out", str(out), *TINY[:6], "--steps", "5", "--batch", "2", "--threads", "1", "--resume"]) == 0
    assert json.loads((tmp_path / "enc.state.json").read_text())["step"] == 5
    # the encoder's JSON names both commands and where each started (the schedule changed)
    runs = json.loads((tmp_path / "enc.json").read_text())["runs"]
    assert [r["from_step"] for r in runs] == [0, 3] and "--resume" in runs[1]["command"]


@pytest.mark.parametrize("flags, message", [
    (["--rooms", "65"], "only 64 pretraining rooms"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--resume"], "--resume: no state"),
    (["--init-encoder", "/nonexistent.safetensors"], "no such file"),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    assert P.main(["--out", str(tmp_path / "enc"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not list(tmp_path.iterdir())


def test_an_existing_encoder_is_not_replaced(tmp_path, capsys):
    (tmp_path / "enc.safetensors").write_bytes(b"x")
    assert P.main(["--out", str(tmp_path / "enc")]) == 2
    assert "exists" in capsys.readouterr().err
