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
* **training** (coordinate, reprojection and end-to-end differentiable-RANSAC stages)
  is the ``dsac`` recipe, :mod:`vizloc_ros.training.recipes.dsac`.

Pose conventions: hypotheses are world-to-camera internally (that is what projection
needs); outputs are camera-to-world like every model here. Registered as ``dsac``.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import nn

from vizloc_ros import geometry
from vizloc_ros.localize.camera import cell_centres, intrinsic_matrix
from vizloc_ros.localize.models.backbones import build_backbone
from vizloc_ros.localize.models.base import PoseRegressor
from vizloc_ros.localize.models.registry import register_model
from vizloc_ros.localize.pnp import pose_covariance

LOG = logging.getLogger(__name__)

#: pessimistic covariance (ROS order) of a frame with too few inliers to say anything
FAILED_SIGMA_T = 10.0
FAILED_SIGMA_R = math.radians(90.0)
MIN_INLIERS = 6


def _cv2():
    try:
        import cv2  # on first use: the nodes of a pose-regressor robot need not load OpenCV
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
        return torch.as_tensor(cell_centres(out_h, out_w, self.stride).reshape(-1, 2), dtype=dtype,
                               device=device)

    def intrinsics(self) -> np.ndarray:
        if self.input_camera is None:
            raise RuntimeError("this DSAC model has no input_camera (intrinsics of the network input): "
                               "train it with vizloc-train or pass input_camera=[fx, fy, cx, cy]")
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


register_model("dsac")(SceneCoordinateNet)
