"""Mapping and relocalization with scene-coordinate maps (``ace``) on this CPU.

For each scene: render (once, cached) the training walks and the held-out test walk, and
the same test walk under another lighting; make a map from the training walks (in a
child process, so its peak memory is its own); localize every test frame through
``PoseEstimator`` on one CPU thread, as the regressor node would. Reports the mapping
time split into encoding, head training and validation, the buffer's memory, the
process's peak memory, the map's size, the localization latency (median / p95), the
accuracy (median translation / rotation, share within 5 cm / 5 deg) with the average
NEES per degree of freedom of the published covariance, and the same on the relit walk.

    python benchmarks/bench_mapping.py [--scenes demo,room:3000,room:3001,room:3002]
        [--minutes 6 | --steps N] [--threads 2] [--frames 300] [--train-walks 4] [--every 1]
        [--lighting 7] [--depth]
        [--encoder weights/scene_encoder.safetensors] [--out benchmarks/results/bench_mapping.json]

The rooms are evaluation seeds (vizloc_ros.sim.rooms.SEED_USES): the encoder never saw
them. ``--depth`` maps with the rendered depth as extra supervision (an RGB-D
recording); without it only the poses and intrinsics are used, as from a camera bag.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vizloc_ros" / "bench_mapping"


def render(scene: str, frames: int, train_walks: int, lighting: int | None) -> tuple[Path, Path]:
    """7-Scenes folders (train walks, test walk) of ``scene``, rendered once."""
    from vizloc_ros.sim.synthetic import SynthConfig, demo_sequences, generate

    tag = scene.replace(":", "_")
    train = CACHE / f"{tag}-train-{train_walks}x{frames}"
    test = CACHE / (f"{tag}-test-{frames}" + (f"-light{lighting}" if lighting is not None else ""))
    if not (train / "scene.json").exists():
        generate(train, demo_sequences("train", frames, train_walks=train_walks), SynthConfig(scene=scene),
                 fmt="7scenes", overwrite=True, progress=False)
    if not (test / "scene.json").exists():
        generate(test, demo_sequences("test", frames), SynthConfig(scene=scene, lighting_seed=lighting),
                 fmt="7scenes", overwrite=True, progress=False)
    return train, test


def _map_child(train: str, out: str, minutes: float, depth: bool, encoder: str | None, queue,
               every: int = 1, steps: int | None = None, threads: int = 2) -> None:
    from vizloc_ros.mapping.mapper import MapOptions, make_map
    from vizloc_ros.mapping.sources import DatasetFrames
    from vizloc_ros.training.datasets import SevenScenes
    from vizloc_ros.training.scene_geometry import dataset_camera

    dataset = SevenScenes(train, "train")
    dataset.items = dataset.items[::every]   # as vizloc-map --every
    dataset = dataset.preload(workers=2)
    options = MapOptions(minutes=minutes, steps=steps, threads=threads, encoder=Path(encoder) if encoder else None,
                         scene=Path(train).name)
    summary = make_map(DatasetFrames(dataset, use_depth=depth), dataset_camera(dataset), out, options)
    summary["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    queue.put(json.loads(json.dumps(summary, default=str)))


def make_map_measured(train: Path, out: Path, minutes: float, depth: bool, encoder: str | None,
                      every: int = 1, steps: int | None = None, threads: int = 2) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    started = time.monotonic()
    child = context.Process(target=_map_child,
                            args=(str(train), str(out), minutes, depth, encoder, queue, every, steps, threads))
    child.start()
    summary = queue.get()
    child.join()
    summary["wall_s"] = time.monotonic() - started
    return summary


def localize_walk(weights: Path, test: Path) -> dict:
    """Every test frame through PoseEstimator on one thread: errors, NEES, latency."""
    import torch

    from vizloc_ros.localize.estimator import PoseEstimator
    from vizloc_ros.metrics import nees, pose_error_vectors, pose_errors
    from vizloc_ros.training.datasets import SevenScenes

    torch.set_num_threads(1)
    dataset = SevenScenes(test, "test").preload(workers=2)
    estimator = PoseEstimator(str(weights), device="cpu")
    estimator.estimate(dataset[0]["image"])  # warm-up
    t_est, q_est, covs, latency = [], [], [], []
    for i in range(len(dataset)):
        image = dataset[i]["image"]
        started = time.perf_counter()
        estimate = estimator.estimate(image)
        latency.append(time.perf_counter() - started)
        t_est.append(estimate.t)
        q_est.append(estimate.q)
        covs.append(estimate.cov)
    t_gt, q_gt = dataset.poses()
    t_est, q_est, covs = np.stack(t_est), np.stack(q_est), np.stack(covs)
    trans, rot = pose_errors(t_est, q_est, t_gt, q_gt)
    values = nees(pose_error_vectors(t_est, q_est, t_gt, q_gt), covs)
    confident = np.sqrt(covs[:, 0, 0] + covs[:, 1, 1] + covs[:, 2, 2]) < 1.0
    return {"frames": int(len(trans)), "median_translation_m": float(np.median(trans)),
            "median_rotation_deg": float(np.median(rot)),
            "within_5cm_5deg": float(np.mean((trans < 0.05) & (rot < 5.0))),
            "within_25cm_2deg": float(np.mean((trans < 0.25) & (rot < 2.0))),
            "nees_per_dof": float(np.nanmean(values) / 6.0), "flagged_failed": int((~confident).sum()),
            "confident_but_wrong": int((confident & (trans > 0.5)).sum()),
            "latency_median_ms": float(np.median(latency) * 1e3),
            "latency_p95_ms": float(np.percentile(latency, 95) * 1e3)}


def markdown(rows: list[dict]) -> str:
    head = ("| scene | frames | encode s | head s | total s | buffer MB | peak GB | map MB | latency ms (median / p95, 1 thread) "
            "| median m / deg | 5 cm, 5 deg | NEES/dof | failed flagged / confident > 0.5 m | relit median m / deg |")
    lines = [head, "|" + " --- |" * 14]
    for r in rows:
        m, t, lit = r["map"], r["test"], r.get("relit") or {}
        timings = m["training"]["timings"]
        lines.append(
            f"| {r['scene']} | {m['training']['frames']} | {timings['encode_s']:.0f} | {timings['head_s']:.0f} | "
            f"{m['wall_s']:.0f} | {m['training']['buffer_bytes'] / 1e6:.0f} | {m['peak_rss_gb']:.2f} | "
            f"{r['map_mb']:.1f} | {t['latency_median_ms']:.0f} / {t['latency_p95_ms']:.0f} | "
            f"{t['median_translation_m']:.3f} / {t['median_rotation_deg']:.2f} | {t['within_5cm_5deg']:.0%} | "
            f"{t['nees_per_dof']:.2f} | {t['flagged_failed']} / {t['confident_but_wrong']} | "
            + (f"{lit['median_translation_m']:.3f} / {lit['median_rotation_deg']:.2f} |" if lit else "- |"))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", default="demo,room:3000,room:3001,room:3002")
    parser.add_argument("--minutes", type=float, default=6.0, help="head training budget per map")
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--train-walks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None,
                        help="a fixed number of head steps instead of --minutes (accuracy that a busy "
                             "machine cannot starve; the times then say how busy it was)")
    parser.add_argument("--threads", type=int, default=2, help="the mapping's threads (MapOptions.threads)")
    parser.add_argument("--every", type=int, default=1,
                        help="map every N-th training frame (as vizloc-map --every): many walks, same frame count")
    parser.add_argument("--lighting", type=int, default=7, help="lighting seed of the relit test walk (-1: none)")
    parser.add_argument("--depth", action="store_true", help="depth-supervised mapping")
    parser.add_argument("--encoder", default=None)
    parser.add_argument("--maps", type=Path, default=CACHE / "maps")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_mapping.json"))
    args = parser.parse_args(argv)
    if args.every < 1 or args.threads < 1 or (args.steps is not None and args.steps < 1):
        parser.error("--every, --threads and --steps must be at least 1")
    rows = []
    args.maps.mkdir(parents=True, exist_ok=True)
    for scene in [s.strip() for s in args.scenes.split(",") if s.strip()]:
        train, test = render(scene, args.frames, args.train_walks, None)
        relit = render(scene, args.frames, args.train_walks, args.lighting)[1] if args.lighting >= 0 else None
        out = args.maps / f"{scene.replace(':', '_')}{'_depth' if args.depth else ''}"
        for suffix in (".safetensors", ".json"):
            Path(str(out) + suffix).unlink(missing_ok=True)
        summary = make_map_measured(train, out, args.minutes, args.depth, args.encoder, args.every, args.steps,
                                    args.threads)
        weights = Path(str(out) + ".safetensors")
        row = {"scene": scene, "map": summary, "map_mb": weights.stat().st_size / 1e6,
               "test": localize_walk(weights, test), "relit": localize_walk(weights, relit) if relit else None}
        rows.append(row)
        print(markdown([row]).splitlines()[-1], flush=True)
    document = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "table": markdown(rows)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1, default=str))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
