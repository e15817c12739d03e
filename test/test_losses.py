"""losses.py: zero at ground truth, finite gradients (identity, 180 deg), sign invariance,
learned weights, MapNet relative terms, reprojection, config errors."""
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vizloc_ros.geometry import torch_pose_compose, torch_quat_log, torch_quat_multiply, torch_quat_normalize
from vizloc_ros.training.losses import (
    COMBINATIONS,
    ROTATION_DISTANCES,
    TRANSLATION_DISTANCES,
    MapNetLoss,
    PoseLoss,
    build_loss,
    reprojection_distance,
    rotation_distance,
)

IDENTITY = [1.0, 0.0, 0.0, 0.0]
HALF_TURN = [0.0, 0.6, 0.0, 0.8]          # 180 degrees about (0.6, 0, 0.8)
NEAR_HALF_TURN = [1e-4, 0.0, 1.0, 0.0]
PLAIN = [0.8, 0.2, -0.4, 0.4]
SPECIAL_QUATS = {"identity": IDENTITY, "180deg": HALF_TURN, "near180": NEAR_HALF_TURN, "plain": PLAIN}
NON_REPROJECTION = [c for c in COMBINATIONS if c != "reprojection"]
ALL_CONFIGS = list(itertools.product(TRANSLATION_DISTANCES, ROTATION_DISTANCES, NON_REPROJECTION,
                                     ("quat", "logq")))


def gt_batch(q, t=(0.5, -1.0, 2.0), batch=2):
    q = torch_quat_normalize(torch.tensor([q] * batch, dtype=torch.float32))
    return torch.tensor([t] * batch, dtype=torch.float32), q


def pred_from(t, q, rotation_format):
    rot = q if rotation_format == "quat" else torch_quat_log(q)
    return torch.cat([t, rot], -1)


def loss_at(cfg, pred, t, q, **kw):
    translation, rotation, combine, _fmt = cfg
    return PoseLoss(translation=translation, rotation=rotation, combine=combine, beta=10.0)(pred, t, q, **kw)


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=lambda c: "-".join(c))
@pytest.mark.parametrize("qname", list(SPECIAL_QUATS))
def test_zero_or_minimal_at_ground_truth_with_finite_gradients(cfg, qname):
    t, q = gt_batch(SPECIAL_QUATS[qname])
    fmt = cfg[3]
    loss_fn = PoseLoss(translation=cfg[0], rotation=cfg[1], combine=cfg[2], beta=10.0)
    for offset in (0.0, 1e-4):  # at and near the ground truth
        pred = pred_from(t, q, fmt) + offset * torch.tensor([[1.0, -1, 0.5, 0.3, -0.2, 0.7, 0.1][:3 + (4 if fmt == "quat" else 3)]])
        pred.requires_grad_(True)
        loss = loss_fn(pred, t, q)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(pred.grad).all(), (qname, offset)
        if offset == 0.0:
            floor = (loss_fn.s_t + loss_fn.s_q).item() if cfg[2] == "learned" else 0.0
            assert loss.item() == pytest.approx(floor, abs=2e-5)
    # minimal: moving away from the ground truth increases the loss
    worse = pred_from(t + 0.3, q, fmt)
    at_gt = loss_fn(pred_from(t, q, fmt), t, q)
    assert loss_fn(worse, t, q).item() > at_gt.item()


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=lambda c: "-".join(c))
@pytest.mark.parametrize("qname", ["plain", "180deg"])
def test_rotation_losses_are_sign_invariant(cfg, qname):
    torch.manual_seed(0)
    t, q = gt_batch(SPECIAL_QUATS[qname])
    pred = torch.cat([t + 0.1 * torch.randn(2, 3), torch.randn(2, 4 if cfg[3] == "quat" else 3)], -1)
    base = loss_at(cfg, pred, t, q)
    assert loss_at(cfg, pred, t, -q).item() == pytest.approx(base.item(), rel=1e-5, abs=1e-6)
    if cfg[3] == "quat":  # the predicted quaternion's sign does not matter either
        flipped = torch.cat([pred[:, :3], -pred[:, 3:]], -1)
        assert loss_at(cfg, flipped, t, q).item() == pytest.approx(base.item(), rel=1e-5, abs=1e-6)


quat_strategy = st.tuples(*(st.floats(-1, 1, allow_nan=False),) * 4).filter(
    lambda v: math.sqrt(sum(x * x for x in v)) > 0.2)


@settings(max_examples=50, deadline=None)
@given(quat_strategy, quat_strategy, st.sampled_from(ROTATION_DISTANCES))
def test_rotation_distance_properties(q_pred, q_true, kind):
    qp = torch_quat_normalize(torch.tensor([q_pred], dtype=torch.float64))
    qt = torch_quat_normalize(torch.tensor([q_true], dtype=torch.float64))
    d = rotation_distance(qp, qt, kind, "quat").item()
    assert d >= 0.0
    assert rotation_distance(-qp, qt, kind, "quat").item() == pytest.approx(d, abs=1e-9)
    assert rotation_distance(qp, -qt, kind, "quat").item() == pytest.approx(d, abs=1e-9)
    assert rotation_distance(qt, qt, kind, "quat").item() == pytest.approx(0.0, abs=1e-7)
    # a logq prediction of the same rotation gives the same distance (away from w == 0,
    # where the log-quaternion has two values and a logq prediction is one of them)
    if abs(qp[0, 0].item()) > 1e-6:
        assert rotation_distance(torch_quat_log(qp), qt, kind, "logq").item() == pytest.approx(d, abs=1e-7)


def test_geodesic_is_the_rotation_angle():
    t, q = gt_batch(IDENTITY)
    angle = 0.3
    q_rot = torch.tensor([[math.cos(angle / 2), 0.0, 0.0, math.sin(angle / 2)]] * 2)
    assert rotation_distance(q_rot, q, "geodesic").mean().item() == pytest.approx(angle, abs=1e-6)
    assert rotation_distance(torch.tensor([HALF_TURN] * 2), q, "geodesic").mean().item() \
        == pytest.approx(math.pi, abs=1e-5)


def test_translation_distances():
    t = torch.zeros(1, 3)
    pred = torch.cat([torch.tensor([[3.0, -4.0, 0.0]]), torch.tensor([IDENTITY])], -1)
    q = torch.tensor([IDENTITY])
    assert PoseLoss("l1", "quat", "sum")(pred, t, q).item() == pytest.approx(7.0)
    assert PoseLoss("l2", "quat", "sum")(pred, t, q).item() == pytest.approx(5.0)


def test_combinations():
    torch.manual_seed(1)
    t, q = gt_batch(PLAIN)
    pred = pred_from(t + 0.2, torch_quat_multiply(q, torch.tensor([[0.9, 0.3, 0.0, 0.3]] * 2)), "quat")
    parts = PoseLoss("l2", "geodesic", "sum").compute(pred, t, q)
    lt, lq = parts["translation"].item(), parts["rotation"].item()
    assert parts["loss"].item() == pytest.approx(lt + lq, rel=1e-6)
    assert PoseLoss("l2", "geodesic", "max")(pred, t, q).item() == pytest.approx(max(lt, lq), rel=1e-6)
    assert PoseLoss("l2", "geodesic", "beta", beta=500)(pred, t, q).item() == pytest.approx(lt + 500 * lq, rel=1e-6)
    learned = PoseLoss("l2", "geodesic", "learned", s_t=0.0, s_q=-3.0)
    expected = lt + lq * math.exp(3.0) - 3.0
    assert learned(pred, t, q).item() == pytest.approx(expected, rel=1e-5)


def test_learned_weights_receive_gradients():
    t, q = gt_batch(PLAIN)
    pred = pred_from(t + 0.2, torch.tensor([IDENTITY] * 2), "logq").requires_grad_(True)
    loss_fn = build_loss({"translation": "l1", "rotation": "logq", "combine": "learned"})
    assert loss_fn.s_t.item() == 0.0 and loss_fn.s_q.item() == -3.0
    loss_fn(pred, t, q).backward()
    for param in (loss_fn.s_t, loss_fn.s_q):
        assert param.grad is not None and torch.isfinite(param.grad) and param.grad.abs() > 0
    assert {name for name, _ in loss_fn.named_parameters()} == {"s_t", "s_q"}
    assert list(PoseLoss(combine="beta").parameters()) == []


# ------------------------------------------------------------------ MapNet

def tuples(batch=2, steps=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(batch, steps, 3, generator=gen)
    q = torch_quat_normalize(torch.randn(batch, steps, 4, generator=gen))
    return t, q


@pytest.mark.parametrize("fmt", ["quat", "logq"])
@pytest.mark.parametrize("mode", ["simple", "se3"])
def test_mapnet_loss_zero_at_gt_and_relative_term(fmt, mode):
    t, q = tuples()
    loss_fn = MapNetLoss(translation="l1", rotation="logq", combine="sum", relative_mode=mode)
    pred = pred_from(t, q, fmt).requires_grad_(True)
    out = loss_fn.compute(pred, t, q)
    assert out["loss"].item() == pytest.approx(0.0, abs=1e-5)
    out["loss"].backward()
    assert torch.isfinite(pred.grad).all()
    # a constant translation offset moves every absolute pose but no relative one
    shifted = pred_from(t + torch.tensor([1.0, -2.0, 0.5]), q, fmt)
    out = loss_fn.compute(shifted, t, q)
    assert out["abs_translation"].item() > 1.0
    if mode == "simple":
        assert out["rel_loss"].item() == pytest.approx(0.0, abs=1e-5)
    # jitter of one frame shows up in the relative term
    jitter = t.clone()
    jitter[:, 1] += 0.3
    assert loss_fn.compute(pred_from(jitter, q, fmt), t, q)["rel_loss"].item() > 0.1


def test_mapnet_se3_relative_term_ignores_a_global_rigid_motion():
    t, q = tuples(seed=3)
    g_t = torch.tensor([2.0, -1.0, 0.3]).expand_as(t)
    g_q = torch_quat_normalize(torch.tensor([0.7, 0.1, 0.7, -0.1])).expand_as(q)
    moved_t, moved_q = torch_pose_compose(g_t, g_q, t, q)
    out = MapNetLoss(combine="sum", relative_mode="se3").compute(pred_from(moved_t, moved_q, "quat"), t, q)
    assert out["abs_loss"].item() > 0.5
    assert out["rel_loss"].item() == pytest.approx(0.0, abs=1e-5)


def test_mapnet_learned_weights_are_separate_and_get_gradients():
    t, q = tuples()
    loss_fn = build_loss({"combine": "learned", "relative": True, "s_t_rel": 0.5, "s_q_rel": -2.0,
                          "learn_relative_weights": True})
    assert isinstance(loss_fn, MapNetLoss)
    names = dict(loss_fn.named_parameters())
    assert set(names) == {"absolute.s_t", "absolute.s_q", "relative.s_t", "relative.s_q"}
    assert names["relative.s_t"].item() == 0.5 and names["relative.s_q"].item() == -2.0
    pred = pred_from(t + 0.1 * torch.randn(t.shape), q, "logq").requires_grad_(True)
    loss_fn(pred, t, q).backward()
    for name, param in names.items():
        assert param.grad is not None and torch.isfinite(param.grad), name
    assert torch.isfinite(pred.grad).all()


def test_mapnet_needs_tuples():
    t, q = gt_batch(PLAIN)
    with pytest.raises(ValueError, match="tuples"):
        MapNetLoss()(pred_from(t, q, "quat"), t, q)


# ------------------------------------------------------------------ reprojection

K = torch.tensor([[100.0, 0.0, 32.0], [0.0, 100.0, 24.0], [0.0, 0.0, 1.0]])


def scene_points(n=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=gen) + torch.tensor([0.0, 0.0, 5.0])  # in front of an identity camera


def test_reprojection_zero_at_gt_positive_off_it():
    t, q = torch.zeros(2, 3), torch.tensor([IDENTITY] * 2)
    loss_fn = PoseLoss(combine="reprojection", points=scene_points(), K=K)
    pred = pred_from(t, q, "quat").requires_grad_(True)
    loss = loss_fn(pred, t, q)
    assert loss.item() == pytest.approx(0.0, abs=1e-4)
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    off = pred_from(t + torch.tensor([0.1, 0.0, 0.0]), q, "quat")
    assert loss_fn(off, t, q).item() > 1.0  # pixels
    # logq predictions, per-sample points and intrinsics given at call time
    points = scene_points().expand(2, -1, -1)
    loss_logq = PoseLoss(combine="reprojection")(pred_from(t, q, "logq"), t, q, points=points, K=K.expand(2, 3, 3))
    assert loss_logq.item() == pytest.approx(0.0, abs=1e-4)


def test_reprojection_uses_metric_units_when_given_stats():
    t, q = torch.zeros(2, 3), torch.tensor([IDENTITY] * 2)
    loss_fn = PoseLoss(combine="reprojection", points=scene_points(), K=K)
    off = pred_from(t + torch.tensor([0.1, 0.0, 0.0]), q, "quat")
    plain = loss_fn(off, t, q).item()
    scaled = loss_fn(off, t, q, t_mean=torch.zeros(3), t_std=torch.full((3,), 2.0)).item()
    assert scaled > 1.5 * plain


def test_reprojection_robust_to_points_behind_the_camera():
    t, q = torch.zeros(2, 3), torch.tensor([IDENTITY] * 2)
    points = torch.cat([scene_points(), -scene_points(seed=1)])  # half behind the true camera
    # predicted camera turned around: every visible point is behind it
    pred = pred_from(t, torch.tensor([HALF_TURN] * 2), "quat").requires_grad_(True)
    loss = PoseLoss(combine="reprojection", points=points, K=K)(pred, t, q)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    # points behind the true camera are not in the image and do not count
    only_behind = reprojection_distance(t, q, t, q, -scene_points(seed=1), K)
    assert torch.equal(only_behind, torch.zeros(2))


def test_reprojection_needs_points():
    t, q = gt_batch(IDENTITY)
    with pytest.raises(ValueError, match="points"):
        PoseLoss(combine="reprojection")(pred_from(t, q, "quat"), t, q)


# ------------------------------------------------------------------ configuration

@pytest.mark.parametrize("key,bad", [("translation", "l3"), ("rotation", "euler"), ("combine", "avg"),
                                     ("relative_mode", "weird")])
def test_unknown_names_list_the_options(key, bad):
    cfg = {key: bad}
    if key == "relative_mode":
        cfg["relative"] = True
    with pytest.raises(ValueError, match=bad) as err:
        build_loss(cfg)
    assert "options" in str(err.value)


def test_unknown_keys_and_misplaced_options():
    with pytest.raises(ValueError, match="betta"):
        build_loss({"betta": 3})
    with pytest.raises(ValueError, match="relative"):
        build_loss({"relative_mode": "se3"})
    with pytest.raises(ValueError, match="reprojection"):
        build_loss({"combine": "reprojection", "relative": True})


def test_build_loss_example_config_and_round_trip():
    cfg = {"translation": "l1", "rotation": "logq", "combine": "learned", "beta": 500,
           "s_t": 0.0, "s_q": -3.0, "relative": True}
    loss_fn = build_loss(cfg)
    assert isinstance(loss_fn, MapNetLoss)
    assert isinstance(build_loss(loss_fn.config()), MapNetLoss)
    plain = build_loss({"translation": "l2", "rotation": "quat", "combine": "beta", "beta": 250})
    assert isinstance(plain, PoseLoss) and plain.beta == 250.0
    assert build_loss(plain.config()).config() == plain.config()


def test_rejects_wrong_prediction_width():
    t, q = gt_batch(PLAIN)
    with pytest.raises(ValueError, match="7"):
        PoseLoss()(torch.zeros(2, 5), t, q)
    with pytest.raises(ValueError):
        PoseLoss(rotation_format="logq")(torch.zeros(2, 7), t, q)


def test_default_mapnet_training_loss_does_not_swamp_the_absolute_translation():
    """Issue #18: MapNet from scratch on KITTI frames never learned translation (it stayed at
    the mean pose, even on its training frames) because the rotation terms' weighted L1
    gradients, which do not shrink as rotation is fitted, drowned the translation's in the
    shared trunk (rotation weighted 20x by s_q = -3, plus a relative rotation term at 2.7x).
    With vizloc-train's default loss, the gradient on the absolute translation outputs must
    be at least as large as the rotation's, and the relative terms (fixed, a tenth of the
    absolute ones) may not outweigh the absolute ones, on a long drive whose steps are a
    tenth of a standard deviation and whose heading hardly changes."""
    from vizloc_ros.training.train import DEFAULTS

    torch.manual_seed(0)
    loss_fn = build_loss(dict(DEFAULTS["loss"]))
    assert isinstance(loss_fn, MapNetLoss) and not loss_fn.learn_relative_weights
    B, T = 16, 3
    along = torch.linspace(-1.5, 1.5, B * T).reshape(B, T)  # normalised units: 0.1 std per step
    true_t = torch.stack([0.05 * torch.randn(B, T), 0.05 * torch.randn(B, T), along], dim=-1)
    half = torch.deg2rad(0.5 * torch.randn(B, T)) / 2       # headings within ~0.5 deg
    true_q = torch.stack([half.cos(), torch.zeros_like(half), half.sin(), torch.zeros_like(half)], dim=-1)
    pred = (0.3 * torch.randn(B, T, 6)).requires_grad_(True)
    out = loss_fn.compute(pred, true_t, true_q)
    weighted = {"abs_t": out["abs_translation"] * torch.exp(-out["abs_s_t"]),
                "abs_q": out["abs_rotation"] * torch.exp(-out["abs_s_q"]),
                "rel_t": out["rel_translation"] * torch.exp(-out["rel_s_t"]),
                "rel_q": out["rel_rotation"] * torch.exp(-out["rel_s_q"])}
    grads = {k: torch.autograd.grad(v, pred, retain_graph=True)[0] for k, v in weighted.items()}
    on_t = grads["abs_t"][..., :3].abs().mean()
    assert on_t >= 0.99 * grads["abs_q"][..., 3:].abs().mean()   # equal weights: equal L1 gradients
    assert on_t >= 3 * grads["rel_q"][..., 3:].abs().mean()
    assert on_t >= 3 * grads["rel_t"][..., :3].abs().mean()
    # the same check fails on the loss that did not learn translation (the old defaults)
    old = build_loss({**DEFAULTS["loss"], "s_q": -3.0, "learn_relative_weights": True})
    old_out = old.compute(pred, true_t, true_q)
    old_t = torch.autograd.grad(old_out["abs_translation"] * torch.exp(-old_out["abs_s_t"]), pred,
                                retain_graph=True)[0][..., :3].abs().mean()
    old_q = torch.autograd.grad(old_out["abs_rotation"] * torch.exp(-old_out["abs_s_q"]), pred)[0]
    assert old_t < old_q[..., 3:].abs().mean() / 10
