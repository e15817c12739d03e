"""Procedural rooms (sim/rooms.py, sim/catalog.py) and ``vizloc-synth --scene room:SEED``:
rooms are a pure function of their seed, stay within their documented bounds, leave room
to walk, keep the seed split honest, and go through the whole simulator (walks, TUM
placement, bags, 7-Scenes, scene.json). Geometry is checked on many seeds without
painting textures; only a few rooms are rendered, at tiny sizes."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from vizloc_ros.ros_io.bag_io import topic_message_counts
from vizloc_ros.sim import synthetic as synth
from vizloc_ros.sim.catalog import canonical_scene_name, describe_scene, get_scene, scene_spec
from vizloc_ros.sim.render import PinholeCamera, Renderer
from vizloc_ros.sim.rooms import SEED_USES, parse_room_name, room_extent, room_spec, seed_use
from vizloc_ros.sim.scene import build_scene
from vizloc_ros.sim.trajectories import BOX_MARGIN, WALL_MARGIN, camera_poses, random_walk
from pinned_digests import rounded

ROOT = Path(__file__).resolve().parents[1]
#: 200 rooms for the cheap geometric checks: every evaluation seed and 100 outside every range
MANY_SEEDS = list(SEED_USES["evaluation"]) + list(range(100))
WALLS = {"wall_-x", "wall_+x", "wall_-y", "wall_+y"}
SMALL = (64, 48)


def _spec_digest(seeds) -> str:
    digest = hashlib.sha256()
    for seed in seeds:
        s = room_spec(seed)
        digest.update(repr(rounded([s.name, s.room_lo, s.room_hi, s.light, s.wall_hues, s.doors, s.windows,
                                     s.texture_seed, [[b.name, b.lo, b.hi, b.hue] for b in s.boxes]])).encode())
    return digest.hexdigest()[:16]


def _coarse(seed: int):
    """The room's geometry with coarse textures: walks and clearances without the painting time."""
    return get_scene(f"room:{seed}", texel=0.25)


# --------------------------------------------------------------------------- room_spec

def test_a_room_is_a_pure_function_of_its_seed():
    assert room_spec(3007) == room_spec(3007)
    specs = [room_spec(seed) for seed in range(3000, 3010)]
    assert len({(s.room_hi, s.texture_seed) for s in specs}) == len(specs)
    assert len({tuple((b.lo, b.hi) for b in s.boxes) for s in specs}) == len(specs)


def test_the_pretraining_and_validation_rooms_never_change():
    """The generic encoder was pretrained on these rooms and its checkpoint chosen on the
    validation ones: a changed draw in room_spec would silently change what "unseen" means
    (values rounded to 1e-9 m, so only a real change of the draws moves the digest)."""
    assert _spec_digest(SEED_USES["pretrain"]) == "cda46d7621add69a"
    assert _spec_digest(SEED_USES["validation"]) == "168e26b2a6889e1d"


@pytest.mark.parametrize("seed", MANY_SEEDS)
def test_rooms_stay_within_their_documented_bounds(seed):
    spec = room_spec(seed)
    lo, hi = np.array(spec.room_lo), np.array(spec.room_hi)
    size = hi - lo
    assert np.all((size[:2] >= 4.0) & (size[:2] <= 9.0)) and 2.5 <= size[2] <= 3.4
    np.testing.assert_allclose(lo[:2], -hi[:2])  # centred on the map origin
    assert lo[2] == 0.0 and room_extent(spec) == pytest.approx(size[:2].max())
    assert spec.name == f"room:{seed}" and parse_room_name(spec.name) == seed
    # furniture stands on the floor inside the room, with a passage between any two pieces
    assert len(spec.boxes) >= 1 and len({b.name for b in spec.boxes}) == len(spec.boxes)
    for box in spec.boxes:
        blo, bhi = np.array(box.lo), np.array(box.hi)
        assert blo[2] == 0.0 and np.all(blo < bhi) and bhi[2] <= hi[2] + 1e-9
        assert np.all(blo >= lo - 1e-9) and np.all(bhi <= hi + 1e-9)
        assert 0.0 <= box.hue < 1.0
    for i, a in enumerate(spec.boxes):
        for b in spec.boxes[i + 1:]:
            gap = np.maximum(np.array(b.lo[:2]) - a.hi[:2], np.array(a.lo[:2]) - b.hi[:2]).max()
            assert gap >= 0.5 - 1e-9, (a.name, b.name)
    # at least half the floor (less a 0.6 m wall margin) is 0.6 m from any furniture
    xs, ys = np.meshgrid(np.linspace(lo[0] + 0.6, hi[0] - 0.6, 50), np.linspace(lo[1] + 0.6, hi[1] - 0.6, 50))
    free = np.ones(xs.shape, bool)
    for box in spec.boxes:
        free &= ~((xs > box.lo[0] - 0.6) & (xs < box.hi[0] + 0.6) & (ys > box.lo[1] - 0.6) & (ys < box.hi[1] + 0.6))
    assert free.mean() >= 0.45  # 0.5 on the generator's coarser grid
    # the lamp hangs inside the room under the ceiling; walls are told apart
    assert np.all(np.array(spec.light) > lo) and np.all(np.array(spec.light) < hi)
    assert 1 <= len(spec.doors) <= 2 and len(spec.windows) <= 2
    assert set(spec.doors) <= WALLS and set(spec.windows) <= WALLS
    assert len(spec.wall_hues) == 4 and len(set(spec.wall_hues)) == 4
    assert all(0.0 <= h < 1.0 for h in spec.wall_hues)


@pytest.mark.parametrize("seed", [3000, 3001, 3017, 3042, 3055, 3063, 3080, 3099])
def test_a_seeded_random_walk_fits_every_room(seed):
    scene = _coarse(seed)
    trajectory = random_walk(scene, 15.0, seed=101)
    xyz = trajectory.position(trajectory.sample_times(30.0))
    assert np.all(scene.clearance(xyz[:, :2]) >= min(WALL_MARGIN, BOX_MARGIN) - 0.2)
    assert np.all((xyz[:, 2] > 0.8) & (xyz[:, 2] < 2.0))


def test_extreme_rooms_are_in_the_evaluation_range():
    """The evaluation seeds span small and large rooms, so benchmarks see both."""
    extents = [room_extent(room_spec(seed)) for seed in SEED_USES["evaluation"]]
    assert min(extents) < 5.5 and max(extents) > 8.0


# --------------------------------------------------------------------------- names and seed uses

def test_seed_ranges_are_disjoint_and_the_demo_is_never_a_room():
    ranges = {use: set(seeds) for use, seeds in SEED_USES.items()}
    assert set(ranges) == {"pretrain", "validation", "evaluation"}
    uses = list(ranges)
    for i, a in enumerate(uses):
        for b in uses[i + 1:]:
            assert not ranges[a] & ranges[b], (a, b)
    assert (min(ranges["pretrain"]), max(ranges["pretrain"])) == (1000, 1063)
    assert (min(ranges["validation"]), max(ranges["validation"])) == (2000, 2003)
    assert (min(ranges["evaluation"]), max(ranges["evaluation"])) == (3000, 3099)
    assert seed_use(1031) == "pretrain" and seed_use(2003) == "validation" and seed_use(3099) == "evaluation"
    assert seed_use(0) is None and seed_use(1064) is None and seed_use(3100) is None
    assert parse_room_name("demo") is None
    demo = describe_scene(get_scene("demo"))
    assert demo["seed"] is None and demo["seed_use"] is None and demo["name"] == "demo"


def test_the_seed_table_in_the_docs_is_the_code_s():
    doc = (ROOT / "docs" / "SYNTHETIC.md").read_text(encoding="utf-8")
    for use, seeds in SEED_USES.items():
        assert f"| {use} | {seeds.start}-{seeds.stop - 1} |" in doc, use


@pytest.mark.parametrize("name, canonical", [("demo", "demo"), ("room:3000", "room:3000"), ("room:007", "room:7"),
                                             ("room:0", "room:0")])
def test_scene_names(name, canonical):
    assert canonical_scene_name(name) == canonical
    assert scene_spec(name).name == canonical


@pytest.mark.parametrize("name", ["kitchen", "room:abc", "room:-1", "room:", "room:1234567890", "ROOM:3",
                                  "room: 3", "demo "])
def test_bad_scene_names_are_refused_with_one_line(name):
    with pytest.raises(ValueError) as error:
        canonical_scene_name(name)
    assert "\n" not in str(error.value) and repr(name) in str(error.value)
    with pytest.raises(KeyError):
        scene_spec(name)
    with pytest.raises(ValueError):  # the library entry refuses it too, before building anything
        synth.generate(Path("/nonexistent/never_written"), synth.demo_sequences("test", 3),
                       synth.SynthConfig(scene=name), progress=False)


# --------------------------------------------------------------------------- rendering

def test_room_rendering_is_deterministic_and_rooms_differ():
    camera = PinholeCamera.from_fov(*SMALL)
    scene = get_scene("room:3000")
    trajectory = random_walk(scene, 4.0, seed=5)
    t, q = camera_poses(trajectory, np.array([1.0]))

    def frame_digest(renderer):
        result = renderer.render(t[0], q[0])
        return hashlib.sha256(result.rgb.tobytes() + result.depth.tobytes()).hexdigest()

    first = frame_digest(Renderer(scene, camera))
    assert frame_digest(Renderer(scene, camera)) == first
    rebuilt = build_scene(room_spec(3000))  # a fresh build paints the same textures
    np.testing.assert_array_equal(rebuilt.atlas, scene.atlas)
    assert frame_digest(Renderer(rebuilt, camera)) == first
    other = get_scene("room:3001")
    assert not np.array_equal(other.atlas[:1000], scene.atlas[:1000])


def test_the_demo_room_is_still_the_demo_room():
    """The demo's textures (what the shipped demo weights learnt) did not move when the scene
    builder learnt procedural rooms; test_render / test_synthetic check its geometry."""
    demo = get_scene("demo")
    assert hashlib.sha256(demo.atlas.tobytes()).hexdigest()[:16] == "d25e127ef295ce8d"
    assert demo.doors == ("wall_-x", "wall_+y") and demo.windows == ("wall_+x", "wall_-y")


# --------------------------------------------------------------------------- vizloc-synth --scene room:SEED

@pytest.fixture(scope="module")
def room_output(tmp_path_factory):
    out = tmp_path_factory.mktemp("rooms") / "room3000"
    assert synth.main(["--scene", "room:3000", "--out", str(out), "--frames", "4", "--train-walks", "1",
                       "--size", f"{SMALL[0]}x{SMALL[1]}", "--quiet"]) == 0
    return out


def test_a_room_output_has_the_walks_bags_and_7scenes_folders(room_output):
    assert sorted(p.name for p in room_output.iterdir()) == [
        "TestSplit.txt", "TrainSplit.txt", "bags", "scene.json", "seq-01", "seq-05", "trajectories"]
    assert (room_output / "TrainSplit.txt").read_text().split() == ["sequence1"]
    assert (room_output / "TestSplit.txt").read_text().split() == ["sequence5"]
    assert len(list((room_output / "seq-05").glob("frame-*.color.png"))) == 4
    counts = topic_message_counts(room_output / "bags" / "seq-01")
    assert counts[synth.TOPIC_IMAGE] == 4 and counts[synth.TOPIC_TF_STATIC] == 1
    assert counts[synth.TOPIC_IMU] > counts[synth.TOPIC_ODOM] > counts[synth.TOPIC_IMAGE]


def test_scene_json_describes_the_room(room_output):
    meta = json.loads((room_output / "scene.json").read_text())
    spec = room_spec(3000)
    assert meta["scene"] == "room:3000" and meta["scene_seed"] == 3000 and meta["seed_use"] == "evaluation"
    assert meta["room"]["lo"] == list(spec.room_lo) and meta["room"]["hi"] == list(spec.room_hi)
    assert meta["room"]["largest_side_m"] == pytest.approx(room_extent(spec))
    assert [b["name"] for b in meta["boxes"]] == [b.name for b in spec.boxes]
    details = meta["scene_details"]
    assert details["doors"] == list(spec.doors) and details["windows"] == list(spec.windows)
    assert details["light"] == list(spec.light) and details["texture_seed"] == spec.texture_seed
    lighting = meta["lighting"]
    assert lighting["seed"] is None and lighting["position"] == list(spec.light) and lighting["kelvin"] == 6500.0
    assert [s["split"] for s in meta["sequences"]] == ["train", "test"]
    assert [s["seed"] for s in meta["sequences"]] == [s.seed for s in synth.demo_sequences("all", 4, 0, 1)]


def test_a_real_recording_is_fitted_into_a_room(tmp_path, capsys):
    tum = tmp_path / "loop.tum"
    times = np.linspace(0.0, 3.0, 61)
    angle = times * 2.0
    rows = [f"{t:.3f} {6 * np.cos(a):.4f} {6 * np.sin(a):.4f} 1.3 0 0 0 1" for t, a in zip(times, angle)]
    tum.write_text("\n".join(rows) + "\n")
    out = tmp_path / "tum_room"
    assert synth.main(["--scene", "room:3010", "--out", str(out), "--trajectory", str(tum), "--frames", "3",
                       "--camera-hz", "2", "--size", "40x30", "--format", "7scenes", "--quiet"]) == 0
    assert "seq-01 <- loop.tum" in capsys.readouterr().err
    meta = json.loads((out / "scene.json").read_text())
    placement = meta["sequences"][0]["tum_placement"]
    assert meta["scene"] == "room:3010" and placement["scale"] < 1.0  # a 12 m loop shrunk into the room
    scene = get_scene("room:3010")
    for pose_file in sorted((out / "seq-01").glob("*.pose.txt")):
        position = np.loadtxt(pose_file)[:3, 3]
        assert np.all(position > scene.room_lo) and np.all(position < scene.room_hi)


@pytest.mark.parametrize("name", ["kitchen", "room:abc", "room:-1"])
def test_cli_refuses_a_bad_scene_with_one_line_and_writes_nothing(tmp_path, capsys, name):
    out = tmp_path / "out"
    assert synth.main(["--scene", name, "--out", str(out), "--frames", "3", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("vizloc-synth: error: --scene:") and name in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, use, warned", [("room:1000", "pretrain", True), ("room:2001", "validation", True),
                                               ("room:3005", "evaluation", False), ("demo", None, False)])
def test_rendering_a_reserved_training_room_says_so(tmp_path, name, use, warned):
    """Evaluating on a room the encoder was trained or validated on would flatter it: the
    log says so, while evaluation rooms and the demo room render without that line."""
    lines = []
    config = synth.SynthConfig(scene=name, width=32, height=24)
    synth.generate(tmp_path / "out", synth.demo_sequences("test", 2), config, fmt="bag", progress=False,
                   log=lines.append)
    reserved = [line for line in lines if "reserved" in line]
    if warned:
        assert len(reserved) == 1 and f"{name} is reserved for the generic encoder's {use}" in reserved[0]
    else:
        assert reserved == []
    assert json.loads((tmp_path / "out" / "scene.json").read_text())["seed_use"] == use
