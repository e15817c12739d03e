#!/usr/bin/env python3
"""The fusion on walks of the demo room, end to end: is it honest and never worse than its
best input? (issue #20)

Renders walks of the demo room driven by real trajectories (every ``*.tum`` of a
directory, default ``../shared/data/trajectories``; ``vizloc-synth --trajectory FILE
--split test``), replays each of them and the demo's held-out walk with ``vizloc-replay``
(the shipped default weights or ``--weights``, the bag's drifting odometry, the default
fusion parameters or ``--params-file``) and tabulates, from each report's ``metrics.json``: raw, fused and
odometry-only median and final translation error, NEES per dof of the network
(``/vizloc/absolute_pose``) and of the fusion (``/vizloc/pose``), the share of frames
inside the 95 % bound, reinitialisations, and the pass flags of the issue's targets.

Usage: .venv/bin/python benchmarks/fusion_walks.py [DIR] [--work /tmp/fusion_walks]
           [--weights W] [--params-file FILE] [--json benchmarks/results/fusion_walks.json]

Rendered walks are kept in ``--work`` and reused; the replays run every time.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: the issue's targets
TARGETS = {"nees_per_dof": (0.5, 2.0), "share_within_95": (0.90, 0.98), "reinitialisations": 0}


def _python_main(module: str) -> list[str]:
    """A console script of this tree (the installed ones may point at another checkout)."""
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


def render(trajectory: Path, out: Path) -> Path:
    """The walk's bag, rendered on first use."""
    bag = out / "bags" / "seq-01"
    if not bag.is_dir():
        subprocess.run(_python_main("vizloc_ros.sim.synthetic") + [
            "--trajectory", str(trajectory), "--split", "test", "--format", "bag", "--quiet",
            "--out", str(out), "--overwrite"], check=True, cwd=REPO)
    return bag


def replay(bag: Path | None, out: Path, params_file: str | None, weights: str | None = None) -> dict:
    """``vizloc-replay`` of ``bag`` (None: the demo) into ``out``; its metrics.json."""
    cmd = _python_main("vizloc_ros.replay.cli") + (["--demo"] if bag is None else [str(bag)])
    cmd += ["--out", str(out), "--overwrite", "--no-progress"]
    if params_file:
        cmd += ["--params-file", params_file]
    if weights:
        cmd += ["--weights", weights]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"vizloc-replay {bag or '--demo'} failed:\n{done.stderr[-2000:]}")
    return json.loads((out / "metrics.json").read_text())


def row_of(name: str, metrics: dict) -> dict:
    src = metrics["sources"]
    raw, fused, odom = src["absolute"], src.get("fused", {}), src.get("odometry", {})
    row = {"walk": name,
           "raw_median_m": raw["median_translation_m"], "raw_final_m": raw["final_median_translation_m"],
           "fused_median_m": fused.get("median_translation_m"),
           "fused_final_m": fused.get("final_median_translation_m"),
           "odometry_median_m": odom.get("median_translation_m"),
           "odometry_final_m": odom.get("final_median_translation_m"),
           "network_nees_per_dof": raw.get("nees_per_dof"),
           "network_share_within_95": raw.get("nees_share_within_95"),
           "fused_nees_per_dof": fused.get("nees_per_dof"),
           "fused_share_within_95": fused.get("nees_share_within_95"),
           "reinitialisations": fused.get("reinitialisations"),
           "rejected": metrics["counts"].get("fusion_rejected")}
    lo, hi = TARGETS["nees_per_dof"]
    slo, shi = TARGETS["share_within_95"]
    best_median = min(row["raw_median_m"], row["odometry_median_m"] or float("inf"))
    best_final = min(row["raw_final_m"], row["odometry_final_m"] or float("inf"))
    row["passes"] = {
        "fused_nees": row["fused_nees_per_dof"] is not None and lo <= row["fused_nees_per_dof"] <= hi,
        "fused_share_95": row["fused_share_within_95"] is not None
        and slo <= row["fused_share_within_95"] <= shi,
        "network_nees": row["network_nees_per_dof"] is not None and lo <= row["network_nees_per_dof"] <= hi,
        "no_reinitialisation": row["reinitialisations"] == TARGETS["reinitialisations"],
        "median_le_best": row["fused_median_m"] is not None and row["fused_median_m"] <= best_median,
        "final_below_both": row["fused_final_m"] is not None and row["fused_final_m"] < best_final,
    }
    return row


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| walk | raw median / final | fused median / final | odometry-only median / final "
             "| NEES/dof network (in 95 %) | NEES/dof fused (in 95 %) | reinit. | rejected | targets |",
             "| --- | --- | --- | --- | --- | --- | ---: | ---: | --- |"]
    for r in rows:
        flags = "".join("+" if v else "-" for v in r["passes"].values())
        lines.append(
            f"| {r['walk']} | {r['raw_median_m']:.3f} / {r['raw_final_m']:.3f} "
            f"| {_fmt(r['fused_median_m'], '.3f')} / {_fmt(r['fused_final_m'], '.3f')} "
            f"| {_fmt(r['odometry_median_m'], '.3f')} / {_fmt(r['odometry_final_m'], '.3f')} "
            f"| {_fmt(r['network_nees_per_dof'], '.2f')} ({_fmt(r['network_share_within_95'], '.0%')}) "
            f"| {_fmt(r['fused_nees_per_dof'], '.2f')} ({_fmt(r['fused_share_within_95'], '.0%')}) "
            f"| {r['reinitialisations']} | {r['rejected']} | `{flags}` |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", nargs="?", default=str(REPO.parent / "shared/data/trajectories"),
                        help="folder with *.tum trajectories (default: ../shared/data/trajectories)")
    parser.add_argument("--work", default="/tmp/fusion_walks", help="rendered walks and reports")
    parser.add_argument("--params-file", help="the nodes' parameter file, passed to vizloc-replay")
    parser.add_argument("--weights", help="checkpoint, passed to vizloc-replay (default: its default, the demo map)")
    parser.add_argument("--json", default=str(REPO / "benchmarks/results/fusion_walks.json"))
    parser.add_argument("--no-demo", action="store_true", help="leave out the demo's held-out walk")
    args = parser.parse_args(argv)
    files = sorted(Path(args.directory).glob("*.tum"))
    if not files:
        print(f"no *.tum files in {args.directory}", file=sys.stderr)
        return 2
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    walks = ([] if args.no_demo else [("demo held-out walk", None)]) + [(f.stem, f) for f in files]
    rows = []
    started = time.perf_counter()
    for name, trajectory in walks:
        bag = None if trajectory is None else render(trajectory, work / "walks" / name)
        metrics = replay(bag, work / "reports" / name.replace(" ", "_"), args.params_file, args.weights)
        rows.append(row_of(name, metrics))
        print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)
    table = markdown_table(rows)
    print("\n" + table)
    print("\ntargets (flags in order): fused NEES/dof in [0.5, 2]; fused share inside the 95 % bound "
          "in [90 %, 98 %]; network NEES/dof in [0.5, 2]; 0 reinitialisations; fused median <= "
          "min(raw, odometry-only); fused final < both")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"targets": TARGETS, "params_file": args.params_file, "weights": args.weights,
                               "directory": str(args.directory), "seconds": time.perf_counter() - started,
                               "rows": rows, "table": table}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
