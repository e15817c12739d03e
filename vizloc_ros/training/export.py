"""`vizloc-export`: a checkpoint -> ONNX (dynamic batch) validated with ONNX Runtime,
and, where TensorRT is importable (Jetson, x86 with TensorRT), an fp16 engine.

The exported network takes the *preprocessed* image batch (B, 3, crop_h, crop_w) float32
and returns (B, 7): metric translation and unit quaternion (w, x, y, z) with w >= 0, so
runtimes without PyTorch need no pose decoding of their own. The checkpoint's JSON is
copied beside every exported file: ``PoseEstimator`` reads preprocessing from it.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from vizloc_ros.files import staged_files, write_bytes
from vizloc_ros.localize.models import CheckpointError, load_checkpoint
from vizloc_ros.localize.preprocess import InputSpec

LOG = logging.getLogger(__name__)
OPSET = 17


class PoseOutput(torch.nn.Module):
    """Wraps a PoseRegressor so its graph ends in (t_metric, q_wxyz) concatenated."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        t, q = self.model.decode(self.model(images))
        return torch.cat([t, q], dim=-1)


class _Rejected(Exception):
    """The exported network failed validation: nothing is moved into place."""


def export_onnx(model, spec, out_path: Path, opset: int = OPSET) -> Path:
    """Export with a dynamic batch dimension to ``out_path`` (the caller's temporary:
    see :func:`main`, which validates it before it takes the final name)."""
    wrapper = PoseOutput(model.eval().float().cpu())
    dummy = torch.zeros(2, 3, *spec.crop)
    torch.onnx.export(wrapper, (dummy,), str(out_path), dynamo=False, input_names=["images"],
                      output_names=["pose"], opset_version=opset,
                      dynamic_axes={"images": {0: "batch"}, "pose": {0: "batch"}})
    return out_path


def validate_onnx(model, spec, onnx_path: Path, batch: int = 4, seed: int = 0) -> float:
    """Max abs difference between ONNX Runtime and PyTorch on random normalised inputs."""
    import onnxruntime as ort  # optional dependency (the export extra): imported when used

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, *spec.crop, generator=gen)
    with torch.inference_mode():
        ref = PoseOutput(model.eval().float().cpu())(x).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"images": x.numpy()})[0]
    return float(np.max(np.abs(out - ref)))


def build_tensorrt_engine(onnx_path: Path, engine_path: Path, spec, max_batch: int = 32) -> Path:
    """Build an fp16 engine with an optimisation profile for batch 1..max_batch."""
    import tensorrt as trt  # optional dependency: imported when an engine is built

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    shape = (3, *spec.crop)
    profile.set_shape("images", (1, *shape), (1, *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine")
    write_bytes(engine_path, bytes(serialized), what="TensorRT engine")
    return engine_path


def _tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vizloc-export",
        description="Export a vizloc_ros checkpoint to ONNX (validated with ONNX Runtime) and, "
                    "when TensorRT is available, to an fp16 TensorRT engine.")
    parser.add_argument("weights", help="checkpoint (X.safetensors with X.json beside it)")
    parser.add_argument("--out", default=None,
                        help="output stem (default: beside the checkpoint, same name)")
    parser.add_argument("--tensorrt", choices=("auto", "yes", "no"), default="auto",
                        help="build a TensorRT fp16 engine: auto = when tensorrt is importable")
    parser.add_argument("--max-batch", type=int, default=32, help="largest batch of the engine")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="max abs difference ONNX vs PyTorch accepted (default 1e-4)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        model, meta = load_checkpoint(args.weights)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"vizloc-export: {exc}", file=sys.stderr)
        return 2
    if model.custom_inference:
        print(f"vizloc-export: {meta['architecture']!r} localizes with its own post-processing "
              "(RANSAC, retrieval or map matching), not a (t, q) network output: run it from "
              "its checkpoint", file=sys.stderr)
        return 2
    if model.pose_depends_on_history:
        print(f"vizloc-export: {meta['architecture']} is a sequence model (its pose reads the last "
              f"{model.context_frames} frames); only single-image networks export to ONNX / TensorRT. "
              "Run the .safetensors checkpoint (PoseEstimator keeps the clip).", file=sys.stderr)
        return 2
    if model.has_relative_head:
        LOG.warning("%s: only the absolute-pose head is exported; visual odometry from the relative "
                    "head needs the .safetensors checkpoint", meta["architecture"])
    spec = InputSpec.from_meta(meta.get("input"))
    src = Path(args.weights)
    src_json = src.with_suffix(".json") if src.suffix == ".safetensors" else Path(f"{src}.json")
    stem = Path(args.out) if args.out else src.with_suffix("") if src.suffix else src
    onnx_path = stem.with_name(stem.name + ".onnx")
    json_path = stem.with_name(stem.name + ".json")
    # exported and validated under its temporary (vizloc_ros.files: locked, swept after a
    # kill -9): a network that fails validation never replaces (or appears as) a usable
    # .onnx, and the sidecar JSON is never half copied beside it
    copy_json = src_json.resolve() != json_path.resolve()
    try:
        with staged_files([json_path, onnx_path] if copy_json else [onnx_path], what="export") as partials:
            unvalidated = partials[-1]
            export_onnx(model, spec, unvalidated)
            diff = validate_onnx(model, spec, unvalidated)
            if not diff <= args.tolerance:
                raise _Rejected("the network's outputs are not finite (NaN or inf in the weights?)"
                                if not np.isfinite(diff) else
                                f"ONNX output differs from PyTorch by {diff:.3g} (> tolerance {args.tolerance})")
            if copy_json:
                shutil.copyfile(src_json, partials[0])
    except _Rejected as exc:
        print(f"vizloc-export: {exc}; nothing written", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"vizloc-export: cannot write {onnx_path}: {exc}", file=sys.stderr)
        return 2
    print(f"ONNX: {onnx_path} (opset {OPSET}, dynamic batch); max abs difference vs PyTorch "
          f"{diff:.3g}")
    want_trt = args.tensorrt == "yes" or (args.tensorrt == "auto" and _tensorrt_available())
    if want_trt:
        engine_path = stem.with_name(stem.name + ".engine")
        try:
            build_tensorrt_engine(onnx_path, engine_path, spec, args.max_batch)
        except (ImportError, RuntimeError) as exc:
            print(f"vizloc-export: TensorRT engine not built: {exc}", file=sys.stderr)
            return 1
        print(f"TensorRT fp16 engine: {engine_path}")
    else:
        print("TensorRT: not available here (no tensorrt module or no CUDA); ONNX only")
    summary = {"onnx": str(onnx_path), "max_abs_diff": diff, "json": str(json_path)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
