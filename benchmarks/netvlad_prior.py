#!/usr/bin/env python3
"""NetVLAD as the coarse prior of the fusion after a kidnap (issue #18's target: "as the
coarse prior in ``vizloc-replay --prior-weights`` on a bag where the robot is carried 3 m
away mid-walk, the fused pose is back within 0.5 m within 10 frames").

Renders a walk of the demo room whose robot is carried ``--distance`` metres at
``--at-frame`` while the odometry does not notice (:mod:`vizloc_ros.sim.kidnap`; by
default the held-out walk's seed), replays it with ``vizloc-replay BAG --weights WEIGHTS``
twice, with and without ``--prior-weights NETVLAD``, and counts, from each replay's TUM
files, the network frames from the carry until the fused pose is back within ``--within``
metres of the truth and stays there for ``--hold`` frames. The kidnap bag is kept in
``--work`` and reused while its parameters are the same; the replays run every time.

Usage: .venv/bin/python benchmarks/netvlad_prior.py --prior-weights weights/netvlad_demo.safetensors
           [--weights weights/mapnet_demo.safetensors] [--work /tmp/netvlad_prior]
           [--json benchmarks/results/netvlad_prior.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this tree's vizloc_ros, not another checkout's install

import numpy as np  # noqa: E402

from vizloc_ros.files import write_text  # noqa: E402
from vizloc_ros.ros_io.ground_truth import previous_poses  # noqa: E402
from vizloc_ros.ros_io.tum import read_tum  # noqa: E402

#: the issue's target: back within 0.5 m within 10 network frames
TARGET = {"within_m": 0.5, "frames": 10}
#: the held-out walk's seed (vizloc_ros.sim.synthetic.demo_sequences, seed 0)
HELD_OUT_WALK_SEED = 101


def _parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, got {text!r}") from None
    if width < 16 or height < 16:
        raise argparse.ArgumentTypeError(f"size must be at least 16x16, got {text!r}")
    return width, height


def kidnap_bag(work: Path, frames: int, at_frame: int, distance: float, seed: int,
               size: tuple[int, int], progress: bool) -> tuple[Path, dict]:
    """The kidnap walk's bag under ``work`` (rendered unless one with these parameters is
    there) and its ``kidnap`` block (where, when, how far; stamps from the walk's start)."""
    from vizloc_ros.sim.kidnap import simulate_kidnap
    from vizloc_ros.sim.synthetic import SequenceSpec, SynthConfig, write_simulated

    out = work / "kidnap_walk"
    wanted = {"frames": frames, "at_frame": at_frame, "distance_m": distance, "seed": seed,
              "size": list(size)}
    scene_json = out / "scene.json"
    if scene_json.is_file():
        try:
            known = json.loads(scene_json.read_text())
        except (OSError, ValueError):
            known = {}
        if known.get("kidnap_request") == wanted and (out / "bags" / "seq-01").is_dir():
            return out / "bags" / "seq-01", known["kidnap"] | {"epoch_ns": known["epoch_ns"]}
    config = SynthConfig(width=size[0], height=size[1])
    sim, kidnap = simulate_kidnap(SequenceSpec(1, "test", seed, frames), config, at_frame, distance)
    write_simulated(out, [sim], config, fmt="bag", overwrite=True, progress=progress,
                    metadata={"kidnap": kidnap.metadata(), "kidnap_request": wanted})
    return out / "bags" / "seq-01", kidnap.metadata() | {"epoch_ns": config.epoch_ns}


def replay(bag: Path, out: Path, weights: Path, prior: Path | None, device: str, child: bool = True) -> dict:
    """``vizloc-replay BAG --weights W [--prior-weights P]`` into ``out``; its metrics."""
    from vizloc_ros.replay import cli

    options = cli.ReplayOptions(bag=bag, out=out, weights=weights, prior_weights=prior, device=device,
                                overwrite=True, progress=False, fusion_process=child)
    return cli.run_replay(options)


def recovery(report: Path, carried_at: float, within: float, hold: int) -> dict:
    """From a replay's ``absolute.tum`` (one line per network frame), ``fused.tum`` and
    ``ground_truth.tum``: the fused error at each network frame from the carry on, and the
    number of frames until it is within ``within`` m and stays so for ``hold`` frames
    (None: never)."""
    frame_stamps = read_tum(report / "absolute.tum")[0]
    fused = read_tum(report / "fused.tum")
    gt_stamps, gt_t, _ = read_tum(report / "ground_truth.tum")
    after = frame_stamps[frame_stamps >= carried_at - 1e-6]
    if len(after) == 0:
        raise ValueError(f"{report}: no network frame after the carry")
    fused_t, _ = previous_poses(*fused, after)
    nearest = np.clip(np.searchsorted(gt_stamps, after), 1, len(gt_stamps) - 1)
    nearest -= (after - gt_stamps[nearest - 1]) < (gt_stamps[nearest] - after)
    errors = np.linalg.norm(fused_t - gt_t[nearest], axis=1)  # NaN before the first fused pose
    ok = np.nan_to_num(errors, nan=np.inf) <= within
    back = next((i + 1 for i in range(len(ok)) if ok[i:i + hold].all()), None)  # 1: the carry's frame
    return {"frames_until_back": back, "error_first_frame_m": float(errors[0]),
            "error_at_10_frames_m": float(errors[min(9, len(errors) - 1)]),
            "error_final_m": float(errors[-1]), "frames_after_carry": int(len(after)),
            "errors_first_20_m": [round(float(e), 3) for e in errors[:20]]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prior-weights", required=True, help="the NetVLAD checkpoint (with its database)")
    parser.add_argument("--weights", default=str(REPO / "weights/mapnet_demo.safetensors"),
                        help="the absolute-pose network (default: the shipped MapNet)")
    parser.add_argument("--work", default="/tmp/netvlad_prior", help="the kidnap bag and the replays")
    parser.add_argument("--json", default=str(REPO / "benchmarks/results/netvlad_prior.json"))
    parser.add_argument("--frames", type=int, default=300, help="camera frames of the walk (default 300)")
    parser.add_argument("--at-frame", type=int, default=150, help="the frame at which it is carried")
    parser.add_argument("--distance", type=float, default=3.0, help="metres it is carried (default 3)")
    parser.add_argument("--seed", type=int, default=HELD_OUT_WALK_SEED,
                        help=f"the walk's seed (default {HELD_OUT_WALK_SEED}: the demo's held-out walk)")
    parser.add_argument("--size", type=_parse_size, default=(320, 240), help="image WIDTHxHEIGHT")
    parser.add_argument("--within", type=float, default=TARGET["within_m"], help="metres counted as back")
    parser.add_argument("--hold", type=int, default=5, help="frames it must stay within (default 5)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--single-process", action="store_true",
                        help="fuse in this process (vizloc-replay --single-process)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    for name in ("prior_weights", "weights"):
        if not Path(getattr(args, name)).is_file():
            print(f"netvlad_prior: --{name.replace('_', '-')} {getattr(args, name)} does not exist", file=sys.stderr)
            return 2
    if args.frames < 3 or args.hold < 1 or args.distance <= 0 or args.within <= 0:
        print("netvlad_prior: --frames >= 3, --hold >= 1, --distance and --within > 0", file=sys.stderr)
        return 2
    if args.threads > 0:
        import torch
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    started = time.perf_counter()
    try:
        bag, kidnap = kidnap_bag(work, args.frames, args.at_frame, args.distance, args.seed, args.size,
                                 not args.quiet)
        carried_at = kidnap["epoch_ns"] * 1e-9 + kidnap["at_time_s"]
        runs = {}
        for name, prior in (("with_prior", Path(args.prior_weights)), ("without_prior", None)):
            metrics = replay(bag, work / name, Path(args.weights), prior, args.device, not args.single_process)
            fused = metrics["sources"].get("fused", {})
            runs[name] = {**recovery(work / name, carried_at, args.within, args.hold),
                          "reinitialisations": fused.get("reinitialisations"),
                          "fused_median_m": fused.get("median_translation_m"),
                          "counts": {k: v for k, v in metrics["counts"].items() if "coarse" in k or "reinit" in k}}
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"netvlad_prior: {exc}", file=sys.stderr)
        return 2
    back = runs["with_prior"]["frames_until_back"]
    result = {"target": TARGET, "passes": back is not None and back <= TARGET["frames"],
              "kidnap": kidnap, "weights": str(args.weights), "prior_weights": str(args.prior_weights),
              "within_m": args.within, "hold_frames": args.hold, "frames": args.frames, "seed": args.seed,
              "size": list(args.size), "device": args.device, "machine": platform.processor() or platform.machine(),
              "seconds": round(time.perf_counter() - started, 1), "runs": runs}
    print(f"carried {kidnap['distance_m']:.2f} m at frame {kidnap['at_frame']} ({kidnap['at_time_s']:.2f} s)")
    for name, run in runs.items():
        print(f"{name:>13}: back within {args.within} m after {run['frames_until_back']} network frames "
              f"(error {run['error_first_frame_m']:.2f} m at the carry, {run['error_at_10_frames_m']:.2f} m "
              f"10 frames later, {run['error_final_m']:.2f} m at the end; "
              f"{run['reinitialisations']} reinitialisations)")
    print(f"target (back within {TARGET['within_m']} m within {TARGET['frames']} frames with the prior): "
          f"{'met' if result['passes'] else 'not met'}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, json.dumps(result, indent=1) + "\n", what="benchmark result")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
