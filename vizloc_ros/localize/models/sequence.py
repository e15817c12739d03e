"""Online operation of sequence models: the last frames' states, newest prediction out.

A single-image network maps each frame to a pose on its own. Sequence models do not:
VidLoc reads a clip of the last N frames with a bidirectional LSTM, and VLocNet's
odometry head needs the previous frame. :class:`FrameStream` is the one place that
keeps that history at run time (``PoseEstimator``, hence the regressor node and
``vizloc-replay``, and the trainer's validation), for any model whose
:attr:`~vizloc_ros.localize.models.base.PoseRegressor.streaming` is true:

* each frame is encoded once (``model.encode_frames``: the CNN part) and its state kept
  in a ring of ``model.context_frames`` entries;
* for every frame the window "all kept states up to and including it" goes through
  ``model.decode_window``, so frame i of a batch sees exactly what it would have seen
  had the frames come one at a time (batching changes speed, not results);
* a stamp that goes back in time (a looping bag) or jumps forward by more than
  ``max_gap_s`` starts a new window: a clip never spans two recordings.

While the ring fills up, the window is shorter than ``context_frames``: the first frames
of a recording are predicted from what there is. Once full, the output for the newest
frame equals the model's offline output for the last frame of the same clip.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

#: a gap longer than this (seconds of message time) starts a new window
DEFAULT_MAX_GAP_S = 1.0


@dataclass
class StreamOutput:
    """Raw outputs of one pushed batch of N frames, S dropout samples each.

    ``pose`` (S, N, D); ``relative`` (S, N, 6) or None when the model has no relative
    head; ``has_relative`` (N,) bool: the frame had a predecessor in its window.
    """

    pose: torch.Tensor
    relative: torch.Tensor | None
    has_relative: torch.Tensor


class FrameStream:
    """Per-frame states of the last ``model.context_frames`` frames of one camera."""

    def __init__(self, model, max_gap_s: float = DEFAULT_MAX_GAP_S):
        if not getattr(model, "streaming", False):
            raise ValueError(f"{type(model).__name__} is a single-image model: it needs no FrameStream")
        self.model = model
        self.length = max(int(model.context_frames), 2 if model.has_relative_head else 1)
        self.max_gap_s = float(max_gap_s)
        self._states: deque = deque(maxlen=self.length)
        self._last_stamp: float | None = None
        self.resets = 0

    def __len__(self) -> int:
        return len(self._states)

    def reset(self) -> None:
        """Forget the kept frames (a new recording, a re-initialisation)."""
        if self._states:
            self.resets += 1
        self._states.clear()
        self._last_stamp = None

    def _accept_stamp(self, stamp) -> None:
        if stamp is None:
            return
        stamp = float(stamp)
        last = self._last_stamp
        if last is not None and (stamp <= last or stamp - last > self.max_gap_s):
            self.reset()
        self._last_stamp = stamp

    @torch.inference_mode()
    def push(self, images: torch.Tensor, stamps=None, samples: int = 1) -> StreamOutput:
        """Preprocessed frames (N, 3, H, W) in time order (and their stamps, seconds) ->
        raw outputs for each of them. ``samples`` > 1 repeats the window decoding with
        the model's dropout as it is set (MC dropout); the CNN runs once per frame."""
        n = images.shape[0]
        if stamps is not None and len(stamps) != n:
            raise ValueError(f"{n} frames but {len(stamps)} stamps")
        samples = max(int(samples), 1)
        states = self.model.encode_frames(images)
        windows: list[torch.Tensor] = []
        for i in range(n):
            self._accept_stamp(None if stamps is None else stamps[i])
            self._states.append(states[i])
            windows.append(torch.stack(tuple(self._states)))
        pose = [None] * n
        relative = [None] * n
        has_relative = torch.zeros(n, dtype=torch.bool)
        by_length: dict[int, list[int]] = {}
        for i, window in enumerate(windows):
            by_length.setdefault(window.shape[0], []).append(i)
        for length, indices in by_length.items():
            batch = torch.stack([windows[i] for i in indices])          # (B, T, ...)
            if samples > 1:
                batch = batch.repeat(samples, *([1] * (batch.dim() - 1)))  # sample-major
            out = self.model.decode_window(batch)
            b = len(indices)
            p = out["pose"].reshape(samples, b, -1)
            r = out.get("relative")
            r = None if r is None else r.reshape(samples, b, -1)
            for k, i in enumerate(indices):
                pose[i] = p[:, k]
                if r is not None:
                    relative[i] = r[:, k]
                    has_relative[i] = True
        pose_t = torch.stack(pose, dim=1)
        rel_t = None
        if self.model.has_relative_head:
            template = next((r for r in relative if r is not None), None)
            if template is None:
                template = torch.full((samples, 6), float("nan"), dtype=pose_t.dtype, device=pose_t.device)
            rel_t = torch.stack([r if r is not None else torch.full_like(template, float("nan"))
                                 for r in relative], dim=1)
        return StreamOutput(pose=pose_t, relative=rel_t, has_relative=has_relative)
