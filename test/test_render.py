"""render.py / scene.py: determinism, pinhole geometry, colours from the right surface,
depth along the optical axis."""
from __future__ import annotations

import math

import numpy as np
import pytest

from vizloc_ros.sim.render import PinholeCamera, Renderer, depth_to_millimetres
from vizloc_ros.sim.catalog import get_scene
from vizloc_ros.sim.scene import DEMO_SPEC, build_scene
from vizloc_ros.sim.trajectories import OPTICAL_IN_BASE_R, euler_zyx_to_matrix
from vizloc_ros.geometry import matrix_to_quat, pose_inverse, quat_rotate, quat_to_matrix

CAMERA = PinholeCamera.from_fov(80, 60)


@pytest.fixture(scope="module")
def scene():
    return get_scene("demo")


@pytest.fixture(scope="module")
def renderer(scene):
    return Renderer(scene, CAMERA)


@pytest.fixture(scope="module")
def albedo_renderer(scene):
    return Renderer(scene, CAMERA, shading=False)


def camera_quat(yaw, pitch=0.0, roll=0.0):
    """Camera-to-world rotation of an optical frame on a base with the given attitude."""
    return matrix_to_quat(euler_zyx_to_matrix(yaw, pitch, roll) @ OPTICAL_IN_BASE_R)


def test_intrinsics_from_field_of_view():
    cam = PinholeCamera.from_fov(320, 240, 60.0)
    assert cam.fx == pytest.approx(160 / math.tan(math.radians(30)))
    assert (cam.cx, cam.cy) == (159.5, 119.5)
    assert PinholeCamera.from_fov(320, 240, focal=300.0).fy == 300.0
    with pytest.raises(ValueError):
        PinholeCamera.from_fov(0, 240)


def test_rendering_is_deterministic(scene, renderer):
    q = camera_quat(0.7, 0.1, 0.05)
    a = renderer.render([-0.5, 0.3, 1.4], q)
    b = renderer.render([-0.5, 0.3, 1.4], q)
    np.testing.assert_array_equal(a.rgb, b.rgb)
    np.testing.assert_array_equal(a.depth, b.depth)
    rebuilt = build_scene(DEMO_SPEC)  # a fresh build paints the same textures
    np.testing.assert_array_equal(rebuilt.atlas, scene.atlas)
    c = Renderer(rebuilt, CAMERA).render([-0.5, 0.3, 1.4], q)
    np.testing.assert_array_equal(a.rgb, c.rgb)
    assert a.rgb.shape == (60, 80, 3) and a.rgb.dtype == np.uint8
    assert a.depth.shape == (60, 80) and a.depth.dtype == np.float32


def _pixel_ray_world(q_wc, u, v):
    ray_cam = np.array([(u - CAMERA.cx) / CAMERA.fx, (v - CAMERA.cy) / CAMERA.fy, 1.0])
    return quat_rotate(q_wc, ray_cam)


@pytest.mark.parametrize("origin, yaw, pitch, roll, pixel, plane, face_name", [
    # looking along +x at the +x wall (x = 3)
    ([0.0, 0.2, 1.5], 0.0, 0.0, 0.0, (50, 20), (0, 3.0), "wall_+x"),
    # rotated camera looking at the -y wall (y = -2.5), pitched and rolled
    ([-1.5, 0.5, 1.3], -math.pi / 2 - 0.3, 0.1, 0.08, (30, 12), (1, -2.5), "wall_-y"),
    # looking down at the table top (z = 0.75, x 0.7..1.7, y -1.5..-0.8)
    ([1.2, 0.0, 1.6], -math.pi / 2, 0.7, 0.0, (40, 30), (2, 0.75), "table_+z"),
    # the floor
    ([-1.0, 0.0, 1.5], 0.5, 0.8, -0.05, (20, 50), (2, 0.0), "floor"),
])
def test_a_surface_point_projects_where_the_pinhole_model_says(scene, renderer, albedo_renderer, origin, yaw,
                                                               pitch, roll, pixel, plane, face_name):
    q_wc = camera_quat(yaw, pitch, roll)
    u, v = pixel
    axis, coordinate = plane
    ray = _pixel_ray_world(q_wc, u, v)
    distance = (coordinate - origin[axis]) / ray[axis]
    point = np.asarray(origin) + distance * ray  # the 3D point on the surface seen at (u, v)
    # independent check through the inverse pose and the pinhole projection
    t_cw, q_cw = pose_inverse(np.asarray(origin, float), q_wc)
    point_cam = quat_rotate(q_cw, point) + t_cw
    pu, pv = CAMERA.project(point_cam)
    assert (pu, pv) == (pytest.approx(u, abs=1e-6), pytest.approx(v, abs=1e-6))

    result = renderer.render(origin, q_wc, return_face_ids=True)
    assert scene.faces[result.face_ids[v, u]].name == face_name
    # depth is the z distance along the optical axis, not the range along the ray
    assert result.depth[v, u] == pytest.approx(point_cam[2], abs=1e-4)
    ray_cam_norm = math.hypot((u - CAMERA.cx) / CAMERA.fx, (v - CAMERA.cy) / CAMERA.fy, 1.0)
    assert np.linalg.norm(point - origin) == pytest.approx(result.depth[v, u] * ray_cam_norm, abs=1e-4)
    albedo = albedo_renderer.render(origin, q_wc)
    expected = scene.albedo_at([scene.face_index(face_name)], point)[0]
    np.testing.assert_array_equal(albedo.rgb[v, u], expected)
    # shading only scales the colour of that surface
    shaded = result.rgb[v, u].astype(float)
    ratio = shaded / np.maximum(expected.astype(float), 1)
    assert np.all(ratio <= Renderer.AMBIENT + Renderer.DIFFUSE + 0.02)
    assert np.all(ratio[expected > 20] >= Renderer.AMBIENT - 0.02)


def test_depth_of_the_whole_image_matches_the_wall_plane(renderer):
    """Facing the +x wall squarely from 1.5 m above a clear floor band, every pixel that
    sees the wall has depth exactly (3 - x)."""
    result = renderer.render([0.5, -0.2, 2.2], camera_quat(0.0, -0.15, 0.0), return_face_ids=True)
    on_wall = result.face_ids == 1  # wall_+x is face axis 0, side 1
    assert on_wall.mean() > 0.3
    v, u = np.nonzero(on_wall)
    q = camera_quat(0.0, -0.15, 0.0)
    rays = np.stack([_pixel_ray_world(q, uu, vv) for uu, vv in zip(u[::37], v[::37])])
    expected = (3.0 - 0.5) / rays[:, 0]  # z-depth = ray parameter for rays with camera z = 1
    np.testing.assert_allclose(result.depth[v[::37], u[::37]], expected, rtol=1e-5)


def test_walls_have_distinct_colour_families(scene):
    means = {f.name: f.texture.reshape(-1, 3).mean(axis=0) for f in scene.faces[:6]}
    names = list(means)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert np.linalg.norm(means[a] - means[b]) > 25, (a, b)


def test_textures_are_not_periodic(scene):
    """A shifted copy of a wall never matches itself (no repeating tile)."""
    wall = scene.faces[scene.face_index("wall_-x")].texture.astype(float)
    row = wall[wall.shape[0] // 2]
    for shift in range(20, row.shape[0] // 2, 20):
        assert np.abs(row[shift:] - row[:-shift]).mean() > 3


def test_camera_outside_the_room_is_refused(renderer):
    with pytest.raises(ValueError, match="outside the room"):
        renderer.render([4.0, 0.0, 1.0], camera_quat(0.0))


def test_depth_to_millimetres():
    mm = depth_to_millimetres(np.array([[1.2345, 0.0, np.nan, 70.0]], np.float32))
    assert mm.dtype == np.uint16
    np.testing.assert_array_equal(mm, [[1234 if abs(1.2345 * 1000 - 1234) < 0.5 else 1235, 65535, 65535, 65535]])


def test_optical_frame_convention():
    """REP-103 optical frame: at zero attitude the camera looks along world +x, image
    right is world -y and image down is world -z."""
    R = quat_to_matrix(camera_quat(0.0))
    np.testing.assert_allclose(R[:, 2], [1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(R[:, 0], [0, -1, 0], atol=1e-12)
    np.testing.assert_allclose(R[:, 1], [0, 0, -1], atol=1e-12)
