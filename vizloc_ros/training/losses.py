"""The loss zoo of camera pose regression, every piece selectable by name.

Distances (per sample, then averaged over the batch):

* translation: ``"l1"`` (L1 norm of the difference, geomapnet) or ``"l2"`` (Euclidean
  distance, PoseNet);
* rotation: ``"quat"`` (distance between unit quaternions, sign-invariant:
  min(|q - q*|, |q + q*|)), ``"logq"`` (distance between log-quaternions of w >= 0
  quaternions, MapNet), ``"geodesic"`` (the angle ||log(R* R^T)|| in radians). The
  vector distances use ``rotation_norm`` (l1 / l2), by default the translation's.

Combinations of the translation loss Lt and rotation loss Lq:

* ``"sum"``: Lt + Lq; ``"max"``: max(Lt, Lq);
* ``"beta"``: Lt + beta * Lq, beta hand-tuned per scene (PoseNet, Kendall et al. 2015);
* ``"learned"``: Lt exp(-s_t) + s_t + Lq exp(-s_q) + s_q with learnable s_t, s_q
  (homoscedastic uncertainty, Kendall & Cipolla 2017; geomapnet starts at 0 and -3);
* ``"reprojection"``: mean pixel distance between scene points projected through the
  predicted and the true camera (Kendall & Cipolla 2017, geometric loss).

:class:`PoseLoss` takes the raw model output (B, 3 + 4) for ``"quat"`` models or
(B, 3 + 3) for ``"logq"`` models, and the ground truth translation (B, 3) and
quaternion (B, 4, w x y z, either sign). Translations are compared in the units given:
the trainer normalises the ground truth with the model's pose statistics like the
network output. :class:`MapNetLoss` adds the same terms on relative poses between
consecutive frames of tuples (B, T, ...), with its own weights. :class:`OdometryLoss`
compares relative poses (metres, frame of the earlier camera) with measured ones: MapNet+'s
visual-odometry term on unlabeled sequences and VLocNet's odometry head, which
:class:`VLocNetLoss` trains jointly with the absolute pose. :func:`build_loss` builds the
absolute, MapNet or VLocNet loss from a config dict; :func:`build_odometry_loss` the
unlabeled term.

All quaternion algebra comes from :mod:`vizloc_ros.geometry`, whose torch functions
keep gradients finite at the identity and at 180 degrees.

Starting weights, and why they matter when training from scratch: the L1 distances' gradient
does not shrink as a term is fitted (it is the sign of the error, times the term's weight),
and with freshly initialised heads the trunk's gradient from each term is proportional to
that weight. geomapnet's ``s_q = -3`` (rotation weighted 20x, tuned on ImageNet features)
then trains the trunk for rotation first; on a car drive whose heading hardly varies (the
KITTI frames of issue #18: the mean heading is 0.5 deg off) rotation reaches its floor in a
hundred steps and its weighted sign noise is 20-140x the translation's gradient in the
trunk (measured), so the translation head decays to the mean pose and never recovers. The
trainer therefore starts the learned weights equal (``s_t = s_q = 0``, vizloc-train's
defaults), and :class:`MapNetLoss` holds its relative weights fixed at a tenth of the
absolute ones' start unless told to learn them.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from vizloc_ros.geometry import (
    torch_pose_relative,
    torch_quat_conjugate,
    torch_quat_exp,
    torch_quat_log,
    torch_quat_multiply,
    torch_quat_normalize,
    torch_quat_to_matrix,
    torch_rotation_angle,
)

TRANSLATION_DISTANCES = ("l1", "l2")
ROTATION_DISTANCES = ("quat", "logq", "geodesic")
COMBINATIONS = ("sum", "max", "beta", "learned", "reprojection")
ROTATION_FORMATS = {"quat": 4, "logq": 3}
RELATIVE_MODES = ("simple", "se3")
#: fixed relative-term weights default to exp(-s - FIXED_RELATIVE_OFFSET): a tenth of the
#: absolute terms' starting weights, a regulariser that cannot outweigh them
FIXED_RELATIVE_OFFSET = math.log(10.0)


def _check_choice(kind: str, value, options) -> str:
    if value not in options:
        raise ValueError(f"unknown {kind} {value!r}; options: {', '.join(options)}")
    return value


def _safe_norm(v: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Euclidean norm whose gradient is 0 (not NaN) at the zero vector, i.e. at GT."""
    sq = (v * v).sum(dim=dim)
    tiny = sq < 1e-24
    return torch.where(tiny, torch.zeros_like(sq), torch.sqrt(torch.where(tiny, torch.ones_like(sq), sq)))


def vector_distance(diff: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """L1 or L2 norm over the last dimension."""
    _check_choice("norm", norm, TRANSLATION_DISTANCES)
    return diff.abs().sum(dim=-1) if norm == "l1" else _safe_norm(diff)


def translation_distance(pred_t: torch.Tensor, true_t: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Per-sample translation distance (...,)."""
    return vector_distance(pred_t - true_t, _check_choice("translation distance", kind, TRANSLATION_DISTANCES))


def rotation_to_quat(rot: torch.Tensor, rotation_format: str) -> torch.Tensor:
    """Network rotation output -> unit quaternion (w, x, y, z)."""
    _check_choice("rotation format", rotation_format, tuple(ROTATION_FORMATS))
    return torch_quat_normalize(rot) if rotation_format == "quat" else torch_quat_exp(rot)


def rotation_distance(pred_rot: torch.Tensor, true_q: torch.Tensor, kind: str = "logq",
                      rotation_format: str = "quat", norm: str = "l2") -> torch.Tensor:
    """Per-sample rotation distance (...,) between a prediction in ``rotation_format``
    and ground-truth quaternions; invariant to the sign of either quaternion."""
    _check_choice("rotation distance", kind, ROTATION_DISTANCES)
    true_q = torch_quat_normalize(true_q)
    if kind == "logq":
        # The hemisphere w >= 0 makes log(q) == log(-q) except at w == 0 (180 degrees),
        # where the log has two values, +-axis * pi / 2: take the nearer pair.
        true_logs = (torch_quat_log(true_q), torch_quat_log(-true_q))
        if rotation_format == "logq":
            pred_logs = (pred_rot,)
        else:
            pred_q = rotation_to_quat(pred_rot, "quat")
            pred_logs = (torch_quat_log(pred_q), torch_quat_log(-pred_q))
        dists = [vector_distance(p - t, norm) for p in pred_logs for t in true_logs]
        return torch.stack(dists, dim=0).amin(dim=0)
    pred_q = rotation_to_quat(pred_rot, rotation_format)
    if kind == "quat":
        return torch.minimum(vector_distance(pred_q - true_q, norm), vector_distance(pred_q + true_q, norm))
    return torch_rotation_angle(pred_q, true_q)


def project_points(t: torch.Tensor, q: torch.Tensor, points: torch.Tensor, K: torch.Tensor,
                   min_depth: float = 0.1):
    """Pixels (B, N, 2) and depths (B, N) of world points seen by cameras (t, q)
    (camera-to-world, optical frame). Depths below ``min_depth`` are clamped for the
    division so points behind a (wrongly) predicted camera give a finite pixel."""
    R = torch_quat_to_matrix(q)                           # (B, 3, 3) camera -> world
    if points.dim() == 2:
        points = points.unsqueeze(0)
    cam = torch.matmul(points - t[:, None, :], R)         # rows: R^T (X - t)
    depth = cam[..., 2]
    z = depth.clamp_min(min_depth).unsqueeze(-1)
    homogeneous = torch.cat([cam[..., :2] / z, torch.ones_like(z)], dim=-1)
    uv = torch.matmul(homogeneous, K.transpose(-1, -2))[..., :2]
    return uv, depth


def reprojection_distance(pred_t, pred_q, true_t, true_q, points, K, min_depth: float = 0.1):
    """Per-sample mean pixel distance over the points in front of the true camera.

    Points behind (or too close to) the true camera are ignored: they are not in the
    image. A sample with no visible point contributes 0.
    """
    uv_pred, _ = project_points(pred_t, pred_q, points, K, min_depth)
    uv_true, depth_true = project_points(true_t, true_q, points, K, min_depth)
    visible = (depth_true > min_depth).to(uv_pred.dtype)
    dist = _safe_norm(uv_pred - uv_true) * visible
    return dist.sum(dim=-1) / visible.sum(dim=-1).clamp_min(1.0)


class PoseLoss(nn.Module):
    """Absolute pose loss: translation + rotation distances, combined by name."""

    def __init__(self, translation: str = "l1", rotation: str = "logq", combine: str = "learned",
                 beta: float = 500.0, s_t: float = 0.0, s_q: float = -3.0,
                 rotation_norm: str | None = None, rotation_format: str | None = None,
                 points=None, K=None, min_depth: float = 0.1):
        super().__init__()
        self.translation = _check_choice("translation distance", translation, TRANSLATION_DISTANCES)
        self.rotation = _check_choice("rotation distance", rotation, ROTATION_DISTANCES)
        self.combine = _check_choice("combination", combine, COMBINATIONS)
        self.rotation_norm = _check_choice("rotation norm", rotation_norm or translation,
                                           TRANSLATION_DISTANCES)
        if rotation_format is not None:
            _check_choice("rotation format", rotation_format, tuple(ROTATION_FORMATS))
        self.rotation_format = rotation_format
        self.beta = float(beta)
        self.min_depth = float(min_depth)
        if combine == "learned":
            self.s_t = nn.Parameter(torch.tensor(float(s_t)))
            self.s_q = nn.Parameter(torch.tensor(float(s_q)))
        else:
            self.s_t = self.s_q = None
        self._init_s = (float(s_t), float(s_q))
        # Scene points / intrinsics fixed for a scene can be given once; buffers follow .to()
        self.register_buffer("points", None if points is None else torch.as_tensor(points, dtype=torch.float32))
        self.register_buffer("K", None if K is None else torch.as_tensor(K, dtype=torch.float32))

    def config(self) -> dict:
        """The build_loss() config that recreates this loss (for the checkpoint's training block)."""
        return {"translation": self.translation, "rotation": self.rotation, "combine": self.combine,
                "beta": self.beta, "s_t": self._init_s[0], "s_q": self._init_s[1],
                "rotation_norm": self.rotation_norm, "rotation_format": self.rotation_format,
                "min_depth": self.min_depth}

    def _split(self, pred: torch.Tensor):
        fmt = self.rotation_format
        if fmt is None:
            fmt = {7: "quat", 6: "logq"}.get(pred.shape[-1])
        if fmt is None or pred.shape[-1] != 3 + ROTATION_FORMATS[fmt]:
            raise ValueError(f"prediction must be (..., 7) for quat or (..., 6) for logq models, "
                             f"got shape {tuple(pred.shape)}")
        return pred[..., :3], pred[..., 3:], fmt

    def combine_terms(self, lt: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        if self.combine in ("sum", "reprojection"):
            return lt + lq
        if self.combine == "max":
            return torch.maximum(lt, lq)
        if self.combine == "beta":
            return lt + self.beta * lq
        return lt * torch.exp(-self.s_t) + self.s_t + lq * torch.exp(-self.s_q) + self.s_q

    def compute(self, pred: torch.Tensor, true_t: torch.Tensor, true_q: torch.Tensor, *,
                points=None, K=None, t_mean=None, t_std=None) -> dict:
        """Loss and its parts: {"loss", "translation", "rotation"[, "reprojection", "s_t", "s_q"]}.

        For ``combine="reprojection"`` translations must be metric; pass ``t_mean`` and
        ``t_std`` if ``pred`` and ``true_t`` are in the model's normalised units.
        """
        pred_t, pred_rot, fmt = self._split(pred)
        lt = translation_distance(pred_t, true_t, self.translation).mean()
        lq = rotation_distance(pred_rot, true_q, self.rotation, fmt, self.rotation_norm).mean()
        out = {"translation": lt, "rotation": lq}
        if self.combine == "reprojection":
            points = self.points if points is None else points
            K = self.K if K is None else K
            if points is None or K is None:
                raise ValueError("combine='reprojection' needs scene points (N, 3) or (B, N, 3) "
                                 "and intrinsics K (3, 3) or (B, 3, 3)")
            if t_mean is not None or t_std is not None:
                mean = torch.as_tensor(0.0 if t_mean is None else t_mean, dtype=pred_t.dtype, device=pred_t.device)
                std = torch.as_tensor(1.0 if t_std is None else t_std, dtype=pred_t.dtype, device=pred_t.device)
                pred_t, true_t = pred_t * std + mean, true_t * std + mean
            points = torch.as_tensor(points, dtype=pred_t.dtype, device=pred_t.device)
            K = torch.as_tensor(K, dtype=pred_t.dtype, device=pred_t.device)
            reproj = reprojection_distance(pred_t, rotation_to_quat(pred_rot, fmt), true_t, true_q,
                                           points, K, self.min_depth).mean()
            out["reprojection"] = reproj
            out["loss"] = reproj
        else:
            out["loss"] = self.combine_terms(lt, lq)
        if self.s_t is not None:
            out["s_t"], out["s_q"] = self.s_t, self.s_q
        return out

    def forward(self, pred, true_t, true_q, **kwargs) -> torch.Tensor:
        return self.compute(pred, true_t, true_q, **kwargs)["loss"]


class MapNetLoss(nn.Module):
    """MapNet loss (Brahmbhatt et al. 2018): absolute terms on every frame of a tuple plus
    the same terms on relative poses between consecutive frames, each with its own weights.

    ``relative_mode="simple"`` (geomapnet's default) compares t_j - t_i and q_i^-1 q_j;
    it stays meaningful with per-axis normalised translations. ``"se3"`` uses the full
    relative pose (a_i^-1 a_j), which needs metric (or isotropically scaled) translations.

    The relative weights are fixed by default (``learn_relative_weights=False``), at
    ``s_t_rel = s_t + log 10`` and ``s_q_rel = s_q + log 10`` unless given: learned ones
    converge to 1 / L_rel, and relative steps are small (a tenth of a standard deviation
    between KITTI frames 10 apart), so a learned relative term soon outweighs the absolute
    one, and its L1 sign noise swamps the trunk. Learned (geomapnet), they start at the
    absolute values.
    """

    def __init__(self, translation: str = "l1", rotation: str = "logq", combine: str = "learned",
                 beta: float = 500.0, s_t: float = 0.0, s_q: float = -3.0,
                 s_t_rel: float | None = None, s_q_rel: float | None = None,
                 rotation_norm: str | None = None, rotation_format: str | None = None,
                 relative_mode: str = "simple", learn_relative_weights: bool = False):
        super().__init__()
        if combine == "reprojection":
            raise ValueError("combine='reprojection' has no relative counterpart; use PoseLoss "
                             "(relative: false) for the reprojection loss")
        offset = 0.0 if learn_relative_weights else FIXED_RELATIVE_OFFSET
        self.relative_mode = _check_choice("relative mode", relative_mode, RELATIVE_MODES)
        common = dict(translation=translation, rotation=rotation, combine=combine, beta=beta,
                      rotation_norm=rotation_norm)
        self.absolute = PoseLoss(s_t=s_t, s_q=s_q, rotation_format=rotation_format, **common)
        self.relative = PoseLoss(s_t=s_t + offset if s_t_rel is None else s_t_rel,
                                 s_q=s_q + offset if s_q_rel is None else s_q_rel,
                                 rotation_format="quat", **common)
        self.learn_relative_weights = bool(learn_relative_weights)
        if not self.learn_relative_weights and self.relative.s_t is not None:
            self.relative.s_t.requires_grad_(False)
            self.relative.s_q.requires_grad_(False)

    def config(self) -> dict:
        cfg = self.absolute.config()
        cfg.pop("min_depth")  # reprojection only
        cfg.update(relative=True, relative_mode=self.relative_mode,
                   s_t_rel=self.relative._init_s[0], s_q_rel=self.relative._init_s[1],
                   learn_relative_weights=self.learn_relative_weights)
        return cfg

    def _relative(self, t: torch.Tensor, q: torch.Tensor):
        t_a, q_a, t_b, q_b = t[:, :-1], q[:, :-1], t[:, 1:], q[:, 1:]
        if self.relative_mode == "se3":
            return torch_pose_relative(t_a, q_a, t_b, q_b)
        return t_b - t_a, torch_quat_normalize(torch_quat_multiply(torch_quat_conjugate(q_a), q_b))

    def compute(self, pred: torch.Tensor, true_t: torch.Tensor, true_q: torch.Tensor) -> dict:
        """pred (B, T, 3 + R), true_t (B, T, 3), true_q (B, T, 4) with T >= 2."""
        if pred.dim() != 3 or pred.shape[1] < 2:
            raise ValueError(f"MapNetLoss needs tuples shaped (B, T >= 2, 3 + R), got {tuple(pred.shape)}")
        B, T, D = pred.shape
        absolute = self.absolute.compute(pred.reshape(B * T, D), true_t.reshape(B * T, 3),
                                         true_q.reshape(B * T, 4))
        _, pred_rot, fmt = self.absolute._split(pred)
        pred_q = rotation_to_quat(pred_rot, fmt)
        rel_pred_t, rel_pred_q = self._relative(pred[..., :3], pred_q)
        rel_true_t, rel_true_q = self._relative(true_t, torch_quat_normalize(true_q))
        relative = self.relative.compute(torch.cat([rel_pred_t, rel_pred_q], -1).reshape(-1, 7),
                                         rel_true_t.reshape(-1, 3), rel_true_q.reshape(-1, 4))
        out = {"loss": absolute["loss"] + relative["loss"]}
        out.update({f"abs_{k}": v for k, v in absolute.items() if k != "loss"})
        out.update({f"rel_{k}": v for k, v in relative.items() if k != "loss"})
        out["abs_loss"], out["rel_loss"] = absolute["loss"], relative["loss"]
        return out

    def forward(self, pred, true_t, true_q) -> torch.Tensor:
        return self.compute(pred, true_t, true_q)["loss"]


class OdometryLoss(nn.Module):
    """Relative poses against measured relative poses (visual odometry, or ground truth
    made relative): the same distances and combination as :class:`PoseLoss`, on
    ``a^-1 b`` in the frame of the earlier camera, in metres.

    Two uses: MapNet+'s term on unlabeled sequences (:meth:`from_absolute`: relative poses
    of a tuple's absolute predictions against the odometry between the same frames,
    Brahmbhatt et al. 2018, eq. 5) and VLocNet's odometry head (:meth:`compute` on the
    head's output). ``learn_weights=False`` holds ``s_t`` / ``s_q`` fixed.
    """

    def __init__(self, translation: str = "l1", rotation: str = "logq", combine: str = "learned",
                 beta: float = 500.0, s_t: float = 0.0, s_q: float = -3.0,
                 rotation_norm: str | None = None, learn_weights: bool = True):
        super().__init__()
        if combine == "reprojection":
            raise ValueError("combine='reprojection' has no relative form")
        self.term = PoseLoss(translation=translation, rotation=rotation, combine=combine, beta=beta,
                             s_t=s_t, s_q=s_q, rotation_norm=rotation_norm)
        self.learn_weights = bool(learn_weights)
        if not self.learn_weights and self.term.s_t is not None:
            self.term.s_t.requires_grad_(False)
            self.term.s_q.requires_grad_(False)

    def config(self) -> dict:
        cfg = self.term.config()
        for key in ("min_depth", "rotation_format"):
            cfg.pop(key)
        cfg["learn_weights"] = self.learn_weights
        return cfg

    def compute(self, pred_rel: torch.Tensor, true_t_rel: torch.Tensor, true_q_rel: torch.Tensor,
                rotation_format: str = "logq") -> dict:
        """pred_rel (..., 3 + R): metric translation + rotation in ``rotation_format``;
        targets (..., 3) metres and (..., 4) quaternions."""
        self.term.rotation_format = rotation_format
        try:
            return self.term.compute(pred_rel.reshape(-1, pred_rel.shape[-1]), true_t_rel.reshape(-1, 3),
                                     true_q_rel.reshape(-1, 4))
        finally:
            self.term.rotation_format = None

    def from_absolute(self, pred: torch.Tensor, t_mean, t_std, true_t_rel: torch.Tensor,
                      true_q_rel: torch.Tensor, rotation_format: str) -> dict:
        """pred (B, T, 3 + R) absolute raw outputs in normalised units (t_mean, t_std: the
        model's statistics) -> the loss of their consecutive relative poses against
        ``true_t_rel`` (B, T-1, 3), ``true_q_rel`` (B, T-1, 4)."""
        if pred.dim() != 3 or pred.shape[1] < 2:
            raise ValueError(f"relative terms need tuples shaped (B, T >= 2, 3 + R), got {tuple(pred.shape)}")
        t = pred[..., :3] * torch.as_tensor(t_std, dtype=pred.dtype, device=pred.device) + \
            torch.as_tensor(t_mean, dtype=pred.dtype, device=pred.device)
        q = rotation_to_quat(pred[..., 3:], rotation_format)
        rel_t, rel_q = torch_pose_relative(t[:, :-1], q[:, :-1], t[:, 1:], q[:, 1:])
        return self.compute(torch.cat([rel_t, rel_q], dim=-1), true_t_rel, true_q_rel, "quat")

    def forward(self, pred_rel, true_t_rel, true_q_rel, rotation_format: str = "logq") -> torch.Tensor:
        return self.compute(pred_rel, true_t_rel, true_q_rel, rotation_format)["loss"]


class VLocNetLoss(nn.Module):
    """VLocNet's joint loss: the absolute pose of every frame of a tuple (with MapNet's
    relative terms between the absolute predictions when ``relative`` is true: VLocNet's
    geometric consistency) plus the odometry head's relative pose against the true
    relative pose between consecutive frames, each part with its own (learned) weights."""

    #: the trainer passes the model's relative head output and the true relative poses
    trains_relative_head = True

    def __init__(self, translation: str = "l1", rotation: str = "logq", combine: str = "learned",
                 beta: float = 500.0, s_t: float = 0.0, s_q: float = -3.0,
                 s_t_odo: float = 0.0, s_q_odo: float = -3.0, rotation_norm: str | None = None,
                 rotation_format: str | None = None, relative: bool = False,
                 relative_mode: str = "simple", s_t_rel: float | None = None,
                 s_q_rel: float | None = None, learn_relative_weights: bool = True):
        super().__init__()
        common = dict(translation=translation, rotation=rotation, combine=combine, beta=beta,
                      rotation_norm=rotation_norm)
        self.consistency = bool(relative)
        if self.consistency:
            self.absolute = MapNetLoss(s_t=s_t, s_q=s_q, rotation_format=rotation_format,
                                       relative_mode=relative_mode, s_t_rel=s_t_rel, s_q_rel=s_q_rel,
                                       learn_relative_weights=learn_relative_weights, **common)
        else:
            self.absolute = PoseLoss(s_t=s_t, s_q=s_q, rotation_format=rotation_format, **common)
        self.odometry = OdometryLoss(s_t=s_t_odo, s_q=s_q_odo, **common)

    def config(self) -> dict:
        cfg = self.absolute.config()
        cfg.pop("min_depth", None)
        cfg.update(odometry=True, relative=self.consistency, s_t_odo=self.odometry.term._init_s[0],
                   s_q_odo=self.odometry.term._init_s[1])
        return cfg

    def compute(self, pred: torch.Tensor, true_t: torch.Tensor, true_q: torch.Tensor, *,
                relative: torch.Tensor, true_t_rel: torch.Tensor, true_q_rel: torch.Tensor,
                relative_format: str = "logq") -> dict:
        """pred (B, T, 3 + R) absolute raw outputs, true_t (B, T, 3) (normalised units),
        true_q (B, T, 4); relative (B, T-1, 6) the odometry head (metres, log-quaternion);
        true_t_rel (B, T-1, 3) metres and true_q_rel (B, T-1, 4)."""
        if self.consistency:
            absolute = self.absolute.compute(pred, true_t, true_q)
        else:
            absolute = self.absolute.compute(pred.reshape(-1, pred.shape[-1]), true_t.reshape(-1, 3),
                                             true_q.reshape(-1, 4))
        odometry = self.odometry.compute(relative, true_t_rel, true_q_rel, relative_format)
        out = {"loss": absolute["loss"] + odometry["loss"], "abs_loss": absolute["loss"],
               "odo_loss": odometry["loss"]}
        out.update({f"odo_{k}": v for k, v in odometry.items() if k != "loss"})
        out.update({k if k.startswith(("abs_", "rel_")) else f"abs_{k}": v
                    for k, v in absolute.items() if k != "loss"})
        return out

    def forward(self, pred, true_t, true_q, **kwargs) -> torch.Tensor:
        return self.compute(pred, true_t, true_q, **kwargs)["loss"]


_LOSS_KEYS = ("translation", "rotation", "combine", "beta", "s_t", "s_q", "rotation_norm",
              "rotation_format", "relative", "relative_mode", "s_t_rel", "s_q_rel", "points", "K",
              "min_depth", "learn_relative_weights", "odometry", "s_t_odo", "s_q_odo")
_ODOMETRY_LOSS_KEYS = ("translation", "rotation", "combine", "beta", "s_t", "s_q", "rotation_norm",
                       "learn_weights")


def build_odometry_loss(config: dict | None = None) -> OdometryLoss:
    """:class:`OdometryLoss` from a config dict (MapNet+'s ``unlabeled.loss``); unknown keys
    raise ``ValueError``."""
    config = dict(config or {})
    unknown = sorted(set(config) - set(_ODOMETRY_LOSS_KEYS))
    if unknown:
        raise ValueError(f"unknown odometry loss option(s) {', '.join(map(repr, unknown))}; "
                         f"options: {', '.join(_ODOMETRY_LOSS_KEYS)}")
    return OdometryLoss(**config)


def build_loss(config: dict | None = None) -> nn.Module:
    """PoseLoss, or MapNetLoss when ``config["relative"]`` is true, or VLocNetLoss when
    ``config["odometry"]`` is true, from a config dict, e.g.
    ``{"translation": "l1", "rotation": "logq", "combine": "learned", "s_t": 0.0,
    "s_q": -3.0, "relative": True}``. Unknown keys or names raise ``ValueError``."""
    config = dict(config or {})
    unknown = sorted(set(config) - set(_LOSS_KEYS))
    if unknown:
        raise ValueError(f"unknown loss option(s) {', '.join(map(repr, unknown))}; "
                         f"options: {', '.join(_LOSS_KEYS)}")
    if config.pop("odometry", False):
        for key in ("points", "K", "min_depth"):
            if key in config:
                raise ValueError(f"loss option {key!r} belongs to the reprojection loss, "
                                 "which has no odometry (VLocNet) form")
        return VLocNetLoss(**config)
    for key in ("s_t_odo", "s_q_odo"):
        if key in config:
            raise ValueError(f"loss option {key!r} needs odometry: true")
    relative = bool(config.pop("relative", False))
    if relative:
        for key in ("points", "K", "min_depth"):
            if key in config:
                raise ValueError(f"loss option {key!r} belongs to the reprojection loss, "
                                 "which has no relative (MapNet) form")
        return MapNetLoss(**config)
    for key in ("relative_mode", "s_t_rel", "s_q_rel"):
        if key in config:
            raise ValueError(f"loss option {key!r} needs relative: true")
    return PoseLoss(**config)
