"""The estimator's adapters: one per way of turning images into poses, chosen once at load.

A runner takes same-size uint8 host images and returns :class:`RawPoses`; the
:class:`~vizloc_ros.localize.estimator.PoseEstimator` turns those into estimates with
covariances. Which runner serves a set of weights is decided when the weights are loaded
(:func:`model_runner` for a checkpoint's model, :func:`exported_runner` for an exported
network), never per frame:

* :class:`RegressorRunner`: single-image pose regressors (PoseNet, MapNet, ...). The whole
  device-side computation (uint8 image -> resize / crop / normalise -> network -> decoded
  pose) is one function; on CUDA it is captured once per input shape and sample count
  into a CUDA graph, and MC dropout runs the samples as one batch;
* :class:`SequenceRunner`: sequence models (VidLoc's clip, VLocNet's relative head) keep
  the last frames in a :class:`~vizloc_ros.localize.models.sequence.FrameStream`;
* :class:`LocalizingRunner`: models that compute their pose themselves (DSAC's RANSAC,
  NetVLAD's retrieval, the allocentric matcher), with their own per-frame covariances;
* :class:`OnnxRunner` and :class:`TensorRTRunner`: networks exported by ``vizloc-export``.
"""
from __future__ import annotations

import collections
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vizloc_ros import geometry
from vizloc_ros.localize.models.batchnorm_folding import fold_batch_norms
from vizloc_ros.localize.models.sequence import FrameStream
from vizloc_ros.localize.preprocess import InputSpec, preprocess
from vizloc_ros.localize.tensorrt import TensorRTEngine

LOG = logging.getLogger(__name__)

_MAX_GRAPHS = 8
#: images per CUDA-graph launch in a large batch: uploads of one chunk overlap the network
#: run of the previous one
_CHUNK = 8
EXPORTED_SUFFIXES = (".onnx", ".engine", ".plan")


@dataclass
class RawPoses:
    """A runner's answer for B images: ``t`` (S, B, 3) metres and ``q`` (S, B, 4) (w, x, y, z),
    float64, S = the MC dropout samples (1 without); ``relative`` (t (S, B, 3), q (S, B, 4),
    valid (B,)) for models with a relative head, else None; ``cov`` (B, 6, 6) ROS order for
    models that estimate their own uncertainty, else None."""

    t: np.ndarray
    q: np.ndarray
    relative: tuple | None = None
    cov: np.ndarray | None = None


class Runner:
    """Images in, :class:`RawPoses` out."""

    #: the frame stream of a sequence model (its output depends on earlier frames)
    stream: FrameStream | None = None

    def __call__(self, arrays: list[np.ndarray], samples: int, stamps=None) -> RawPoses:
        raise NotImplementedError


class _TorchRunner(Runner):
    """A PoseRegressor on the inference device: batch norms folded, channels_last, fp16 on
    CUDA when asked; images uploaded through reused page-locked buffers."""

    def __init__(self, model, spec: InputSpec, device: torch.device, precision: str):
        self.spec = spec
        self.device = device
        self.dtype = torch.float16 if (precision == "fp16" and device.type == "cuda") else torch.float32
        if precision == "fp16" and device.type != "cuda":
            LOG.warning("fp16 requested on %s: running fp32 (fp16 is a GPU path)", device)
        crop_h, crop_w = spec.crop
        example = torch.rand(2, 3, max(crop_h, 1), max(crop_w, 1), generator=torch.Generator().manual_seed(0))
        model = fold_batch_norms(model.float().eval(), (example - 0.45) / 0.225)
        if device.type == "cuda" and self.dtype == torch.float32:
            # fp32 means fp32: TF32 convolutions and matmuls differ from it by ~1e-3
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        model = model.to(device=device).eval()
        model = model.to(memory_format=torch.channels_last)
        if self.dtype == torch.float16:
            model = model.half()
        self.model = model
        self._pinned: dict[tuple, torch.Tensor] = {}
        self._copy_pool = None

    def _stack_into(self, arrays: list[np.ndarray], out: np.ndarray) -> None:
        """Stack images into ``out``. Large batches are copied by a few threads (numpy
        releases the GIL while copying); one thread cannot fill pinned memory fast enough
        to keep a GPU busy with 640x480 frames."""
        if len(arrays) < 4 or out.nbytes < (2 << 20):
            np.stack(arrays, out=out)
            return
        if self._copy_pool is None:
            self._copy_pool = ThreadPoolExecutor(max(1, min(8, (os.cpu_count() or 2) // 2)),
                                                 thread_name_prefix="vizloc-upload")
        list(self._copy_pool.map(lambda i: np.copyto(out[i], arrays[i]), range(len(arrays))))

    def _buffer(self, cache: dict, key: tuple, make) -> torch.Tensor:
        buffer = cache.get(key)
        if buffer is None:
            if len(cache) >= _MAX_GRAPHS:
                cache.clear()
            buffer = cache[key] = make(key)
        return buffer

    def upload(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """Same-size (H, W, 3) uint8 host images -> one (B, H, W, 3) tensor on the device.

        On CUDA the images are stacked straight into a reused page-locked buffer (one host
        copy, not two) and uploaded without blocking; the buffer is reused only after the
        previous call has synchronised on its result.
        """
        if self.device.type != "cuda":
            return torch.from_numpy(np.stack(arrays))
        pinned = self._buffer(self._pinned, (len(arrays), *arrays[0].shape),
                              lambda k: torch.empty(k, dtype=torch.uint8, pin_memory=True))
        self._stack_into(arrays, pinned.numpy())
        return pinned.to(self.device, non_blocking=True)

    def prepared(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """Host images -> the normalised network input on the device (eager)."""
        x = preprocess(self.upload(arrays), self.spec, dtype=self.dtype)
        return x.contiguous(memory_format=torch.channels_last)


class RegressorRunner(_TorchRunner):
    """Single-image pose regressors, with the fast paths.

    On CUDA the device-side computation (:meth:`_pipeline`) is captured once per input
    shape and sample count into a CUDA graph, so a frame costs one host copy, one upload,
    one graph launch and one 28-byte download per image; MC dropout is captured with
    dropout sampling on (the graph advances the random generator on every replay, so each
    call draws fresh masks).
    """

    def __init__(self, model, spec: InputSpec, device: torch.device, precision: str,
                 use_graphs: bool, compile_model: bool):
        super().__init__(model, spec, device, precision)
        self.forward = torch.compile(self.model.forward) if compile_model else self.model.forward
        self.use_graphs = use_graphs and device.type == "cuda"
        self._graphs: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
        self._device_in: dict[tuple, torch.Tensor] = {}
        self._copy_stream = None

    def _pipeline(self, images: torch.Tensor, samples: int) -> torch.Tensor:
        """uint8 (B, H, W, 3) on the device -> (samples * B, 7) float32: metric
        translation and unit quaternion (w, x, y, z), sample-major."""
        x = preprocess(images, self.spec, dtype=self.dtype).contiguous(memory_format=torch.channels_last)
        self.model.mc_dropout(samples > 1)
        try:
            raw = self.model.forward_samples(x, samples) if samples > 1 else self.forward(x)
        finally:
            self.model.mc_dropout(False)
        t, q = self.model.decode(raw.float())
        return torch.cat([t, q], dim=-1)

    def _graph_for(self, images: torch.Tensor, samples: int) -> tuple:
        key = (*images.shape, samples)
        entry = self._graphs.get(key)
        if entry is not None:
            self._graphs.move_to_end(key)
            return entry
        static_in = images.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up iterations, as CUDA graphs require
            for _ in range(2):
                self._pipeline(static_in, samples)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self._pipeline(static_in, samples)
        entry = self._graphs[key] = (graph, static_in, static_out)
        if len(self._graphs) > _MAX_GRAPHS:
            self._graphs.popitem(last=False)
        return entry

    def _run_chunked(self, arrays: list[np.ndarray], repeats: int) -> torch.Tensor:
        """Large CUDA batches in chunks of :data:`_CHUNK`: the host copy of chunk i+1 and
        its upload (on a copy stream) overlap the graph replay of chunk i, so a batch of
        640x480 frames is bounded by the slowest of copy, upload and network rather than
        by their sum."""
        n, shape = len(arrays), (len(arrays), *arrays[0].shape)
        pinned = self._buffer(self._pinned, shape,
                              lambda k: torch.empty(k, dtype=torch.uint8, pin_memory=True))
        device_in = self._buffer(self._device_in, shape,
                                 lambda k: torch.empty(k, dtype=torch.uint8, device=self.device))
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)
        pinned_np = pinned.numpy()
        outputs = []
        for start in range(0, n, _CHUNK):
            stop = min(start + _CHUNK, n)
            self._stack_into(arrays[start:stop], pinned_np[start:stop])
            with torch.cuda.stream(self._copy_stream):
                device_in[start:stop].copy_(pinned[start:stop], non_blocking=True)
                uploaded = torch.cuda.Event()
                uploaded.record(self._copy_stream)
            compute.wait_event(uploaded)
            graph, static_in, static_out = self._graph_for(device_in[start:stop], repeats)
            static_in.copy_(device_in[start:stop])
            graph.replay()
            outputs.append(static_out.reshape(repeats, stop - start, 7).clone())
        return torch.cat(outputs, dim=1)

    @torch.inference_mode()
    def __call__(self, arrays: list[np.ndarray], samples: int, stamps=None) -> RawPoses:
        repeats = max(samples, 1)
        if self.use_graphs and len(arrays) >= 2 * _CHUNK:
            out = self._run_chunked(arrays, repeats)
        elif self.use_graphs:
            images = self.upload(arrays)
            graph, static_in, static_out = self._graph_for(images, repeats)
            static_in.copy_(images)
            graph.replay()
            out = static_out
        else:
            out = self._pipeline(self.upload(arrays), repeats)
        pose = out.reshape(repeats, len(arrays), 7).cpu().numpy().astype(np.float64)
        return RawPoses(pose[..., :3], pose[..., 3:])


class SequenceRunner(_TorchRunner):
    """Sequence models (VidLoc, VLocNet): frames go through the model's frame stream in
    stamp order (eager, since the stream's state changes with every frame)."""

    def __init__(self, model, spec: InputSpec, device: torch.device, precision: str):
        super().__init__(model, spec, device, precision)
        self.stream = FrameStream(self.model)

    @torch.inference_mode()
    def __call__(self, arrays: list[np.ndarray], samples: int, stamps=None) -> RawPoses:
        repeats = max(samples, 1)
        x = self.prepared(arrays)
        relative = None
        self.model.mc_dropout(repeats > 1)
        try:
            out = self.stream.push(x, stamps, repeats)
            raw = out.pose.reshape(-1, out.pose.shape[-1])
            if out.relative is not None:
                t_rel, q_rel = self.model.decode_relative(out.relative.float())
                relative = (t_rel.double().cpu().numpy(), q_rel.double().cpu().numpy(),
                            out.has_relative.cpu().numpy())
        finally:
            self.model.mc_dropout(False)
        t, q = self.model.decode(raw.float())
        b = len(arrays)
        return RawPoses(t.reshape(repeats, b, 3).double().cpu().numpy(),
                        q.reshape(repeats, b, 4).double().cpu().numpy(), relative)


class LocalizingRunner(_TorchRunner):
    """Models with their own localisation (DSAC's RANSAC, NetVLAD's retrieval, the
    allocentric matcher): eager, one pose per image, with the model's per-frame
    covariances when it gives them."""

    @torch.inference_mode()
    def __call__(self, arrays: list[np.ndarray], samples: int, stamps=None) -> RawPoses:
        t, q, cov = self.model.localize(self.prepared(arrays))
        return RawPoses(t.double().cpu().numpy()[None], q.double().cpu().numpy()[None],
                        cov=None if cov is None else torch.as_tensor(cov).double().cpu().numpy())


class _ExportedRunner(Runner):
    """An exported network that outputs (B, 7): metric translation and quaternion
    (w, x, y, z), as written by ``vizloc-export``; preprocessing on the CPU."""

    def __init__(self, spec: InputSpec):
        self.spec = spec

    def run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, arrays: list[np.ndarray], samples: int, stamps=None) -> RawPoses:
        with torch.inference_mode():
            x = preprocess(torch.from_numpy(np.stack(arrays)), self.spec).numpy()
        out = np.asarray(self.run(np.ascontiguousarray(x, dtype=np.float32)), dtype=np.float64)
        t = out[None, :, :3]
        q = geometry.quat_hemisphere(geometry.quat_normalize(out[None, :, 3:7]))
        return RawPoses(t, q)


class OnnxRunner(_ExportedRunner):
    """An ``.onnx`` network through ONNX Runtime (any available execution provider)."""

    def __init__(self, path: Path, spec: InputSpec):
        super().__init__(spec)
        try:
            import onnxruntime as ort  # optional dependency (the export extra): imported when used
        except ImportError as exc:
            raise RuntimeError("running an .onnx file needs onnxruntime "
                               "(pip install 'vizloc_ros[export]')") from exc
        try:
            self.session = ort.InferenceSession(str(path), providers=ort.get_available_providers())
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors derive from Exception only
            raise RuntimeError(f"{path}: ONNX Runtime cannot load it ({type(exc).__name__}: {exc})") from None
        self.input_name = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]


class TensorRTRunner(_ExportedRunner):
    """A TensorRT engine (``.engine`` / ``.plan``); a clear error where tensorrt is absent."""

    def __init__(self, path: Path, spec: InputSpec):
        super().__init__(spec)
        self.engine = TensorRTEngine(path)

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.engine.infer(x)


def is_exported(path) -> bool:
    """Weights exported by ``vizloc-export`` (ONNX or a TensorRT engine), not a checkpoint."""
    return Path(path).suffix in EXPORTED_SUFFIXES


def exported_runner(path, spec: InputSpec) -> Runner:
    """The runner of an exported network, by its file type."""
    path = Path(path)
    return OnnxRunner(path, spec) if path.suffix == ".onnx" else TensorRTRunner(path, spec)


def model_runner(model, spec: InputSpec, device: torch.device, precision: str = "fp32",
                 use_graphs: bool = True, compile_model: bool = False) -> Runner:
    """The runner of a loaded PoseRegressor, by what the model is."""
    if model.custom_inference:
        return LocalizingRunner(model, spec, device, precision)
    if model.streaming:
        return SequenceRunner(model, spec, device, precision)
    return RegressorRunner(model, spec, device, precision, use_graphs, compile_model)
