"""``PoseRegressor``: what every pose network in vizloc_ros promises to the rest of the package.

The estimator, the trainer, the exporter and the checkpoint code only talk to this
interface, so a new architecture is usable everywhere once it subclasses this and is
registered (see :mod:`vizloc_ros.localize.models.registry`), with its training recipe
registered under the same name (:mod:`vizloc_ros.training.recipes`). Models are
inference only: nothing here knows the trainer's configuration.

Output convention: :meth:`forward` returns the *raw* head output, translation in
normalised units ((t - t_mean) / t_std, the statistics being buffers saved with the
weights) followed by the rotation in the model's :attr:`rotation_format`:

* ``"quat"``: 4 numbers, an unnormalised quaternion (w, x, y, z) (PoseNet);
* ``"logq"``: 3 numbers, the log-quaternion of a w >= 0 quaternion (MapNet).

:meth:`decode` turns that into metric translation and a unit quaternion with w >= 0,
the convention of DESIGN.md.
"""
from __future__ import annotations

import torch
from torch import nn

from vizloc_ros.geometry import torch_quat_exp, torch_quat_hemisphere, torch_quat_normalize

ROTATION_DIMS = {"quat": 4, "logq": 3}


def _is_dropout(module: nn.Module) -> bool:
    # _DropoutNd is the common base of Dropout, Dropout1d/2d/3d, AlphaDropout, ...
    return isinstance(module, nn.modules.dropout._DropoutNd)


class PoseRegressor(nn.Module):
    """Base class of the pose regressors: normalisation buffers, decoding, MC dropout.

    Subclasses set :attr:`rotation_format` and :attr:`architecture`, implement
    :meth:`forward` and :meth:`config` (the constructor kwargs that rebuild the model
    through ``build_model(architecture, **config())``).
    """

    #: "quat" or "logq": the parametrisation of the rotation part of :meth:`forward`.
    rotation_format: str = "quat"
    #: registry name; ``build_model`` overwrites it on the instance with the name used.
    architecture: str = ""
    #: the command that makes its weights (``vizloc-train`` with a training recipe, or
    #: ``vizloc-map`` for scene-coordinate maps)
    trained_by: str = "vizloc-train"

    def __init__(self) -> None:
        super().__init__()
        if self.rotation_format not in ROTATION_DIMS:
            raise ValueError(f"rotation_format must be one of {sorted(ROTATION_DIMS)}, "
                             f"got {self.rotation_format!r}")
        # Buffers, not plain attributes: they travel with state_dict() into the
        # checkpoint and with .to(device) onto the GPU.
        self.register_buffer("t_mean", torch.zeros(3))
        self.register_buffer("t_std", torch.ones(3))
        self._mc_dropout_enabled = False

    # ------------------------------------------------------------------ interface
    @property
    def rotation_dim(self) -> int:
        return ROTATION_DIMS[self.rotation_format]

    @property
    def output_dim(self) -> int:
        return 3 + self.rotation_dim

    @property
    def backbone_name(self) -> str:
        return str(self.config().get("backbone", ""))

    def config(self) -> dict:
        """JSON-able constructor kwargs; ``build_model(self.architecture, **config())``
        must rebuild an identical (untrained) network."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ sequences
    # Single-image networks need none of this: the defaults below make every model usable
    # by the clip-based trainer and the online FrameStream (vizloc_ros.localize.models.sequence).

    #: the model also regresses the relative pose between consecutive frames (VLocNet's
    #: odometry head); see :meth:`decode_relative`.
    has_relative_head: bool = False

    @property
    def context_frames(self) -> int:
        """Frames one run-time prediction reads: 1 for single-image networks; VidLoc its
        clip, VLocNet 2 (the previous frame, for its relative head)."""
        return 1

    @property
    def pose_depends_on_history(self) -> bool:
        """The absolute pose of a frame depends on earlier frames (VidLoc's clip), so the
        network is not a single-image function (it cannot be exported as one)."""
        return False

    @property
    def streaming(self) -> bool:
        """Run-time output depends on earlier frames: the estimator keeps a FrameStream."""
        return self.context_frames > 1 or self.has_relative_head

    def encode_frames(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> per-frame state (N, ...), the part computed once per frame.
        Default: the raw output itself."""
        return self.forward(images)

    def decode_window(self, states: torch.Tensor) -> dict:
        """A window of per-frame states (B, T, ...), oldest first -> ``{"pose": (B, D)}``,
        the raw output for the newest frame, plus ``"relative"`` (B, 3 + 3): the raw
        relative pose from the previous frame to the newest (models with a relative head,
        T >= 2)."""
        return {"pose": states[:, -1]}

    def forward_clips(self, clips: torch.Tensor) -> dict:
        """Clips (B, T, 3, H, W) -> ``{"pose": (B, T, D)}`` raw outputs for every frame
        (``"relative"`` (B, T - 1, 3 + 3) too for models with a relative head). Default:
        every frame on its own."""
        b, t = clips.shape[:2]
        return {"pose": self(clips.flatten(0, 1)).unflatten(0, (b, t))}

    def decode_relative(self, raw: torch.Tensor):
        """Raw relative output (..., 6) -> (t (..., 3) metres, q (..., 4) w >= 0): the pose of
        the newer camera in the older camera's frame (a^-1 b)."""
        raise NotImplementedError(f"{type(self).__name__} has no relative-pose head")

    # ------------------------------------------------------------------ pose statistics
    def forward_samples(self, images: torch.Tensor, samples: int) -> torch.Tensor:
        """``samples`` stochastic forward passes as one batch, sample-major:
        (samples * B, D). Models whose dropout is confined to the head override this to
        share the backbone pass."""
        return self.forward(images.repeat(samples, 1, 1, 1))

    def set_pose_stats(self, mean, std) -> None:
        """Store the translation statistics of the training set (metres, map frame).

        Networks regress (t - mean) / std, which keeps the translation and rotation
        losses on comparable scales whatever the size of the scene.
        """
        mean_t = torch.as_tensor(mean, dtype=self.t_mean.dtype).reshape(-1)
        std_t = torch.as_tensor(std, dtype=self.t_std.dtype).reshape(-1)
        if mean_t.numel() != 3 or std_t.numel() != 3:
            raise ValueError(f"pose stats need 3 values each, got mean {tuple(mean_t.shape)} "
                             f"and std {tuple(std_t.shape)}")
        if not (torch.isfinite(mean_t).all() and torch.isfinite(std_t).all()) or (std_t <= 0).any():
            raise ValueError(f"pose stats must be finite with std > 0, got mean {mean_t.tolist()} "
                             f"std {std_t.tolist()}")
        with torch.no_grad():
            self.t_mean.copy_(mean_t.to(self.t_mean.device))
            self.t_std.copy_(std_t.to(self.t_std.device))

    def normalize_translation(self, t_metric: torch.Tensor) -> torch.Tensor:
        """Metric translation -> the normalised units that :meth:`forward` regresses."""
        return (t_metric - self.t_mean) / self.t_std

    def denormalize_translation(self, t_norm: torch.Tensor) -> torch.Tensor:
        return t_norm * self.t_std + self.t_mean

    # ------------------------------------------------------------------ decoding
    def decode(self, raw: torch.Tensor):
        """Raw head output (B, 3 + rotation_dim) -> (t_metric (B, 3), q_wxyz (B, 4)).

        The quaternion is unit and on the w >= 0 hemisphere whatever the network emits.
        """
        if raw.shape[-1] != self.output_dim:
            raise ValueError(f"{type(self).__name__} ({self.rotation_format}) expects raw output "
                             f"with {self.output_dim} values, got shape {tuple(raw.shape)}")
        t = self.denormalize_translation(raw[..., :3])
        rot = raw[..., 3:]
        q = torch_quat_normalize(rot) if self.rotation_format == "quat" else torch_quat_exp(rot)
        return t, torch_quat_hemisphere(q)

    def predict(self, images: torch.Tensor):
        """images (B, 3, H, W), normalised -> (t_metric, q_wxyz). Models that compute their
        pose themselves (:attr:`custom_inference`: DSAC, NetVLAD, ...) answer with it."""
        if self.custom_inference:
            t, q, _ = self.localize(images)
            return t, q
        return self.decode(self(images))

    # ------------------------------------------------------------------ MC dropout
    def dropout_modules(self) -> list[nn.Module]:
        return [m for m in self.modules() if _is_dropout(m)]

    def mc_dropout(self, enabled: bool = True) -> "PoseRegressor":
        """Monte-Carlo dropout: keep dropout sampling at inference (Kendall & Cipolla 2016).

        Only dropout layers change mode; batch norm keeps its eval behaviour and running
        statistics. The setting survives later ``train()`` / ``eval()`` calls until it
        is switched off, so callers need not care about the order of the two calls.
        """
        self._mc_dropout_enabled = bool(enabled)
        for module in self.dropout_modules():
            module.train(self._mc_dropout_enabled or self.training)
        return self

    @property
    def mc_dropout_enabled(self) -> bool:
        return self._mc_dropout_enabled

    def train(self, mode: bool = True) -> "PoseRegressor":
        super().train(mode)
        if getattr(self, "_mc_dropout_enabled", False):
            for module in self.dropout_modules():
                module.train(True)
        return self

    # ------------------------------------------------------------------ plug-in hooks
    # Models that are not (t, q) regressors (scene coordinate regression, retrieval,
    # ground-plane matching) override these; the estimator, vizloc-eval and the checkpoint
    # code call them for every model, so no model has a private code path. How a model is
    # trained (its loss, its samples, what is built from the mapping images) is not the
    # model's business: see vizloc_ros.training.recipes.

    @property
    def custom_inference(self) -> bool:
        """The model computes its pose itself (it overrides :meth:`localize`: RANSAC,
        retrieval, map matching), so :meth:`forward` is not the pose regression: no CUDA
        graph, no MC dropout, no ONNX export."""
        return type(self).localize is not PoseRegressor.localize

    def localize(self, images: torch.Tensor):
        """images (B, 3, H, W), normalised -> (t (B, 3) metres, q (B, 4) w x y z,
        cov (B, 6, 6) in ROS order or None). None: the estimator uses the checkpoint's
        validation covariance."""
        return *self.decode(self(images)), None

    def side_tensors(self) -> dict:
        """``{name: {key: tensor}}`` saved by ``save_checkpoint`` beside the checkpoint as
        ``<stem>.<name>.safetensors`` (e.g. a retrieval database) and handed back to
        :meth:`load_side_tensors` by ``load_checkpoint``."""
        return {}

    def load_side_tensors(self, tensors: dict) -> None:
        if tensors:
            raise ValueError(f"{type(self).__name__} takes no side files, got {sorted(tensors)}")

    def side_group(self, tensors: dict, group: str, keys) -> dict | None:
        """The side file ``group`` of ``tensors`` (None when absent), checked: no other
        side file, and all of ``keys`` present. For :meth:`load_side_tensors` of a model
        with one side file (a retrieval database, a scene memory)."""
        unknown = set(tensors) - {group}
        if unknown:
            raise ValueError(f"{self.architecture} has no side file {sorted(unknown)}")
        if group not in tensors:
            return None
        missing = set(keys) - set(tensors[group])
        if missing:
            raise ValueError(f"{group} lacks {sorted(missing)}")
        return tensors[group]
