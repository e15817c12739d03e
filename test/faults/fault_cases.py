"""The fault catalogue of issue #10: every case, its expected behaviour, and how it is seen.

One definition, two users: ``test/faults/test_fault_catalogue.py`` runs every case in CI
and checks it; ``benchmarks/fault_suite.py`` runs them all again, adds the long load runs
and counts cases, crashes, NaN outputs and half-written files.

A case injects one fault where a user's mistake or a broken sensor would put it, through
the code the user reaches:

* images and messages go through the nodes' ROS-free cores (``RegressorCore``,
  ``FusionCore``) and the regressor node's worker loop (``LatestFrameSlot`` +
  ``FrameWorker``), with rosbags messages;
* weights go through ``pipeline.load_estimator`` (what the node, ``vizloc-replay`` and
  ``vizloc-eval`` load them with) and through the command lines' ``main()``;
* bags and output folders go through ``vizloc-replay`` / ``vizloc-eval`` / ``vizloc-export``;
* parameter files go through ``node_params`` (what the nodes convert parameters with).

Expected behaviours (a case states which it must show):

``error``  a clear one-line error; the command lines exit with code 2 (``vizloc-export``: 1 for
           a network that fails validation), no traceback, nothing written;
``drop``   the input is dropped and counted, the next good input is processed;
``reset``  the fusion starts over cleanly and localizes again from the following inputs;
``ok``     the input is processed normally (an unusual but valid input).

Every case also checks: nothing raised out of the core or the command (a crash), no NaN
or inf in what was published or written, no half-written file or folder left behind.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

# torch, the trainer and the synthetic world are imported by the cases that need them:
# collecting the catalogue (and benchmarks/fault_suite.py --help) loads no torch
from vizloc_ros.nodes import params as P
from vizloc_ros.pipeline.fusion_core import FusionCore, FusionSettings
from vizloc_ros.pipeline.outputs import OutputTopics, regressor_messages
from vizloc_ros.pipeline.regressor import RegressorCore, load_estimator
from vizloc_ros.replay import cli as replay_cli
from vizloc_ros.ros_io import messages
from vizloc_ros.ros_io.bag_io import read_messages

TYPES = messages.rosbags_types()
T0 = 1_700_000_000.0
#: names of temporary files and folders that must never outlive a command
PARTIAL = re.compile(r"\.partial|\.tmp|\.unvalidated")


@dataclass
class Observation:
    """What one case did."""

    behaviour: str                  # error | drop | reset | ok | crash
    detail: str = ""                # the error line, the drop reason, the traceback of a crash
    exit_code: int | None = None    # command lines only
    crashed: bool = False           # an exception escaped, or a traceback was printed
    nan_outputs: int = 0            # non-finite numbers published or written
    half_written: list = field(default_factory=list)  # partial files / folders left behind
    recovered: bool = True          # the next good input was processed normally
    seconds: float = 0.0


@dataclass
class Case:
    name: str
    group: str                      # images, messages, weights, bags, params, cli, load
    expected: tuple                 # acceptable behaviours
    run: Callable                   # run(resources) -> Observation
    why: str = ""                   # the expected behaviour in words


# --------------------------------------------------------------------------- resources

class Resources:
    """Small inputs every case shares, built on first use under ``root``."""

    def __init__(self, root, device: str = "cpu"):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.device = device  # of the estimator the image cases run
        self._weights = self._bag = self._estimator = None

    @property
    def weights(self) -> Path:
        """A tiny ResNet-18 PoseNet (48x64 input) with a validation covariance."""
        if self._weights is None:
            import torch

            from vizloc_ros.localize.models import build_model, save_checkpoint

            torch.manual_seed(0)
            model = build_model("posenet_resnet18", feat_dim=32)
            model.set_pose_stats([0.0, 0.0, 1.3], [1.0, 1.0, 0.2])
            cov = np.diag([0.09, 0.09, 0.09, 0.01, 0.01, 0.01]).tolist()
            self._weights = save_checkpoint(
                self.root / "weights" / "tiny", model.eval(),
                {"input": {"resize": 48, "crop": [48, 64]}, "validation_errors": {"cov_ros": cov}})
        return self._weights

    @property
    def bag(self) -> Path:
        """The synthetic world: 24 frames at 80x60 with odometry, IMU, ground truth, TF."""
        if self._bag is None:
            from vizloc_ros.sim.synthetic import SequenceSpec, SynthConfig, generate

            generate(self.root / "scene", [SequenceSpec(5, "test", 101, 24)],
                     SynthConfig(width=80, height=60), fmt="bag", progress=False)
            self._bag = self.root / "scene" / "bags" / "seq-05"
        return self._bag

    @property
    def estimator(self):
        if self._estimator is None:
            self._estimator = load_estimator(self.weights, device=self.device, cpu_threads=1)
        return self._estimator

    def workdir(self, case: Case) -> Path:
        folder = self.root / "cases" / re.sub(r"[^A-Za-z0-9]+", "_", f"{case.group}_{case.name}")
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        return folder


def run_case(case: Case, res: Resources) -> Observation:
    """Run one case; an exception out of it is a crash, never a test error."""
    start = time.perf_counter()
    try:
        obs = case.run(res)
    except Exception:  # noqa: BLE001 - the point is to count it
        obs = Observation("crash", detail=traceback.format_exc(limit=-3), crashed=True)
    obs.seconds = time.perf_counter() - start
    return obs


def leftovers(folder: Path) -> list[str]:
    """Partial files / folders under ``folder`` (a command must remove its temporaries)."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if PARTIAL.search(p.name))


# --------------------------------------------------------------------------- counting NaN

def _strict_json(path: Path) -> int:
    """Number of NaN / Infinity tokens in a JSON file (strict JSON has none)."""
    bad = []
    json.loads(Path(path).read_text(), parse_constant=bad.append)
    return len(bad)


def non_finite_in_outputs(path: Path) -> int:
    """NaN / inf written anywhere in an output (a file or a folder): JSON files, TUM files,
    and every pose, covariance and transform in a result bag."""
    path = Path(path)
    files = [path] if path.is_file() else list(path.rglob("*"))
    count = 0
    for file in files:
        if file.suffix == ".json":
            count += _strict_json(file)
        elif file.suffix == ".tum":
            text = file.read_text().lower()
            count += text.count("nan") + text.count("inf")
    for bag in {f.parent for f in files if f.name == "metadata.yaml"}:
        for record in read_messages(bag):
            count += int(not _finite(_numbers(record.msg)))
    return int(count)


def _numbers(msg) -> list:
    """Every pose / covariance / transform number of a result-bag message."""
    def pose(p):
        return [p.position.x, p.position.y, p.position.z,
                p.orientation.x, p.orientation.y, p.orientation.z, p.orientation.w]
    if hasattr(msg, "transforms"):
        return [v for tf in msg.transforms for v in (
            tf.transform.translation.x, tf.transform.translation.y, tf.transform.translation.z,
            tf.transform.rotation.x, tf.transform.rotation.y, tf.transform.rotation.z, tf.transform.rotation.w)]
    if hasattr(msg, "poses"):
        return [v for p in msg.poses for v in pose(p.pose)]
    if hasattr(msg, "pose") and hasattr(msg.pose, "covariance"):
        return pose(msg.pose.pose) + list(np.asarray(msg.pose.covariance, float))
    return []


def _finite(*arrays) -> bool:
    return all(np.all(np.isfinite(np.asarray(a, dtype=float))) for a in arrays)


# --------------------------------------------------------------------------- command lines

def call_cli(main, argv) -> tuple[int, str, str, bool]:
    """(exit code, stdout, stderr, crashed) of ``main(argv)`` as the console script runs it."""
    out, err = io.StringIO(), io.StringIO()
    crashed = False
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 2
        except Exception:  # noqa: BLE001 - a traceback is what the user would have seen
            crashed = True
            code = 1
            err.write(traceback.format_exc())
    stderr = err.getvalue()
    return int(code or 0), out.getvalue(), stderr, crashed or "Traceback (most recent call last)" in stderr


def _error_line(text: str) -> str:
    """The line a command line says its error in ("vizloc-...: ..."), else its last line."""
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith(("WARNING", "INFO"))]
    said = [line for line in lines if line.startswith("vizloc-")]
    return said[0] if said else lines[-1] if lines else ""


def cli_observation(main, argv, workdir: Path, out: Path | None = None,
                    error_code: int = 2) -> Observation:
    """Run a command line; classify its result; look for NaN and half-written outputs."""
    before = _snapshot(out)
    code, stdout, stderr, crashed = call_cli(main, argv)
    obs = Observation("ok" if code == 0 else "error", exit_code=code, crashed=crashed,
                      detail=_error_line(stderr) or _error_line(stdout))
    if crashed:
        obs.behaviour, obs.detail = "crash", stderr[-2000:]
    elif code not in (0, error_code):
        obs.behaviour = f"exit {code}"
    obs.half_written = leftovers(workdir)
    if out is not None and code != 0 and _snapshot(out) != before:
        obs.half_written.append(f"{out.name} (changed by a failed run)")
    elif out is not None and code == 0 and out.exists():
        obs.nan_outputs = non_finite_in_outputs(out)
    return obs


def _snapshot(path: Path | None):
    """Names, sizes and times of what is at ``path`` (None when nothing is)."""
    if path is None or not Path(path).exists():
        return None
    path = Path(path)
    items = [path] + (sorted(path.rglob("*")) if path.is_dir() else [])
    return [(str(p.relative_to(path)), p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in items]


def _replay_main():
    return replay_cli.main


def _eval_main():
    from vizloc_ros.training import evaluate

    return evaluate.main


def _export_main():
    from vizloc_ros.training import export

    return export.main


def replay_case(args=(), bag=None, weights=None, out="report", prepare=None, error_code=2):
    """A case running ``vizloc-replay BAG --weights W --out DIR ARGS``; ``prepare(res, workdir)``
    may make the bag / weights / output first and returns a dict overriding them."""
    def run(res: Resources, case_dir: Path) -> Observation:
        params = {"bag": res.bag, "weights": res.weights, "out": case_dir / out}
        if prepare is not None:
            params.update(prepare(res, case_dir) or {})
        argv = [params["bag"], "--weights", params["weights"], "--out", params["out"],
                "--device", "cpu", "--no-progress", *args]
        return cli_observation(_replay_main(), argv, case_dir, Path(params["out"]), error_code)
    return run


def eval_case(args=(), data=None, weights=None, prepare=None):
    def run(res: Resources, case_dir: Path) -> Observation:
        params = {"data": res.bag, "weights": res.weights}
        if prepare is not None:
            params.update(prepare(res, case_dir) or {})
        argv = [params["weights"], params["data"], "--kind", "bag", "--device", "cpu",
                "--no-progress", *args]
        json_out = next((Path(a) for k, a in zip(argv, argv[1:]) if k == "--json"), None)
        return cli_observation(_eval_main(), argv, case_dir, json_out)
    return run


def in_workdir(group: str, name: str, expected, run, why: str = "") -> Case:
    """A case whose ``run(res, workdir)`` gets a fresh folder of its own."""
    case = Case(name, group, tuple(expected) if not isinstance(expected, str) else (expected,), None, why)
    case.run = lambda res: run(res, res.workdir(case))
    return case


# --------------------------------------------------------------------------- images

def _image(stamp, h=60, w=80, value=None, seed=None):
    rng = np.random.default_rng(int(stamp * 10) % 1000 if seed is None else seed)
    data = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if value is None else np.full((h, w, 3), value, np.uint8)
    return messages.make_image(TYPES, stamp, "camera_optical_frame", data)


def _bad_images() -> dict:
    """Image messages a camera driver or a user's bag can produce, and what they must give."""
    good = _image(T0 + 1)
    data = np.asarray(good.data)
    jpeg = messages.make_compressed_image(TYPES, T0 + 1, "cam", np.zeros((60, 80, 3), np.uint8))
    png16 = io.BytesIO()
    from PIL import Image as PILImage

    PILImage.fromarray(np.zeros((60, 80), np.uint16)).save(png16, format="PNG")
    negative = _image(T0 + 1)
    negative.header.stamp = TYPES.Time(sec=-5, nanosec=0)
    drop, ok = ("drop",), ("ok",)
    return {
        "empty image": (drop, replace(good, height=0, width=0, step=0, data=np.zeros(0, np.uint8))),
        "truncated data (step * height > len(data))": (drop, replace(good, data=data[: len(data) // 2])),
        "unknown encoding": (drop, replace(good, encoding="yuv422_yuy2")),
        "wrong step": (drop, replace(good, step=good.step - 7)),
        "16-bit image (16UC1)": (drop, messages.make_image(TYPES, T0 + 1, "cam", np.zeros((60, 80), np.uint16))),
        "float image (32FC1)": (drop, messages.make_image(TYPES, T0 + 1, "cam", np.zeros((60, 80), np.float32))),
        "corrupt JPEG in CompressedImage": (drop, replace(jpeg, data=np.asarray(jpeg.data)[:40])),
        "empty CompressedImage": (drop, replace(jpeg, data=np.zeros(0, np.uint8))),
        "16-bit PNG in CompressedImage": (drop, replace(jpeg, format="png",
                                                         data=np.frombuffer(png16.getvalue(), np.uint8))),
        "zero stamp": (drop, _image(0.0)),
        "negative stamp": (drop, negative),
        "smaller than the network's crop": (drop, _image(T0 + 1, h=20, w=30)),
        "black frame": (ok, _image(T0 + 1, value=0)),
        "saturated frame": (ok, _image(T0 + 1, value=255)),
        "resolution change to 160x120": (ok, _image(T0 + 1, h=120, w=160)),
        "resolution change to 1920x1080": (ok, _image(T0 + 1, h=1080, w=1920)),
        "bgr8 image": (ok, messages.make_image(TYPES, T0 + 1, "cam", np.zeros((60, 80, 3), np.uint8), "bgr8")),
        "mono8 image": (ok, messages.make_image(TYPES, T0 + 1, "cam", np.zeros((60, 80), np.uint8))),
        "empty frame_id": (ok, messages.make_image(TYPES, T0 + 1, "", np.zeros((60, 80, 3), np.uint8))),
    }


def _image_case(name, expected, msg) -> Case:
    def run(res: Resources) -> Observation:
        core = RegressorCore(res.estimator, base_T_camera=((0.1, 0.0, 0.2), (0.5, -0.5, 0.5, -0.5)))
        obs = _regress(core, msg)
        follow = _regress(core, _image(T0 + 2))  # the next good frame
        obs.recovered = follow.behaviour == "ok" and follow.nan_outputs == 0
        return obs
    return Case(name, "images", expected, run, "counted drop, the next frame is processed" if expected == ("drop",)
                else "processed, finite pose")


def _regress(core, msg) -> Observation:
    """One frame through the core and the node's publish step."""
    result = core.process(msg)
    pose = result.pose
    if pose is None:
        return Observation("drop" if result.drop is not None else "no output",
                           detail=result.drop.detail if result.drop is not None else "")
    nan = 0 if _finite(pose.t, pose.q, pose.cov) else 1
    if not nan:  # what the node publishes; it refuses a covariance that is not PSD
        regressor_messages(TYPES, pose, OutputTopics())
    return Observation("ok", nan_outputs=nan)


# --------------------------------------------------------------------------- messages

def _truth(t):
    return np.array([1.0 + 0.5 * (t - T0), 2.0, 0.0])


def _abs(stamp, t=None, q=(1.0, 0.0, 0.0, 0.0), cov=None, frame="map"):
    cov = np.diag([0.04] * 3 + [0.003] * 3) if cov is None else np.asarray(cov, float)
    return TYPES.PoseWithCovarianceStamped(
        header=messages.make_header(TYPES, stamp, frame),
        pose=TYPES.PoseWithCovariance(pose=messages.make_pose(TYPES, _truth(stamp) if t is None else t, q),
                                      covariance=cov.reshape(-1).copy()))


def _odom(stamp, origin=T0, x=None):
    x = 0.5 * (stamp - origin) if x is None else x
    return messages.make_odometry(TYPES, stamp, "odom", "base_link", (x, 0.0, 0.0), (1.0, 0, 0, 0),
                                  np.diag([1e-4] * 6))


def _imu(stamp):
    return messages.make_imu(TYPES, stamp, "imu", (0.0, 0.0, 0.0), (0.0, 0.0, 9.81),
                             np.eye(3) * 1e-4, np.eye(3) * 1e-3)


def _nan_position(msg):
    msg.pose.pose.position.x = float("nan")
    return msg


def _zero_quaternion(msg):
    msg.pose.pose.orientation = TYPES.Quaternion(x=0.0, y=0.0, z=0.0, w=0.0)
    return msg


def _double_quaternion(msg):
    msg.pose.pose.orientation.w *= 2.0
    return msg


def _covariance(msg, values):
    msg.pose.covariance = np.asarray(values, float).reshape(-1).copy()
    return msg


def _set_gyro(msg, x):
    msg.angular_velocity.x = x
    return msg


def _set_accel(msg, x):
    msg.linear_acceleration.x = x
    return msg


HISTORY = 30  # 3 s at 10 Hz before the fault; the default window is 20 poses
STEP = 0.1
FAULT_AT = T0 + HISTORY * STEP


class _FusionRun:
    """FusionCore fed like the fusion node: odometry, IMU and absolute poses at 10 Hz."""

    def __init__(self, use_imu=False):
        self.core = FusionCore(settings=FusionSettings(use_imu=use_imu))
        self.use_imu = use_imu
        self.nan = 0
        self.drops = 0
        self.last_drop = None

    def feed(self, method: str, msg):
        step = getattr(self.core, method)(msg)
        if step.drop is not None:
            self.drops += 1
            self.last_drop = step.drop
        out = step.output
        if out is not None and not _finite(out.t, out.q, out.cov):
            self.nan += 1
        if out is not None and out.transform is not None and not _finite(out.transform.t, out.transform.q):
            self.nan += 1
        return out

    def good(self, start, n, origin=T0):
        for k in range(n):
            s = start + STEP * k
            if self.use_imu:
                for j in range(10):
                    self.feed("on_imu", _imu(s - STEP + 0.01 * (j + 1)))
            self.feed("on_odometry", _odom(s, origin))
            self.feed("on_absolute", _abs(s))

    def counts(self):
        fusion = self.core.fusion.counters
        resets = sum(fusion.get(k, 0) for k in ("resets", "time_jumps", "reinitialisations", "initial_poses"))
        return self.drops, resets


def _message_case(name, expected, inject, why="", use_imu=False, resume=None) -> Case:
    """``inject(run)`` feeds the fault after HISTORY good steps; good inputs follow from
    ``resume = (start stamp, odometry origin)`` and the estimate must end near the truth."""
    def run(res: Resources) -> Observation:
        fr = _FusionRun(use_imu)
        fr.good(T0, HISTORY)
        drops0, resets0 = fr.counts()
        before = fr.core.fusion.estimate()
        inject(fr)
        detail = fr.last_drop.detail if fr.last_drop is not None and fr.drops > drops0 else ""
        after = fr.core.fusion.estimate()
        moved = (float(np.linalg.norm(after.t - before.t)) if after is not None and _finite(after.t)
                 else float("inf"))
        start, origin = resume if resume is not None else (FAULT_AT + STEP, T0)
        fr.good(start, 12, origin)
        drops, resets = fr.counts()  # over the fault and what follows it
        obs = Observation("reset" if resets > resets0 else "drop" if drops > drops0 else "ok", detail=detail)
        if obs.behaviour == "drop" and moved > 0.2:  # a dropped input must leave the estimate alone
            obs.behaviour = f"drop that moved the estimate by {moved:.2f} m"
        estimate = fr.core.fusion.estimate()
        last = start + STEP * 11
        obs.recovered = (estimate is not None and _finite(estimate.t, estimate.cov_ros)
                         and float(np.linalg.norm(estimate.t - _truth(last))) < 0.3)
        if estimate is not None and not _finite(estimate.t, estimate.q, estimate.cov_ros):
            fr.nan += 1
        obs.nan_outputs = fr.nan
        return obs
    return Case(name, "messages", tuple(expected) if not isinstance(expected, str) else (expected,), run, why)


def _feed(method, make):
    return lambda fr: fr.feed(method, make())


def _message_cases() -> list[Case]:
    drop = "counted drop; the fusion goes on unchanged"
    cases = [
        _message_case("absolute pose: NaN position", "drop", _feed("on_absolute", lambda: _nan_position(_abs(FAULT_AT))), drop),
        _message_case("absolute pose: inf covariance", "drop",
                      _feed("on_absolute", lambda: _abs(FAULT_AT, cov=np.full((6, 6), np.inf))), drop),
        _message_case("absolute pose: NaN covariance", "drop",
                      _feed("on_absolute", lambda: _abs(FAULT_AT, cov=np.full((6, 6), np.nan))), drop),
        _message_case("absolute pose: covariance not positive definite", "drop",
                      _feed("on_absolute", lambda: _abs(FAULT_AT, cov=-np.eye(6))), drop),
        _message_case("absolute pose: zero quaternion", "drop",
                      _feed("on_absolute", lambda: _zero_quaternion(_abs(FAULT_AT))), drop),
        _message_case("absolute pose: quaternion of norm 2", "drop",
                      _feed("on_absolute", lambda: _double_quaternion(_abs(FAULT_AT))), drop),
        _message_case("absolute pose: frame 'odom', not 'map'", "drop",
                      _feed("on_absolute", lambda: _abs(FAULT_AT, frame="odom")), drop),
        _message_case("absolute pose: zero stamp", "drop", _feed("on_absolute", lambda: _abs(0.0)), drop),
        _message_case("absolute pose: duplicate stamp", ("drop", "ok"),
                      _feed("on_absolute", lambda: _abs(FAULT_AT - STEP)),
                      "dropped or taken as a second measurement of that instant"),
        _message_case("absolute pose: 40 m outlier", "drop",
                      _feed("on_absolute", lambda: _abs(FAULT_AT, t=_truth(FAULT_AT) + 40.0)),
                      "rejected by the gate, counted"),
        _message_case("odometry: NaN position", "drop", _feed("on_odometry", lambda: _nan_position(_odom(FAULT_AT))), drop),
        _message_case("odometry: inf covariance", "drop",
                      _feed("on_odometry", lambda: _covariance(_odom(FAULT_AT), np.full(36, np.inf))), drop),
        _message_case("odometry: zero quaternion", "drop",
                      _feed("on_odometry", lambda: _zero_quaternion(_odom(FAULT_AT))), drop),
        _message_case("odometry: zero stamp", "drop", _feed("on_odometry", lambda: _odom(0.0)), drop),
        _message_case("odometry: duplicate stamp", "drop", _feed("on_odometry", lambda: _odom(FAULT_AT - STEP)), drop),
        _message_case("odometry: covariance not positive definite", "ok",
                      _feed("on_odometry", lambda: _covariance(_odom(FAULT_AT), -np.eye(6))),
                      "used with the covariance floor (wheel odometry often sends such matrices)"),
        _message_case("odometry: reset to zero while moving", "reset",
                      lambda fr: fr.good(FAULT_AT, 1, origin=FAULT_AT),
                      "the jump is trusted at first, the network poses then disagree and the "
                      "fusion re-initialises (kidnap recovery) within kidnap_consecutive poses",
                      resume=(FAULT_AT + STEP, FAULT_AT)),
        _message_case("stamps going backwards (bag loop)", "reset", lambda fr: None,
                      "time jump: the fusion and the path start over", resume=(T0, T0)),
        _message_case("gap of 120 s (longer than the window)", ("ok", "reset"), lambda fr: None,
                      "localizes again after the gap", resume=(FAULT_AT + 120.0, T0)),
        _message_case("odometry reset after a 120 s gap", ("ok", "reset"), lambda fr: None,
                      "localizes again after the gap", resume=(FAULT_AT + 120.0, FAULT_AT + 120.0)),
        _message_case("IMU: NaN angular velocity", "drop",
                      _feed("on_imu", lambda: _set_gyro(_imu(FAULT_AT), float("nan"))), drop, use_imu=True),
        _message_case("IMU: inf acceleration", "drop",
                      _feed("on_imu", lambda: _set_accel(_imu(FAULT_AT), float("inf"))), drop, use_imu=True),
        _message_case("IMU: zero stamp", "drop", _feed("on_imu", lambda: _imu(0.0)),
                      "counted drop (it must not look like a bag loop and reset the fusion)", use_imu=True),
        _message_case("IMU: stamp 0.5 s back", "drop", _feed("on_imu", lambda: _imu(FAULT_AT - 0.5)), drop,
                      use_imu=True),
        _message_case("initial pose: NaN position", "drop",
                      _feed("on_initial_pose", lambda: _nan_position(_abs(FAULT_AT))), drop),
        _message_case("initial pose: frame 'odom'", "drop",
                      _feed("on_initial_pose", lambda: _abs(FAULT_AT, frame="odom")), drop),
        _message_case("initial pose: zero quaternion", "drop",
                      _feed("on_initial_pose", lambda: _zero_quaternion(_abs(FAULT_AT))), drop),
        _message_case("initial pose: covariance not positive definite", "drop",
                      _feed("on_initial_pose", lambda: _abs(FAULT_AT, cov=-np.eye(6))), drop),
        _message_case("initial pose: zero stamp (ros2 topic pub)", "reset",
                      _feed("on_initial_pose", lambda: _abs(0.0, t=_truth(FAULT_AT - STEP))),
                      "restarts at the given pose, stamped with the newest input"),
    ]
    return cases


# --------------------------------------------------------------------------- weights

def _edit_json(st_path: Path, change):
    json_path = st_path.with_suffix(".json")
    meta = json.loads(json_path.read_text())
    change(meta)
    json_path.write_text(json.dumps(meta))


def _copy_weights(res: Resources, folder: Path, name: str) -> Path:
    st = folder / f"{name}.safetensors"
    shutil.copy(res.weights, st)
    shutil.copy(res.weights.with_suffix(".json"), st.with_suffix(".json"))
    return st


def _truncated(res, folder):
    st = _copy_weights(res, folder, "truncated")
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    return st


def _other_architecture(res, folder):
    """MapNet-34 tensors under a sidecar copied from the PoseNet-18 checkpoint."""
    from vizloc_ros.localize.models import build_model, save_checkpoint

    st = save_checkpoint(folder / "mapnet", build_model("mapnet", feat_dim=32).eval())
    shutil.copy(res.weights.with_suffix(".json"), st.with_suffix(".json"))
    return st


def _pickle(res, folder):
    import pickle

    st = _copy_weights(res, folder, "pickled")
    marker = folder / "UNPICKLED"
    st.write_bytes(pickle.dumps({"weights": _Touch(str(marker))}))
    return st


class _Touch:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (Path(self.path),)


def _missing_keys(res, folder):
    st = _copy_weights(res, folder, "nokeys")
    _edit_json(st, lambda m: (m.pop("pose_stats"), m["input"].pop("mean")))
    return st


def _nan_weights(res, folder):
    from safetensors.torch import load_file, save_file

    st = _copy_weights(res, folder, "nan")
    tensors = load_file(str(st))
    tensors["fc_t.weight"][:] = float("nan")
    save_file(tensors, str(st))
    return st


def _no_sidecar(res, folder):
    st = _copy_weights(res, folder, "alone")
    st.with_suffix(".json").unlink()
    return st


def _bad_json(res, folder):
    st = _copy_weights(res, folder, "badjson")
    st.with_suffix(".json").write_text('{"format": "vizloc_ros/checkpoint-v1", ')
    return st


def _wrong_value_types(res, folder):
    st = _copy_weights(res, folder, "types")
    _edit_json(st, lambda m: m.update(validation_errors=[0.1, 0.2]))
    return st


def _empty_file(res, folder):
    st = _copy_weights(res, folder, "empty")
    st.write_bytes(b"")
    return st


def _corrupt_onnx(res, folder):
    path = folder / "exported.onnx"
    path.write_bytes(b"\x08\x07garbage, not a protobuf" * 50)
    shutil.copy(res.weights.with_suffix(".json"), path.with_suffix(".json"))
    return path


def _a_folder(res, folder):
    (folder / "weights_dir").mkdir()
    return folder / "weights_dir"


WEIGHT_FAULTS = {
    "truncated safetensors": _truncated,
    "weights of another architecture": _other_architecture,
    "pickle disguised as safetensors": _pickle,
    "JSON sidecar with missing keys": _missing_keys,
    "NaN in the weights (diverged training)": _nan_weights,
    "no JSON sidecar": _no_sidecar,
    "JSON sidecar cut short": _bad_json,
    "sidecar value of the wrong type": _wrong_value_types,
    "empty file": _empty_file,
    "corrupt ONNX file": _corrupt_onnx,
    "a folder given as weights": _a_folder,
}


def _weights_cases() -> list[Case]:
    cases = []
    for name, make in WEIGHT_FAULTS.items():
        def loader(res, folder, make=make):
            path = make(res, folder)
            try:
                load_estimator(path, device="cpu", cpu_threads=1)
            except ValueError as exc:
                obs = Observation("error", detail=str(exc))
                if (folder / "UNPICKLED").exists():
                    obs.crashed, obs.detail = True, "the pickle was unpickled"
                return obs
            return Observation("ok")
        cases.append(in_workdir("weights", f"{name} (node / PoseEstimator)", "error", loader,
                                "one ValueError naming the file; the node logs it as one fatal line, exit 1"))
        cases.append(in_workdir("weights", f"{name} (vizloc-replay)", "error",
                                replay_case(prepare=lambda res, d, make=make: {"weights": make(res, d)}),
                                "exit 2, one line, no report folder"))
        cases.append(in_workdir("weights", f"{name} (vizloc-eval)", "error",
                                eval_case(prepare=lambda res, d, make=make: {"weights": make(res, d)}),
                                "exit 2, one line"))

    def export(res, folder, make, code):
        path = make(res, folder)
        obs = cli_observation(_export_main(), [path, "--tensorrt", "no"], folder, error_code=code)
        written = [p.name for p in folder.glob("*.onnx")]
        if written:
            obs.half_written.append(f"{written} written from bad weights")
        return obs
    cases.append(in_workdir("weights", "NaN in the weights (vizloc-export)", "error",
                            lambda res, d: export(res, d, _nan_weights, 1),
                            "exit 1: validation fails, no .onnx written"))
    cases.append(in_workdir("weights", "truncated safetensors (vizloc-export)", "error",
                            lambda res, d: export(res, d, _truncated, 2), "exit 2, nothing written"))
    return cases


# --------------------------------------------------------------------------- bags

def _rewrite_bag(src: Path, dst: Path, drop_topics=(), change=None, storage="mcap", extra=None):
    """Copy a bag, leaving out ``drop_topics``; ``change(topic, msgtype) -> msgtype`` renames a
    topic's type (the raw bytes stay: a bag recorded with the wrong type); ``extra`` adds a
    topic of a custom message type (name, msgtype, definition, raw message bytes)."""
    from rosbags.highlevel import AnyReader
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = get_typestore(Stores.ROS2_JAZZY)
    if extra is not None:
        store.register(get_types_from_msg(extra[2], extra[1]))
    plugin = StoragePlugin.SQLITE3 if storage == "sqlite3" else StoragePlugin.MCAP
    with AnyReader([src], default_typestore=store) as reader, \
            Writer(dst, version=8, storage_plugin=plugin) as writer:
        connections = {}
        for c in reader.connections:
            if c.topic in drop_topics:
                continue
            msgtype = change(c.topic, c.msgtype) if change else c.msgtype
            connections[c.id] = writer.add_connection(c.topic, msgtype, typestore=store)
        custom = writer.add_connection(extra[0], extra[1], typestore=store) if extra else None
        for c, stamp, raw in reader.messages():
            if c.id in connections:
                writer.write(connections[c.id], stamp, raw)
            if custom is not None:
                writer.write(custom, stamp, extra[3](store))
    return dst


def _truncate_mcap(res, folder):
    dst = folder / "truncated"
    shutil.copytree(res.bag, dst)
    mcap = next(dst.glob("*.mcap"))
    data = mcap.read_bytes()
    mcap.write_bytes(data[: int(len(data) * 0.6)])  # mid-chunk: images make most of the file
    return {"bag": dst, "data": dst}


def _truncate_sqlite(res, folder):
    dst = _rewrite_bag(res.bag, folder / "sqlite", storage="sqlite3")
    db = next(dst.glob("*.db3"))
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2])
    return {"bag": dst, "data": dst}


def _without(topic):
    def make(res, folder):
        dst = _rewrite_bag(res.bag, folder / "missing", drop_topics=(topic,))
        return {"bag": dst, "data": dst}
    return make


def _image_topic_of_type(msgtype):
    def make(res, folder):
        dst = _rewrite_bag(res.bag, folder / "wrongtype",
                           change=lambda topic, kind: msgtype if topic == "/camera/image_raw" else kind)
        return {"bag": dst, "data": dst}
    return make


def _with_custom_type(res, folder):
    definition = "string text\nfloat64[] values\n"
    name = "acme_msgs/msg/Blob"

    def raw(store):
        cls = store.types[name]
        return store.serialize_cdr(cls(text="x", values=np.zeros(3)), name)
    dst = _rewrite_bag(res.bag, folder / "custom", extra=("/acme/blob", name, definition, raw))
    return {"bag": dst, "data": dst}


def _text_file(res, folder):
    path = folder / "notes.txt"
    path.write_text("not a bag\n")
    return {"bag": path, "data": path}


def _empty_folder(res, folder):
    (folder / "empty").mkdir()
    return {"bag": folder / "empty", "data": folder / "empty"}


def _mcap_without_metadata(res, folder):
    dst = folder / "nometa"
    dst.mkdir()
    shutil.copy(next(res.bag.glob("*.mcap")), dst)
    return {"bag": dst, "data": dst}


BAG_FAULTS = {
    "bag truncated mid-chunk (mcap)": ("error", _truncate_mcap),
    "bag truncated (sqlite3)": ("error", _truncate_sqlite),
    "bag without the image topic": ("error", _without("/camera/image_raw")),
    "bag without the ground-truth topic": ("error", _without("/ground_truth/pose")),
    "image topic of an unsupported type (CameraInfo)": ("error", _image_topic_of_type("sensor_msgs/msg/CameraInfo")),
    "a text file given as the bag": ("error", _text_file),
    "an empty folder given as the bag": ("error", _empty_folder),
    "an mcap folder without metadata.yaml": ("error", _mcap_without_metadata),
    "an unknown message type on another topic": ("ok", _with_custom_type),
}


def _bag_cases() -> list[Case]:
    cases = []
    for name, (expected, make) in BAG_FAULTS.items():
        why = "exit 2, one line naming the bag / topic, no report" if expected == "error" else \
            "topics the replay does not read do not matter"
        cases.append(in_workdir("bags", f"{name} (vizloc-replay)", expected, replay_case(prepare=make), why))
        cases.append(in_workdir("bags", f"{name} (vizloc-eval)", expected, eval_case(prepare=make), why))
    cases.append(in_workdir("bags", "bag without the odometry topic (vizloc-replay)", "error",
                            replay_case(prepare=_without("/odom")),
                            "exit 2; the message says --odom-topic none"))
    return cases


# --------------------------------------------------------------------------- parameter files

PARAM_FILES = {
    # name: (node, YAML text of ros__parameters or a whole file, words the error must hold)
    "string for an integer": ("vizloc_fusion", "window_size: '20'", "'window_size'"),
    "float for an integer": ("vizloc_fusion", "window_size: 20.5", "'window_size'"),
    "string for a bool": ("vizloc_fusion", "use_odom: 'true'", "'use_odom'"),
    "number for a string": ("vizloc_regressor", "map_frame: 5", "'map_frame'"),
    "null for a string": ("vizloc_regressor", "weights: null", "'weights'"),
    "scalar for a list": ("vizloc_fusion", "gravity: -9.81", "'gravity'"),
    "list of strings for a list of numbers": ("vizloc_fusion", "gravity: ['0', '0', '-9.81']", "'gravity'"),
    "list of the wrong length": ("vizloc_regressor", "camera_extrinsic: [0.0, 0.0, 0.0]", "'camera_extrinsic'"),
    "NaN for a double": ("vizloc_fusion", "transform_tolerance: .nan", "'transform_tolerance'"),
    "negative rate": ("vizloc_regressor", "max_rate: -5.0", "'max_rate'"),
    "unknown choice": ("vizloc_regressor", "precision: fp8", "'precision'"),
    "unknown device": ("vizloc_regressor", "device: gpu0", "'device'"),
    "misspelt parameter": ("vizloc_fusion", "windw_size: 10", "windw_size"),
    "non-unit quaternion": ("vizloc_fusion", "imu_extrinsic: [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0]", "'imu_extrinsic'"),
    "window of one pose": ("vizloc_fusion", "window_size: 1", "window_size"),
    "YAML syntax error": (None, "vizloc_regressor:\n  ros__parameters:\n    device: [cpu\n", "not valid YAML"),
    "tab indentation": (None, "vizloc_regressor:\n\tros__parameters: {}\n", "not valid YAML"),
    "a list at the top": (None, "- vizloc_regressor\n- vizloc_fusion\n", "at the top"),
    "no ros__parameters": (None, "vizloc_regressor:\n  device: cpu\n", "ros__parameters"),
    "ros__parameters is a list": (None, "vizloc_fusion:\n  ros__parameters:\n    - window_size\n", "ros__parameters"),
}


def _param_case(name, node, text, words) -> Case:
    def run(res: Resources, folder: Path) -> Observation:
        body = text if node is None else f"{node}:\n  ros__parameters:\n    {text}\n"
        path = folder / "params.yaml"
        path.write_text(body)
        try:
            values = P.load_yaml_parameters(path)
            for node_name, params in values.items():
                if node_name == P.REGRESSOR_NODE:
                    P.regressor_settings(params, default_weights=lambda: "w.safetensors")
                elif node_name == P.FUSION_NODE:
                    P.fusion_settings(params)
        except ValueError as exc:
            obs = Observation("error", detail=str(exc))
            if words not in str(exc):
                obs.behaviour = f"error without {words!r}"
            return obs
        return Observation("ok")
    return in_workdir("params", name, "error", run,
                      "ValueError naming the parameter (the node: one fatal line, exit 1)")


def _param_cases() -> list[Case]:
    return [_param_case(name, *spec) for name, spec in PARAM_FILES.items()]


# --------------------------------------------------------------------------- command-line mistakes

def _make_folder_with(name, content=None):
    def make(res, folder):
        out = folder / name
        out.mkdir()
        if content:
            (out / content).write_text("keep me\n")
        return {"out": out}
    return make


def _out_holding_the_bag(res, folder):
    dst = folder / "mine"
    shutil.copytree(res.bag, dst / "seq-05")
    return {"bag": dst / "seq-05", "out": dst}


def _out_is_a_file(res, folder):
    (folder / "report.txt").write_text("x\n")
    return {"out": folder / "report.txt"}


class _Inject:
    """Replace ``module.name`` by a function raising ``exc`` while a case runs."""

    def __init__(self, module, name, exc):
        self.module, self.name, self.exc = module, name, exc

    def __call__(self, run):
        def wrapped(res, folder):
            original = getattr(self.module, self.name)

            def fail(*args, **kwargs):
                raise self.exc
            setattr(self.module, self.name, fail)
            try:
                return run(res, folder)
            finally:
                setattr(self.module, self.name, original)
        return wrapped


def _interrupted(expected_code):
    def run(res, folder):
        inner = replay_case(error_code=expected_code)
        return _Inject(replay_cli, "write_report", KeyboardInterrupt())(inner)(res, folder)
    return run


def _disk_full(res, folder):
    return _Inject(replay_cli, "write_report", OSError(28, "No space left on device"))(replay_case())(res, folder)


def _second_run_overwrites(res, folder):
    first = replay_case()(res, folder)
    if first.behaviour != "ok":
        return first
    return replay_case(args=("--overwrite",))(res, folder)


#: vizloc-replay --params-file: (file text, None for a missing file; words the error line must hold)
REPLAY_PARAM_FILES = {
    "an unknown parameter": ("vizloc_fusion:\n  ros__parameters:\n    windw_size: 10\n", "windw_size"),
    "a string for an integer": ("vizloc_fusion:\n  ros__parameters:\n    window_size: '20'\n", "'window_size'"),
    "a value out of bounds": ("vizloc_fusion:\n  ros__parameters:\n    gate_probability: 1.5\n",
                              "gate_probability"),
    "malformed YAML": ("vizloc_regressor:\n  ros__parameters:\n    device: [cpu\n", "not valid YAML"),
    "a file that does not exist": (None, "cannot read it"),
}


def _replay_params_file(text, words):
    """vizloc-replay with a bad --params-file: exit 2, one line naming the file and the
    parameter, before anything is written (as the node would refuse to start)."""
    def run(res, folder):
        path = folder / ("robot.yaml" if text is not None else "missing.yaml")
        if text is not None:
            path.write_text(text)
        obs = replay_case(args=("--params-file", path))(res, folder)
        if obs.behaviour == "error" and not (str(path) in obs.detail and words in obs.detail):
            obs.behaviour = f"error without {path} and {words!r}"
        return obs
    return run


def _cli_cases() -> list[Case]:
    c = []
    add = lambda name, expected, run, why="exit 2, one line, nothing written": \
        c.append(in_workdir("cli", name, expected, run, why))  # noqa: E731
    add("vizloc-replay: a normal run", "ok", replay_case(), "report written, every number finite")
    add("vizloc-replay: --overwrite of an earlier report", "ok", _second_run_overwrites, "replaced atomically")
    add("vizloc-replay: --out exists, no --overwrite", "error", replay_case(prepare=_make_folder_with("report")))
    add("vizloc-replay: --overwrite of a folder that is not a report", "error",
        replay_case(args=("--overwrite",), prepare=_make_folder_with("report", "thesis.tex")),
        "exit 2: the folder is kept")
    add("vizloc-replay: --overwrite of the folder holding the bag", "error",
        replay_case(args=("--overwrite",), prepare=_out_holding_the_bag), "exit 2: the bag is kept")
    add("vizloc-replay: --out is a file", "error", replay_case(args=("--overwrite",), prepare=_out_is_a_file))
    add("vizloc-replay: --out where no folder can be made", "error",
        replay_case(prepare=lambda res, d: {"out": Path("/proc/vizloc_report")}))
    add("vizloc-replay: --camera-extrinsic with a zero quaternion", "error",
        replay_case(args=("--camera-extrinsic", 0, 0, 0, 0, 0, 0, 0)))
    add("vizloc-replay: --camera-extrinsic with NaN", "error",
        replay_case(args=("--camera-extrinsic", "nan", 0, 0, 0, 0, 0, 1)))
    add("vizloc-replay: --batch-size 0", "error", replay_case(args=("--batch-size", 0)))
    add("vizloc-replay: --batch-size 100000", "error", replay_case(args=("--batch-size", 100000)),
        "exit 2 (it would decode 100000 images at once)")
    add("vizloc-replay: --device tpu", "error", replay_case(args=("--device", "tpu")))
    add("vizloc-replay: --mc-dropout-samples -1", "error", replay_case(args=("--mc-dropout-samples", -1)))
    add("vizloc-replay: --ground-truth tf:map", "error", replay_case(args=("--ground-truth", "tf:map")))
    add("vizloc-replay: --ground-truth on the image topic", "error",
        replay_case(args=("--ground-truth", "/camera/image_raw")))
    add("vizloc-replay: --imu-topic on the odometry topic", "error", replay_case(args=("--imu-topic", "/odom")))
    add("vizloc-replay: --image-topic that does not exist", "error", replay_case(args=("--image-topic", "/cam")))
    for name, (text, words) in REPLAY_PARAM_FILES.items():
        add(f"vizloc-replay: --params-file with {name}", "error", _replay_params_file(text, words),
            "exit 2, one line naming the file and the parameter, nothing written")
    add("vizloc-replay: interrupted while writing (Ctrl-C)", "error", _interrupted(130),
        "exit 130, no report folder, no temporaries")
    add("vizloc-replay: disk full while writing", "error", _disk_full, "exit 2, no report folder, no temporaries")
    add("vizloc-eval: a normal run with --json", "ok",
        lambda res, d: eval_case(args=("--json", d / "m.json"))(res, d), "JSON written, strict (no NaN)")
    add("vizloc-eval: --json in a folder that does not exist", "error",
        lambda res, d: eval_case(args=("--json", d / "nowhere" / "m.json"))(res, d),
        "exit 2 before evaluating, nothing written")
    add("vizloc-eval: --json names a folder", "error",
        lambda res, d: eval_case(args=("--json", d))(res, d), "exit 2 before evaluating")
    add("vizloc-eval: --batch-size 0", "error", eval_case(args=("--batch-size", 0)))
    add("vizloc-eval: --image-topic on the odometry topic", "error", eval_case(args=("--image-topic", "/odom")))
    add("vizloc-eval: --gt-topic on the image topic", "error", eval_case(args=("--gt-topic", "/camera/image_raw")))
    return c


# --------------------------------------------------------------------------- the catalogue

def _image_cases() -> list[Case]:
    return [_image_case(name, expected, msg) for name, (expected, msg) in _bad_images().items()]


def _cases_from_sibling_modules() -> list[Case]:
    """Cases kept in ``cases_<class>.py`` beside this file, one module per class of fault.

    Each such module defines ``cases() -> list[Case]`` and may use this module's helpers;
    they are imported in name order so the catalogue's order is stable.
    """
    import importlib  # only here: the sibling modules import this one

    found = []
    for path in sorted(Path(__file__).parent.glob("cases_*.py")):
        found += importlib.import_module(path.stem).cases()
    return found


def all_cases() -> list[Case]:
    return (_image_cases() + _message_cases() + _weights_cases() + _bag_cases() + _param_cases() + _cli_cases()
            + _cases_from_sibling_modules())


CASES = all_cases()


def summarize(results) -> dict:
    """Counts over (case, observation) pairs, for the suite's printout and JSON."""
    failures = [(c, o) for c, o in results if o.behaviour not in c.expected or o.crashed or o.nan_outputs
                or o.half_written or not o.recovered]
    return {"cases": len(results), "crashes": sum(o.crashed for _, o in results),
            "nan_outputs": sum(o.nan_outputs for _, o in results),
            "half_written": sum(len(o.half_written) for _, o in results),
            "not_recovered": sum(not o.recovered for _, o in results),
            "unexpected_behaviour": sum(o.behaviour not in c.expected for c, o in results),
            "failures": [f"{c.group}: {c.name}: {o.behaviour} ({o.detail[:200]})" for c, o in failures],
            "by_group": {g: sum(c.group == g for c, _ in results) for g in dict.fromkeys(c.group for c, _ in results)}}


