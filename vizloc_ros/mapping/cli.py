"""`vizloc-map`: map a place from a recording in minutes on a CPU.

    vizloc-map SOURCE --out MAP.safetensors [--minutes M]

SOURCE is a rosbag2 folder or ROS 1 .bag (images, ground truth from a pose topic or a TF
chain, intrinsics from ``camera_info``; the flags and defaults of ``vizloc-replay``), or a
7-Scenes, Cambridge Landmarks or KITTI odometry folder (:mod:`vizloc_ros.mapping.sources`).
The frames are encoded once by the frozen generic encoder, the map's head is trained on
them, held-out frames validate it and calibrate its covariance, optionally DSAC++'s
end-to-end stage refines it (:mod:`vizloc_ros.mapping.refine`), and ``MAP.safetensors`` +
``MAP.json`` is written: a checkpoint of the ``ace`` method that ``PoseEstimator``,
``vizloc-eval``, ``vizloc-replay --weights`` and the nodes (``weights:=MAP.safetensors``)
run as it is.

Why the output is written here and not by :func:`~vizloc_ros.mapping.mapper.make_map`:
the map is made (and refined) in a private scratch folder beside ``MAP``
(:func:`vizloc_ros.files.scratch_folder`: removed when the run ends, however it ends;
after a ``kill -9``, by the next run), then both files are copied to ``MAP`` through
:mod:`vizloc_ros.files` (locked temporaries, JSON last) with Ctrl-C and SIGTERM held back
for those few milliseconds. So an interrupt at any stage leaves the previous ``MAP`` (or
none) untouched and no temporary behind, and a run that was stopped exits 130 (SIGINT)
or 143 (SIGTERM) with one line.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from tqdm import tqdm

from vizloc_ros.cli_args import positive
from vizloc_ros.files import OutputError, check_not_a_link, scratch_folder, staged
from vizloc_ros.localize.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vizloc_ros.localize.weights import shipped_weights
from vizloc_ros.mapping.buffer import BYTES_PER_SAMPLE, Augmentation
from vizloc_ros.mapping.mapper import (DEFAULT_MAX_SAMPLES, ENCODER_NAME, MapOptions, MappingError, load_encoder,
                                      make_map)
from vizloc_ros.mapping.refine import RefineOptions, refine_map
from vizloc_ros.mapping.sources import BagOptions, SourceError, open_source, parse_intrinsics
from vizloc_ros.ros_io import messages

PROG = "vizloc-map"
_SUFFIX = ".safetensors"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Python next runs, so it unwinds the same way as Ctrl-C."""


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (``vizloc-map: error: ...``), exit 2, like every other bad input."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------- output

def output_paths(out) -> tuple[Path, Path]:
    """``MAP.safetensors`` and its ``MAP.json`` from ``--out`` (with or without the suffix,
    as :func:`~vizloc_ros.localize.models.checkpoint.save_checkpoint` names them)."""
    path = Path(out).expanduser()
    if path.suffix == ".json":
        path = path.with_suffix(_SUFFIX)
    elif path.suffix != _SUFFIX:
        path = path.with_name(path.name + _SUFFIX)
    return path, path.with_suffix(".json")


def check_output(out: Path, overwrite: bool, encoder: Path | None) -> tuple[Path, Path]:
    """Refuse, before any work, an output that exists (unless ``overwrite``), is a folder or
    a link, or is the encoder the map is made with."""
    tensors, sidecar = output_paths(out)
    for path in (tensors, sidecar):
        try:
            check_not_a_link(path, "--out")
        except OutputError as exc:
            raise MappingError(str(exc)) from None
        if path.is_dir():
            raise MappingError(f"--out {path} is a folder; give a file name such as {path / 'map.safetensors'}")
    if encoder is not None and tensors.resolve() == Path(encoder).resolve():
        raise MappingError(f"--out {tensors} is the encoder the map is made with; choose another --out")
    existing = [str(p) for p in (tensors, sidecar) if p.exists()]
    if existing and not overwrite:
        raise MappingError(f"{' and '.join(existing)} exist{'s' if len(existing) == 1 else ''}; "
                           "pass --overwrite to replace the map")
    return tensors, sidecar


@contextlib.contextmanager
def held_signals():
    """SIGINT and SIGTERM wait until the block is done (an output half renamed is worse
    than one that ends a few milliseconds later), then act as they would have; the
    exception then carries ``written = True``: what the block wrote is complete."""
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda number, _frame: pending.append(number))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if pending:
        stop = Terminated() if pending[0] == signal.SIGTERM else KeyboardInterrupt()
        stop.written = True
        raise stop


def publish(scratch_tensors: Path, tensors: Path, sidecar: Path, overwrite: bool) -> None:
    """Copy the finished checkpoint from the scratch folder to ``tensors`` + ``sidecar``:
    both written under locked temporaries, the tensors renamed first and the JSON last (a
    reader that finds the JSON finds its tensors); an output that appeared during the run is
    not replaced unless ``overwrite``."""
    rule = True if overwrite else None
    with held_signals():
        with staged(sidecar, replaceable=rule, what="map") as sidecar_tmp, \
                staged(tensors, replaceable=rule, what="map") as tensors_tmp:
            tensors_tmp.write_bytes(scratch_tensors.read_bytes())
            sidecar_tmp.write_bytes(scratch_tensors.with_suffix(".json").read_bytes())


# --------------------------------------------------------------------------- progress

class Progress:
    """One tqdm bar per stage (encode, head, validate, refine), fed by the ``progress``
    callback of :func:`make_map` and :func:`refine_map`; elapsed time and ETA as tqdm
    shows them (the head's step total is fixed from its measured rate after 20 steps)."""

    LABELS = {"features": "finding keypoints", "triangulate": "triangulating pairs", "encode": "encoding frames",
              "head": "training head", "validate": "validating", "refine": "refining (e2e)"}

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.stage = None
        self.bar = None
        self.stage_started = time.time()  # a stage's first report may come late (the head's: step 50)

    def __call__(self, stage: str, done: int, total: int, info) -> None:
        if not self.enabled:
            return
        info = info or {}
        if stage != self.stage or self.bar is None or done < self.bar.n:
            self.close()
            self.stage = stage
            unit = {"head": "step", "refine": "step", "triangulate": "pair"}.get(stage, "frame")
            self.bar = tqdm(total=total, desc=self.LABELS.get(stage, stage), unit=unit, file=sys.stderr,
                            dynamic_ncols=True, leave=True, smoothing=0.0)  # ETA from the stage's average speed
            self.bar.start_t = self.stage_started
        self.bar.total = total
        self.bar.update(done - self.bar.n)
        shown = {k: info[k] for k in ("loss", "median_px", "valid") if k in info}
        if shown:
            self.bar.set_postfix({k: (round(v, 3) if isinstance(v, float) else v) for k, v in shown.items()},
                                 refresh=False)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.stage = None
            self.stage_started = time.time()


# --------------------------------------------------------------------------- the run

def default_encoder() -> Path:
    try:
        return shipped_weights(ENCODER_NAME)
    except FileNotFoundError as exc:
        raise MappingError(f"{exc}; pass --encoder PATH") from None


def input_height(requested: int | None, camera: dict) -> int:
    """The network input's height (its shorter side): ``--input-height``, by default
    :class:`MapOptions`' unless the images are smaller. Never more than the images have:
    the estimator refuses images smaller than its input, so such a map could not localize
    the very camera it was made from."""
    shorter = min(camera["width"], camera["height"])
    if requested is None:
        return min(MapOptions.input_height, shorter)
    if requested > shorter:
        raise MappingError(f"--input-height {requested} is more than the images' shorter side ({camera['width']}x"
                           f"{camera['height']}): the map could not localize them; give at most {shorter}")
    return requested


def run(args) -> dict:
    """One mapping run from parsed flags; returns what the summary prints."""
    encoder_path = Path(args.encoder) if args.encoder else default_encoder()
    tensors, sidecar = check_output(Path(args.out), args.overwrite, encoder_path)
    load_encoder(encoder_path)  # a missing or foreign encoder: said before the recording is read
    intrinsics = parse_intrinsics(args.intrinsics) if args.intrinsics is not None else None
    extrinsic = None
    if args.camera_extrinsic is not None:
        try:
            extrinsic = messages.extrinsic_from_ros(
                args.camera_extrinsic, f"--camera-extrinsic {' '.join(f'{v:g}' for v in args.camera_extrinsic)}")
        except ValueError as exc:
            raise MappingError(str(exc)) from None
    bag = BagOptions(image_topic=args.image_topic, ground_truth=args.ground_truth, base_frame=args.base_frame,
                     camera_extrinsic=extrinsic, camera_info_topic=args.camera_info_topic)
    say = (lambda text: None) if args.quiet else (lambda text: print(f"{PROG}: {text}", file=sys.stderr))
    say(f"reading {args.source} ...")
    source = open_source(args.source, bag, intrinsics, args.every, use_depth=not args.no_depth)
    left = ", ".join(f"{n} {why}" for why, n in source.left_out.items() if n)
    cam = source.camera
    say(f"{len(source.frames)} frames ({source.kind}{'; left out: ' + left if left else ''}), "
        f"{cam['width']}x{cam['height']} px, fx {cam['fx']:.1f} fy {cam['fy']:.1f} cx {cam['cx']:.1f} "
        f"cy {cam['cy']:.1f} (from {source.camera_from}){', depth' if source.frames.use_depth else ''}")
    options = MapOptions(minutes=args.minutes if args.minutes is not None else MapOptions.minutes, steps=args.steps,
                         input_height=input_height(args.input_height, cam),
                         max_samples=args.max_samples, encoder=encoder_path, threads=args.threads,
                         seed=args.seed, scene=Path(args.source).resolve().name, head_width=args.head_width,
                         augmentation=Augmentation(copies=args.augment), triangulate=args.triangulate,
                         command=getattr(args, "command", ""))
    progress = Progress(enabled=not (args.quiet or args.no_progress))
    try:
        with scratch_folder(tensors.with_name(tensors.name + ".work"), what="map") as scratch:
            scratch_map = scratch / "map.safetensors"
            meta = make_map(source.frames, source.camera, scratch_map, options, progress)
            if args.refine_minutes is not None:
                model, loaded = load_checkpoint(scratch_map)
                refine = RefineOptions(minutes=args.refine_minutes, threads=args.threads, seed=args.seed)
                meta = refine_map(model, loaded, source.frames, options, refine, progress)
                save_checkpoint(scratch_map, model, meta, dtype="fp16")
            publish(scratch_map, tensors, sidecar, args.overwrite)
    finally:
        progress.close()
    return {"meta": meta, "tensors": tensors, "sidecar": sidecar, "frames": len(source.frames)}


def summary(result: dict) -> str:
    """The lines printed at the end: what was mapped, how long each stage took, how well
    the held-out frames localized, and the map file."""
    meta, tensors = result["meta"], result["tensors"]
    training = meta.get("training") or {}
    timings = training.get("timings") or {}
    metrics = meta.get("metrics") or {}
    validation = metrics.get("validation") or {}
    scale = (meta.get("validation_errors") or {}).get("model_cov_scale")
    size_mb = (tensors.stat().st_size + result["sidecar"].stat().st_size) / 1e6
    lines = [f"map: {tensors} ({size_mb:.1f} MB)",
             f"frames: {result['frames']} ({metrics.get('mapping_frames', '?')} mapping, "
             f"{metrics.get('validation_frames', '?')} validation); buffer {training.get('buffer_samples', 0):,} "
             f"samples ({training.get('buffer_bytes', 0) / 1e6:.0f} MB)"
             f"{', depth-supervised' if training.get('depth_supervised') else ''}"
             f"{' (triangulated)' if training.get('triangulation') else ''}; "
             f"head {training.get('head_steps', '?')} steps",
             "time: " + ", ".join(f"{name} {timings[key]:.1f} s" for name, key in
                                  (("triangulate", "triangulate_s"), ("encode", "encode_s"), ("head", "head_s"),
                                   ("validate", "validate_s"), ("refine", "refine_s"),
                                   ("re-validate", "refine_validate_s"), ("total", "total_s")) if key in timings)]
    triangulation = training.get("triangulation")
    if triangulation:
        lines.append(f"triangulated depth: {triangulation['points']:,} points in {triangulation['frames_with_points']} "
                     f"of {triangulation['frames']} mapping frames ({triangulation['pairs']} pairs); "
                     f"{100 * triangulation['buffer_rows_with_target']:.1f} % of the buffer's cells have a target")
    if validation:
        lines.append(f"validation: median {validation['median_translation_m']:.3f} m / "
                     f"{validation['median_rotation_deg']:.2f} deg, "
                     f"{100 * validation['within_5cm_5deg']:.0f} % within 5 cm / 5 deg, "
                     f"{validation.get('failed_frames', 0)} failed; covariance scale "
                     + (f"{scale:.3g}" if scale is not None else "not calibrated (no frame localized)"))
    else:
        lines.append("validation: none (too few frames to hold a block out); covariance not calibrated")
    refinement = training.get("refinement")
    if refinement:
        before = refinement.get("validation_before") or {}
        after = refinement.get("validation_after") or {}
        if before and after:
            lines.append(f"refinement ({refinement['steps']} steps): median {before['median_translation_m']:.3f} m "
                         f"-> {after['median_translation_m']:.3f} m, "
                         f"{'kept' if refinement['kept'] else 'not kept (validation got worse)'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI

def _count(text: str) -> int:
    """A whole number >= 0 (a flag where 0 means "none")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    defaults = MapOptions()
    gigabytes = DEFAULT_MAX_SAMPLES * BYTES_PER_SAMPLE / 1e9
    parser = _OneLineParser(
        prog=PROG,
        description="Map a place from a recording: encode its frames once with the frozen generic encoder, "
                    "train the map's scene-coordinate head, validate on held-out frames (calibrated "
                    "covariance) and write MAP.safetensors + MAP.json, a checkpoint that vizloc-replay "
                    "--weights, vizloc-eval and the nodes (weights:=MAP.safetensors) run as it is.",
        epilog="Bags: the same topics, ground truth and camera mount rules as vizloc-replay. Intrinsics: "
               "--intrinsics, else the bag's camera_info, else the folder's scene.json (synthetic) / "
               "calib.txt (KITTI) / 7-Scenes' published 585 px. Exit status: 0 done, 2 bad input, "
               "130 interrupted (Ctrl-C), 143 terminated (SIGTERM); an interrupted run writes nothing.")
    parser.add_argument("source", metavar="SOURCE",
                        help="rosbag2 folder or ROS 1 .bag; or a 7-Scenes folder (TrainSplit.txt: the train "
                             "split, with depth where .depth.png exist), a Cambridge Landmarks folder "
                             "(dataset_train.txt) or a KITTI odometry folder (poses.txt)")
    parser.add_argument("--out", required=True, metavar="MAP.safetensors",
                        help="the map to write (MAP.json beside it); refused if it exists, unless --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing MAP")
    timing = parser.add_argument_group("training")
    timing.add_argument("--minutes", type=positive(float),
                        help=f"head training budget, wall clock (default {defaults.minutes:g}); "
                             "the step count follows from the measured speed")
    timing.add_argument("--steps", type=positive(int),
                        help="a fixed number of head steps instead of --minutes (reproducible)")
    timing.add_argument("--refine-minutes", type=positive(float), metavar="M",
                        help="afterwards, refine the head for M minutes with DSAC++'s end-to-end loss "
                             "(differentiable hypothesis selection); kept only if validation does not get worse")
    timing.add_argument("--every", type=positive(int), default=1, metavar="N",
                        help="map every N-th frame (default 1: all)")
    timing.add_argument("--max-samples", type=positive(int), default=DEFAULT_MAX_SAMPLES,
                        help=f"bound of the feature buffer, in cells (default {DEFAULT_MAX_SAMPLES:,}: "
                             f"{gigabytes:.1f} GB at {BYTES_PER_SAMPLE} bytes each); with more cells each "
                             "frame keeps an equal random share")
    timing.add_argument("--augment", type=_count, default=defaults.augmentation.copies, metavar="N",
                        help="also encode N scaled (1/2-2) and rolled (+-15 deg) copies of each frame, so the "
                             "map knows surfaces from other distances and angles (default "
                             f"{defaults.augmentation.copies}; each copy adds about one frame's encoding time and "
                             "buffer rows; 0: the frames only)")
    timing.add_argument("--head-width", type=positive(int), default=defaults.head_width, metavar="C",
                        help=f"channels of the map's head (default {defaults.head_width}; 256 trains 3x "
                             "faster per step, and fits less)")
    timing.add_argument("--input-height", type=positive(int),
                        help=f"network input: the shorter image side is resized to this (default "
                             f"{defaults.input_height}, or the images' own if smaller); localization uses the same")
    timing.add_argument("--encoder", metavar="PATH",
                        help=f"the frozen encoder (default: the shipped weights/{ENCODER_NAME})")
    timing.add_argument("--threads", type=positive(int), default=os.cpu_count() or 1,
                        help="CPU threads (default: all cores)")
    timing.add_argument("--seed", type=int, default=defaults.seed, help=f"seed (default {defaults.seed})")
    data = parser.add_argument_group("input")
    data.add_argument("--intrinsics", metavar="FX,FY,CX,CY",
                      help="pinhole intrinsics of the recorded images in pixels (width and height from the "
                           "images); win over camera_info and the folder's files")
    data.add_argument("--no-depth", action="store_true",
                      help="ignore 7-Scenes .depth.png files (as if the recording had none)")
    data.add_argument("--triangulate", action=argparse.BooleanOptionalAction, default=defaults.triangulate,
                      help="without depth: match keypoints between mapping frames, triangulate them with the "
                           "known poses and train the head on these sparse depths too (default on; "
                           "--no-triangulate: reprojection loss only). A recording with depth uses its depth")
    data.add_argument("--image-topic", default="/camera/image_raw",
                      help="bag: sensor_msgs/Image or CompressedImage topic (default /camera/image_raw)")
    data.add_argument("--camera-info-topic",
                      help="bag: sensor_msgs/CameraInfo topic (default: camera_info beside the image topic, "
                           "e.g. /camera/camera_info)")
    data.add_argument("--ground-truth", default="/ground_truth/pose",
                      help="bag: PoseStamped / PoseWithCovarianceStamped / Odometry / TransformStamped topic, "
                           "or tf:PARENT->CHILD for a TF chain through /tf and /tf_static "
                           "(default /ground_truth/pose)")
    data.add_argument("--camera-extrinsic", type=float, nargs=7, metavar=("X", "Y", "Z", "QX", "QY", "QZ", "QW"),
                      help="bag: base -> camera optical frame when the bag has no /tf_static for it")
    data.add_argument("--base-frame", default="base_link",
                      help="bag: the frame the ground truth poses (default base_link)")
    shown = parser.add_argument_group("output")
    shown.add_argument("--no-progress", action="store_true", help="no progress bars")
    shown.add_argument("--quiet", action="store_true", help="no progress bars and no summary")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # the command, recorded in the map's JSON so that a shipped map says how it was made
    args.command = shlex.join([PROG, *(sys.argv[1:] if argv is None else [str(a) for a in argv])])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.steps is not None and args.minutes is not None:
        print(f"{PROG}: error: give --minutes or --steps, not both", file=sys.stderr)
        return 2
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(Terminated()))
    started = time.monotonic()
    result = None
    try:
        result = run(args)
        if not args.quiet:
            print(summary(result))
            print(f"{time.monotonic() - started:.0f} s in all; run it with vizloc-replay BAG --weights "
                  f"{result['tensors']}, vizloc-eval {result['tensors']} DATA, or the nodes' "
                  f"weights:={result['tensors']}")
    except (MappingError, SourceError, CheckpointError, OutputError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, an unreadable file
        print(f"{PROG}: error: {exc}; no map was written", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        written = result is not None or getattr(exc, "written", False)
        what = "the map is complete" if written else "no map was written"
        print(f"{PROG}: {'terminated' if terminated else 'interrupted'}; {what}", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
