"""Per-walk lighting (sim/lighting.py, the renderer's Lighting) and ``vizloc-synth
--lighting SEED``: the default lighting is the unlit-default image exactly, variants are
seeded and stay in their documented ranges, colour temperature moves the colours the
right way, and lighting changes the colour images of an output and nothing else."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from vizloc_ros.sim import synthetic as synth
from vizloc_ros.sim.catalog import get_scene
from vizloc_ros.sim.lighting import (AMBIENT_RANGE, DIFFUSE_RANGE, EXPOSURE_RANGE, KELVIN_RANGE,
                                     check_lighting_seed, kelvin_to_gain, lighting_metadata, lighting_variant)
from vizloc_ros.sim.render import Lighting, PinholeCamera, Renderer
from vizloc_ros.sim.trajectories import camera_poses, random_walk
from pinned_digests import rounded

CAMERA = PinholeCamera.from_fov(64, 48)
SMALL_ARGS = ["--frames", "3", "--train-walks", "1", "--size", "64x48", "--quiet"]


@pytest.fixture(scope="module")
def room():
    return get_scene("room:3000")


@pytest.fixture(scope="module")
def views(room):
    """A few camera poses of a walk through the room."""
    return camera_poses(random_walk(room, 6.0, seed=3), np.array([0.5, 2.0, 4.0]))


# --------------------------------------------------------------------------- the renderer's Lighting

@pytest.mark.parametrize("scene_name", ["demo", "room:3000"])
def test_the_default_lighting_renders_the_unlit_default_image(scene_name):
    """Lighting() and a Lighting that spells out the defaults (the scene's own light, as
    scene.json records it) render the image of no lighting at all, bit for bit."""
    scene = get_scene(scene_name)
    t, q = camera_poses(random_walk(scene, 4.0, seed=3), np.array([1.0, 3.0]))
    plain = Renderer(scene, CAMERA)
    spelled = lighting_metadata(None, scene)
    explicit = Lighting(position=tuple(spelled["position"]), ambient=spelled["ambient"], diffuse=spelled["diffuse"],
                        falloff=spelled["falloff"], exposure=spelled["exposure"],
                        white_balance=tuple(spelled["white_balance"]))
    assert not explicit.is_default()  # so it takes the lit path
    for lighting in (Lighting(), explicit):
        lit = Renderer(scene, CAMERA, lighting=lighting)
        for i in range(len(t)):
            np.testing.assert_array_equal(lit.render(t[i], q[i]).rgb, plain.render(t[i], q[i]).rgb)


def test_exposure_and_white_balance_act_on_the_colours_only(room, views):
    t, q = views
    base = Renderer(room, CAMERA).render(t[1], q[1])
    dark = Renderer(room, CAMERA, lighting=Lighting(exposure=0.5)).render(t[1], q[1])
    warm = Renderer(room, CAMERA, lighting=Lighting(white_balance=kelvin_to_gain(2700))).render(t[1], q[1])
    cool = Renderer(room, CAMERA, lighting=Lighting(white_balance=kelvin_to_gain(7500))).render(t[1], q[1])
    np.testing.assert_array_equal(dark.depth, base.depth)
    assert dark.rgb.astype(float).mean() < 0.6 * base.rgb.astype(float).mean()

    def red_over_blue(image):
        return image[..., 0].astype(float).mean() / max(image[..., 2].astype(float).mean(), 1.0)

    assert red_over_blue(warm.rgb) > red_over_blue(base.rgb) > red_over_blue(cool.rgb)


def test_a_variant_moves_the_light(room, views):
    t, q = views
    variant = lighting_variant(5, room)
    plain = Renderer(room, CAMERA).render(t[0], q[0])
    lit = Renderer(room, CAMERA, lighting=variant).render(t[0], q[0])
    np.testing.assert_array_equal(lit.depth, plain.depth)
    assert np.abs(lit.rgb.astype(int) - plain.rgb.astype(int)).mean() > 2.0


# --------------------------------------------------------------------------- seeded variants

def test_kelvin_to_gain():
    assert kelvin_to_gain(6500) == pytest.approx((1.0, 1.0, 1.0), abs=1e-9)
    warm, cool = kelvin_to_gain(2700), kelvin_to_gain(7500)
    assert warm[2] < cool[2] and warm[0] >= cool[0]
    assert warm[0] == 1.0 and cool[2] == 1.0  # normalised: the largest gain is 1
    blues = [kelvin_to_gain(k)[2] for k in range(2700, 6600, 300)]
    assert blues == sorted(blues)  # bluer as the temperature rises towards 6500 K
    assert all(0.0 < g <= 1.0 for k in (1500, 4000, 9000, 20000) for g in kelvin_to_gain(k))


def test_variants_are_seeded(room):
    assert lighting_variant(17, room) == lighting_variant(17, room)
    variants = {lighting_variant(seed, room) for seed in range(20)}
    assert len(variants) == 20
    assert lighting_variant(17, get_scene("room:3001", texel=0.25)) != lighting_variant(17, room)  # room-sized


def test_the_lighting_draws_never_change():
    """Pretraining lit its rooms with these draws: the same seed must give the same light."""
    scene = get_scene("room:1000", texel=0.25)  # only its size matters; nothing is rendered
    digest = hashlib.sha256()
    for seed in range(64):
        lit = lighting_variant(seed, scene)
        digest.update(repr(rounded([lit.position, lit.ambient, lit.diffuse, lit.falloff, lit.exposure,
                                     lit.white_balance])).encode())
    assert digest.hexdigest()[:16] == "a47de100b36bee8e"


@pytest.mark.parametrize("scene_name", ["demo", "room:3000", "room:3020", "room:3063"])
def test_variants_stay_within_their_documented_ranges(scene_name):
    scene = get_scene(scene_name, texel=0.25)
    lo, hi = scene.room_lo, scene.room_hi
    for seed in range(100):
        record = lighting_metadata(seed, scene)
        position = np.array(record["position"])
        assert np.all(position[:2] >= lo[:2] + 0.5) and np.all(position[:2] <= hi[:2] - 0.5)
        assert lo[2] + 0.6 * (hi[2] - lo[2]) <= position[2] <= hi[2] - 0.1
        assert AMBIENT_RANGE[0] <= record["ambient"] <= AMBIENT_RANGE[1]
        assert DIFFUSE_RANGE[0] <= record["diffuse"] <= DIFFUSE_RANGE[1]
        assert EXPOSURE_RANGE[0] <= record["exposure"] <= EXPOSURE_RANGE[1]
        assert KELVIN_RANGE[0] <= record["kelvin"] <= KELVIN_RANGE[1]
        assert record["white_balance"] == list(kelvin_to_gain(record["kelvin"]))
        variant = lighting_variant(seed, scene)
        assert record["position"] == list(variant.position) and record["exposure"] == variant.exposure


def test_lighting_metadata_of_the_scene_s_own_light(room):
    record = lighting_metadata(None, room)
    assert record["seed"] is None and record["source"] == "scene"
    assert record["position"] == list(room.spec.light) and record["kelvin"] == 6500.0
    assert (record["ambient"], record["diffuse"], record["falloff"], record["exposure"]) == (
        Renderer.AMBIENT, Renderer.DIFFUSE, Renderer.FALLOFF, 1.0)


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True, None])
def test_a_lighting_seed_is_a_non_negative_integer(bad):
    with pytest.raises(ValueError):
        check_lighting_seed(bad)
    assert check_lighting_seed(np.int64(4)) == 4


# --------------------------------------------------------------------------- vizloc-synth --lighting

@pytest.fixture(scope="module")
def lit_outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lighting")
    common = ["--scene", "room:3020", "--format", "both", *SMALL_ARGS]
    assert synth.main(["--out", str(root / "plain"), *common]) == 0
    assert synth.main(["--out", str(root / "lit"), "--lighting", "5", *common]) == 0
    return root / "plain", root / "lit"


def test_lighting_is_recorded_in_scene_json(lit_outputs):
    plain, lit = (json.loads((out / "scene.json").read_text()) for out in lit_outputs)
    assert plain["lighting"]["seed"] is None
    assert lit["lighting"] == lighting_metadata(5, get_scene("room:3020"))
    assert lit["lighting"]["seed"] == 5 and lit["lighting"]["source"] == "lighting_variant"
    assert {k: v for k, v in plain.items() if k != "lighting"} == {k: v for k, v in lit.items() if k != "lighting"}


def test_lighting_changes_the_colour_images_and_nothing_else(lit_outputs):
    plain, lit = lit_outputs
    files = sorted(p.relative_to(plain) for p in plain.rglob("*") if p.is_file() and p.name != "scene.json")
    assert files == sorted(p.relative_to(lit) for p in lit.rglob("*") if p.is_file() and p.name != "scene.json")
    colour = [f for f in files if f.name.endswith(".color.png")]
    assert len(colour) == 6
    for rel in files:
        if rel.suffix in (".txt", ".tum") or rel.name.endswith(".depth.png"):
            assert (plain / rel).read_bytes() == (lit / rel).read_bytes(), rel
    for rel in colour:
        a = np.asarray(Image.open(plain / rel), dtype=int)
        b = np.asarray(Image.open(lit / rel), dtype=int)
        assert np.abs(a - b).mean() > 2.0, rel


def test_worker_processes_render_under_the_output_s_lighting(lit_outputs, tmp_path):
    """--jobs N re-creates the renderer in each worker from the config: that path (run
    here in this process) must light the walk as the single-process path did."""
    _, lit = lit_outputs
    config = synth.SynthConfig(scene="room:3020", lighting_seed=5, width=64, height=48)
    spec = synth.demo_sequences("test", frames=3)[0]
    staging = tmp_path / "staging"
    (staging / "trajectories").mkdir(parents=True)
    assert synth._render_sequence_job(str(staging), spec, config, want_bag=False, want_7scenes=True) == 3
    frames = sorted((lit / spec.name).glob("*.color.png"))
    assert len(frames) == 3
    for frame in frames:
        assert (staging / spec.name / frame.name).read_bytes() == frame.read_bytes()


def test_cli_refuses_a_negative_lighting_seed(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        synth.main(["--out", str(tmp_path / "out"), "--lighting", "-2", *SMALL_ARGS])
    assert exit_info.value.code == 2 and "--lighting" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="lighting seed"):
        synth.generate(tmp_path / "out", synth.demo_sequences("test", 3),
                       synth.SynthConfig(width=40, height=30, lighting_seed=-1), progress=False)
    assert list(tmp_path.iterdir()) == []
