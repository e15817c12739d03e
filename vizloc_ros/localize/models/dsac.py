"""DSAC / DSAC++: scene coordinate regression + differentiable RANSAC (Brachmann et al.,
CVPR 2017 and CVPR 2018).

A fully convolutional network maps the image to a coarse grid of 3D scene coordinates
(one per 8x8 block: 30x40 for a 240x320 input, 80x60 for 640x480). The camera pose
follows from these 2D-3D correspondences with PnP inside RANSAC:

* **inference** (numpy + OpenCV): hypotheses from random minimal sets of 4
  correspondences (AP3P), each scored by its soft inlier count
  ``sum_i sigmoid(beta (tau - r_i))`` over all reprojection errors ``r_i``; the best one is
  refined by re-solving PnP on its inliers until the set is stable. The covariance comes
  from the inlier geometry: ``sigma^2 (J^T J)^-1`` with ``J`` the Jacobian of the inlier
  reprojections with respect to the pose and ``sigma^2`` their residual variance;
* **training**, in three stages selected by ``loss.stage`` (or ``coords+e2e`` to switch
  after ``loss.e2e_after`` steps, one command):

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

Pose conventions: hypotheses are world-to-camera internally (that is what projection
needs); outputs are camera-to-world like every model here. Registered as ``dsac``.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vizloc_ros import geometry
from vizloc_ros.geometry import torch_matrix_to_quat, torch_rotation_angle, torch_so3_exp
from vizloc_ros.localize.models.backbones import build_backbone
from vizloc_ros.localize.models.base import PoseRegressor, own_loss_options
from vizloc_ros.localize.models.registry import register_model

LOG = logging.getLogger(__name__)

STAGES = ("coords", "reprojection", "e2e", "coords+e2e")
#: pessimistic covariance (ROS order) of a frame with too few inliers to say anything
FAILED_SIGMA_T = 10.0
FAILED_SIGMA_R = math.radians(90.0)
MIN_INLIERS = 6


def _cv2():
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise RuntimeError("DSAC needs OpenCV: pip install opencv-python-headless") from exc
    return cv2


# --------------------------------------------------------------------------- network

def _small_trunk() -> tuple[nn.Module, int]:
    """A light stride-8 trunk (tests, CPU experiments)."""
    layers, channels = [], 3
    for out, stride in ((32, 2), (64, 2), (128, 2), (128, 1)):
        layers += [nn.Conv2d(channels, out, 3, stride, 1, bias=False), nn.BatchNorm2d(out),
                   nn.ReLU(inplace=True)]
        channels = out
    return nn.Sequential(*layers), channels


def _resnet_trunk(name: str, pretrained) -> tuple[nn.Module, int]:
    """ResNet stem + layer1..layer3 with layer3's stride removed: stride 8, 256 channels."""
    if name not in ("resnet18", "resnet34"):
        raise ValueError(f"dsac backbones: small, resnet18, resnet34; got {name!r}")
    net, _ = build_backbone(name, pretrained)
    block = net.layer3[0]
    block.conv1.stride = (1, 1)
    block.downsample[0].stride = (1, 1)
    return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2,
                         net.layer3), 256


class SceneCoordinateNet(PoseRegressor):
    """FCN regressing scene coordinates; :meth:`localize` runs PnP-RANSAC on them.

    Args:
        backbone: ``resnet18`` / ``resnet34`` (stem to layer3 at stride 8) or ``small``.
        hypotheses: RANSAC hypotheses per image at inference.
        inlier_threshold: reprojection error (network-input pixels) of an inlier, tau.
        inlier_beta: sharpness of the soft inlier sigmoid (default 5 / tau).
        alpha: softmax scale on the inlier fraction for the hypothesis distribution.
        refine_iterations: inlier re-solving rounds of the best hypothesis.
        input_camera: [fx, fy, cx, cy] of the network input (set by training from the
            dataset intrinsics and the input crop; needed to localize).
        camera: intrinsics of the training images (informational, JSON).
        cov_scale: factor on the inlier covariance (calibration).
        feat_dim: channels of the regression head.
        seed: RANSAC sampling seed (inference is deterministic per image).
    """

    rotation_format = "quat"
    architecture = "dsac"
    custom_inference = True
    stride = 8

    def __init__(self, backbone: str = "resnet18", hypotheses: int = 256, inlier_threshold: float = 5.0,
                 inlier_beta: float | None = None, alpha: float = 100.0, refine_iterations: int = 8,
                 input_camera=None, camera=None, cov_scale: float = 1.0, feat_dim: int = 256,
                 seed: int = 0, pretrained: str | None = None):
        super().__init__()
        if int(hypotheses) < 1 or not float(inlier_threshold) > 0:
            raise ValueError("hypotheses must be >= 1 and inlier_threshold > 0")
        self._backbone_name = str(backbone)
        self.hypotheses = int(hypotheses)
        self.inlier_threshold = float(inlier_threshold)
        self.inlier_beta = float(inlier_beta) if inlier_beta is not None else 5.0 / self.inlier_threshold
        self.alpha = float(alpha)
        self.refine_iterations = int(refine_iterations)
        self.input_camera = None if input_camera is None else [float(v) for v in input_camera]
        if self.input_camera is not None and len(self.input_camera) != 4:
            raise ValueError(f"input_camera is [fx, fy, cx, cy], got {input_camera!r}")
        self.camera = None if camera is None else dict(camera)
        self.cov_scale = float(cov_scale)
        self.feat_dim = int(feat_dim)
        self.seed = int(seed)
        self.pretrained = pretrained
        if self._backbone_name == "small":
            self.trunk, channels = _small_trunk()
        else:
            self.trunk, channels = _resnet_trunk(self._backbone_name, pretrained)
        c = self.feat_dim
        self.head = nn.Sequential(nn.Conv2d(channels, c, 3, 1, 1), nn.ReLU(inplace=True),
                                  nn.Conv2d(c, c, 1), nn.ReLU(inplace=True),
                                  nn.Conv2d(c, c, 1), nn.ReLU(inplace=True), nn.Conv2d(c, 3, 1))
        nn.init.zeros_(self.head[-1].bias)
        nn.init.normal_(self.head[-1].weight, std=1e-3)

    def config(self) -> dict:
        return {"backbone": self._backbone_name, "hypotheses": self.hypotheses,
                "inlier_threshold": self.inlier_threshold, "inlier_beta": self.inlier_beta,
                "alpha": self.alpha, "refine_iterations": self.refine_iterations,
                "input_camera": self.input_camera, "camera": self.camera, "cov_scale": self.cov_scale,
                "feat_dim": self.feat_dim, "seed": self.seed}

    # ------------------------------------------------------------------ network
    def coordinate_scale(self) -> torch.Tensor:
        """One metric scale for all axes (the largest spread of the training cameras)."""
        return self.t_std.max().clamp_min(0.1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> scene coordinates (B, 3, ceil(H/8), ceil(W/8)), metres in map."""
        raw = self.head(self.trunk(images))
        return raw * self.coordinate_scale().to(raw.dtype) + self.t_mean.to(raw.dtype).view(1, 3, 1, 1)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return (math.ceil(height / self.stride), math.ceil(width / self.stride))

    def pixel_grid(self, out_h: int, out_w: int, device=None, dtype=torch.float64) -> torch.Tensor:
        """(out_h * out_w, 2) network-input pixels of the cells, row-major like the output."""
        from vizloc_ros.training.scene_geometry import cell_centres

        return torch.as_tensor(cell_centres(out_h, out_w, self.stride).reshape(-1, 2), dtype=dtype,
                               device=device)

    def intrinsics(self) -> np.ndarray:
        if self.input_camera is None:
            raise RuntimeError("this DSAC model has no input_camera (intrinsics of the network input): "
                               "train it with vizloc-train or pass input_camera=[fx, fy, cx, cy]")
        from vizloc_ros.training.scene_geometry import intrinsic_matrix

        return intrinsic_matrix(*self.input_camera)

    # ------------------------------------------------------------------ inference
    def decode(self, raw):
        raise TypeError("dsac outputs scene coordinates, not a pose: use localize()")

    @torch.no_grad()
    def localize(self, images: torch.Tensor):
        coords = self.forward(images).float()
        b, _, h, w = coords.shape
        K = self.intrinsics()
        pixels = self.pixel_grid(h, w).numpy()
        ts, qs, covs = [], [], []
        for i in range(b):
            X = coords[i].reshape(3, -1).T.double().cpu().numpy()
            result = pnp_ransac(X, pixels, K, self.hypotheses, self.inlier_threshold, self.inlier_beta,
                                np.random.default_rng(self.seed), self.refine_iterations)
            if result is None or result[2].sum() < MIN_INLIERS:
                # no pose is supported by the coordinates: say "somewhere in the scene"
                ts.append(np.asarray(self.t_mean.double().cpu()))
                qs.append(np.array([1.0, 0.0, 0.0, 0.0]))
                covs.append(np.diag([FAILED_SIGMA_T ** 2] * 3 + [FAILED_SIGMA_R ** 2] * 3))
                continue
            R_wc, t_wc, inliers, residuals = result
            R_cw = R_wc.T
            ts.append(-R_cw @ t_wc)
            qs.append(geometry.quat_hemisphere(geometry.matrix_to_quat(R_cw)))
            covs.append(self.cov_scale * pose_covariance(X, K, R_wc, t_wc, inliers, residuals))
        device = images.device
        return (torch.as_tensor(np.stack(ts), dtype=torch.float32, device=device),
                torch.as_tensor(np.stack(qs), dtype=torch.float32, device=device),
                torch.as_tensor(np.stack(covs), dtype=torch.float64))

    # ------------------------------------------------------------------ training hooks
    def training_loss(self, config: dict):
        return SceneCoordinateLoss(self, **loss_options(config.get("loss") or {}))

    def training_dataset(self, dataset, config: dict, spec):
        from vizloc_ros.training.scene_geometry import dataset_camera, input_camera

        if config["augment"].get("random_crop"):
            raise ValueError("dsac needs augment.random_crop: false (its targets are aligned "
                             "with the network input pixel for pixel)")
        camera = dataset_camera(dataset, self.camera)
        self.camera = camera
        self.input_camera = input_camera(camera, spec)
        options = config.get("loss") or {}
        return SceneCoordinateSamples(dataset, camera, spec, self.output_size(*spec.crop), self.stride,
                                      init_depth=float(options.get("init_depth", 3.0)))


# --------------------------------------------------------------------------- inference geometry

def project_numpy(R_wc: np.ndarray, t_wc: np.ndarray, X: np.ndarray, K: np.ndarray):
    """Pixels and depths of world points X (N, 3) under world-to-camera (R, t) of shape
    (M, 3, 3), (M, 3) -> (M, N, 2), (M, N)."""
    Xc = np.einsum("mij,nj->mni", R_wc, X) + t_wc[:, None, :]
    z = Xc[..., 2]
    zs = np.where(z > 1e-6, z, 1e-6)
    uv = np.stack([K[0, 0] * Xc[..., 0] / zs + K[0, 2], K[1, 1] * Xc[..., 1] / zs + K[1, 2]], -1)
    return uv, z


def _residuals(R_wc, t_wc, X, p, K, min_depth: float = 0.1) -> np.ndarray:
    uv, z = project_numpy(R_wc, t_wc, X, K)
    r = np.linalg.norm(uv - p[None], axis=-1)
    return np.where(z > min_depth, r, 1e6)


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def pnp_ransac(X: np.ndarray, p: np.ndarray, K: np.ndarray, hypotheses: int, threshold: float,
               beta: float, rng: np.random.Generator, refine_iterations: int = 8):
    """PnP-RANSAC with soft inlier scoring. X (N, 3) world points, p (N, 2) pixels.

    Returns (R_wc, t_wc, inlier mask, residuals of the final pose) or None if no
    hypothesis could be made (fewer than 4 finite correspondences, all solves failed).
    """
    cv2 = _cv2()
    finite = np.all(np.isfinite(X), axis=1)
    X, p = X[finite], p[finite]
    n = len(X)
    if n < 4:
        return None
    sets = np.argsort(rng.random((hypotheses, n)), axis=1)[:, :4]
    Rs, ts = [], []
    for idx in sets:
        try:
            ok, rvec, tvec = cv2.solvePnP(X[idx], p[idx], K, None, flags=cv2.SOLVEPNP_AP3P)
        except cv2.error:
            continue
        if ok and np.all(np.isfinite(rvec)) and np.all(np.isfinite(tvec)):
            Rs.append(cv2.Rodrigues(rvec)[0])
            ts.append(tvec.reshape(3))
    if not Rs:
        return None
    Rs, ts = np.stack(Rs), np.stack(ts)
    r = _residuals(Rs, ts, X, p, K)
    scores = _sigmoid(beta * (threshold - r)).sum(axis=1)
    best = int(np.argmax(scores))
    R, t, r_best = Rs[best], ts[best], r[best]
    inliers = r_best < threshold
    for _ in range(refine_iterations):
        if inliers.sum() < MIN_INLIERS:
            break
        rvec = cv2.Rodrigues(R)[0]
        try:
            ok, rvec, tvec = cv2.solvePnP(X[inliers], p[inliers], K, None, rvec, t.reshape(3, 1).copy(),
                                          useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE)
        except cv2.error:
            break
        if not ok or not np.all(np.isfinite(tvec)):
            break
        R, t = cv2.Rodrigues(rvec)[0], tvec.reshape(3)
        r_best = _residuals(R[None], t[None], X, p, K)[0]
        new_inliers = r_best < threshold
        if np.array_equal(new_inliers, inliers):
            break
        inliers = new_inliers
    full_inliers = np.zeros(len(finite), dtype=bool)
    full_inliers[np.flatnonzero(finite)[inliers]] = True
    full_r = np.full(len(finite), np.inf)
    full_r[finite] = r_best
    return R, t, full_inliers, full_r


def pose_covariance(X: np.ndarray, K: np.ndarray, R_wc: np.ndarray, t_wc: np.ndarray,
                    inliers: np.ndarray, residuals: np.ndarray, min_sigma_px: float = 0.5) -> np.ndarray:
    """6x6 ROS-order covariance of the camera-to-world pose from its inlier reprojections.

    Perturbation as the estimator documents: position in ``map`` and a rotation vector
    on the left (R_true = exp(delta) R). Linearised least squares: sigma^2 (J^T J)^-1 with
    sigma^2 the inliers' residual variance (at least ``min_sigma_px`` squared).
    """
    n = int(inliers.sum())
    if n < MIN_INLIERS:
        return np.diag([FAILED_SIGMA_T ** 2] * 3 + [FAILED_SIGMA_R ** 2] * 3)
    Xi = X[inliers]
    c = -R_wc.T @ t_wc
    d = Xi - c
    Xc = d @ R_wc.T
    z = np.maximum(Xc[:, 2], 1e-6)
    fx, fy = K[0, 0], K[1, 1]
    dpi = np.zeros((n, 2, 3))
    dpi[:, 0, 0] = fx / z
    dpi[:, 0, 2] = -fx * Xc[:, 0] / z ** 2
    dpi[:, 1, 1] = fy / z
    dpi[:, 1, 2] = -fy * Xc[:, 1] / z ** 2
    d_trans = np.broadcast_to(-R_wc, (n, 3, 3))
    d_rot = R_wc[None] @ geometry.hat(d)
    J = dpi @ np.concatenate([d_trans, d_rot], axis=2)  # (n, 2, 6)
    J = J.reshape(-1, 6)
    dof = max(2 * n - 6, 1)
    sigma2 = max(float(np.sum(residuals[inliers] ** 2)) / dof, min_sigma_px ** 2)
    H = J.T @ J
    try:
        cov = sigma2 * np.linalg.inv(H)
    except np.linalg.LinAlgError:
        return np.diag([FAILED_SIGMA_T ** 2] * 3 + [FAILED_SIGMA_R ** 2] * 3)
    return 0.5 * (cov + cov.T)


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


def _hat(v: torch.Tensor) -> torch.Tensor:
    z = torch.zeros_like(v[..., 0])
    x, y, w = v.unbind(-1)
    return torch.stack([torch.stack([z, -w, y], -1), torch.stack([w, z, -x], -1),
                        torch.stack([-y, x, z], -1)], -2)


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
    J = torch.cat([dpi, -dpi @ _hat(Xc)], dim=-1)  # (M, N, 2, 6)
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
    cv2 = _cv2()
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


# --------------------------------------------------------------------------- training

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
        from vizloc_ros.training.scene_geometry import depth_path

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
        from vizloc_ros.training.scene_geometry import depth_path, grid_scene_coordinates, load_depth

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


register_model("dsac")(SceneCoordinateNet)
