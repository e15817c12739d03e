"""geometry.py: round trips, agreement numpy == torch == transforms3d, edge cases, gradients."""
import numpy as np
import pytest
import torch
import transforms3d.quaternions as t3q
from hypothesis import given, settings
from hypothesis import strategies as st

from vizloc_ros import geometry as g

SETTINGS = settings(max_examples=50, deadline=None)
TOL = 1e-6

coord = st.floats(-1.0, 1.0, allow_nan=False)
quats = st.tuples(coord, coord, coord, coord).map(np.array).filter(
    lambda q: np.linalg.norm(q) > 0.1).map(lambda q: q / np.linalg.norm(q))
vec3 = st.tuples(*(st.floats(-5.0, 5.0, allow_nan=False),) * 3).map(np.array)
# rotation vectors strictly inside the ball of radius pi, where log(exp(w)) == w
rotvecs = st.tuples(coord, coord, coord).map(lambda v: np.array(v) * 0.99 * np.pi / np.sqrt(3))


def same_rotation(q_a, q_b, tol=TOL):
    """q and -q are the same rotation (hemisphere flips are ambiguous at w == 0)."""
    q_a, q_b = np.asarray(q_a), np.asarray(q_b)
    return np.allclose(q_a, q_b, atol=tol) or np.allclose(q_a, -q_b, atol=tol)


def T(x):
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


# ------------------------------------------------------------------ round trips

@SETTINGS
@given(quats)
def test_quat_exp_log_round_trip(q):
    assert np.allclose(g.quat_exp(g.quat_log(q)), g.quat_hemisphere(q), atol=TOL)
    back = g.torch_quat_exp(g.torch_quat_log(T(q)[None]))[0].numpy()
    assert np.allclose(back, g.quat_hemisphere(q), atol=TOL)


@SETTINGS
@given(rotvecs)
def test_so3_log_exp_round_trip(w):
    R = g.so3_exp(w)
    assert np.allclose(R @ R.T, np.eye(3), atol=TOL) and np.isclose(np.linalg.det(R), 1.0)
    assert np.allclose(g.so3_log(R), w, atol=TOL)
    assert np.allclose(g.so3_exp(g.so3_log(R)), R, atol=TOL)
    assert np.allclose(g.torch_so3_log(g.torch_so3_exp(T(w)[None]))[0].numpy(), w, atol=TOL)


@SETTINGS
@given(vec3, rotvecs)
def test_se3_log_exp_round_trip(rho, w):
    xi = np.concatenate([rho, w])
    M = g.se3_exp(xi)
    assert np.allclose(g.se3_log(M), xi, atol=1e-5)
    assert np.allclose(g.se3_exp(g.se3_log(M)), M, atol=TOL)
    assert np.allclose(g.torch_se3_log(g.torch_se3_exp(T(xi)[None]))[0].numpy(), xi, atol=1e-5)


@SETTINGS
@given(vec3, quats, vec3, quats)
def test_inverse_undoes_compose(t_a, q_a, t_b, q_b):
    t_c, q_c = g.pose_compose(t_a, q_a, t_b, q_b)
    t_ai, q_ai = g.pose_inverse(t_a, q_a)
    t_back, q_back = g.pose_compose(t_ai, q_ai, t_c, q_c)
    assert np.allclose(t_back, t_b, atol=1e-6) and same_rotation(q_back, q_b)
    t_rel, q_rel = g.pose_relative(t_a, q_a, t_c, q_c)
    assert np.allclose(t_rel, t_b, atol=1e-6) and same_rotation(q_rel, q_b)
    t_id, q_id = g.pose_compose(t_a, q_a, *g.pose_inverse(t_a, q_a))
    assert np.allclose(t_id, 0.0, atol=1e-6) and same_rotation(q_id, [1, 0, 0, 0])
    assert np.allclose(g.pose_to_matrix(t_c, q_c),
                       g.pose_to_matrix(t_a, q_a) @ g.pose_to_matrix(t_b, q_b), atol=TOL)


# ------------------------------------------------------------------ numpy == torch == transforms3d

@SETTINGS
@given(quats, quats, vec3, rotvecs)
def test_numpy_torch_agree(q_a, q_b, rho, w):
    xi = np.concatenate([rho, w])
    pairs = [
        (g.quat_to_matrix(q_a), g.torch_quat_to_matrix(T(q_a))),
        (g.matrix_to_quat(g.quat_to_matrix(q_a)), g.torch_matrix_to_quat(T(g.quat_to_matrix(q_a)))),
        (g.quat_multiply(q_a, q_b), g.torch_quat_multiply(T(q_a), T(q_b))),
        (g.quat_log(q_a), g.torch_quat_log(T(q_a))),
        (g.quat_exp(w), g.torch_quat_exp(T(w))),
        (g.so3_exp(w), g.torch_so3_exp(T(w))),
        (g.so3_log(g.quat_to_matrix(q_a)), g.torch_so3_log(T(g.quat_to_matrix(q_a)))),
        (g.se3_exp(xi), g.torch_se3_exp(T(xi))),
        (g.se3_log(g.se3_exp(xi)), g.torch_se3_log(T(g.se3_exp(xi)))),
        (g.quat_rotate(q_a, rho), g.torch_quat_rotate(T(q_a), T(rho))),
        (g.rotation_angle(q_a, q_b), g.torch_rotation_angle(T(q_a), T(q_b))),
        (g.ros_to_wxyz(q_a), g.torch_ros_to_wxyz(T(q_a))),
    ]
    for expected, got in pairs:
        assert np.allclose(got.numpy(), expected, atol=TOL), (expected, got)
    t_np, q_np = g.pose_relative(rho, q_a, w, q_b)
    t_th, q_th = g.torch_pose_relative(T(rho), T(q_a), T(w), T(q_b))
    assert np.allclose(t_th.numpy(), t_np, atol=TOL) and same_rotation(q_th.numpy(), q_np)


@SETTINGS
@given(quats, quats)
def test_transforms3d_agree(q_a, q_b):
    R = g.quat_to_matrix(q_a)
    assert np.allclose(R, t3q.quat2mat(q_a), atol=TOL)
    # at w == 0 both signs are on the hemisphere boundary: compare rotations, not signs
    assert same_rotation(g.matrix_to_quat(R), t3q.mat2quat(R))
    assert np.allclose(g.quat_multiply(q_a, q_b), t3q.qmult(q_a, q_b), atol=TOL)
    assert np.allclose(g.torch_quat_multiply(T(q_a), T(q_b)).numpy(), t3q.qmult(q_a, q_b), atol=TOL)
    assert np.allclose(g.torch_quat_to_matrix(T(q_a)).numpy(), t3q.quat2mat(q_a), atol=TOL)
    assert np.allclose(g.quat_conjugate(q_a), t3q.qconjugate(q_a))


def test_batched_shapes():
    rng = np.random.default_rng(0)
    q = g.quat_normalize(rng.normal(size=(2, 5, 4)))
    assert g.quat_to_matrix(q).shape == (2, 5, 3, 3)
    assert g.matrix_to_quat(g.quat_to_matrix(q)).shape == (2, 5, 4)
    assert g.quat_log(q).shape == (2, 5, 3)
    assert g.se3_exp(rng.normal(size=(2, 5, 6))).shape == (2, 5, 4, 4)


# ------------------------------------------------------------------ conventions and edge cases

def test_ros_order_round_trip():
    assert np.allclose(g.ros_to_wxyz([1, 2, 3, 4]), [4, 1, 2, 3])
    assert np.allclose(g.wxyz_to_ros([4, 1, 2, 3]), [1, 2, 3, 4])
    x = np.random.default_rng(1).normal(size=(6, 4))
    assert np.allclose(g.wxyz_to_ros(g.ros_to_wxyz(x)), x)
    assert torch.equal(g.torch_wxyz_to_ros(g.torch_ros_to_wxyz(T(x))), T(x))


@SETTINGS
@given(quats)
def test_hemisphere(q):
    h = g.quat_hemisphere(q)
    assert h[0] >= 0 and same_rotation(h, q)
    assert np.allclose(g.quat_to_matrix(h), g.quat_to_matrix(-q), atol=TOL)
    assert g.matrix_to_quat(g.quat_to_matrix(q))[0] >= 0
    assert g.torch_quat_hemisphere(T(q))[0] >= 0


def test_identity_edge_cases():
    ident = np.array([1.0, 0, 0, 0])
    assert np.allclose(g.quat_log(ident), 0) and np.allclose(g.quat_log(-ident), 0)
    assert np.allclose(g.quat_exp(np.zeros(3)), ident)
    assert np.allclose(g.so3_log(np.eye(3)), 0) and np.allclose(g.so3_exp(np.zeros(3)), np.eye(3))
    assert np.allclose(g.se3_log(np.eye(4)), 0) and np.allclose(g.se3_exp(np.zeros(6)), np.eye(4))
    assert g.rotation_angle(ident, -ident) == pytest.approx(0.0, abs=1e-7)
    assert g.torch_rotation_angle(T(ident), T(-ident)).item() == pytest.approx(0.0, abs=1e-7)
    # tiny rotations go through the Taylor branches and stay accurate
    w = np.array([1e-7, -2e-7, 3e-8])
    assert np.allclose(g.so3_log(g.so3_exp(w)), w, atol=1e-12)
    assert np.allclose(g.se3_log(g.se3_exp(np.r_[1.0, 2.0, 3.0, w])), np.r_[1.0, 2.0, 3.0, w], atol=1e-9)


@pytest.mark.parametrize("axis", [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [0.3, -0.5, 0.8]])
def test_180_degree_edge_cases(axis):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    q = np.r_[0.0, axis]
    R = g.quat_to_matrix(q)
    assert np.allclose(R, 2 * np.outer(axis, axis) - np.eye(3), atol=TOL)
    assert same_rotation(g.matrix_to_quat(R), q)
    assert np.linalg.norm(g.so3_log(R)) == pytest.approx(np.pi, abs=1e-6)
    assert np.allclose(g.so3_exp(g.so3_log(R)), R, atol=TOL)
    assert np.allclose(np.abs(g.quat_log(q)), np.abs(axis) * np.pi / 2, atol=TOL)
    assert g.rotation_angle([1, 0, 0, 0], q) == pytest.approx(np.pi, abs=1e-6)
    assert g.torch_rotation_angle(T([1, 0, 0, 0]), T(q)).item() == pytest.approx(np.pi, abs=1e-6)
    M = g.pose_to_matrix([1.0, -2.0, 0.5], q)
    assert np.allclose(g.se3_exp(g.se3_log(M)), M, atol=1e-6)
    assert np.allclose(g.torch_se3_exp(g.torch_se3_log(T(M))).numpy(), M, atol=1e-6)


def test_quat_normalize_rejects_zero():
    with pytest.raises(ValueError):
        g.quat_normalize([0.0, 0.0, 0.0, 0.0])
    assert torch.isfinite(g.torch_quat_normalize(torch.zeros(4))).all()


# ------------------------------------------------------------------ gradients

def _finite_grad(fn, x):
    x = x.clone().requires_grad_(True)
    fn(x).sum().backward()
    return x.grad is not None and bool(torch.isfinite(x.grad).all())


HALF_TURN = [0.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("q", [[1.0, 0, 0, 0], [-1.0, 0, 0, 0], HALF_TURN, [1e-9, 0.6, 0.8, 0.0]],
                         ids=["identity", "minus-identity", "180deg", "near-180deg"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_gradients_finite(q, dtype):
    q = torch.tensor([q], dtype=dtype)
    ref = torch.tensor([[1.0, 0, 0, 0]], dtype=dtype)
    assert _finite_grad(g.torch_quat_log, q)
    assert _finite_grad(g.torch_quat_normalize, q)
    assert _finite_grad(lambda x: g.torch_rotation_angle(x, ref), q)
    assert _finite_grad(lambda x: g.torch_rotation_angle(x, q.detach()), q)
    assert _finite_grad(g.torch_quat_to_matrix, q)
    R = g.torch_quat_to_matrix(q).detach()
    assert _finite_grad(g.torch_so3_log, R)
    assert _finite_grad(g.torch_matrix_to_quat, R)
    M = torch.eye(4, dtype=dtype)[None].repeat(1, 1, 1)
    M[0, :3, :3] = R[0]
    assert _finite_grad(g.torch_se3_log, M)
    t = torch.tensor([[0.5, -1.0, 2.0]], dtype=dtype)
    assert _finite_grad(lambda x: torch.cat(g.torch_pose_relative(t, x, t, ref), -1), q)


@pytest.mark.parametrize("omega", [[0.0, 0.0, 0.0], [np.pi, 0.0, 0.0], [0.0, 0.0, -np.pi]],
                         ids=["identity", "180deg-x", "180deg-z"])
def test_torch_exp_gradients_finite(omega):
    w = torch.tensor([omega], dtype=torch.float64)
    assert _finite_grad(g.torch_quat_exp, w * 0.5)
    assert _finite_grad(g.torch_so3_exp, w)
    assert _finite_grad(g.torch_se3_exp, torch.cat([torch.ones(1, 3, dtype=torch.float64), w], -1))
