"""DSAC++'s end-to-end stage as an optional refinement of a map (``vizloc-map --refine-minutes``).

Why: the head is trained by :mod:`~vizloc_ros.mapping.head_training` on a loss per
scene point (reprojection), which does not know which points PnP-RANSAC will pick. DSAC's
differentiable hypothesis selection (Brachmann et al., DSAC / DSAC++) closes that gap: the
expected pose error of the RANSAC hypotheses, under the softmax of their soft inlier
counts, is differentiable in the scene coordinates, so the head can be trained on the
error of the pose itself. The machinery is the training recipe's
(:func:`vizloc_ros.training.recipes.dsac.dsac_expected_loss`: AP3P minimal sets made
differentiable by Gauss-Newton steps, soft-inlier scores, refined hypotheses, the
``max(degrees, cm)`` loss); this module only feeds it a map's frames.

How: the map's mapping frames (the same split :func:`~vizloc_ros.mapping.mapper.make_map`
used; its validation frames stay held out) are visited in a seeded random order, each
encoded by the map's frozen encoder (re-encoded per visit: 16 ms at 320x240, nothing kept
in memory), the head predicts every cell's point and only the head steps (Adam, cosine
learning rate over the budget). Afterwards the validation frames are localized again as at
run time, and the covariance scale recalibrated; the refined head is kept only if its
validation median translation error is not worse than before (a short refinement on a
small map can overfit; a map without validation frames keeps it unchecked), and the
checkpoint says which was kept and both figures. The stage needs a map that already
localizes: DSAC++'s loss is capped (``cap``) per hypothesis, so where every hypothesis is
far off it has no gradient and the head stays as it was.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from vizloc_ros.localize.camera import cell_centres
from vizloc_ros.localize.models.ace import AceLocalizer
from vizloc_ros.localize.preprocess import InputSpec, preprocess
from vizloc_ros.mapping.mapper import MappingError, MapOptions, split_frames, validate_map
from vizloc_ros.training.recipes.dsac import dsac_expected_loss


@dataclass
class RefineOptions:
    minutes: float = 2.0  # wall-clock budget
    steps: int | None = None  # a fixed number of frames instead (reproducible)
    lr: float = 1e-4
    hypotheses: int = 64
    alpha: float = 100.0  # softmax scale on the inlier fraction (DSAC++'s)
    refine_steps: int = 2  # soft-inlier Gauss-Newton steps per hypothesis
    cm_per_degree: float = 1.0
    cap: float = 100.0  # per-hypothesis loss cap (degrees / cm)
    threads: int = 2
    seed: int = 0


def refine_head(model: AceLocalizer, frames, indices, spec: InputSpec, options: RefineOptions,
                progress=None) -> dict:
    """Train ``model.head`` on DSAC's expected pose loss over ``frames[indices]``; returns
    the history. ``progress(stage, done, total, info)`` per step (a time budget's total is
    estimated from the speed so far)."""
    if options.steps is None and not (options.minutes > 0):
        raise MappingError(f"--refine-minutes must be > 0, got {options.minutes}")
    if not len(indices):
        raise MappingError("no mapping frames to refine on")
    report = progress or (lambda *a, **k: None)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, options.threads))
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    K = model.intrinsics()
    encoder, head = model.encoder.eval(), model.head
    params = list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=options.lr)
    budget = options.minutes * 60.0
    started = time.monotonic()
    history, losses, step, order = [], [], 0, np.array([], dtype=int)
    try:
        head.train()
        while True:
            elapsed = time.monotonic() - started
            done_share = step / options.steps if options.steps is not None else elapsed / budget
            if done_share >= 1.0:
                break
            for group in optimizer.param_groups:  # cosine down to zero over the budget
                group["lr"] = options.lr * 0.5 * (1.0 + math.cos(math.pi * done_share))
            if not len(order):
                order = rng.permutation(np.asarray(indices))
            frame, order = frames[int(order[0])], order[1:]
            with torch.no_grad():
                features = encoder(preprocess(torch.from_numpy(np.ascontiguousarray(frame.image))[None], spec))
            coords = model.coordinates_from_head(head(features))[0]  # (3, h, w), metres in map
            h, w = coords.shape[1:]
            pixels = torch.from_numpy(cell_centres(h, w, model.stride).reshape(-1, 2))
            out = dsac_expected_loss(coords.reshape(3, -1).T, pixels, K, torch.as_tensor(frame.t),
                                     torch.as_tensor(frame.q), hypotheses=options.hypotheses,
                                     threshold=model.pnp.inlier_threshold, alpha=options.alpha,
                                     refine_steps=options.refine_steps, cm_per_degree=options.cm_per_degree,
                                     cap=options.cap, rng=rng)
            loss = out["loss"]
            optimizer.zero_grad(set_to_none=True)
            if loss.requires_grad and torch.isfinite(loss):
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)  # one bad frame must not undo the map
                optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
            if step % 10 == 0:
                history.append({"step": step, "expected_loss": round(float(np.mean(losses[-10:])), 3),
                                "elapsed_s": round(time.monotonic() - started, 1)})
            # a time budget's step total follows from the speed so far (as the head training's)
            total = options.steps if options.steps is not None else max(
                step + 1, round(step * budget / max(time.monotonic() - started, 1e-9)))
            report("refine", step, total, {"loss": losses[-1]})
        if options.steps is None:
            report("refine", step, step, {"loss": losses[-1] if losses else float("nan")})
    finally:
        head.eval()
        torch.set_num_threads(previous_threads)
    return {"steps": step, "seconds": round(time.monotonic() - started, 1), "history": history[-20:],
            "mean_expected_loss_first": float(np.mean(losses[:10])) if losses else None,
            "mean_expected_loss_last": float(np.mean(losses[-10:])) if losses else None}


def refine_map(model: AceLocalizer, meta: dict, frames, map_options: MapOptions, options: RefineOptions,
               progress=None) -> dict:
    """Refine a map made by :func:`~vizloc_ros.mapping.mapper.make_map` from ``frames``
    with ``map_options`` (``model``, ``meta``: its loaded checkpoint) and re-validate it;
    returns the checkpoint meta to save (the head in ``model`` is the one kept)."""
    spec = InputSpec.from_meta(meta["input"])
    mapping_idx, validation_idx = split_frames(len(frames), map_options.validation_share,
                                               map_options.validation_block)
    before = (meta.get("metrics") or {}).get("validation") or {}
    kept_head = {k: v.detach().clone() for k, v in model.head.state_dict().items()}
    started = time.monotonic()
    result = refine_head(model, frames, mapping_idx, spec, options, progress)
    validation_started = time.monotonic()
    validated, errors = validate_map(model, frames, validation_idx, spec, progress)
    after = validated.get("validation") or {}
    validate_s = round(time.monotonic() - validation_started, 1)
    better = not before or not after or after["median_translation_m"] <= before["median_translation_m"]
    if not better:
        model.head.load_state_dict(kept_head)
    training = dict(meta.get("training") or {})
    timings = dict(training.get("timings") or {})
    timings.update(refine_s=result["seconds"], refine_validate_s=validate_s,
                   total_s=round(timings.get("total_s", 0.0) + time.monotonic() - started, 1))
    training["timings"] = timings
    training["refinement"] = {"method": "DSAC++ end-to-end (expected pose loss), head only",
                              "options": asdict(options), "kept": bool(better), **result,
                              "validation_before": before, "validation_after": after}
    metrics = dict(meta.get("metrics") or {})
    validation_errors = dict(meta.get("validation_errors") or {})
    if better and after:
        metrics["validation"] = after
        validation_errors.update(errors)
    return {"input": meta["input"], "scene": meta.get("scene", ""), "map_frame": meta.get("map_frame", "map"),
            "training": training, "metrics": metrics, "validation_errors": validation_errors}


__all__ = ["RefineOptions", "refine_head", "refine_map"]
