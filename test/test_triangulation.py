"""Triangulated sparse depth for recordings without depth: the depths agree with what the
renderer says, frames with no partner or no texture give no points, wrong poses leave few
points, and make_map trains on them when the frames have no depth."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vizloc_ros import geometry
from vizloc_ros.localize.models.ace import SceneEncoder
from vizloc_ros.localize.preprocess import InputSpec
from vizloc_ros.mapping.cli import build_parser
from vizloc_ros.mapping.head_training import HeadTrainingConfig
from vizloc_ros.mapping.mapper import MapFrame, MapOptions, make_map
from vizloc_ros.mapping.pretrain import write_encoder
from vizloc_ros.mapping.triangulation import (SparseDepth, TriangulationOptions, cell_radius, choose_partners,
                                               triangulate_frames)
from vizloc_ros.sim.catalog import get_scene
from vizloc_ros.sim.render import PinholeCamera, Renderer
from vizloc_ros.sim.trajectories import camera_poses, random_walk

WIDTH, HEIGHT, COUNT = 160, 120, 24


@pytest.fixture(scope="module")
def walk():
    """24 frames of a 12 s walk through the demo room: images, poses, rendered depth."""
    torch.set_num_threads(1)
    scene = get_scene("demo")
    camera = PinholeCamera.from_fov(WIDTH, HEIGHT, 60.0)
    renderer = Renderer(scene, camera)
    t, q = camera_poses(random_walk(scene, 12.0, seed=3), np.linspace(0.5, 11.5, COUNT))
    rendered = [renderer.render(t[k], q[k]) for k in range(COUNT)]
    intrinsics = {"fx": camera.fx, "fy": camera.fy, "cx": camera.cx, "cy": camera.cy,
                  "width": WIDTH, "height": HEIGHT}
    return {"t": t, "q": q, "images": [r.rgb for r in rendered], "depths": [r.depth for r in rendered],
            "camera": intrinsics}


def _frames(walk, q=None):
    q = walk["q"] if q is None else q
    return [MapFrame(image=walk["images"][k], t=walk["t"][k], q=q[k]) for k in range(COUNT)]


def test_triangulated_depths_agree_with_the_rendered_depth(walk):
    result = triangulate_frames(_frames(walk), walk["camera"])
    errors = []
    for sparse, true in zip(result.depths, walk["depths"]):
        d = true[np.rint(sparse.v).astype(int), np.rint(sparse.u).astype(int)]
        errors.append(np.abs(sparse.depth - d) / d)
    errors = np.concatenate(errors)
    assert result.summary["points"] == len(errors) >= 200
    assert result.summary["frames_with_points"] >= COUNT // 2
    assert np.median(errors) < 0.02  # measured 1.1 %
    assert np.mean(errors > 0.10) < 0.10  # measured 5 % (keypoints on a depth edge read the other side)


def test_wrong_poses_leave_few_points(walk):
    """Each pose turned 2 deg about a random axis: most matches are off their epipolar
    lines by pixels, so the filter removes them before anything is triangulated."""
    good = triangulate_frames(_frames(walk), walk["camera"]).summary["points"]
    axes = np.random.default_rng(0).normal(size=(COUNT, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    turned = np.stack([geometry.quat_multiply(walk["q"][k], geometry.quat_exp(np.radians(2.0) / 2 * axes[k]))
                       for k in range(COUNT)])
    wrong = triangulate_frames(_frames(walk, turned), walk["camera"]).summary["points"]
    assert wrong < 0.15 * good  # measured 22 of 399


def test_frames_without_partner_or_texture_give_no_points(walk):
    camera = walk["camera"]
    alone = triangulate_frames(_frames(walk)[:1], camera)
    assert alone.summary["pairs"] == 0 and len(alone.depths) == 1 and len(alone.depths[0]) == 0
    # one place, turning on the spot: no baseline, no parallax, no partner
    spot = [MapFrame(image=walk["images"][k], t=walk["t"][0], q=walk["q"][k]) for k in range(6)]
    assert triangulate_frames(spot, camera).summary["pairs"] == 0
    grey = np.full((HEIGHT, WIDTH, 3), 128, np.uint8)  # partners by pose, but nothing to match
    blank = triangulate_frames([MapFrame(image=grey, t=walk["t"][k], q=walk["q"][k]) for k in range(COUNT)], camera)
    assert blank.summary["pairs"] > 0 and blank.summary["points"] == 0
    assert all(np.isnan(d.image(HEIGHT, WIDTH, 4)).all() for d in blank.depths)


def test_sparse_depth_image_draws_each_keypoint_over_its_cell_nearest_first():
    sparse = SparseDepth(np.array([10.0, 14.2], np.float32), np.array([5.0, 5.0], np.float32),
                         np.array([1.0, 2.0], np.float32))
    image = sparse.image(12, 24, radius=3)
    assert image[5, 10] == 1.0 and image[5, 14] == 2.0
    assert image[5, 11] == 1.0 and image[5, 13] == 2.0  # each pixel: the nearer keypoint
    assert image[2, 7] == 1.0 and np.isnan(image[1, 10]) and np.isnan(image[5, 6])
    assert np.isfinite(image).sum() == 7 * 7 + 7 * 4  # two 7x7 squares, overlapping in 3 columns
    assert np.isnan(SparseDepth(*(np.zeros(0, np.float32),) * 3).image(4, 4, 2)).all()
    camera = {"fx": 500.0, "fy": 500.0, "cx": 612.5, "cy": 184.5, "width": 1226, "height": 370}
    assert cell_radius(camera, InputSpec(resize=240, crop=(240, 792)), 8) == 7  # KITTI: 8 px at 0.65 -> 12.3
    assert cell_radius(dict(camera, width=320, height=240), InputSpec(resize=240, crop=(240, 320)), 8) == 4


def test_options_out_of_range_are_refused():
    for bad in ({"min_views": 0}, {"min_parallax_deg": 20.0}, {"ratio": 1.5}, {"scene_depth": -1.0}):
        with pytest.raises(ValueError):
            TriangulationOptions(**bad)


def test_make_map_trains_on_triangulated_depth_when_the_frames_have_none(walk, tmp_path):
    torch.manual_seed(0)
    write_encoder(tmp_path / "encoder", SceneEncoder().eval(), {"made_by": "test"})
    options = MapOptions(steps=3, encoder=tmp_path / "encoder.safetensors", input_height=120,
                         head=HeadTrainingConfig(batch=256), validation_share=0.0, threads=1)
    meta = make_map(_frames(walk), walk["camera"], tmp_path / "map", options)
    triangulation = meta["training"]["triangulation"]
    assert meta["training"]["depth_supervised"] and triangulation["points"] >= 200
    assert 0.0 < triangulation["buffer_rows_with_target"] < 0.5
    assert json.loads((tmp_path / "map.json").read_text())["training"]["triangulation"]["points"] \
        == triangulation["points"]
    off = make_map(_frames(walk), walk["camera"], tmp_path / "off",
                   MapOptions(**{**options.__dict__, "triangulate": False}))
    assert "triangulation" not in off["training"] and not off["training"]["depth_supervised"]
    with_depth = [MapFrame(image=f.image, t=f.t, q=f.q, depth=d) for f, d in zip(_frames(walk), walk["depths"])]
    rgbd = make_map(with_depth, walk["camera"], tmp_path / "rgbd", options)  # the recording's depth wins
    assert "triangulation" not in rgbd["training"] and rgbd["training"]["depth_supervised"]


def test_vizloc_map_triangulates_by_default_and_can_be_told_not_to():
    parser = build_parser()
    assert parser.parse_args(["src", "--out", "m"]).triangulate
    assert not parser.parse_args(["src", "--out", "m", "--no-triangulate"]).triangulate


def test_a_camera_moving_along_its_axis_finds_partners_by_its_side_probes(monkeypatch):
    """A car on a straight road: the point ahead shows no parallax between two frames,
    the roadside does (KITTI 06 had partners for 5 of 26 frames with the axis alone)."""
    camera = {"fx": 718.9, "fy": 718.9, "cx": 607.2, "cy": 185.2, "width": 1241, "height": 376}
    count = 12
    centres = np.column_stack([np.zeros(count), np.zeros(count), 2.4 * np.arange(count)])
    rotations = np.repeat(np.eye(3)[None], count, axis=0)  # optical axis along +z, the motion
    partners = choose_partners(centres, rotations, camera, TriangulationOptions(scene_depth=10.0))
    assert all(len(p) > 0 for p in partners)
    for i, p in enumerate(partners):  # never the frame itself, and each partner once
        assert i not in p and len(set(p.tolist())) == len(p)
    # the axis probe alone finds none: every ray to it is parallel
    import vizloc_ros.mapping.triangulation as triangulation
    monkeypatch.setattr(triangulation, "PROBE_OFFSETS", ((0.0, 0.0),))
    axis_only = choose_partners(centres, rotations, camera, TriangulationOptions(scene_depth=10.0))
    assert all(len(p) == 0 for p in axis_only)


def test_pairs_that_kept_no_point_give_an_empty_depth_without_a_warning():
    import warnings

    from vizloc_ros.mapping.triangulation import _fuse

    points = np.zeros((5, 2), np.float32)
    empty = (np.zeros(0, np.int64), np.zeros(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for samples in ([], [empty], [empty, empty]):
            depth = _fuse(samples, points, TriangulationOptions())
            assert len(depth.u) == len(depth.v) == len(depth.depth) == 0
