"""Train a map's coordinate head on the feature buffer: ACE's reprojection loss, with the
true scene points as extra supervision where the recording has depth.

The loss needs only each frame's pose and the intrinsics (no depth): a predicted point X
of a cell is projected into the frame that saw it and compared with the cell's pixel.

* A **valid** prediction (in front of the camera by at least ``min_depth``, reprojecting
  within ``max_reprojection`` pixels) costs ``tau tanh(e / tau)``: robust, because some
  cells see nothing the head can place (a blank wall), and ``tau`` shrinks over the run
  from ``tau_max`` to ``tau_min`` pixels (ACE's dynamic threshold) so the head first
  places every cell roughly, then sharpens the ones it can.
* An **invalid** one is pulled towards a point ``init_depth`` metres along the cell's ray
  (``||X - target||``, metres): early in training every prediction is the map centre,
  which is behind many cameras; reprojection gives no useful gradient there.
* With **depth** (synthetic 7-Scenes folders, RGB-D recordings), ``depth_weight`` times
  the distance to the true point, in pixels at that depth (``f ||X - X_true|| / z``), is
  added, under the same robust clamp.

Only the head is trained; the encoder was frozen when the buffer was made.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from vizloc_ros.localize.models.ace import CoordinateHead, native_bf16
from vizloc_ros.mapping.buffer import FeatureBuffer


@dataclass
class HeadTrainingConfig:
    batch: int = 5120
    lr_min: float = 5e-4
    lr_max: float = 3e-3
    tau_max: float = 25.0
    tau_min: float = 1.0
    min_depth: float = 0.1
    max_reprojection: float = 1000.0
    init_depth: float = 3.0
    depth_weight: float = 1.0
    #: "auto": bfloat16 hidden layers where the CPU does bf16 natively (oneDNN says so),
    #: else float32; "bf16" / "fp32" force one
    precision: str = "auto"
    threads: int = 2
    seed: int = 0


@dataclass
class HeadTrainingResult:
    steps: int
    seconds: float
    history: list
    config: dict


def reprojection_loss(X: torch.Tensor, pixels: torch.Tensor, R_cw: torch.Tensor, t_cw: torch.Tensor,
                      K: torch.Tensor, tau: float, targets: torch.Tensor | None, config: HeadTrainingConfig):
    """Mean loss of predicted points X (N, 3) seen at ``pixels`` (N, 2) by cameras (N, 3, 3),
    (N, 3); also the share of valid predictions and their median reprojection error."""
    Xc = torch.einsum("nij,nj->ni", R_cw, X) + t_cw
    z = Xc[:, 2]
    zs = z.clamp_min(config.min_depth)
    uv = torch.stack([K[0, 0] * Xc[:, 0] / zs + K[0, 2], K[1, 1] * Xc[:, 1] / zs + K[1, 2]], dim=1)
    err = torch.linalg.vector_norm(uv - pixels, dim=1)
    valid = (z > config.min_depth) & (err < config.max_reprojection)
    loss = torch.where(valid, tau * torch.tanh(err / tau), torch.zeros_like(err))
    # invalid: towards init_depth along the cell's ray, in the camera frame
    ray = torch.stack([(pixels[:, 0] - K[0, 2]) / K[0, 0], (pixels[:, 1] - K[1, 2]) / K[1, 1],
                       torch.ones_like(err)], dim=1)
    target_c = ray * config.init_depth
    loss = loss + torch.where(valid, torch.zeros_like(err), torch.linalg.vector_norm(Xc - target_c, dim=1))
    if targets is not None:
        has = torch.isfinite(targets).all(dim=1)
        if bool(has.any()):
            Xt = torch.einsum("nij,nj->ni", R_cw[has], targets[has]) + t_cw[has]
            px = K[0, 0] * torch.linalg.vector_norm(X[has] - targets[has], dim=1) / Xt[:, 2].clamp_min(config.min_depth)
            depth_term = torch.zeros_like(err)
            depth_term[has] = tau * torch.tanh(px / tau)
            loss = loss + config.depth_weight * depth_term
    with torch.no_grad():
        valid_share = float(valid.float().mean())
        median_err = float(err[valid].median()) if bool(valid.any()) else float("inf")
    return loss.mean(), valid_share, median_err


def low_precision(precision: str) -> bool:
    """Whether the head's hidden layers train in bfloat16 (see :class:`HeadTrainingConfig`)."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    return native_bf16() if precision == "auto" else precision == "bf16"


def _tau(progress: float, config: HeadTrainingConfig) -> float:
    return math.sqrt(max(1.0 - progress ** 2, 0.0)) * (config.tau_max - config.tau_min) + config.tau_min


def _one_cycle(step: int, total: int, config: HeadTrainingConfig) -> float:
    """Up from lr_min to lr_max over the first quarter, then cosine down to lr_min / 10."""
    warm = max(1, total // 4)
    if step < warm:
        return config.lr_min + (config.lr_max - config.lr_min) * step / warm
    progress = (step - warm) / max(total - warm, 1)
    low = config.lr_min / 10
    return low + (config.lr_max - low) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def train_head(head: CoordinateHead, buffer: FeatureBuffer, centre: torch.Tensor, scale: float,
               steps: int | None = None, seconds: float | None = None, config: HeadTrainingConfig = HeadTrainingConfig(),
               on_step=None) -> HeadTrainingResult:
    """Train ``head`` on ``buffer`` for ``steps`` (or until ``seconds``, the schedule then
    being set by a measured rate). ``on_step(step, total, info)`` reports progress."""
    if steps is None and seconds is None:
        raise ValueError("give steps or seconds")
    torch.manual_seed(config.seed)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, config.threads))
    generator = torch.Generator().manual_seed(config.seed)
    head.train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr_min, weight_decay=0.0)
    n = len(buffer)
    bf16 = low_precision(config.precision)
    use_depth = buffer.has_depth and config.depth_weight > 0
    centre = centre.float()
    started = time.monotonic()
    total = steps if steps is not None else 10 ** 9
    history: list[dict] = []
    step = 0
    order = torch.randperm(n, generator=generator)
    cursor = 0
    try:
        while step < total:
            if steps is None and step == 20:  # budget in seconds: fix the schedule from the measured rate
                rate = (time.monotonic() - started) / 20
                total = max(40, int(seconds / rate))
            progress = step / max(total, 1)
            for group in optimizer.param_groups:
                group["lr"] = _one_cycle(step, total, config)
            tau = _tau(progress, config)
            if cursor + config.batch > n:
                order = torch.randperm(n, generator=generator)
                cursor = 0
            idx = order[cursor:cursor + config.batch]
            cursor += config.batch
            frames = buffer.frames[idx]
            X = head.forward_flat(buffer.features[idx].float(), low_precision=bf16) * scale + centre
            loss, valid_share, median_err = reprojection_loss(
                X, buffer.pixels[idx], buffer.R_cw[frames], buffer.t_cw[frames], buffer.K, tau,
                buffer.targets[idx] if use_depth else None, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % 50 == 0 or step == total:
                info = {"step": step, "loss": round(loss.item(), 4), "valid": round(valid_share, 3),
                        "median_px": round(median_err, 2), "tau": round(tau, 2),
                        "elapsed_s": round(time.monotonic() - started, 1)}
                history.append(info)
                if on_step is not None:
                    on_step(step, total, info)
    finally:
        torch.set_num_threads(previous_threads)
        head.eval()
    return HeadTrainingResult(steps=step, seconds=time.monotonic() - started, history=history,
                              config={**asdict(config), "bf16": bf16})


def coordinate_frame(buffer: FeatureBuffer, init_depth: float) -> tuple[np.ndarray, float]:
    """Centre and scale of the head's output: the mean camera position, and the spread of
    the cameras plus the distance they look at (so unit outputs reach the far walls)."""
    centres = buffer.camera_centres()
    centre = centres.mean(axis=0)
    spread = float(np.sqrt(((centres - centre) ** 2).sum(axis=1).mean())) if len(centres) > 1 else 0.0
    return centre, max(1.0, spread + init_depth)


__all__ = ["HeadTrainingConfig", "HeadTrainingResult", "coordinate_frame", "reprojection_loss", "train_head"]
