"""Run a TensorRT engine written by ``vizloc-export`` (an optional runtime: Jetson, x86 with TensorRT).

The ``tensorrt`` package is imported when an engine is opened, not with this module:
it is optional and absent on most machines, and a missing package must be the clear
error below rather than an import failure of the estimator.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class TensorRTEngine:
    """A deserialised TensorRT engine run through torch CUDA tensors (no pycuda needed).

    The engine takes the preprocessed batch ``images`` (B, 3, crop_h, crop_w) float32 and
    writes ``pose`` (B, 7): metric translation and quaternion (w, x, y, z).
    """

    def __init__(self, path: Path):
        try:
            import tensorrt as trt  # optional dependency, see the module docstring
        except ImportError as exc:
            raise RuntimeError(f"{path} is a TensorRT engine but the tensorrt Python package "
                               "is not installed (JetPack ships it; on x86: pip install tensorrt)"
                               ) from exc
        if not torch.cuda.is_available():
            raise RuntimeError("a TensorRT engine needs CUDA, which is not available")
        self._trt = trt
        logger = trt.Logger(trt.Logger.WARNING)
        with open(path, "rb") as handle:
            self.engine = trt.Runtime(logger).deserialize_cuda_engine(handle.read())
        if self.engine is None:
            raise RuntimeError(f"{path}: TensorRT could not deserialise this engine "
                               "(built for another GPU or TensorRT version?)")
        self.context = self.engine.create_execution_context()

    def infer(self, x: np.ndarray) -> np.ndarray:
        images = torch.from_numpy(x).cuda()
        self.context.set_input_shape("images", tuple(images.shape))
        out = torch.empty((images.shape[0], 7), dtype=torch.float32, device="cuda")
        self.context.set_tensor_address("images", images.data_ptr())
        self.context.set_tensor_address("pose", out.data_ptr())
        stream = torch.cuda.current_stream()
        self.context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return out.cpu().numpy()
