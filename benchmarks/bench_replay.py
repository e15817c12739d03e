#!/usr/bin/env python3
"""End-to-end throughput of ``vizloc-replay``, with the time split by stage.

Runs :func:`vizloc_ros.replay.cli.run_replay` on a bag (as the command line does) and reports
frames/s end to end plus the busy seconds of each stage from ``metrics.json``:
``bag_read`` (rosbags reading and deserialising), ``network`` (image decoding + the
estimator) and ``fusion_and_output`` (the fusion in stamp order + writing the result bag).

``--without-network`` measures the pipeline's ceiling when the network costs nothing
(what a fast GPU approaches): a first run records the estimator's outputs, the timed
runs play them back in the same order, so the fusion sees exactly the poses the real
network gave, and image decoding still runs. ``--wait-ms`` adds a sleep per frame in
place of the network, which is how a process waiting for a GPU looks to the CPU: it
shows how much of the fusion the child process hides behind the network.

Usage::

    vizloc-synth --out /tmp/bag640 --format bag --split test --frames 300 --size 640x480
    python benchmarks/bench_replay.py /tmp/bag640/bags/seq-05 [--weights W] [--device cuda]
        [--batch-size 32] [--repeat 3] [--without-network] [--no-fusion] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vizloc_ros.pipeline import regressor as pipeline  # noqa: E402
from vizloc_ros.replay.cli import ReplayOptions, run_replay  # noqa: E402


class _PlaybackEstimator:
    """Wraps a real estimator: records ``estimate_batch`` outputs, then plays them back."""

    def __init__(self, estimator, wait_ms: float = 0.0):
        self._estimator = estimator
        self._wait_s = wait_ms * 1e-3
        self._recorded: list = []
        self._cursor = None

    def __getattr__(self, name):
        return getattr(self._estimator, name)

    def playback(self) -> None:
        self._cursor = 0

    def estimate_batch(self, images, encoding="rgb8", stamps=None):
        if self._cursor is None:
            out = self._estimator.estimate_batch(images, encoding, stamps)
            self._recorded.append(out)
            return out
        out = self._recorded[self._cursor % len(self._recorded)]
        self._cursor += 1
        if self._wait_s:  # like waiting for a GPU: no CPU used, the GIL released
            time.sleep(self._wait_s * len(images))
        if len(out) != len(images):
            raise RuntimeError("playback got a batch of another size than recorded")
        return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bag")
    parser.add_argument("--weights", help="checkpoint (default: the shipped MapNet)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs (the median is reported)")
    parser.add_argument("--without-network", action="store_true",
                        help="play back recorded network outputs: the pipeline's ceiling")
    parser.add_argument("--wait-ms", type=float, default=0.0,
                        help="with --without-network: sleep this long per frame in place of the network, "
                             "as a process waiting for a GPU would")
    parser.add_argument("--no-fusion", action="store_true")
    parser.add_argument("--in-process", action="store_true",
                        help="fuse in the main process (ReplayOptions.fusion_process=False)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)

    playback = None
    if args.without_network:
        real_loader = pipeline.load_estimator

        def loader(weights, **kwargs):
            nonlocal playback
            if playback is None:  # one network per benchmark: --weights
                playback = _PlaybackEstimator(real_loader(weights, **kwargs), args.wait_ms)
            return playback

        pipeline.load_estimator = loader

    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_replay_") as tmp:
        for i in range(args.repeat + (1 if args.without_network else 0)):
            options = ReplayOptions(bag=Path(args.bag), out=Path(tmp) / f"run{i}",
                                    weights=Path(args.weights) if args.weights else None,
                                    device=args.device, precision=args.precision,
                                    batch_size=args.batch_size,
                                    fusion=not args.no_fusion, progress=False,
                                    fusion_process=not args.in_process)
            if playback is not None:
                playback.playback()
            start = time.perf_counter()
            metrics = run_replay(options)
            wall = time.perf_counter() - start
            if args.without_network and i == 0:
                continue  # the recording run
            timing = metrics["timing"]
            runs.append({"frames": metrics["frames"]["estimated"], "frames_per_second": timing["frames_per_second"],
                         "phase_seconds": timing.get("phase_seconds", {}), "wall_with_report_s": round(wall, 3)})
            print(f"run {len(runs)}: {timing['frames_per_second']:.1f} frames/s, "
                  f"phases {timing.get('phase_seconds')}", flush=True)
    fps = [r["frames_per_second"] for r in runs]
    median = runs[int(np.argsort(fps)[len(fps) // 2])]
    frames = median["frames"]
    print(f"\n{'stage':<22}{'seconds':>10}{'ms/frame':>10}")
    for name, seconds in median["phase_seconds"].items():
        print(f"{name:<22}{seconds:>10.3f}{1e3 * seconds / frames:>10.2f}")
    print(f"{'end to end':<22}{frames / median['frames_per_second']:>10.3f}"
          f"{1e3 / median['frames_per_second']:>10.2f}   = {median['frames_per_second']:.1f} frames/s "
          f"(median of {len(runs)})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "bag": args.bag, "weights": args.weights, "device": args.device, "precision": args.precision,
            "batch_size": args.batch_size,
            "without_network": args.without_network, "fusion": not args.no_fusion,
            "fusion_process": not args.in_process, "wait_ms": args.wait_ms,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "runs": runs, "median": median}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
