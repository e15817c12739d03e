"""`vizloc-synth`: the synthetic world rendered into rosbag2 bags and a 7-Scenes folder.

Why a synthetic world: tests, demos and the launch file need images with exact ground
truth, drifting odometry and an IMU that all agree, without downloading anything. This
module only orchestrates: the room and its textures (``scene.py``), ray casting
(``render.py``), motion (``trajectories.py``), sensors (``sensors.py``), bag writing
(``bag_io.py``) and the 7-Scenes layout (``sevenscenes_writer.py``).

Output of :func:`generate` under ``out_dir`` (written under a hidden temporary name and
renamed when complete, so there is never a half-written output)::

    scene.json                       scene (name, room seed and its use, room, furniture, doors,
                                     windows, light), lighting, camera, frames, extrinsic, rates,
                                     sequences (a TUM-driven one with ``tum_placement``: how it
                                     was fitted into the room)
    trajectories/seq-NN_ground_truth.tum   base_link in map (TUM: x y z qx qy qz qw)
    bags/seq-NN/                     rosbag2, MCAP   (format bag or both)
    seq-NN/, TrainSplit.txt, TestSplit.txt    7-Scenes (format 7scenes or both)

Topics of each bag (stamps are simulated time from :data:`EPOCH_NS`; bag log time =
header stamp): /camera/image_raw (Image rgb8, ``camera_optical_frame``),
/camera/camera_info, /odom (Odometry ``odom`` -> ``base_link``, drifting, honest
covariance), /tf (the same odom -> base_link), /imu/data (Imu in ``base_link``, no
orientation), /ground_truth/pose (PoseStamped of base_link in ``map``), /tf_static
(base_link -> camera_optical_frame, transient local).

Scenes (``--scene``): ``demo``, the hand-made room, or ``room:SEED``, a procedural room
(:mod:`vizloc_ros.sim.rooms`; which seeds serve pretraining, validation and evaluation is
in ``docs/SYNTHETIC.md``). Every scene gets the same seeded walks: sequences 1-4 are the
training walks, 5 is the held-out test walk (different seeds, so different paths).
``--lighting SEED`` renders every walk of the output under
:func:`vizloc_ros.sim.lighting.lighting_variant` (default: the scene's own light), so a map
and its queries can be rendered into two outputs under two lightings.
:func:`cached_demo_bag` builds the demo's test bag once under
``$XDG_CACHE_HOME/vizloc_ros/demo`` (default ``~/.cache``) for the replay's ``--demo`` mode
and the launch file.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import re
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vizloc_ros.cli_args import positive
from vizloc_ros.files import OutputBusy, check_not_a_link, exit_with_parent, staged
from vizloc_ros.ros_io import messages
from vizloc_ros.ros_io.bag_io import BagWriter
from vizloc_ros.ros_io.tum import read_tum, write_tum
from vizloc_ros.sim.render import PinholeCamera, Renderer
from vizloc_ros.sim.catalog import canonical_scene_name, describe_scene, get_scene, scene_names_help
from vizloc_ros.sim.lighting import check_lighting_seed, lighting_metadata, lighting_variant
from vizloc_ros.sim.rooms import SEED_USES
from vizloc_ros.sim.scene import Scene
from vizloc_ros.sim.sensors import (ImuNoise, ImuSamples, OdometrySamples, VoNoise, simulate_imu,
                                    simulate_visual_odometry)
from vizloc_ros.sim.sevenscenes_writer import sequence_dir_name, write_frame, write_splits
from vizloc_ros.sim.trajectories import (CAMERA_IN_BASE_Q, CAMERA_IN_BASE_T, Trajectory, TumPlacement,
                                         camera_poses, place_tum_trajectory, random_walk)

LOG = logging.getLogger("vizloc-synth")

#: bump when anything changes what the generator outputs (invalidates the demo cache)
GENERATOR_VERSION = 1
#: simulated time of the first message: 2023-11-14T22:13:20Z
EPOCH_NS = 1_700_000_000 * 1_000_000_000

FRAME_MAP = "map"
FRAME_ODOM = "odom"
FRAME_BASE = "base_link"
FRAME_CAMERA = "camera_optical_frame"
FRAME_IMU = FRAME_BASE  # the IMU sits at the base origin, axes aligned

TOPIC_IMAGE = "/camera/image_raw"
TOPIC_CAMERA_INFO = "/camera/camera_info"
TOPIC_ODOM = "/odom"
TOPIC_TF = "/tf"
TOPIC_IMU = "/imu/data"
TOPIC_GROUND_TRUTH = "/ground_truth/pose"
TOPIC_TF_STATIC = "/tf_static"

BAG_TOPICS = {
    TOPIC_IMAGE: "sensor_msgs/msg/Image",
    TOPIC_CAMERA_INFO: "sensor_msgs/msg/CameraInfo",
    TOPIC_ODOM: "nav_msgs/msg/Odometry",
    TOPIC_TF: "tf2_msgs/msg/TFMessage",
    TOPIC_IMU: "sensor_msgs/msg/Imu",
    TOPIC_GROUND_TRUTH: "geometry_msgs/msg/PoseStamped",
    TOPIC_TF_STATIC: "tf2_msgs/msg/TFMessage",
}

FORMATS = ("bag", "7scenes", "both")
SPLITS = ("train", "test", "all")


@dataclass(frozen=True)
class SynthConfig:
    """Everything but the sequences: scene, lighting, camera, sensor rates and noise."""

    scene: str = "demo"  # "demo" or "room:SEED" (vizloc_ros.sim.catalog)
    width: int = 320
    height: int = 240
    focal: float | None = None  # pixels; None: 60 degree horizontal field of view
    camera_hz: float = 15.0
    odom_hz: float = 30.0
    imu_hz: float = 200.0
    ground_truth_hz: float = 30.0
    epoch_ns: int = EPOCH_NS
    vo_noise: VoNoise = field(default_factory=VoNoise)
    imu_noise: ImuNoise = field(default_factory=ImuNoise)
    #: every walk lit by lighting_variant(lighting_seed, scene); None: the scene's own light
    lighting_seed: int | None = None

    def camera(self) -> PinholeCamera:
        return PinholeCamera.from_fov(self.width, self.height, focal=self.focal)

    def renderer(self, scene: Scene) -> Renderer:
        """The renderer of every frame of this output: this camera, this lighting."""
        lighting = None if self.lighting_seed is None else lighting_variant(self.lighting_seed, scene)
        return Renderer(scene, self.camera(), lighting=lighting)


@dataclass(frozen=True)
class SequenceSpec:
    """One recording: its number (seq-NN), split, seed and length; a TUM file drives it
    instead of a random walk when ``tum_file`` is set (never shrunk to fit the room when
    ``keep_scale``)."""

    number: int
    split: str
    seed: int
    frames: int
    tum_file: str | None = None
    keep_scale: bool = False

    @property
    def name(self) -> str:
        return sequence_dir_name(self.number)


def demo_sequences(split: str = "all", frames: int = 300, seed: int = 0,
                   train_walks: int = 4) -> list[SequenceSpec]:
    """The seeded walks of any scene (the demo's and a procedural room's alike):
    ``train_walks`` training walks (seq-01..04, then seq-06 onwards) and 1 test walk
    (seq-05). More walks cover more of the room; the first four and the test walk do not
    change with ``train_walks``. The walk seeds do not depend on the scene: the room
    shapes each path."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    if train_walks < 1:
        raise ValueError(f"train_walks must be >= 1, not {train_walks}")
    base = 1000 * int(seed)
    numbers = [n for n in range(1, train_walks + 2) if n != 5][:train_walks]
    train = [SequenceSpec(n, "train", base + n, frames) for n in numbers]
    test = [SequenceSpec(5, "test", base + 101, frames)]
    return {"train": train, "test": test, "all": train + test}[split]


@dataclass
class SimulatedSequence:
    """All motion and sensor data of one sequence, before rendering."""

    spec: SequenceSpec
    trajectory: Trajectory
    frame_times: np.ndarray  # seconds from the sequence start
    camera_t: np.ndarray  # (F, 3) camera-to-world
    camera_q: np.ndarray  # (F, 4) wxyz
    odom: OdometrySamples
    imu: ImuSamples
    ground_truth_times: np.ndarray
    ground_truth_t: np.ndarray  # base_link in map
    ground_truth_q: np.ndarray
    placement: TumPlacement | None = None  # how a TUM recording was fitted into the room


def simulate_sequence(spec: SequenceSpec, config: SynthConfig, scene: Scene) -> SimulatedSequence:
    """Motion, odometry and IMU of one sequence (cheap; rendering comes later)."""
    if spec.frames < 2:
        raise ValueError(f"a sequence needs at least 2 frames, got {spec.frames}")
    duration = (spec.frames - 1) / config.camera_hz
    if spec.tum_file is not None:
        try:
            stamps, t, q = read_tum(spec.tum_file)
        except UnicodeDecodeError as exc:  # read_tum's own errors name the file already
            raise ValueError(f"{spec.tum_file}: not a TUM text file ({exc.reason} at byte {exc.start})") from None
        # a little extra so the smoothed spline still covers the last frame
        try:
            trajectory, placement = place_tum_trajectory(scene, stamps, t, q, duration=duration + 0.25,
                                                         keep_scale=spec.keep_scale)
        except ValueError as exc:
            raise ValueError(f"{Path(spec.tum_file).name}: {exc}") from None
    else:
        trajectory, placement = random_walk(scene, duration, seed=spec.seed), None
    frame_times = np.arange(spec.frames) / config.camera_hz
    camera_t, camera_q = camera_poses(trajectory, frame_times)
    odom = simulate_visual_odometry(trajectory, config.odom_hz, config.vo_noise, seed=spec.seed * 10 + 1)
    imu = simulate_imu(trajectory, config.imu_hz, config.imu_noise, seed=spec.seed * 10 + 2)
    gt_times = trajectory.sample_times(config.ground_truth_hz)
    gt_t, gt_q = trajectory.pose(gt_times)
    return SimulatedSequence(spec, trajectory, frame_times, camera_t, camera_q, odom, imu, gt_times, gt_t, gt_q,
                             placement)


# --------------------------------------------------------------------------- bag

class _BagSink:
    """Writes one sequence's bag; images arrive from the render loop, the rest is
    interleaved by stamp around them."""

    def __init__(self, path: Path, seq: SimulatedSequence, config: SynthConfig):
        self.seq = seq
        self.config = config
        self.types = messages.rosbags_types()
        self.writer = BagWriter(path)
        self.writer.open()
        for topic, msgtype in BAG_TOPICS.items():
            self.writer.add_topic(topic, msgtype, latched=(topic == TOPIC_TF_STATIC))
        self.camera = config.camera()
        # (stamp_ns, order, kind, index): everything but images, sorted by stamp
        to_ns = lambda times: config.epoch_ns + np.round(np.asarray(times) * 1e9).astype(np.int64)  # noqa: E731
        events = [(config.epoch_ns, 0, "tf_static", 0)]
        events += [(int(ns), 2, "odom", i) for i, ns in enumerate(to_ns(seq.odom.times))]
        events += [(int(ns), 3, "imu", i) for i, ns in enumerate(to_ns(seq.imu.times))]
        events += [(int(ns), 4, "gt", i) for i, ns in enumerate(to_ns(seq.ground_truth_times))]
        events.sort()
        self.events = events
        self.next_event = 0
        self.frame_ns = to_ns(seq.frame_times)

    def _time(self, ns: int):
        return messages.time_from_ns(self.types, ns)

    def _flush_until(self, ns: int) -> None:
        while self.next_event < len(self.events) and self.events[self.next_event][0] <= ns:
            stamp, _, kind, i = self.events[self.next_event]
            self._write_event(stamp, kind, i)
            self.next_event += 1

    def _write_event(self, ns: int, kind: str, i: int) -> None:
        types, seq, time = self.types, self.seq, self._time(ns)
        if kind == "tf_static":
            tf = messages.make_transform_stamped(types, time, FRAME_BASE, FRAME_CAMERA,
                                                 CAMERA_IN_BASE_T, CAMERA_IN_BASE_Q)
            self.writer.write(TOPIC_TF_STATIC, ns, messages.make_tf_message(types, [tf]))
        elif kind == "odom":
            odom = seq.odom
            self.writer.write(TOPIC_ODOM, ns, messages.make_odometry(
                types, time, FRAME_ODOM, FRAME_BASE, odom.t[i], odom.q[i], odom.pose_cov[i],
                linear=odom.linear[i], angular=odom.angular[i], twist_cov=odom.twist_cov[i]))
            tf = messages.make_transform_stamped(types, time, FRAME_ODOM, FRAME_BASE, odom.t[i], odom.q[i])
            self.writer.write(TOPIC_TF, ns, messages.make_tf_message(types, [tf]))
        elif kind == "imu":
            imu = seq.imu
            self.writer.write(TOPIC_IMU, ns, messages.make_imu(
                types, time, FRAME_IMU, imu.gyro[i], imu.accel[i], imu.gyro_cov, imu.accel_cov))
        elif kind == "gt":
            self.writer.write(TOPIC_GROUND_TRUTH, ns, messages.make_pose_stamped(
                types, time, FRAME_MAP, seq.ground_truth_t[i], seq.ground_truth_q[i]))

    def add_frame(self, index: int, rgb: np.ndarray) -> None:
        ns = int(self.frame_ns[index])
        self._flush_until(ns)
        time = self._time(ns)
        cam = self.camera
        self.writer.write(TOPIC_IMAGE, ns, messages.make_image(self.types, time, FRAME_CAMERA, rgb, "rgb8"))
        self.writer.write(TOPIC_CAMERA_INFO, ns, messages.make_camera_info(
            self.types, time, FRAME_CAMERA, cam.width, cam.height, cam.fx, cam.fy, cam.cx, cam.cy))

    def close(self) -> None:
        self._flush_until(np.iinfo(np.int64).max)
        self.writer.close()

    def abort(self) -> None:
        self.writer.abort()


# --------------------------------------------------------------------------- generation

def _scene_metadata(config: SynthConfig, scene: Scene, sims: list[SimulatedSequence], fmt: str) -> dict:
    cam = config.camera()
    description = describe_scene(scene)
    return {
        "generator": "vizloc_ros.sim.synthetic",
        "generator_version": GENERATOR_VERSION,
        "scene": scene.spec.name,
        "scene_seed": description["seed"],
        "seed_use": description["seed_use"],
        "format": fmt,
        "room": description["room"],
        "boxes": description["boxes"],
        "scene_details": {key: description[key] for key in ("doors", "windows", "wall_hues", "light",
                                                             "texture_seed", "texel_m")},
        "lighting": lighting_metadata(config.lighting_seed, scene),
        "camera": {"width": cam.width, "height": cam.height, "fx": cam.fx, "fy": cam.fy,
                   "cx": cam.cx, "cy": cam.cy, "rate_hz": config.camera_hz,
                   "model": "pinhole, no distortion, REP-103 optical frame (z forward, x right, y down)"},
        "frames": {"map": FRAME_MAP, "odom": FRAME_ODOM, "base": FRAME_BASE, "camera": FRAME_CAMERA,
                   "imu": FRAME_IMU},
        "base_to_camera": {"t": CAMERA_IN_BASE_T.tolist(), "q_wxyz": CAMERA_IN_BASE_Q.tolist()},
        "rates_hz": {"camera": config.camera_hz, "odom": config.odom_hz, "imu": config.imu_hz,
                     "ground_truth": config.ground_truth_hz},
        "epoch_ns": config.epoch_ns,
        "topics": BAG_TOPICS,
        "pose_txt": "4x4 camera-to-world: camera_optical_frame in map",
        "depth_png": "uint16 millimetres along the optical axis (z), 65535 = invalid",
        "vo_noise": asdict(config.vo_noise),
        "imu_noise": asdict(config.imu_noise),
        "sequences": [{
            "name": sim.spec.name, "number": sim.spec.number, "split": sim.spec.split,
            "seed": sim.spec.seed, "frames": sim.spec.frames,
            "source": f"tum:{Path(sim.spec.tum_file).name}" if sim.spec.tum_file else "random_walk",
            "duration_s": float(sim.frame_times[-1]),
            "map_T_odom": {"t": sim.odom.map_T_odom[0].tolist(), "q_wxyz": sim.odom.map_T_odom[1].tolist()},
            **({"tum_placement": sim.placement.metadata()} if sim.placement is not None else {}),
        } for sim in sims],
    }


def _progress(total: int, enabled: bool, desc: str):
    return tqdm(total=total, unit="frame", desc=desc, disable=not enabled, dynamic_ncols=True)


def _render_sequence(staging: Path, sim: SimulatedSequence, config: SynthConfig, renderer: Renderer,
                     want_bag: bool, want_7scenes: bool, on_frame=None) -> None:
    """Render one sequence into ``staging``: its TUM ground truth, bag and/or 7-Scenes folder."""
    name = sim.spec.name
    write_tum(staging / "trajectories" / f"{name}_ground_truth.tum",
              sim.ground_truth_times + config.epoch_ns * 1e-9, sim.ground_truth_t, sim.ground_truth_q)
    bag = _BagSink(staging / "bags" / name, sim, config) if want_bag else None
    seq_dir = staging / name
    if want_7scenes:
        seq_dir.mkdir()
    try:
        for index in range(sim.spec.frames):
            result = renderer.render(sim.camera_t[index], sim.camera_q[index])
            if bag is not None:
                bag.add_frame(index, result.rgb)
            if want_7scenes:
                write_frame(seq_dir, index, result.rgb, result.depth,
                            sim.camera_t[index], sim.camera_q[index])
            if on_frame is not None:
                on_frame()
    except BaseException:
        if bag is not None:
            bag.abort()
        raise
    if bag is not None:
        bag.close()


def _render_sequence_job(staging: str, spec: SequenceSpec, config: SynthConfig,
                         want_bag: bool, want_7scenes: bool) -> int:
    """Worker-process entry of ``jobs > 1``: re-simulates its sequence (deterministic and
    cheap, so nothing large crosses the process boundary) and renders it."""
    scene = get_scene(config.scene)
    sim = simulate_sequence(spec, config, scene)
    _render_sequence(Path(staging), sim, config, config.renderer(scene), want_bag, want_7scenes)
    return spec.frames


def generate(out_dir, sequences: list[SequenceSpec], config: SynthConfig = SynthConfig(),
             fmt: str = "both", overwrite: bool = False, progress: bool = True, jobs: int = 1,
             log=LOG.info) -> Path:
    """Render ``sequences`` into ``out_dir`` (bags and/or 7-Scenes folders); returns it.

    ``log`` gets one line per TUM-driven sequence saying how the recording was fitted
    into the room (scale, rotation, offset; also written into ``scene.json``), so that
    nobody evaluates a shrunk walk unknowingly, and one line when the room is a
    pretraining or validation room, so that nobody evaluates on a room a network has seen.

    ``jobs > 1`` renders that many sequences at once in worker processes (the output is
    the same bytes as with one job: every sequence has its own seeds). Raises
    ``FileExistsError`` if ``out_dir`` exists and ``overwrite`` is false, ``ValueError``
    for an unknown scene name or a bad lighting seed.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
    if not sequences:
        raise ValueError("no sequences to generate")
    if len({s.number for s in sequences}) != len(sequences):
        raise ValueError("sequence numbers must be unique")
    if int(jobs) < 1:
        raise ValueError(f"jobs must be >= 1, not {jobs}")
    canonical_scene_name(config.scene)  # a clear ValueError before anything is built
    if config.lighting_seed is not None:
        check_lighting_seed(config.lighting_seed)
    out_dir = Path(out_dir)
    _check_output(out_dir, overwrite)
    scene = get_scene(config.scene)
    use = describe_scene(scene)["seed_use"]
    if use in ("pretrain", "validation"):  # evaluating there would measure on rooms a network has seen
        evaluation = SEED_USES["evaluation"]
        log(f"{scene.spec.name} is reserved for the generic encoder's {use} (docs/SYNTHETIC.md); "
            f"evaluate on the evaluation rooms room:{evaluation.start}-{evaluation.stop - 1}")
    sims = [simulate_sequence(spec, config, scene) for spec in sequences]  # fail early, before rendering
    for sim in sims:
        if sim.placement is not None:
            log(f"{sim.spec.name} <- {Path(sim.spec.tum_file).name}: {sim.placement.describe()}")
    return _write_output(out_dir, sims, config, scene, fmt, overwrite, progress, int(jobs))


def write_simulated(out_dir, sims: list[SimulatedSequence], config: SynthConfig = SynthConfig(),
                    fmt: str = "bag", overwrite: bool = False, progress: bool = True,
                    metadata: dict | None = None) -> Path:
    """Render sequences simulated (and perhaps edited, e.g. :mod:`vizloc_ros.sim.kidnap`)
    by the caller into ``out_dir``, as :func:`generate` renders its own; ``metadata`` is
    added to ``scene.json`` (say there how the sequences were edited)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
    if not sims:
        raise ValueError("no sequences to render")
    out_dir = Path(out_dir)
    _check_output(out_dir, overwrite)
    return _write_output(out_dir, sims, config, get_scene(config.scene), fmt, overwrite, progress, 1, metadata)


def _write_output(out_dir: Path, sims: list[SimulatedSequence], config: SynthConfig, scene: Scene, fmt: str,
                  overwrite: bool, progress: bool, jobs: int, metadata: dict | None = None) -> Path:
    sequences = [sim.spec for sim in sims]
    # built under .OUT.partial-PID (locked while this run lives; a dead run's is swept, a
    # live one's refused), moved into place only if nothing else took OUT meanwhile
    with staged(out_dir, folder=True, replaceable=_is_synth_output if overwrite else None,
                what="vizloc-synth output") as staging:
        want_bag, want_7scenes = fmt in ("bag", "both"), fmt in ("7scenes", "both")
        (staging / "trajectories").mkdir()
        if want_bag:
            (staging / "bags").mkdir()
        with _progress(sum(s.frames for s in sequences), progress, "vizloc-synth") as bar:
            if int(jobs) == 1 or len(sequences) == 1:
                renderer = config.renderer(scene)
                for sim in sims:
                    _render_sequence(staging, sim, config, renderer, want_bag, want_7scenes,
                                     on_frame=lambda: bar.update(1))
            else:
                _render_in_processes(staging, sequences, config, want_bag, want_7scenes, int(jobs), bar)
        if want_7scenes:
            write_splits(staging, [s.number for s in sequences if s.split == "train"],
                         [s.number for s in sequences if s.split == "test"])
        (staging / "scene.json").write_text(json.dumps({**_scene_metadata(config, scene, sims, fmt),
                                                        **(metadata or {})}, indent=2), encoding="utf-8")
    return out_dir


def _render_in_processes(staging: Path, sequences, config, want_bag, want_7scenes, jobs, bar) -> None:
    """One sequence per task on a spawn-started pool (no fork of a process that may hold
    threads); the progress bar advances by whole sequences; the first failure cancels the rest."""
    context = multiprocessing.get_context("spawn")
    # a worker ends with this process: killed (-9), it could not stop them otherwise
    with ProcessPoolExecutor(max_workers=min(jobs, len(sequences)), mp_context=context,
                             initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
        futures = [pool.submit(_render_sequence_job, str(staging), spec, config, want_bag, want_7scenes)
                   for spec in sequences]
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    bar.update(future.result())  # re-raises a worker's error here
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def _is_synth_output(path: Path) -> bool:
    """An earlier vizloc-synth output (its ``scene.json``) or an empty folder, never a link."""
    if path.is_symlink() or not path.is_dir():
        return False
    return not any(path.iterdir()) or (path / "scene.json").is_file()


def _check_output(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite``, and even then refuse to replace a
    folder that is not an earlier vizloc-synth output (no ``scene.json``): ``--out .``
    with ``--overwrite`` is a typing slip, not a wish to delete the working directory.
    A link is refused before rendering, not after."""
    check_not_a_link(out_dir, "--out")
    if not out_dir.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass --overwrite (overwrite=True) to replace it")
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file, not a vizloc-synth output folder; choose another --out")
    if not _is_synth_output(out_dir):
        raise FileExistsError(f"{out_dir} is not a vizloc-synth output (no scene.json): refusing to "
                              "replace it; choose another --out")


def generate_demo(out_dir, split: str = "all", fmt: str = "both", frames: int = 300,
                  size: tuple[int, int] = (320, 240), seed: int = 0, overwrite: bool = False,
                  progress: bool = True, config: SynthConfig | None = None) -> Path:
    """The demo scene's train and/or test sequences (see :func:`demo_sequences`)."""
    config = config or SynthConfig(width=int(size[0]), height=int(size[1]))
    return generate(out_dir, demo_sequences(split, frames, seed), config, fmt, overwrite, progress)


def demo_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/vizloc_ros/demo`` (``~/.cache/vizloc_ros/demo`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vizloc_ros" / "demo"


def cached_demo(split: str = "test", fmt: str = "bag", frames: int = 300,
                size: tuple[int, int] = (320, 240), progress: bool = False) -> Path:
    """Root folder of a demo dataset in the user cache, generated on first use.

    The folder name holds the generator version and the parameters, so a changed
    generator never serves a stale dataset. Safe against two processes building it at
    once: the second waits for the first's result (and builds it itself if the first
    died); one that finished at the same moment loses its copy.
    """
    key = f"v{GENERATOR_VERSION}-{split}-{fmt}-{int(frames)}f-{int(size[0])}x{int(size[1])}"
    root = demo_cache_dir() / key
    while not (root / "scene.json").exists():
        try:
            generate_demo(root, split=split, fmt=fmt, frames=frames, size=size, progress=progress,
                          overwrite=root.exists())
        except OutputBusy:  # another process renders it now: wait for its result (or death)
            time.sleep(0.5)
        except FileExistsError:
            if not (root / "scene.json").exists():
                raise
    return root


def cached_demo_bag(split: str = "test", frames: int = 300, size: tuple[int, int] = (320, 240),
                    progress: bool = False) -> Path:
    """Path of the demo bag (the held-out test walk by default), built on first use."""
    if split != "test":
        raise ValueError("cached_demo_bag gives the single test bag; use cached_demo_bags for the train split")
    return cached_demo_bags(split, frames, size, progress)[0]


def cached_demo_bags(split: str = "test", frames: int = 300, size: tuple[int, int] = (320, 240),
                     progress: bool = False) -> list[Path]:
    """Paths of the demo bags of a split, built on first use."""
    root = cached_demo(split, "bag", frames, size, progress)
    return [root / "bags" / s.name for s in demo_sequences(split, frames)]


# --------------------------------------------------------------------------- CLI

def _parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"size must look like 320x240, not {text!r}")
    width, height = int(match.group(1)), int(match.group(2))
    if not (8 <= width <= 4096 and 8 <= height <= 4096):
        raise argparse.ArgumentTypeError(f"size {width}x{height} out of range (8..4096 per side)")
    return width, height


def _int_at_least(minimum: int):
    """argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"need at least {minimum}, got {value}")
        return value
    return parse


_positive_int = _int_at_least(2)  # frames: a sequence needs two poses for odometry


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vizloc-synth",
        description="Render the synthetic indoor world into rosbag2 (MCAP) bags and/or a "
                    "7-Scenes-style folder, with ground truth, drifting visual odometry and IMU.")
    parser.add_argument("--scene", default="demo", metavar="demo|room:SEED",
                        help=f"scene: {scene_names_help()}, SEED a non-negative integer; "
                             "docs/SYNTHETIC.md says which seeds are reserved for what (default demo)")
    parser.add_argument("--lighting", type=_int_at_least(0), default=None, metavar="SEED",
                        help="render every walk of this output under the seeded lighting SEED (light "
                             "position and strength, ambient, exposure, colour temperature; written "
                             "into scene.json); default: the scene's own light")
    parser.add_argument("--out", type=Path, help="output folder (must not exist unless --overwrite); required "
                                                 "unless --demo-bag")
    parser.add_argument("--demo-bag", action="store_true",
                        help="print the path of the cached demo bag (the held-out test walk that "
                             "`relocalize.launch.py demo:=true` plays), rendering it under "
                             "$XDG_CACHE_HOME/vizloc_ros/demo on first use; ignores the other options")
    parser.add_argument("--format", default="both", choices=FORMATS, help="bag, 7scenes or both (default)")
    parser.add_argument("--split", default="all", choices=SPLITS,
                        help="walks: train (seq-01..04), test (seq-05) or all (default)")
    parser.add_argument("--frames", type=_positive_int, default=300, help="frames per sequence (default 300)")
    parser.add_argument("--train-walks", type=_int_at_least(1), default=4,
                        help="number of training walks (default 4: seq-01..04; more go to seq-06 on)")
    parser.add_argument("--size", type=_parse_size, default=(320, 240), help="image WIDTHxHEIGHT (default 320x240)")
    parser.add_argument("--focal", type=positive(float), default=None,
                        help="focal length in pixels (default: 60 degree horizontal field of view)")
    parser.add_argument("--camera-hz", type=positive(float), default=15.0, help="camera rate (default 15)")
    parser.add_argument("--trajectory", type=Path, action="append", default=None, metavar="FILE.tum",
                        help="drive a sequence with a real TUM trajectory instead of the random walks "
                             "(repeatable; sequences go to the test split unless --split train); "
                             "shrunk to fit the room if needed, the scale, rotation and offset logged "
                             "and written into scene.json")
    parser.add_argument("--keep-scale", action="store_true",
                        help="with --trajectory: keep the recording at its real scale (error, exit 2, "
                             "when it does not fit the room)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the walks and sensor noise (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--jobs", type=_int_at_least(1), default=1,
                        help="sequences rendered at once in worker processes (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo_bag:  # the launch file's demo bag, for a launch process without rosbags / PIL
        try:
            bag = cached_demo_bag(progress=not args.quiet)
        except (OSError, ValueError, RuntimeError) as exc:
            print(f"vizloc-synth: error: cannot prepare the demo bag: {exc}", file=sys.stderr)
            return 2
        print(bag)
        return 0
    if args.out is None:
        parser.error("the following arguments are required: --out (or --demo-bag)")
    try:
        scene_name = canonical_scene_name(args.scene)
    except ValueError as exc:
        print(f"vizloc-synth: error: --scene: {exc}", file=sys.stderr)
        return 2
    if args.out.exists() and not args.overwrite:
        parser.error(f"output {args.out} exists; pass --overwrite to replace it")
    if args.keep_scale and not args.trajectory:
        parser.error("--keep-scale applies to --trajectory walks only")
    if args.trajectory:
        for path in args.trajectory:
            if not path.is_file():
                parser.error(f"trajectory file {path} " + ("is not a file" if path.exists() else "does not exist"))
        split = "train" if args.split == "train" else "test"
        sequences = [SequenceSpec(i + 1, split, 1000 * args.seed + 500 + i, args.frames, str(path),
                                  keep_scale=args.keep_scale)
                     for i, path in enumerate(args.trajectory)]
    else:
        sequences = demo_sequences(args.split, args.frames, args.seed, args.train_walks)
    config = SynthConfig(scene=scene_name, lighting_seed=args.lighting, width=args.size[0], height=args.size[1],
                         focal=args.focal, camera_hz=args.camera_hz)
    try:
        out = generate(args.out, sequences, config, fmt=args.format, overwrite=args.overwrite,
                       progress=not args.quiet, jobs=args.jobs,
                       log=lambda line: print(f"vizloc-synth: {line}", file=sys.stderr))
    except (FileExistsError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"vizloc-synth: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the disk filled up while rendering
        print(f"vizloc-synth: error: cannot write {exc.filename or args.out}: {exc.strerror or exc}; "
              "nothing was written", file=sys.stderr)
        return 2
    print(f"vizloc-synth: wrote {len(sequences)} sequence(s) of {scene_name} to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
