"""Train and evaluate every model of the registry on the demo scene and on real KITTI frames.

One command gives one Markdown table (and JSON): per model and dataset the median
translation / rotation error, the planar (x, y) and yaw errors, the share of frames within
25 cm and 2 deg, the milliseconds per frame of the deployed ``PoseEstimator`` on the CPU
(one thread, one frame at a time) and, where CUDA is there, on the GPU, and the size of
the checkpoint.

    python benchmarks/model_zoo.py                       # full training, each model's demo config
    python benchmarks/model_zoo.py --quick               # smoke level: a few steps, tiny inputs
    python benchmarks/model_zoo.py --models dsac,netvlad --kitti ../shared/data/kitti

Datasets:

* ``demo``: the synthetic scene's 7-Scenes folders (``--demo-train``, ``--demo-val``; see
  config/train_posenet_demo.yaml for the ``vizloc-synth`` commands). Test: the held-out walk.
* ``kitti/<sequence>``: every folder of ``--kitti`` with ``poses.txt``; trained on the even
  frames, tested on the odd ones (the real-image check of README).

Training configs: ``config/train_<name>_demo.yaml`` where it exists, else the PoseNet demo
config with the model's name (regressors) and, for KITTI, the input and loss adapted to
1226x370 driving frames. ``--weights DIR`` evaluates ``DIR/<name>_demo.safetensors`` on the
demo scene instead of training, where such a file exists (the shipped PoseNet and MapNet).
Models that cannot run on a dataset (the allocentric memory needs depth images) are listed
with the reason. ``--quick`` figures say that the pipeline works, not how good a method is.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
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

from vizloc_ros import geometry  # noqa: E402
from vizloc_ros.localize.estimator import PoseEstimator  # noqa: E402
from vizloc_ros.localize.models import available_models  # noqa: E402
from vizloc_ros.localize.models.registry import trained_by  # noqa: E402
from vizloc_ros.metrics import evaluate_poses, pose_error_vectors  # noqa: E402
from vizloc_ros.metrics import nees as metrics_nees  # noqa: E402
from vizloc_ros.training import train  # noqa: E402
from vizloc_ros.training.datasets import open_dataset  # noqa: E402

NAMES = {"posenet": "PoseNet (GoogLeNet)", "posenet_resnet18": "PoseNet (ResNet-18)",
         "posenet_resnet34": "PoseNet (ResNet-34)", "posenet_resnet50": "PoseNet (ResNet-50)",
         "mapnet": "MapNet", "dsac": "DSAC++", "netvlad": "NetVLAD", "allocentric": "Allocentric MapNet",
         "lstm_posenet": "LSTM-PoseNet", "vidloc": "VidLoc", "mapnet_plus": "MapNet+", "vlocnet": "VLocNet"}
#: models whose architecture takes a light "small" trunk (quick mode)
SMALL_TRUNK = ("dsac", "netvlad", "allocentric")
NEEDS_DEPTH = ("allocentric",)


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
    """A KITTI folder of the even (parity 0) or odd (1) frames of ``src``, renumbered."""
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


# --------------------------------------------------------------------------- configs

def base_config(name: str) -> dict:
    own = ROOT / "config" / f"train_{name}_demo.yaml"
    if own.is_file():
        return yaml.safe_load(own.read_text())
    generic = yaml.safe_load((ROOT / "config" / "train_posenet_demo.yaml").read_text())
    generic["model"] = {"name": name, "args": {}}
    return generic


def zoo_config(name: str, dataset: dict, quick: bool, steps: int, out: Path, device: str) -> dict:
    cfg = base_config(name)
    cfg.setdefault("model", {})["name"] = name
    args = cfg["model"].setdefault("args", {}) or {}
    cfg["model"]["args"] = args
    cfg["data"] = {"kind": dataset["kind"], "root": str(dataset["train"]), "train_split": "train",
                   "val_root": str(dataset["val"]), "val_split": "test", "preload": True}
    cfg["out"] = str(out)
    cfg["device"] = device
    cfg["threads"] = 0
    loss = cfg.setdefault("loss", {})
    if dataset["kind"] == "kitti":
        cfg["input"] = {"resize": 64, "crop": [64, 200]} if quick else {"resize": 128, "crop": [128, 416]}
        if name == "dsac":   # no depth: DSAC++ heuristic targets, then the reprojection stage
            loss.update(stage="reprojection", init_depth=10.0)
            args["inlier_threshold"] = 3.0
        if name == "netvlad":  # even frames of a car 1.5-5 m apart: radii in metres of road
            loss.update(pos_radius=6.0, neg_radius=20.0, pos_angle_deg=None)
            args.update(database_spacing=0.0, consistency_m=8.0)
        if "tuple" in cfg:
            cfg["tuple"] = {"steps": 3, "skip": 2, "stride": 1}
    if quick:
        cfg["max_steps"] = steps
        cfg.update(workers=0, threads=1, amp="none")
        cfg["model"]["init_from"] = None  # the quick networks are smaller than the shipped ones
        cfg["optim"] = {**cfg.get("optim", {}), "epochs": 1, "batch_size": 4, "val_every": 1}
        if dataset["kind"] != "kitti":
            cfg["input"] = {"resize": 60, "crop": [56, 80]}
        if name in SMALL_TRUNK:
            args["backbone"] = "small"
        if name == "dsac":
            args["hypotheses"] = 64
            loss.update(hypotheses=16, e2e_after=max(steps // 2, 1))
        if name == "netvlad":
            args.update(clusters=8, feat_dim=16)
        if name == "allocentric":
            args.update(feat_dim=8, resolution=0.2, rotations=36)
            loss.update(memory_frames=2, train_rotations=18, min_separation=5)
        if name in ("posenet", "mapnet") or name.startswith("posenet_"):
            args["feat_dim"] = 256
    return cfg


# --------------------------------------------------------------------------- evaluation

def planar_errors(t_est, q_est, t_gt, q_gt):
    """xy distance (m) and yaw difference (deg) of the camera's forward direction."""
    xy = np.linalg.norm(t_est[:, :2] - t_gt[:, :2], axis=1)
    f_est = geometry.quat_to_matrix(q_est)[:, :, 2]
    f_gt = geometry.quat_to_matrix(q_gt)[:, :, 2]
    yaw = np.degrees(np.abs(np.angle(np.exp(1j * (np.arctan2(f_est[:, 1], f_est[:, 0])
                                                  - np.arctan2(f_gt[:, 1], f_gt[:, 0]))))))
    return xy, yaw


def evaluate(weights: Path, dataset, device: str, z_up: bool = True) -> dict:
    estimator = PoseEstimator(weights, device=device, cpu_threads=1)
    ts, qs, covs = [], [], []
    for start in range(0, len(dataset), 16):
        images = [dataset[i]["image"] for i in range(start, min(start + 16, len(dataset)))]
        for r in estimator.estimate_batch(images):
            ts.append(r.t)
            qs.append(r.q)
            covs.append(r.cov)
    t_est, q_est = np.array(ts), np.array(qs)
    t_gt, q_gt = dataset.poses()
    metrics = evaluate_poses(t_est, q_est, t_gt, q_gt)
    # NEES of the reported covariances (6 when they are right; larger: over-confident)
    nees = metrics_nees(pose_error_vectors(t_est, q_est, t_gt, q_gt), np.asarray(covs))
    metrics["median_nees"] = float(np.nanmedian(nees))
    if z_up:  # planar errors need a vertical z (the synthetic world; not KITTI's camera frame)
        xy, yaw = planar_errors(t_est, q_est, t_gt, q_gt)
        metrics["median_xy_m"] = float(np.median(xy))
        metrics["median_yaw_deg"] = float(np.median(yaw))
    return metrics


def latency_ms(weights: Path, image: np.ndarray, device: str, repeats: int = 10) -> float:
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


def checkpoint_mb(weights: Path) -> float:
    files = [weights] + list(weights.parent.glob(weights.name.replace(".safetensors", ".*.safetensors")))
    return sum(f.stat().st_size for f in files if not f.name.endswith(".state.safetensors")) / 1e6


def run_one(name: str, dataset: dict, args, work: Path) -> dict:
    row = {"model": name, "method": NAMES.get(name, name), "data": dataset["name"]}
    if dataset["kind"] == "kitti" and name in NEEDS_DEPTH:
        row["note"] = "skipped: needs depth images (KITTI has none here)"
        return row
    unlabeled = (base_config(name).get("unlabeled") or {}).get("root")
    if unlabeled is not None and (dataset["kind"] == "kitti" or not Path(unlabeled).exists()):
        row["note"] = f"skipped: needs unlabeled recordings with odometry ({unlabeled})"
        return row
    test = open_dataset(dataset["kind"], dataset["test"], split="test")
    shipped = Path(args.weights) / f"{name}_demo.safetensors" if args.weights else None
    started = time.time()
    if dataset["name"] == "demo" and shipped is not None and shipped.is_file():
        weights = shipped
        row["training"] = "shipped weights"
    else:
        out = work / dataset["name"].replace("/", "_") / name
        config = zoo_config(name, dataset, args.quick, args.steps, out, args.device)
        config = _checked(config)
        train.train(config, progress=False, overwrite=True)  # its own --work folder: a rerun retrains
        weights = out.with_name(out.name + ".safetensors")
        meta = json.loads(weights.with_suffix(".json").read_text())
        steps = meta.get("training", {}).get("steps")
        row["training"] = f"{steps} steps" + (" (quick)" if args.quick else "")
        row["train_s"] = round(time.time() - started, 1)
    row.update(evaluate(weights, test, args.device, z_up=dataset["kind"] != "kitti"))
    image = test[0]["image"]
    row["cpu_ms"] = latency_ms(weights, image, "cpu")
    if torch.cuda.is_available() and args.device != "cpu":
        row["gpu_ms"] = latency_ms(weights, image, "cuda")
    row["checkpoint_mb"] = round(checkpoint_mb(weights), 1)
    return row


def _checked(config: dict) -> dict:
    """Through vizloc-train's own validation (defaults, types)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(config, handle)
    try:
        return train.load_config(handle.name)
    finally:
        os.unlink(handle.name)


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


def markdown(rows: list[dict], quick: bool) -> str:
    lines = [f"Model zoo, {dt.date.today().isoformat()}, {machine()}"
             + (" - quick mode (smoke-level training: the pipeline runs, the figures are not "
                "the methods' accuracy)" if quick else ""), "",
             "| method | registry | data | training | median t (m) | median r (deg) | xy (m) | yaw (deg) "
             "| within 25 cm, 2 deg | CPU ms/frame | GPU ms/frame | checkpoint MB |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "median_translation_m" not in r:
            lines.append(f"| {r['method']} | `{r['model']}` | {r['data']} | {r.get('note', 'failed')} "
                         "| - | - | - | - | - | - | - | - |")
            continue
        lines.append(
            f"| {r['method']} | `{r['model']}` | {r['data']} | {r.get('training', '')} "
            f"| {_fmt(r['median_translation_m'])} | {_fmt(r['median_rotation_deg'], 1)} "
            f"| {_fmt(r.get('median_xy_m'))} | {_fmt(r.get('median_yaw_deg'), 1)} "
            f"| {_fmt(r['within_25cm_2deg'], 0, 100, ' %')} | {_fmt(r.get('cpu_ms'), 0)} "
            f"| {_fmt(r.get('gpu_ms'), 1)} | {_fmt(r.get('checkpoint_mb'), 1)} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated registry names (default: every registered model)")
    parser.add_argument("--demo-train", default=str(ROOT / "data" / "demo_train"))
    parser.add_argument("--demo-val", default=str(ROOT / "data" / "demo_val"),
                        help="validation walk (picks the best epoch)")
    parser.add_argument("--demo-test", default=None,
                        help="test walk, a 7-Scenes folder whose TestSplit is the held-out walk "
                             "(default: --demo-val)")
    parser.add_argument("--kitti", default=str(ROOT.parent / "shared" / "data" / "kitti"),
                        help="folder of KITTI sequences (each with poses.txt); 'none' to skip")
    parser.add_argument("--quick", action="store_true", help="a few steps on tiny inputs (CPU smoke run)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per model in --quick mode")
    parser.add_argument("--thin", type=int, default=10,
                        help="--quick: use every N-th demo frame (training and test)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--weights", default=None, help="evaluate DIR/<name>_demo.safetensors where present")
    parser.add_argument("--work", default=None, help="checkpoints go here (default: a temporary folder)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "model_zoo.md"))
    parser.add_argument("--json", default=None, help="also write the rows as JSON (default: --out with .json)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1 if args.quick else max(1, torch.get_num_threads()))
    # scene-coordinate maps (ace) are made by vizloc-map, not vizloc-train: benchmarks/bench_mapping.py
    models = args.models.split(",") if args.models else [m for m in available_models() if trained_by(m) == "vizloc-train"]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="vizloc_zoo_"))
    views = Path(tempfile.mkdtemp(prefix="vizloc_zoo_data_"))
    datasets = []
    demo_train, demo_val = Path(args.demo_train), Path(args.demo_val)
    if demo_train.is_dir() and demo_val.is_dir():
        if args.quick and args.thin > 1:
            demo_train = thin_sevenscenes(demo_train, views / "demo_train", args.thin)
            demo_val = thin_sevenscenes(demo_val, views / "demo_val", args.thin)
        demo_test = Path(args.demo_test) if args.demo_test else demo_val
        if args.quick and args.thin > 1 and args.demo_test:
            demo_test = thin_sevenscenes(demo_test, views / "demo_test", args.thin)
        datasets.append({"name": "demo", "kind": "7scenes", "train": demo_train, "val": demo_val,
                         "test": demo_test})
    else:
        print(f"model_zoo: no demo scene at {demo_train} / {demo_val}: skipped", file=sys.stderr)
    if args.kitti != "none" and Path(args.kitti).is_dir():
        for seq in sorted(p for p in Path(args.kitti).iterdir() if (p / "poses.txt").is_file()):
            datasets.append({"name": f"kitti/{seq.name}", "kind": "kitti",
                             "train": kitti_split(seq, views / seq.name / "even", 0),
                             "test": kitti_split(seq, views / seq.name / "odd", 1)})
            datasets[-1]["val"] = datasets[-1]["test"]  # 51 frames: no separate validation split
    rows = []
    for dataset in datasets:
        for name in models:
            print(f"model_zoo: {name} on {dataset['name']} ...", file=sys.stderr, flush=True)
            try:
                row = run_one(name, dataset, args, work)
            except Exception as exc:  # noqa: BLE001 - one model's failure is a row, not the end
                traceback.print_exc()
                row = {"model": name, "method": NAMES.get(name, name), "data": dataset["name"],
                       "note": f"failed: {type(exc).__name__}: {str(exc)[:120]}"}
            rows.append(row)
            print(f"model_zoo: {json.dumps(row)}", file=sys.stderr, flush=True)
    text = markdown(rows, args.quick)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    json_path = Path(args.json) if args.json else out.with_suffix(".json")
    json_path.write_text(json.dumps({"date": dt.date.today().isoformat(), "machine": machine(),
                                     "quick": args.quick, "rows": rows}, indent=2) + "\n")
    print(text)
    shutil.rmtree(views, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
