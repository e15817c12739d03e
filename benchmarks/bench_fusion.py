#!/usr/bin/env python3
"""Latency of the sliding-window fusion: update + estimate, per message, in steady state.

Feeds a simulated 10 Hz network / 50 Hz odometry / 200 Hz IMU stream (synthetic smooth
trajectory, 10 % outliers, realistic latency; vizloc_ros.sim.fusion_sim) through
SlidingWindowFusion for window sizes 10, 20 and 50 poses, with and without IMU
preintegration, and reports median and p95 of:

* ``add_absolute`` + ``estimate`` (the graph update: the number the target is about);
* ``add_odometry`` + ``estimate`` (propagation only, run at the odometry rate);
* ``add_imu``.

Both wall-clock and thread CPU time are reported: on a shared machine the wall-clock
tail is dominated by the scheduler, the CPU time is what the fusion itself costs.
The first 2 * window_size network outputs (window filling) are left out.

Usage: .venv/bin/python benchmarks/bench_fusion.py [--seconds 120] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vizloc_ros.fusion import FusionConfig, SlidingWindowFusion  # noqa: E402
from vizloc_ros.sim.fusion_sim import (DEFAULT_BASE_T_CAMERA, FUSION_MODES, SimConfig, simulate,  # noqa: E402
                                       synthetic_trajectory)

MODES = {name: FUSION_MODES[name] for name in ("abs+odom", "abs+odom+imu", "abs+imu")}


def _stats(samples):
    a = np.asarray(samples) * 1e3
    if a.size == 0:
        return {"median_ms": None, "p95_ms": None, "n": 0}
    return {"median_ms": float(np.median(a)), "p95_ms": float(np.percentile(a, 95)), "n": int(a.size)}


def measure(seq, window_size: int, mode: str) -> dict:
    fusion = SlidingWindowFusion(FusionConfig(window_size=window_size, base_T_camera=DEFAULT_BASE_T_CAMERA,
                                              **MODES[mode]))
    cfg = fusion.config
    wall = time.perf_counter
    cpu = time.thread_time
    out = {k: [] for k in ("abs_wall", "abs_cpu", "odom_wall", "odom_cpu", "imu_wall")}
    n_abs = 0
    skip = 2 * window_size
    for _, _, kind, payload in seq.events:
        if kind == "imu":
            if cfg.use_imu:
                t0 = wall()
                fusion.add_imu(*payload)
                out["imu_wall"].append(wall() - t0)
            continue
        if kind == "odom":
            if not cfg.use_odom:
                continue
            t0, c0 = wall(), cpu()
            fusion.add_odometry(*payload)
            fusion.estimate()
            dt_w, dt_c = wall() - t0, cpu() - c0
            if n_abs > skip:
                out["odom_wall"].append(dt_w)
                out["odom_cpu"].append(dt_c)
            continue
        s, mt, mq, cov, _ = payload
        t0, c0 = wall(), cpu()
        fusion.add_absolute(s, mt, mq, cov)
        fusion.estimate()
        dt_w, dt_c = wall() - t0, cpu() - c0
        n_abs += 1
        if n_abs > skip:
            out["abs_wall"].append(dt_w)
            out["abs_cpu"].append(dt_c)
    res = {k: _stats(v) for k, v in out.items()}
    res["counters"] = dict(fusion.counters)
    return res


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="simulated sequence length")
    parser.add_argument("--windows", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--json", default=str(REPO / "benchmarks/results/bench_fusion.json"))
    args = parser.parse_args(argv)
    seq = simulate(*synthetic_trajectory(args.seconds), SimConfig(seed=0))
    load0 = os.getloadavg()
    rows = []
    header = (f"{'mode':<14} {'window':>6} | {'absolute+estimate (ms)':^31} | "
              f"{'odometry+estimate (ms)':^23} | {'imu (ms)':^8}")
    print(header)
    print(f"{'':<14} {'':>6} | {'wall med':>8} {'p95':>6} {'cpu med':>8} {'p95':>6} | "
          f"{'wall med':>8} {'cpu med':>7} {'p95':>6} | {'med':>8}")
    print("-" * len(header))
    for mode in args.modes:
        for window in args.windows:
            r = measure(seq, window, mode)
            r.update(mode=mode, window_size=window)
            rows.append(r)

            def f(key, field):
                v = r[key][field]
                return "   -" if v is None else f"{v:.3f}"
            print(f"{mode:<14} {window:>6} | {f('abs_wall', 'median_ms'):>8} {f('abs_wall', 'p95_ms'):>6} "
                  f"{f('abs_cpu', 'median_ms'):>8} {f('abs_cpu', 'p95_ms'):>6} | "
                  f"{f('odom_wall', 'median_ms'):>8} {f('odom_cpu', 'median_ms'):>7} "
                  f"{f('odom_cpu', 'p95_ms'):>6} | {f('imu_wall', 'median_ms'):>8}", flush=True)
    load1 = os.getloadavg()
    print(f"\nload average before/after: {load0[0]:.2f} / {load1[0]:.2f} on {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()})")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"seconds": args.seconds, "cpu_count": os.cpu_count(), "load_before": load0,
            "load_after": load1, "python": platform.python_version(), "machine": platform.machine()}
    with open(out, "w", encoding="utf-8") as handle:
        json.dump({"meta": meta, "rows": rows}, handle, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
