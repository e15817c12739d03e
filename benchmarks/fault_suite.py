"""Fault, bad-input and load suite (issue #10): every case of the catalogue, then the long loads.

1. Every case of ``test/faults/fault_cases.py`` (the catalogue CI runs: bad images and
   messages through the nodes' cores, broken weights, bags and parameter files, command-line
   mistakes), counted: cases, crashes, NaN / inf outputs, half-written files, behaviours
   other than the stated one.
2. Load, each run in a fresh process so its memory is its own:
   - images at the rate the estimator serves (nominal) and at ``--factor`` times that rate
     (overload) for ``--seconds``, through the regressor node's threading (LatestFrameSlot +
     FrameWorker + RegressorCore), 640x480 rgb8 frames, a ResNet-18 PoseNet at 224x224;
   - odometry at 50 Hz + IMU at 200 Hz (nominal) and odometry at 1 kHz + IMU at 2 kHz, with
     network poses at 10 Hz, into FusionCore on one thread, played at their stamps.

Prints the table of benchmarks/README.md and writes ``benchmarks/results/fault_suite.json``.

    python benchmarks/fault_suite.py                       # everything, 60 s loads (~6 min)
    python benchmarks/fault_suite.py --seconds 10 --no-cases
    python benchmarks/fault_suite.py --device cuda --groups images --no-fusion-load
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "test" / "faults"))

import fault_cases as F  # noqa: E402 - the catalogue lives with the tests that check it
import load_harness as L  # noqa: E402

IMAGE_SIZE = (480, 640)


def make_load_weights(folder: Path) -> Path:
    """ResNet-18 PoseNet at 224x224: a small network, as deployed on a CPU robot."""
    import torch

    from vizloc_ros.localize.models import build_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model("posenet_resnet18", feat_dim=64)
    return save_checkpoint(folder / "posenet_r18_224", model.eval(), {"input": {"resize": 224, "crop": [224, 224]}})


def _torch_setup() -> None:
    import torch

    # untrained weights produce denormal floats (~30x slower on CPUs); trained ones do not
    torch.set_flush_denormal(True)


def run_cases(device: str, groups: list[str] | None) -> tuple[list, dict]:
    _torch_setup()
    with tempfile.TemporaryDirectory(prefix="vizloc_faults_") as root:
        res = F.Resources(root, device=device)
        results = []
        for case in F.CASES:
            if groups and case.group not in groups:
                continue
            obs = F.run_case(case, res)
            results.append((case, obs))
            flag = "ok " if (obs.behaviour in case.expected and not obs.crashed and not obs.nan_outputs
                             and not obs.half_written and obs.recovered) else "BAD"
            print(f"  {flag} [{case.group}] {case.name}: {obs.behaviour}"
                  f"{'' if obs.exit_code is None else f' (exit {obs.exit_code})'}", flush=True)
    return results, F.summarize(results)


def child(args) -> int:
    """One load run in this (fresh) process; writes its result as JSON."""
    _torch_setup()
    if args.child == "images":
        from vizloc_ros.pipeline.regressor import load_estimator

        estimator = load_estimator(args.weights, device=args.device)
        result = L.image_load(estimator, args.rate, args.seconds, IMAGE_SIZE)
    elif args.child == "fusion-capacity":  # as fast as it goes: messages of stamps per second of wall
        result = L.fusion_load(args.seconds, odom_hz=1000.0, imu_hz=2000.0, abs_hz=10.0, paced=False)
    else:
        odom, imu = (1000.0, 2000.0) if args.child == "fusion-high" else (50.0, 200.0)
        result = L.fusion_load(args.seconds, odom_hz=odom, imu_hz=imu, abs_hz=10.0, paced=True,
                               depths=L.NODE_QUEUE_DEPTHS)
    result["peak_rss_mb"] = round(L.peak_rss_bytes() / 2**20, 1)
    Path(args.json_out).write_text(json.dumps(result, indent=1))
    return 0


def _spawn(kind: str, seconds: float, json_out: Path, **extra) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--seconds", str(seconds), "--json-out", str(json_out)]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    subprocess.run(cmd, check=True)
    return json.loads(json_out.read_text())


def run_loads(seconds: float, factor: float, device: str, fusion: bool) -> dict:
    from vizloc_ros.pipeline.regressor import load_estimator

    _torch_setup()
    loads: dict = {}
    with tempfile.TemporaryDirectory(prefix="vizloc_load_") as tmp:
        tmp = Path(tmp)
        weights = make_load_weights(tmp)
        estimator = load_estimator(weights, device=device)
        service = L.service_time(estimator, IMAGE_SIZE, frames=20)
        del estimator
        nominal_hz = 1.0 / service
        loads["service_ms"] = round(1000 * service, 2)
        for name, rate in (("images_nominal", nominal_hz), ("images_overload", factor * nominal_hz)):
            print(f"  {name}: {rate:.1f} images/s for {seconds:g} s ...", flush=True)
            loads[name] = _spawn("images", seconds, tmp / f"{name}.json", rate=rate, weights=weights, device=device)
        if fusion:
            for name, length in (("fusion-nominal", seconds), ("fusion-high", seconds),
                                 ("fusion-capacity", min(seconds, 10.0))):
                print(f"  {name} for {length:g} s of stamps ...", flush=True)
                loads[name.replace("-", "_")] = _spawn(name, length, tmp / f"{name}.json")
    nominal, over = loads["images_nominal"], loads["images_overload"]
    loads["verdict"] = {
        "memory_steady_overload_vs_nominal": round(over["rss_mb"]["max_after_5s"] / nominal["rss_mb"]["max_after_5s"] - 1, 4),
        "memory_peak_overload_vs_nominal": round(over["peak_rss_mb"] / nominal["peak_rss_mb"] - 1, 4),
        "memory_growth_overload_after_5s_mb": round(over["rss_mb"]["max_after_5s"] - over["rss_mb"]["after_5s"], 1),
        "latency_median_overload_over_nominal": round(over["latency_ms"]["median"] / nominal["latency_ms"]["median"], 3),
        "latency_p95_overload_over_nominal": round(over["latency_ms"]["p95"] / nominal["latency_ms"]["p95"], 3),
        "latency_growth_overload": round(over["latency_ms"]["last_third_median"]
                                         / over["latency_ms"]["first_third_median"], 3),
        "stale_frames_processed": nominal["stale_frames_processed"] + over["stale_frames_processed"],
    }
    return loads


def print_report(summary: dict | None, loads: dict | None) -> None:
    if summary is not None:
        print("\nfault cases")
        print("| group | cases |")
        print("| --- | ---: |")
        for group, count in summary["by_group"].items():
            print(f"| {group} | {count} |")
        print(f"\ncases {summary['cases']}, crashes {summary['crashes']}, NaN/inf outputs {summary['nan_outputs']}, "
              f"half-written files {summary['half_written']}, not recovered {summary['not_recovered']}, "
              f"unexpected behaviour {summary['unexpected_behaviour']}")
        for line in summary["failures"]:
            print(f"  FAILED {line}")
    if loads:
        n, o = loads["images_nominal"], loads["images_overload"]
        print(f"\nimages (service time {loads['service_ms']} ms), {n['seconds']:g} s each")
        print("| run | input/s | processed/s | dropped (not newest) | stale | latency median / p95 / max ms "
              "| latency first / last third ms | RSS at 5 s / max after 5 s / peak (VmHWM) MB |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, r in (("nominal (1x)", n), ("overload", o)):
            lat = r["latency_ms"]
            print(f"| {name} | {r['input_hz_achieved']} | {r['processed_hz']} | {r['dropped_not_latest']} "
                  f"| {r['stale_frames_processed']} | {lat['median']} / {lat['p95']} / {lat['max']} "
                  f"| {lat['first_third_median']} / {lat['last_third_median']} "
                  f"| {r['rss_mb']['after_5s']} / {r['rss_mb']['max_after_5s']} / {r['peak_rss_mb']} |")
        v = loads["verdict"]
        print(f"overload vs nominal: memory (steady, max after 5 s) {100 * v['memory_steady_overload_vs_nominal']:+.1f} %, "
              f"peak {100 * v['memory_peak_overload_vs_nominal']:+.1f} %, growth under overload after 5 s "
              f"{v['memory_growth_overload_after_5s_mb']} MB; latency median x{v['latency_median_overload_over_nominal']}, "
              f"p95 x{v['latency_p95_overload_over_nominal']}; latency last/first third under overload "
              f"x{v['latency_growth_overload']}")
        if "fusion_capacity" in loads:
            r = loads["fusion_capacity"]
            print(f"\nfusion capacity: {r['seconds_of_messages']:g} s of odometry at 1 kHz + IMU at 2 kHz + poses at "
                  f"10 Hz handled in {r['wall_seconds']} s (x{r['realtime_factor']} real time)")
        for key in ("fusion_nominal", "fusion_high"):
            if key not in loads:
                continue
            r = loads[key]
            print(f"\n{key}: {r['rates_hz']} Hz for {r['seconds_of_messages']:g} s of stamps in {r['wall_seconds']} s; "
                  f"lost to the node's queue depths {r['queue_depths']}: {r['dropped_by_queue']}; "
                  f"RSS start / at 60 % / end / peak {r['rss_mb']['start']} / {r['rss_mb']['at_60pct']} / {r['rss_mb']['end']} / "
                  f"{r['peak_rss_mb']} MB; "
                  f"NaN {r['nan_outputs']}; final error {r['final_error_m']} m")
            print("| input | work median / p99 / max ms | latency (handled - stamp) median / p99 / max ms "
                  "| latency last sixth median / p99 ms |")
            print("| --- | ---: | ---: | ---: |")
            for k in r["work_ms"]:
                w, lat = r["work_ms"][k], r["latency_ms"][k]
                print(f"| {k} | {w['median']} / {w['p99']} / {w['max']} | {lat['median']} / {lat['p99']} / {lat['max']} "
                      f"| {lat['last_sixth_median']} / {lat['last_sixth_p99']} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each load run (default 60)")
    parser.add_argument("--factor", type=float, default=10.0, help="image overload factor (default 10)")
    parser.add_argument("--device", default="cpu", help="estimator device for the image cases and loads")
    parser.add_argument("--groups", default=None, help="comma-separated case groups (default: all)")
    parser.add_argument("--no-cases", action="store_true", help="skip the catalogue")
    parser.add_argument("--no-load", action="store_true", help="skip the load runs")
    parser.add_argument("--no-fusion-load", action="store_true", help="skip the fusion load runs")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fault_suite.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    started = time.perf_counter()
    groups = args.groups.split(",") if args.groups else None
    document = {"command": " ".join(["python", "benchmarks/fault_suite.py", *(argv if argv is not None else sys.argv[1:])]),
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                            "device": args.device, "load_average_at_start": os.getloadavg()}}
    summary = loads = None
    if not args.no_cases:
        print("fault cases:", flush=True)
        results, summary = run_cases(args.device, groups)
        document["cases"] = summary
        document["case_results"] = [
            {"group": c.group, "name": c.name, "expected": list(c.expected), "why": c.why, "behaviour": o.behaviour,
             "exit_code": o.exit_code, "crashed": o.crashed, "nan_outputs": o.nan_outputs,
             "half_written": o.half_written, "recovered": o.recovered, "detail": o.detail[:300],
             "seconds": round(o.seconds, 3)} for c, o in results]
    if not args.no_load:
        print("load runs:", flush=True)
        loads = run_loads(args.seconds, args.factor, args.device, fusion=not args.no_fusion_load)
        document["load"] = loads
    document["seconds"] = round(time.perf_counter() - started, 1)
    document["machine"]["load_average_at_end"] = os.getloadavg()
    print_report(summary, loads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(document, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"\nwrote {out} ({document['seconds']} s)")
    bad = summary is not None and (summary["crashes"] or summary["nan_outputs"] or summary["half_written"]
                                   or summary["unexpected_behaviour"] or summary["not_recovered"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
