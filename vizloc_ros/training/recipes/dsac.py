"""The ``dsac`` training recipe: scene coordinate targets and DSAC++'s three training stages.

Stages, selected by ``loss.stage`` (or ``coords+e2e`` to switch after ``loss.e2e_after``
steps, one command):

- ``coords``: distance to ground-truth scene coordinates from depth + pose + intrinsics;
- ``reprojection``: DSAC++'s second stage, the reprojection error of the predicted
  coordinates in the ground-truth camera (no depth needed; heuristic constant-depth
  targets stand in where a point falls behind the camera);
- ``e2e``: DSAC's differentiable hypothesis selection. Hypotheses (OpenCV AP3P, then
  Gauss-Newton steps in torch so they are differentiable functions of the coordinates)
  are scored by the soft inlier count, the selection probability is
  ``softmax(alpha * inlier_fraction)``, every hypothesis is refined by soft-inlier
  weighted Gauss-Newton steps, and the loss is the expectation of
  ``max(rotation error in degrees, translation error in cm)`` under that distribution.

The samples also fix what the model learns from the data: the intrinsics of the training
images and of the network input (:class:`~vizloc_ros.localize.models.dsac.SceneCoordinateNet`
needs them for PnP at inference).
"""
from __future__ import annotations

import logging

import cv2
import numpy as np
import torch
from torch import nn

from vizloc_ros import geometry
from vizloc_ros.geometry import torch_hat, torch_matrix_to_quat, torch_rotation_angle, torch_so3_exp
from vizloc_ros.localize.camera import input_camera
from vizloc_ros.localize.models.dsac import SceneCoordinateNet
from vizloc_ros.training.recipes.base import TrainingRecipe, own_loss_options, register_recipe, require_fixed_crop
from vizloc_ros.training.scene_geometry import dataset_camera, depth_path, grid_scene_coordinates, load_depth

LOG = logging.getLogger(__name__)

STAGES = ("coords", "reprojection", "e2e", "coords+e2e")


# --------------------------------------------------------------------------- differentiable RANSAC

def torch_project(R: torch.Tensor, t: torch.Tensor, X: torch.Tensor, K: torch.Tensor, min_depth: float = 0.1):
    """World-to-camera (M, 3, 3), (M, 3); points (N, 3) or (M, N, 3) -> uv (M, N, 2), Xc."""
    if X.dim() == 2:
        Xc = torch.einsum("mij,nj->mni", R, X) + t[:, None, :]
    else:
        Xc = torch.einsum("mij,mnj->mni", R, X) + t[:, None, :]
    z = Xc[..., 2].clamp_min(min_depth)
    uv = torch.stack([K[0, 0] * Xc[..., 0] / z + K[0, 2], K[1, 1] * Xc[..., 1] / z + K[1, 2]], -1)
    return uv, Xc


def gauss_newton_step(R, t, X, p, K, weights=None, damping: float = 1e-6):
    """One (weighted) Gauss-Newton step of the reprojection error for M hypotheses,
    differentiable with respect to the points ``X`` (and the weights).

    Update on the left in the camera frame: Xc <- exp(w) Xc + v."""
    uv, Xc = torch_project(R, t, X, K)
    r = uv - (p if p.dim() == 3 else p[None])
    z = Xc[..., 2].clamp_min(0.1)
    fx, fy = K[0, 0], K[1, 1]
    zeros = torch.zeros_like(z)
    dpi = torch.stack([torch.stack([fx / z, zeros, -fx * Xc[..., 0] / z ** 2], -1),
                       torch.stack([zeros, fy / z, -fy * Xc[..., 1] / z ** 2], -1)], -2)  # (M, N, 2, 3)
    J = torch.cat([dpi, -dpi @ torch_hat(Xc)], dim=-1)  # (M, N, 2, 6)
    if weights is not None:
        Jw = J * weights[..., None, None]
    else:
        Jw = J
    H = torch.einsum("mnki,mnkj->mij", Jw, J)
    g = torch.einsum("mnki,mnk->mi", Jw, r)
    eye = torch.eye(6, dtype=H.dtype, device=H.device)
    scale = H.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
    delta = -torch.linalg.solve(H + (damping * scale)[:, None, None] * eye, g[..., None])[..., 0]
    dR = torch_so3_exp(delta[:, 3:])
    return dR @ R, (dR @ t[..., None])[..., 0] + delta[:, :3]


def soft_inlier_scores(R, t, X, p, K, threshold: float, beta: float):
    """Soft inlier counts (M,) and reprojection errors (M, N) of hypotheses."""
    uv, Xc = torch_project(R, t, X, K)
    r = (uv - p[None]).norm(dim=-1)
    r = torch.where(Xc[..., 2] > 0.1, r, torch.full_like(r, 1e6))
    return torch.sigmoid(beta * (threshold - r)).sum(dim=-1), r


def initial_hypotheses(X: np.ndarray, p: np.ndarray, K: np.ndarray, count: int, rng: np.random.Generator):
    """Minimal sets of 4 and their AP3P solutions (OpenCV, not differentiable).

    Returns (sets (M, 4) int, R_wc (M, 3, 3), t_wc (M, 3)) for the M <= count that solved."""
    n = len(X)
    sets = np.argsort(rng.random((count, n)), axis=1)[:, :4]
    keep, Rs, ts = [], [], []
    for k, idx in enumerate(sets):
        try:
            ok, rvec, tvec = cv2.solvePnP(X[idx], p[idx], K, None, flags=cv2.SOLVEPNP_AP3P)
        except cv2.error:
            continue
        if ok and np.all(np.isfinite(rvec)) and np.all(np.isfinite(tvec)) and np.abs(tvec).max() < 1e4:
            keep.append(k)
            Rs.append(cv2.Rodrigues(rvec)[0])
            ts.append(tvec.reshape(3))
    if not keep:
        return sets[:0], np.zeros((0, 3, 3)), np.zeros((0, 3))
    return sets[keep], np.stack(Rs), np.stack(ts)


def pose_loss(R_wc, t_wc, t_gt, q_gt, cm_per_degree: float = 1.0, cap: float = 100.0):
    """DSAC++'s per-hypothesis loss max(rotation error in degrees, translation error in
    cm / cm_per_degree), capped (no gradient beyond the cap). Camera-to-world ground truth."""
    R_cw = R_wc.transpose(-1, -2)
    centre = -(R_cw @ t_wc[..., None])[..., 0]
    q = torch_matrix_to_quat(R_cw)
    angle = torch.rad2deg(torch_rotation_angle(q, q_gt.expand_as(q)))
    trans = 100.0 * (centre - t_gt).norm(dim=-1) / cm_per_degree
    return torch.maximum(angle, trans).clamp(max=cap)


def dsac_expected_loss(coords: torch.Tensor, pixels: torch.Tensor, K, t_gt: torch.Tensor, q_gt: torch.Tensor,
                       hypotheses: int = 64, threshold: float = 5.0, beta: float | None = None,
                       alpha: float = 100.0, minimal_steps: int = 2, refine_steps: int = 2,
                       cm_per_degree: float = 1.0, cap: float = 100.0, rng=None) -> dict:
    """DSAC's expected pose loss for one image.

    coords (N, 3) predicted scene coordinates (differentiable), pixels (N, 2), K (3, 3),
    ground truth camera-to-world t_gt (3,), q_gt (4,). Returns {"loss", "probs", "losses",
    "scores"}; ``probs`` is the hypothesis distribution softmax(alpha * inlier fraction).
    """
    beta = 5.0 / threshold if beta is None else beta
    rng = np.random.default_rng() if rng is None else rng
    X = coords.double()
    p = pixels.to(X)
    Kt = torch.as_tensor(K, dtype=X.dtype, device=X.device)
    finite = torch.isfinite(X).all(dim=1)
    X, p = X[finite], p[finite]
    sets, R0, t0 = initial_hypotheses(X.detach().cpu().numpy(), p.cpu().numpy(), Kt.cpu().numpy(),
                                      hypotheses, rng)
    if len(sets) == 0:
        zero = coords.sum() * 0.0
        return {"loss": zero, "probs": zero.new_zeros(0), "losses": zero.new_zeros(0),
                "scores": zero.new_zeros(0)}
    R = torch.as_tensor(R0, dtype=X.dtype, device=X.device)
    t = torch.as_tensor(t0, dtype=X.dtype, device=X.device)
    index = torch.as_tensor(sets, device=X.device)
    X_min, p_min = X[index], p[index]  # (M, 4, 3), (M, 4, 2)
    for _ in range(minimal_steps):  # makes the hypotheses differentiable functions of X
        R, t = gauss_newton_step(R, t, X_min, p_min, Kt)
    scores, _ = soft_inlier_scores(R, t, X, p, Kt, threshold, beta)
    probs = torch.softmax(alpha * scores / len(X), dim=0)
    for _ in range(refine_steps):  # soft-inlier weighted refinement over all correspondences
        _, r = soft_inlier_scores(R, t, X, p, Kt, threshold, beta)
        weights = torch.sigmoid(beta * (threshold - r))
        R, t = gauss_newton_step(R, t, X.expand(len(R), -1, -1), p.expand(len(R), -1, -1), Kt, weights)
    losses = pose_loss(R, t, t_gt.to(X), q_gt.to(X), cm_per_degree, cap)
    return {"loss": (probs * losses).sum(), "probs": probs, "losses": losses, "scores": scores}


# --------------------------------------------------------------------------- loss and samples

LOSS_OPTIONS = {"stage": "coords", "e2e_after": 0, "hypotheses": 64, "threshold": None,
                "alpha": None, "refine_steps": 2, "cm_per_degree": 1.0, "cap": 100.0,
                "init_depth": 3.0, "max_reprojection": 100.0, "seed": 0}


def loss_options(block: dict) -> dict:
    options = own_loss_options("dsac", LOSS_OPTIONS, block)
    if options["stage"] not in STAGES:
        raise ValueError(f"loss.stage must be one of {', '.join(STAGES)}, got {options['stage']!r}")
    return options


class SceneCoordinateLoss(nn.Module):
    """The three DSAC++ training stages as one loss module, called ``loss(net, x, batch)``
    with ``batch["coords"]`` (B, h, w, 3) targets (NaN where unknown), ``batch["t"]``,
    ``batch["q"]`` (camera-to-world ground truth)."""

    def __init__(self, model: SceneCoordinateNet, stage: str = "coords", e2e_after: int = 0,
                 hypotheses: int = 64, threshold: float | None = None, alpha: float | None = None,
                 refine_steps: int = 2, cm_per_degree: float = 1.0, cap: float = 100.0,
                 init_depth: float = 3.0, max_reprojection: float = 100.0, seed: int = 0):
        super().__init__()
        self.stage = stage
        self.e2e_after = int(e2e_after)
        self.hypotheses = int(hypotheses)
        self.threshold = float(threshold) if threshold is not None else model.inlier_threshold
        self.alpha = float(alpha) if alpha is not None else model.alpha
        self.refine_steps = int(refine_steps)
        self.cm_per_degree = float(cm_per_degree)
        self.cap = float(cap)
        self.init_depth = float(init_depth)
        self.max_reprojection = float(max_reprojection)
        self.rng = np.random.default_rng(int(seed))
        # a plain attribute, not a submodule: the optimiser gets the model's parameters once
        object.__setattr__(self, "_model", model)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def config(self) -> dict:
        return {"stage": self.stage, "e2e_after": self.e2e_after, "hypotheses": self.hypotheses,
                "threshold": self.threshold, "alpha": self.alpha, "refine_steps": self.refine_steps,
                "cm_per_degree": self.cm_per_degree, "cap": self.cap, "init_depth": self.init_depth}

    def current_stage(self) -> str:
        if self.stage == "coords+e2e":
            return "e2e" if int(self.steps) >= self.e2e_after else "coords"
        return self.stage

    def forward(self, net, x: torch.Tensor, batch: dict) -> torch.Tensor:
        stage = self.current_stage()
        self.steps += 1
        coords = net(x).permute(0, 2, 3, 1)  # (B, h, w, 3)
        target = batch["coords"].to(coords)
        if target.shape != coords.shape:
            raise ValueError(f"scene coordinate targets {tuple(target.shape)} do not match the "
                             f"network output {tuple(coords.shape)}")
        if stage == "coords":
            return self.coordinate_loss(coords, target)
        if stage == "reprojection":
            return self.reprojection_loss(coords, target, batch["t"], batch["q"])
        return self.e2e_loss(coords, batch["t"], batch["q"])

    @staticmethod
    def coordinate_loss(coords, target):
        valid = torch.isfinite(target).all(dim=-1)
        if not valid.any():
            return coords.sum() * 0.0
        return (coords[valid] - target[valid]).norm(dim=-1).mean()

    def reprojection_loss(self, coords, target, t_gt, q_gt):
        """DSAC++ stage 2: reprojection error in the ground-truth camera, square-root
        damped beyond the inlier threshold; points behind the camera or reprojecting
        absurdly far are pulled to their (heuristic) target coordinates instead."""
        model = self._model
        b, h, w, _ = coords.shape
        K = torch.as_tensor(model.intrinsics(), dtype=coords.dtype, device=coords.device)
        pixels = model.pixel_grid(h, w, coords.device, coords.dtype)
        R_cw = geometry.torch_quat_to_matrix(q_gt.to(coords))
        R_wc = R_cw.transpose(-1, -2)
        t_wc = -(R_wc @ t_gt.to(coords)[..., None])[..., 0]
        uv, Xc = torch_project(R_wc, t_wc, coords.reshape(b, -1, 3), K)
        r = (uv - pixels[None]).norm(dim=-1)
        tau = self.threshold
        robust = torch.where(r < tau, r, torch.sqrt(tau * r.clamp_min(tau)))
        ok = (Xc[..., 2] > 0.1) & (r < self.max_reprojection)
        flat_target = target.reshape(b, -1, 3)
        has_target = torch.isfinite(flat_target).all(-1)
        pull = (coords.reshape(b, -1, 3) - flat_target.nan_to_num()).norm(dim=-1)
        per_cell = torch.where(ok, robust, torch.where(has_target, pull, torch.zeros_like(pull)))
        return per_cell.mean()

    def e2e_loss(self, coords, t_gt, q_gt):
        model = self._model
        b, h, w, _ = coords.shape
        K = model.intrinsics()
        pixels = model.pixel_grid(h, w, coords.device)
        losses = []
        for i in range(b):
            out = dsac_expected_loss(coords[i].reshape(-1, 3), pixels, K, t_gt[i], q_gt[i],
                                     hypotheses=self.hypotheses, threshold=self.threshold,
                                     beta=model.inlier_beta, alpha=self.alpha,
                                     refine_steps=self.refine_steps, cm_per_degree=self.cm_per_degree,
                                     cap=self.cap, rng=self.rng)
            losses.append(out["loss"])
        return torch.stack(losses).mean().to(coords.dtype)


class SceneCoordinateSamples:
    """Training samples of a pose dataset with scene coordinate targets on the output grid.

    Targets come from the depth image beside each colour image; a dataset without depth
    (KITTI, Cambridge) gets DSAC++'s heuristic targets at ``init_depth`` metres in front of
    the camera, meant for the ``reprojection`` and ``e2e`` stages. Targets are computed
    once per frame and cached (a few kB each).
    """

    def __init__(self, base, camera: dict, spec, out_hw, stride: int, init_depth: float = 3.0):
        self.base, self.camera, self.spec = base, camera, spec
        self.out_hw, self.stride, self.init_depth = tuple(out_hw), int(stride), float(init_depth)
        items = getattr(base, "items", [])
        self.has_depth = bool(items) and all(depth_path(it[0]).is_file() for it in items)
        if not self.has_depth:
            LOG.warning("no depth images beside the training images: scene coordinate targets are "
                        "heuristic (constant depth %.1f m); train with loss.stage reprojection / e2e",
                        self.init_depth)
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.base)

    def targets(self, index: int, t, q) -> np.ndarray:
        if index not in self._cache:
            if self.has_depth:
                depth = load_depth(depth_path(self.base.items[index][0]))
                coords = grid_scene_coordinates(depth, self.camera, self.spec, t, q, self.out_hw, self.stride)
            else:
                coords = grid_scene_coordinates(None, self.camera, self.spec, t, q, self.out_hw, self.stride,
                                                constant_depth=self.init_depth)
            self._cache[index] = coords
        return self._cache[index]

    def __getitem__(self, index: int) -> dict:
        sample = self.base[index]
        image = sample["image"]
        if image.shape[:2] != (self.camera["height"], self.camera["width"]):
            raise ValueError(f"image {image.shape[1]}x{image.shape[0]} does not match the camera "
                             f"{self.camera['width']}x{self.camera['height']}")
        return {"image": image, "t": sample["t"], "q": sample["q"],
                "coords": self.targets(index, sample["t"], sample["q"]), "index": sample["index"]}


@register_recipe("dsac")
class SceneCoordinateRecipe(TrainingRecipe):
    """Scene coordinate targets from depth (or DSAC++'s heuristic constant depth) and the
    staged DSAC++ loss."""

    def loss(self, model, config: dict):
        return SceneCoordinateLoss(model, **loss_options(config.get("loss") or {}))

    def samples(self, model, dataset, config: dict, spec):
        require_fixed_crop("dsac", config, "its targets are aligned with the network input pixel for pixel")
        camera = dataset_camera(dataset, model.camera)
        model.camera = camera
        model.input_camera = input_camera(camera, spec)
        options = config.get("loss") or {}
        return SceneCoordinateSamples(dataset, camera, spec, model.output_size(*spec.crop), model.stride,
                                      init_depth=float(options.get("init_depth", 3.0)))
