"""Train or load every model of the registry; evaluate it on the demo room and on real KITTI frames.

Full mode is issue #18's comparison in one command (run from the repository root):

    python benchmarks/model_zoo.py --weights weights --work /tmp/zoo

* Demo room. Each method's checkpoint is the shipped ``weights/<name>_demo.safetensors``
  where it exists, else it is trained here with its ``config/train_<name>_demo.yaml`` (the
  CPU recipes; a ``trunk:`` block copies a shipped trunk, see vizloc_ros/training/trunk.py).
  A method with neither a shipped checkpoint nor a recipe that runs on this machine (no
  own config, or a config without ``device: cpu`` where there is no GPU) is a row saying
  so; ``--train-gpu-recipes`` trains those anyway. ``ace`` maps come from vizloc-map
  (benchmarks/bench_mapping.py): rows for one only with ``--map FILE`` (demo walks).
* Two walks of the demo room, each evaluated raw and fused with odometry:
  - the held-out walk: ``data/demo7`` split test (seq-05, 300 frames at 15 Hz) through
    ``vizloc-eval``'s own code (:func:`vizloc_ros.training.evaluate.evaluate_checkpoint`), so
    ``vizloc-eval CKPT data/demo7 --split test`` prints the table's raw figures; fused:
    ``vizloc-replay`` on the cached demo bag of the same walk (checked: the same ground truth);
  - a walk driven by a real recording (``--trajectory``, default EuRoC MAV V1_02), rendered
    once by the project's generator (``python -m vizloc_ros.sim.synthetic --out DIR --format
    both --split test --trajectory FILE --camera-hz 10``) into ``--walk-cache`` and reused;
    the scale the generator fitted it into the room with is read from its scene.json.
  Fused: :func:`vizloc_ros.replay.cli.run_replay` (``vizloc-replay BAG --weights CKPT``) with
  the bag's drifting visual odometry; the fused median and NEES come from its metrics.json.
  A network with a relative head (VLocNet) is also fused with its own visual odometry only
  (``--visual-odom``), a line of its own under its row.
* KITTI: every folder of ``--kitti`` with ``poses.txt``, trained here on the even frames,
  tested on the odd ones (raw only: those folders carry no odometry), as
  ``vizloc-eval CKPT FOLDER --kind kitti --frames odd`` would; plus the mean-pose baseline
  (always the training frames' mean pose), so "N x better than the mean pose" reads off.
  Training on KITTI: the method's demo recipe at 64x208, ``--kitti-epochs`` epochs of
  batches of 8 (100: 300 steps on the 25 even frames, the partial batch dropped), the loss
  weights at vizloc-train's defaults (the demo configs' ``s_q: -3`` is dropped: it kept
  MapNet at the mean pose on KITTI, commit c46d4ab), checkpoints picked
  by vizloc-train's default rule (``optim.select_by: mean-pose``) on the odd frames (51
  frames allow no third split). A recipe whose trunk comes from a shipped demo checkpoint
  takes it from that model trained here on the same KITTI folder instead.

Columns: median translation / rotation, shares within 25 cm / 2 deg and 5 cm / 5 deg, NEES
per dof of the estimator's covariance (1 when honest), the fused median and NEES, CPU ms per
frame of ``PoseEstimator.estimate`` on one thread, training minutes (the checkpoint JSON's
``training.seconds``: until the kept epoch was saved; "how trained" gives the whole run of a
model trained here), checkpoint MB (its own files; "+ shared trunk X" when it references
a frozen trunk instead of storing it). Markdown at ``--out``, JSON beside it.

    python benchmarks/model_zoo.py --quick --models posenet,mapnet --kitti none   # smoke run

``--quick``: ``--steps`` training steps on tiny inputs, every ``--thin``-th demo frame, one
thread; its figures say that the pipeline works, not how good a method is (no fused
columns unless ``--fused``).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vizloc_ros.cli_args import positive  # noqa: E402
from vizloc_ros.files import staged_files  # noqa: E402
from vizloc_ros.localize.estimator import PoseEstimator  # noqa: E402
from vizloc_ros.localize.models import available_models  # noqa: E402
from vizloc_ros.localize.models.registry import trained_by  # noqa: E402
from vizloc_ros.metrics import evaluate_poses  # noqa: E402
from vizloc_ros.training import train  # noqa: E402
from vizloc_ros.training.datasets import KittiOdometry, open_dataset  # noqa: E402
from vizloc_ros.training.evaluate import evaluate_checkpoint, parse_frames  # noqa: E402
from vizloc_ros.training.selection import mean_rotation  # noqa: E402

NAMES = {"posenet": "PoseNet (GoogLeNet)", "posenet_resnet18": "PoseNet (ResNet-18)",
         "posenet_resnet34": "PoseNet (ResNet-34)", "posenet_resnet50": "PoseNet (ResNet-50)",
         "mapnet": "MapNet", "dsac": "DSAC++", "netvlad": "NetVLAD", "allocentric": "Allocentric MapNet",
         "lstm_posenet": "LSTM-PoseNet", "vidloc": "VidLoc", "mapnet_plus": "MapNet+", "vlocnet": "VLocNet",
         "ace": "ACE map (vizloc-map)", "mean_pose": "mean pose (baseline)"}
#: models whose architecture takes a light "small" trunk (quick mode)
SMALL_TRUNK = ("dsac", "netvlad", "allocentric")
NEEDS_DEPTH = ("allocentric",)
#: the learned loss weights the demo recipes set (geomapnet's s_q -3); KITTI runs drop them
#: so vizloc-train's defaults (equal weights) apply: commit c46d4ab says why
KITTI_DROPPED_LOSS_KEYS = ("s_t", "s_q", "s_t_rel", "s_q_rel")
#: methods that get this many times --kitti-epochs on a KITTI folder: DSAC++ trains its
#: whole scene-coordinate network from scratch on heuristic depths (no trunk to copy), and
#: at 60 epochs (180 steps) it stayed 2.8 m (seq01) and 7.0 m (seq06) off; at 300, 0.66 m
#: on seq01
KITTI_EPOCH_FACTOR = {"dsac": 5}
#: KITTI recipe: input, frames per step (the full mode)
KITTI_INPUT = {"resize": 64, "crop": [64, 208]}
KITTI_BATCH = 8
DEFAULT_TRAJECTORY = ROOT.parent / "shared" / "data" / "trajectories" / "euroc_V1_02_groundtruth.tum"
SHIPPED_NAME = re.compile(r"^(?P<model>.+)_demo\.safetensors$")


class Skipped(Exception):
    """A method that cannot run on a dataset here: its row says why."""


class ZooError(RuntimeError):
    """The benchmark cannot run at all (bad input, a walk that cannot be rendered)."""


# --------------------------------------------------------------------------- data views

def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(src.resolve(), dst)
    except OSError:
        shutil.copy2(src, dst)


def thin_sevenscenes(src: Path, dst: Path, step: int) -> Path:
    """A 7-Scenes folder with every ``step``-th frame of ``src`` (symbolic links)."""
    for name in ("TrainSplit.txt", "TestSplit.txt", "scene.json"):
        if (src / name).is_file():
            _link(src / name, dst / name)
    for seq in sorted(src.glob("seq-*")):
        poses = sorted(seq.glob("frame-*.pose.txt"))
        for k, pose in enumerate(poses[::step]):
            stem = f"frame-{k:06d}"
            for suffix in (".pose.txt", ".color.png", ".depth.png"):
                source = pose.with_name(pose.name.replace(".pose.txt", suffix))
                if source.is_file():
                    _link(source, dst / seq.name / f"{stem}{suffix}")
    return dst


def kitti_split(src: Path, dst: Path, parity: int) -> Path:
    """A KITTI folder of the even (parity 0) or odd (1) frames of ``src``, renumbered
    (the training data of vizloc-train; evaluation reads ``src`` with ``frames``)."""
    rows = [line for line in (src / "poses.txt").read_text().splitlines() if line.strip()]
    image_dir = next(d for d in ("image_0", "image_l", "image_2") if (src / d).is_dir())
    keep = list(range(parity, len(rows), 2))
    (dst / image_dir).mkdir(parents=True, exist_ok=True)
    (dst / "poses.txt").write_text("".join(rows[i] + "\n" for i in keep))
    if (src / "calib.txt").is_file():
        _link(src / "calib.txt", dst / "calib.txt")
    for k, i in enumerate(keep):
        _link(src / image_dir / f"{i:06d}.png", dst / image_dir / f"{k:06d}.png")
    return dst


def kitti_test_set(folder: Path) -> KittiOdometry:
    """The odd frames of ``folder``, read as ``vizloc-eval FOLDER --kind kitti --frames odd`` does."""
    count = sum(1 for line in (folder / "poses.txt").read_text().splitlines() if line.strip())
    return KittiOdometry(folder, frames=parse_frames("odd", count))


# --------------------------------------------------------------------------- walks

def walk_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vizloc_ros" / "model_zoo"


def render_command(trajectory: Path, out: Path, camera_hz: float, frames: int) -> list[str]:
    """The generator's command line for a walk driven by ``trajectory`` (7-Scenes + bag)."""
    return [sys.executable, "-m", "vizloc_ros.sim.synthetic", "--out", str(out), "--format", "both",
            "--split", "test", "--trajectory", str(trajectory), "--camera-hz", f"{camera_hz:g}",
            "--frames", str(frames), "--quiet"]


def real_walk(trajectory: Path, cache: Path, camera_hz: float = 10.0, frames: int = 300) -> dict:
    """The demo room walked along a real recording, rendered once into ``cache`` (the
    generator writes its folder whole or not at all, so a folder with scene.json is
    complete) -> the walk's description, with the scale the generator applied."""
    from vizloc_ros.sim.synthetic import GENERATOR_VERSION

    if not trajectory.is_file():
        raise ZooError(f"--trajectory {trajectory} is not a file")
    folder = cache / f"v{GENERATOR_VERSION}-{trajectory.stem}-{frames}f-{camera_hz:g}hz"
    command = render_command(trajectory, folder, camera_hz, frames)
    if not (folder / "scene.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        print(f"model_zoo: rendering {folder.name} ...", file=sys.stderr, flush=True)
        done = subprocess.run(command + (["--overwrite"] if folder.exists() else []), cwd=ROOT,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise ZooError(f"cannot render the walk of {trajectory.name}: "
                           f"{(done.stderr.strip().splitlines() or ['no message'])[-1]}")
    scene = json.loads((folder / "scene.json").read_text())
    sequence = scene["sequences"][0]
    scale = sequence.get("tum_placement", {}).get("scale")
    return {"name": f"demo, {trajectory.stem} walk", "kind": "7scenes", "test": folder,
            "bag": folder / "bags" / sequence["name"], "trajectory": str(trajectory),
            "scale": scale, "camera_hz": camera_hz, "frames": frames,
            "command": " ".join(["python"] + command[1:-1])}


def held_out_walk(demo_test: Path, demo_bag: Path | None) -> dict:
    """The demo's held-out walk (seq-05 of ``demo_test``) and its bag. The bag must be the
    same walk: its ground-truth file has to equal the folder's, else the raw and fused
    columns would describe two walks."""
    walk = {"name": "demo, held-out walk", "kind": "7scenes", "test": demo_test, "bag": demo_bag}
    if demo_bag is not None:
        ours = demo_test / "trajectories" / "seq-05_ground_truth.tum"
        theirs = demo_bag.parent.parent / "trajectories" / f"{demo_bag.name}_ground_truth.tum"
        if ours.is_file() and theirs.is_file() and ours.read_bytes() != theirs.read_bytes():
            raise ZooError(f"the demo bag {demo_bag} is not the walk of {demo_test} (seq-05): their "
                           "ground-truth files differ")
    return walk


# --------------------------------------------------------------------------- configs

def own_config_path(name: str) -> Path:
    return ROOT / "config" / f"train_{name}_demo.yaml"


def base_config(name: str) -> dict:
    own = own_config_path(name)
    if own.is_file():
        return yaml.safe_load(own.read_text())
    generic = yaml.safe_load((ROOT / "config" / "train_posenet_demo.yaml").read_text())
    generic["model"] = {"name": name, "args": {}}
    return generic


def _in_repo(path) -> str:
    """A config's relative path, meant from the repository root, made absolute."""
    path = Path(str(path)).expanduser()
    return str(path if path.is_absolute() else ROOT / path)


def shipped_source(path) -> str | None:
    """The registry name of a shipped demo checkpoint path (``weights/mapnet_demo.safetensors``
    -> ``mapnet``); None for any other file."""
    match = SHIPPED_NAME.match(Path(str(path)).name)
    return match.group("model") if match else None


def runs_here(name: str, cfg: dict) -> bool:
    """Whether full mode trains ``name`` on the demo here: its own recipe, and one made
    for this machine (``device: cpu``, or a GPU is there)."""
    if not own_config_path(name).is_file():
        return False
    return str(cfg.get("device", "auto")) == "cpu" or torch.cuda.is_available()


def zoo_config(name: str, dataset: dict, args, out: Path, source_checkpoint) -> dict:
    """The training config of ``name`` on ``dataset``: the method's demo recipe with the
    data, output and (KITTI, --quick) the adaptations of the module docstring.
    ``source_checkpoint(model_name)`` gives the zoo's checkpoint of another model on the
    same dataset (a KITTI trunk source)."""
    cfg = base_config(name)
    cfg.setdefault("model", {})["name"] = name
    args_ = cfg["model"].setdefault("args", {}) or {}
    cfg["model"]["args"] = args_
    data = cfg.get("data") or {}
    cfg["data"] = {**data, "kind": dataset["kind"], "root": str(dataset["train"]), "train_split": "train",
                   "val_root": str(dataset["val"]), "val_split": "test"}
    cfg["out"] = str(out)
    if args.device != "auto" or "device" not in cfg:
        cfg["device"] = args.device
    loss = cfg.setdefault("loss", {})
    kitti = dataset["kind"] == "kitti"
    for section, key in (("trunk", "from"), ("model", "init_from")):
        block = cfg.get(section) or {}
        if block.get(key):
            source = shipped_source(block[key])
            if kitti and source is not None:  # a demo-room network says nothing of a road: the
                block[key] = str(source_checkpoint(source))  # same model, trained on this folder
            elif args.quick and section == "model":
                block[key] = None  # the quick networks are smaller than the shipped ones
            else:
                block[key] = _in_repo(block[key])
    copied = (cfg.get("trunk") or {}).get("copy") or []
    if (cfg.get("trunk") or {}).get("from") and "fc_feat" in copied:  # the copied layer's width
        source_meta = json.loads(Path(cfg["trunk"]["from"]).with_suffix(".json").read_text())
        width = (source_meta.get("model_config") or {}).get("feat_dim")
        if width and "feat_dim" in args_:
            args_["feat_dim"] = width
    unlabeled = cfg.get("unlabeled") or {}
    if unlabeled.get("root"):
        unlabeled["root"] = _in_repo(unlabeled["root"])
    if kitti:
        for key in KITTI_DROPPED_LOSS_KEYS:
            loss.pop(key, None)
        cfg["data"].update(preload=True, kwargs={})
        # one thread, no loader workers: the 25 frames are in memory, and torch flushes
        # denormals only on the thread that asks (vizloc-train's main thread), while the
        # worker of an intra-op pool made before it keeps its own floating-point mode:
        # PoseNet's steps on KITTI took 6-11 s instead of 0.16 s in two of three runs
        # (py-spy: the time in oneDNN's convolutions on the pool)
        cfg.update(threads=1, workers=0)
        cfg["input"] = {"resize": 64, "crop": [64, 200]} if args.quick else dict(KITTI_INPUT)
        cfg["augment"] = {**(cfg.get("augment") or {}), "random_crop": False}
        if name == "dsac":   # no depth: DSAC++ heuristic targets, then the reprojection stage
            loss.update(stage="reprojection", init_depth=10.0)
            args_["inlier_threshold"] = 3.0
        if name == "netvlad":  # even frames of a car 1.5-5 m apart: radii in metres of road
            loss.update(pos_radius=6.0, neg_radius=20.0, pos_angle_deg=None)
            args_.update(database_spacing=0.0, consistency_m=8.0)
        if "tuple" in cfg:  # consecutive even frames (0.2 s apart) of the recipe's length
            cfg["tuple"] = {**cfg["tuple"], "skip": min(int(cfg["tuple"].get("skip", 1)), 2), "stride": 1}
        if not args.quick:  # the cosine schedule runs over epochs: a budget in epochs, not steps
            epochs = args.kitti_epochs * KITTI_EPOCH_FACTOR.get(name, 1)
            cfg["optim"] = {**cfg.get("optim", {}), "batch_size": KITTI_BATCH, "epochs": epochs,
                            "val_every": max(1, epochs // 20)}
            cfg["max_steps"] = None
    if args.quick:
        cfg["max_steps"] = args.steps
        cfg.update(workers=0, threads=1, amp="none")
        cfg["optim"] = {**cfg.get("optim", {}), "epochs": 1, "batch_size": 4, "val_every": 1}
        if not kitti:
            cfg["input"] = {"resize": 60, "crop": [56, 80]}
        if name in SMALL_TRUNK:  # a light trunk of its own: a copied ResNet trunk does not fit it
            args_["backbone"] = "small"
            cfg.pop("trunk", None)
        if name == "dsac":
            args_["hypotheses"] = 64
            loss.update(hypotheses=16, e2e_after=max(args.steps // 2, 1))
        if name == "netvlad":
            args_.update(clusters=8, feat_dim=16)
        if name == "allocentric":
            args_.update(feat_dim=8, resolution=0.2, rotations=36)
            loss.update(memory_frames=2, train_rotations=18, min_separation=5)
        if (name in ("posenet", "mapnet") or name.startswith("posenet_")) and not (cfg.get("trunk") or {}).get("from"):
            args_["feat_dim"] = 256
    return cfg


def _checked(config: dict) -> dict:
    """Through vizloc-train's own validation (defaults, types)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(config, handle)
    try:
        return train.load_config(handle.name)
    finally:
        os.unlink(handle.name)


class Checkpoints:
    """Each model's checkpoint on each dataset, made once: shipped (demo, ``--weights``) or
    trained here (and then a trunk source for the recipes that copy it)."""

    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self.made: dict = {}

    def get(self, name: str, dataset: dict) -> tuple[Path, str]:
        key = (name, dataset["name"])
        if key not in self.made:
            try:
                self.made[key] = self._make(name, dataset)
            except Exception as exc:  # noqa: BLE001 - remembered: a source that failed fails its users
                self.made[key] = exc
        if isinstance(self.made[key], Exception):
            raise self.made[key]
        return self.made[key]

    def _make(self, name: str, dataset: dict) -> tuple[Path, str]:
        args = self.args
        kitti = dataset["kind"] == "kitti"
        if kitti and name in NEEDS_DEPTH:
            raise Skipped("needs depth images (KITTI has none here)")
        unlabeled = (base_config(name).get("unlabeled") or {}).get("root")
        if unlabeled is not None and (kitti or not Path(_in_repo(unlabeled)).exists()):
            raise Skipped(f"needs unlabeled recordings with odometry ({unlabeled})")
        if trained_by(name) != "vizloc-train":  # ace: a scene-coordinate map of vizloc-map
            if not kitti and getattr(args, "map", None):
                return Path(args.map), "made by vizloc-map"
            if kitti and trained_by(name) == "vizloc-map" and not args.quick:
                return self._map(dataset)
            raise Skipped(f"made by {trained_by(name)}, not vizloc-train: give the demo map with --map "
                          "(benchmarks/bench_mapping.py measures maps)")
        shipped = Path(args.weights) / f"{name}_demo.safetensors" if args.weights else None
        if not kitti and shipped is not None and shipped.is_file():
            return shipped, "shipped"
        if not (kitti or args.quick or args.train_gpu_recipes or runs_here(name, base_config(name))):
            raise Skipped("no shipped checkpoint, and no CPU recipe (config/train_"
                          f"{name}_demo.yaml with device: cpu); --train-gpu-recipes trains it anyway")
        out = self.work / dataset["name"].replace("/", "_") / name
        config = _checked(zoo_config(name, dataset, args, out, lambda source: self.get(source, dataset)[0]))
        print(f"model_zoo: training {name} on {dataset['name']} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        train.train(config, progress=False, overwrite=True)  # its own --work folder: a rerun retrains
        # training.seconds (the minutes column) is the time until the kept epoch was saved;
        # the whole run, later epochs included, is said here
        whole = (time.perf_counter() - started) / 60.0
        return (out.with_name(out.name + ".safetensors"),
                f"trained here{' (quick)' if args.quick else ''}, whole run {whole:.1f} min")


    def _map(self, dataset: dict) -> tuple[Path, str]:
        """A scene-coordinate map of the folder's training (even) frames, made by vizloc-map
        as a user would, with ``--kitti-map-minutes`` of head training on one thread."""
        from vizloc_ros.mapping import cli as mapping_cli

        out = self.work / dataset["name"].replace("/", "_") / "ace.safetensors"
        out.parent.mkdir(parents=True, exist_ok=True)
        command = [str(dataset["train"]), "--out", str(out), "--minutes", f"{self.args.kitti_map_minutes:g}",
                   "--threads", "1", "--overwrite", "--no-progress", "--quiet"]
        print(f"model_zoo: vizloc-map {' '.join(command)}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        code = mapping_cli.main(command)
        if code == 130:  # Ctrl-C stopped the mapping (it wrote nothing): stop the zoo too
            raise KeyboardInterrupt
        if code != 0:
            raise ZooError(f"vizloc-map failed on {dataset['name']} (exit {code})")
        return out, f"mapped here (vizloc-map), whole run {(time.perf_counter() - started) / 60.0:.1f} min"


# --------------------------------------------------------------------------- evaluation

def latency_ms(weights: Path, image: np.ndarray, device: str = "cpu", repeats: int = 10) -> float:
    """Median ms per frame of PoseEstimator.estimate (one frame, one CPU thread)."""
    estimator = PoseEstimator(weights, device=device, cpu_threads=1)
    estimator.estimate(image)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        estimator.estimate(image)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def checkpoint_size(weights: Path) -> tuple[float, str | None]:
    """(MB of the checkpoint's own files: tensors, JSON, side files such as a database or a
    memory; the name of the frozen trunk file it references instead of storing, or None)."""
    meta = json.loads(weights.with_suffix(".json").read_text())
    files = [weights, weights.with_suffix(".json")]
    files += [weights.parent / Path(f).name for f in (meta.get("side_files") or {}).values()]
    megabytes = sum(f.stat().st_size for f in files if f.is_file()) / 1e6
    frozen = meta.get("frozen_tensors") or {}
    return megabytes, frozen.get("file")


def training_minutes(weights: Path) -> float | None:
    """Minutes until the kept checkpoint was saved; a map's whole mapping time (vizloc-map
    records ``training.timings.total_s``)."""
    training = json.loads(weights.with_suffix(".json").read_text()).get("training") or {}
    seconds = training.get("seconds", (training.get("timings") or {}).get("total_s"))
    return None if seconds is None else float(seconds) / 60.0


def raw_metrics(weights: Path, test_set, device: str) -> dict:
    """``vizloc-eval``'s metrics of ``weights`` on ``test_set`` (the same function)."""
    return evaluate_checkpoint(weights, test_set, device=device, progress=False)


def fused_metrics(weights: Path, bag: Path, out: Path, device: str, visual_odometry: bool = False) -> dict:
    """``vizloc-replay BAG --weights CKPT --out OUT --overwrite`` (``--visual-odom``: the
    network's relative head instead of the bag's odometry): the fused source's metrics."""
    from vizloc_ros.replay.cli import ReplayOptions, run_replay

    result = run_replay(ReplayOptions(bag=bag, out=out, weights=weights, device=device, overwrite=True,
                                      progress=False, visual_odometry=visual_odometry))
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else result
    fused = metrics.get("sources", {}).get("fused")
    if not fused:
        raise RuntimeError(f"the replay of {bag} gave no fused pose")
    return fused


RAW_KEYS = ("frames", "median_translation_m", "median_rotation_deg", "within_25cm_2deg", "within_5cm_5deg",
            "nees_per_dof")


def method_rows(name: str, dataset: dict, walks: list[dict], args, checkpoints: Checkpoints) -> list[dict]:
    """One row per walk of ``dataset`` for ``name`` (a single row saying why when it cannot run)."""
    base = {"model": name, "method": NAMES.get(name, name)}
    try:
        weights, how = checkpoints.get(name, dataset)
    except Skipped as exc:
        return [{**base, "data": walk["name"], "note": f"skipped: {exc}"} for walk in walks]
    except Exception as exc:  # noqa: BLE001 - one model's failure is a row, not the end
        traceback.print_exc()
        return [{**base, "data": walk["name"], "note": f"failed: {type(exc).__name__}: {str(exc)[:160]}"}
                for walk in walks]
    megabytes, trunk = checkpoint_size(weights)
    common = {**base, "training": how, "weights": str(weights), "train_minutes": training_minutes(weights),
              "checkpoint_mb": round(megabytes, 1), "shared_trunk": trunk}
    rows, cpu_ms = [], None
    for walk in walks:
        row = {**common, "data": walk["name"]}
        try:
            test_set = walk["open"]()
            metrics = raw_metrics(weights, test_set, args.device)
            row.update({k: metrics.get(k) for k in RAW_KEYS})
            if cpu_ms is None:
                cpu_ms = latency_ms(weights, test_set[0]["image"], "cpu")
            row["cpu_ms"] = cpu_ms
            if walk.get("bag") is not None and args.fused:
                out = args.work_path / "replay" / walk["slug"] / name
                fused = fused_metrics(weights, walk["bag"], out, args.device)
                row.update(fused_median_translation_m=fused.get("median_translation_m"),
                           fused_median_rotation_deg=fused.get("median_rotation_deg"),
                           fused_nees_per_dof=fused.get("nees_per_dof"), replay_report=str(out))
                if PoseEstimator(weights, device="cpu", cpu_threads=1).has_relative_head:
                    # VLocNet's target: fused with its own visual odometry only, below its raw median
                    out = args.work_path / "replay" / walk["slug"] / f"{name}_visual_odom"
                    fused = fused_metrics(weights, walk["bag"], out, args.device, visual_odometry=True)
                    row.update(fused_vo_median_translation_m=fused.get("median_translation_m"),
                               fused_vo_median_rotation_deg=fused.get("median_rotation_deg"),
                               fused_vo_nees_per_dof=fused.get("nees_per_dof"), replay_vo_report=str(out))
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            row["note"] = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
        rows.append(row)
    return rows


def mean_pose_row(dataset: dict, walk: dict) -> dict:
    """The baseline a regressor must beat: every frame predicted at the training frames'
    mean position and mean orientation (unfloored, unlike vizloc-train's selection rule)."""
    train_t, train_q = open_dataset("kitti", dataset["train"]).poses()
    test_t, test_q = walk["open"]().poses()
    n = len(test_t)
    metrics = evaluate_poses(np.tile(np.mean(train_t, axis=0), (n, 1)), np.tile(mean_rotation(train_q), (n, 1)),
                             test_t, test_q)
    return {"model": "mean_pose", "method": NAMES["mean_pose"], "data": walk["name"],
            "training": "training frames' mean", **{k: metrics.get(k) for k in RAW_KEYS if k in metrics}}


# --------------------------------------------------------------------------- report

def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{os.cpu_count()}-core {cpu}, torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def _fmt(value, digits=2, scale=1.0, suffix=""):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value * scale:.{digits}f}{suffix}"


COLUMNS = ("method", "registry", "data / walk", "how trained", "median t (m)", "median r (deg)",
           "within 25 cm, 2 deg", "within 5 cm, 5 deg", "NEES/dof", "fused t (m)", "fused r (deg)",
           "fused NEES/dof", "CPU ms/frame", "training min", "checkpoint MB")


def _cells(r: dict) -> list[str]:
    how = r.get("training", "")
    size = _fmt(r.get("checkpoint_mb"), 1)
    if r.get("shared_trunk"):
        size += f" + shared trunk {r['shared_trunk']}"
    return [r["method"], f"`{r['model']}`", r["data"], how, _fmt(r.get("median_translation_m"), 3),
            _fmt(r.get("median_rotation_deg"), 2), _fmt(r.get("within_25cm_2deg"), 0, 100, " %"),
            _fmt(r.get("within_5cm_5deg"), 0, 100, " %"), _fmt(r.get("nees_per_dof")),
            _fmt(r.get("fused_median_translation_m"), 3), _fmt(r.get("fused_median_rotation_deg"), 2),
            _fmt(r.get("fused_nees_per_dof")), _fmt(r.get("cpu_ms"), 0), _fmt(r.get("train_minutes"), 1), size]


def markdown(rows: list[dict], walks: list[dict], quick: bool) -> str:
    lines = [f"Model zoo, {dt.date.today().isoformat()}, {machine()}"
             + (" - quick mode (smoke-level training: the pipeline runs, the figures are not "
                "the methods' accuracy)" if quick else ""), ""]
    for walk in walks:
        if walk.get("trajectory"):
            lines.append(f"- {walk['name']}: {Path(walk['trajectory']).name} rendered into the demo room at "
                         f"scale {_fmt(walk.get('scale'), 3)} ({walk['frames']} frames at {walk['camera_hz']:g} Hz; "
                         f"`{walk['command']}`)")
    lines += ["", "| " + " | ".join(COLUMNS) + " |",
              "| --- | --- | --- | --- |" + " ---: |" * (len(COLUMNS) - 4)]
    for r in rows:
        cells = _cells(r)
        if r.get("note") and r.get("median_translation_m") is None:
            cells[3] = r["note"]
        elif r.get("note"):
            cells[3] += f"; {r['note']}"
        lines.append("| " + " | ".join(cells) + " |")
        if r.get("fused_vo_median_translation_m") is not None:  # the same network, its own odometry
            vo = ["", "", r["data"], "fused with its own visual odometry (no wheel odometry)"] + [""] * 5
            vo += [_fmt(r["fused_vo_median_translation_m"], 3), _fmt(r.get("fused_vo_median_rotation_deg"), 2),
                   _fmt(r.get("fused_vo_nees_per_dof"))] + [""] * 3
            lines.append("| " + " | ".join(vo) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(md_path: Path, json_path: Path, text: str, document: dict) -> None:
    """Both files or neither (vizloc_ros.files.staged_files)."""
    md_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with staged_files([md_path, json_path], what="model zoo table") as (md_tmp, json_tmp):
        md_tmp.write_text(text)
        json_tmp.write_text(json.dumps(document, indent=2) + "\n")


# --------------------------------------------------------------------------- main

def _at_least_one(text: str) -> int:
    """argparse type: an integer >= 1 (a count of steps, epochs or frames)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"need at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated registry names (default: every model vizloc-train makes)")
    parser.add_argument("--demo-train", default=str(ROOT / "data" / "demo_train"))
    parser.add_argument("--demo-val", default=str(ROOT / "data" / "demo_val"),
                        help="validation walk (picks the best epoch)")
    parser.add_argument("--demo-test", default=str(ROOT / "data" / "demo7"),
                        help="7-Scenes folder whose test split is the held-out walk (default data/demo7, "
                             "made by `vizloc-synth --out data/demo7 --format 7scenes --split all`)")
    parser.add_argument("--demo-bag", default=None,
                        help="bag of the held-out walk for the fused columns (default: the cached demo "
                             "bag of vizloc-replay --demo, the same walk)")
    parser.add_argument("--trajectory", default=str(DEFAULT_TRAJECTORY),
                        help="real recording (TUM) that drives the second demo walk; 'none' to skip")
    parser.add_argument("--walk-cache", default=str(walk_cache_dir()),
                        help="where the rendered walk is kept and reused")
    parser.add_argument("--kitti", default=str(ROOT.parent / "shared" / "data" / "kitti"),
                        help="folder of KITTI sequences (each with poses.txt); 'none' to skip")
    parser.add_argument("--kitti-epochs", type=_at_least_one, default=100,
                        help="training epochs per model on a KITTI folder (100: 300 steps of 8 of the "
                             "25 even frames)")
    parser.add_argument("--kitti-map-minutes", type=positive(float), default=4.0,
                        help="with ace among --models: vizloc-map's head training on a KITTI folder's even "
                             "frames, minutes (default 4: on KITTI 06 1.5 left the map 26 m off, 4 gave 2 m)")
    parser.add_argument("--quick", action="store_true", help="a few steps on tiny inputs (CPU smoke run)")
    parser.add_argument("--steps", type=_at_least_one, default=20, help="training steps per model in --quick mode")
    parser.add_argument("--thin", type=_at_least_one, default=10,
                        help="--quick: use every N-th demo frame (training and test)")
    fused = parser.add_mutually_exclusive_group()
    fused.add_argument("--fused", dest="fused", action="store_true", default=None,
                       help="replay each walk's bag with odometry (default in full mode)")
    fused.add_argument("--no-fused", dest="fused", action="store_false", help="raw columns only")
    parser.add_argument("--train-gpu-recipes", action="store_true",
                        help="train methods whose demo config is not a CPU recipe, on any machine")
    parser.add_argument("--map", default=None,
                        help="a demo-room map of vizloc-map (ace): adds its rows on the demo walks")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--weights", default=None, help="use DIR/<name>_demo.safetensors on the demo where present")
    parser.add_argument("--work", default=None, help="checkpoints and replays go here (default: a temporary folder)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "model_zoo.md"))
    parser.add_argument("--json", default=None, help="also write the rows as JSON (default: --out with .json)")
    return parser


def _walks(args, views: Path) -> list[tuple[dict, list[dict]]]:
    """(training dataset, its test walks) for the demo room and each KITTI folder."""
    plan = []
    demo_train, demo_val, demo_test = Path(args.demo_train), Path(args.demo_val), Path(args.demo_test)
    if demo_train.is_dir() and demo_val.is_dir() and demo_test.is_dir():
        if args.quick and args.thin > 1:
            demo_train = thin_sevenscenes(demo_train, views / "demo_train", args.thin)
            demo_val = thin_sevenscenes(demo_val, views / "demo_val", args.thin)
            demo_test = thin_sevenscenes(demo_test, views / "demo_test", args.thin)
        bag = None
        if args.fused:
            from vizloc_ros.sim.synthetic import cached_demo_bag

            bag = Path(args.demo_bag) if args.demo_bag else cached_demo_bag()
        walks = [held_out_walk(demo_test, bag)]
        if args.trajectory != "none":
            walks.append(real_walk(Path(args.trajectory), Path(args.walk_cache),
                                   frames=30 if args.quick else 300))
            if not args.fused:
                walks[-1]["bag"] = None
        for walk, slug in zip(walks, ("demo_held_out", "demo_real_walk")):
            folder = walk["test"]
            walk.update(slug=slug, open=lambda folder=folder: open_dataset("7scenes", folder, split="test"))
        plan.append(({"name": "demo", "kind": "7scenes", "train": demo_train, "val": demo_val}, walks))
    else:
        print(f"model_zoo: no demo scene at {demo_train} / {demo_val} / {demo_test}: skipped", file=sys.stderr)
    if args.kitti != "none" and Path(args.kitti).is_dir():
        for seq in sorted(p for p in Path(args.kitti).iterdir() if (p / "poses.txt").is_file()):
            train_view = kitti_split(seq, views / seq.name / "even", 0)
            dataset = {"name": f"kitti/{seq.name}", "kind": "kitti", "train": train_view,
                       "val": kitti_split(seq, views / seq.name / "odd", 1)}
            plan.append((dataset, [{"name": f"kitti/{seq.name} (odd frames)", "slug": seq.name, "bag": None,
                                    "open": lambda seq=seq: kitti_test_set(seq)}]))
    return plan


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.fused is None:
        args.fused = not args.quick
    torch.set_num_threads(1 if args.quick else max(1, torch.get_num_threads()))
    # scene-coordinate maps (ace) are made by vizloc-map, not vizloc-train: benchmarks/bench_mapping.py
    models = (args.models.split(",") if args.models
              else [m for m in available_models() if trained_by(m) == "vizloc-train" or args.map])
    if args.map and not Path(args.map).is_file():
        print(f"model_zoo: --map {args.map} is not a file", file=sys.stderr)
        return 2
    unknown = [m for m in models if m not in available_models()]
    if unknown:
        print(f"model_zoo: unknown model(s) {', '.join(unknown)}; known: {', '.join(available_models())}",
              file=sys.stderr)
        return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="vizloc_zoo_"))
    args.work_path = work
    views = Path(tempfile.mkdtemp(prefix="vizloc_zoo_data_"))
    try:
        plan = _walks(args, views)
        checkpoints = Checkpoints(args, work)
        rows = []
        for dataset, walks in plan:
            if dataset["kind"] == "kitti":
                rows.append(mean_pose_row(dataset, walks[0]))
            for name in models:
                print(f"model_zoo: {name} on {dataset['name']} ...", file=sys.stderr, flush=True)
                for row in method_rows(name, dataset, walks, args, checkpoints):
                    rows.append(row)
                    print(f"model_zoo: {json.dumps(row)}", file=sys.stderr, flush=True)
        all_walks = [w for _, walks in plan for w in walks]
        text = markdown(rows, all_walks, args.quick)
        out = Path(args.out)
        json_path = Path(args.json) if args.json else out.with_suffix(".json")
        walks_meta = [{k: (str(v) if isinstance(v, Path) else v) for k, v in w.items() if k != "open"}
                      for w in all_walks]
        write_outputs(out, json_path, text, {"date": dt.date.today().isoformat(), "machine": machine(),
                                             "quick": args.quick, "walks": walks_meta, "rows": rows})
    except (ZooError, OSError) as exc:
        print(f"model_zoo: {exc}", file=sys.stderr)
        if not args.work:  # the temporary folder made for this run, not the user's
            shutil.rmtree(work, ignore_errors=True)
        return 2
    finally:
        shutil.rmtree(views, ignore_errors=True)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
