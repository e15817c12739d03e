"""One parser for a mount pose given by hand ([x, y, z, qx, qy, qz, qw]): the nodes'
camera_extrinsic / imu_extrinsic parameters and vizloc-replay --camera-extrinsic accept and
refuse the same numbers."""
from __future__ import annotations

import numpy as np
import pytest

from vizloc_ros.nodes import params as P
from vizloc_ros.replay.cli import _extrinsic
from vizloc_ros.replay.fusion_side import ReplayError
from vizloc_ros.ros_io.messages import QUATERNION_NORM_TOLERANCE, extrinsic_from_ros


def test_ros_order_becomes_t_and_a_unit_wxyz_quaternion_with_w_positive():
    t, q = extrinsic_from_ros([0.1, 0.0, 0.2, 0.5, -0.5, 0.5, -0.5], "x")
    assert np.allclose(t, [0.1, 0.0, 0.2])
    assert np.allclose(q, [0.5, -0.5, 0.5, -0.5]) and q[0] >= 0.0


def test_a_rounded_quaternion_is_normalised():
    t, q = extrinsic_from_ros([0, 0, 0, 0.0, 0.0, 0.7071, 0.7071], "x")  # norm 0.99999
    assert np.isclose(np.linalg.norm(q), 1.0)
    inside = 1.0 + QUATERNION_NORM_TOLERANCE / 2
    assert np.isclose(np.linalg.norm(extrinsic_from_ros([0, 0, 0, 0, 0, 0, inside], "x")[1]), 1.0)


@pytest.mark.parametrize("values, words", [
    ([0.0] * 6, "expected 7 values"),
    ([float("nan"), 0, 0, 0, 0, 0, 1], "NaN"),
    ([0, 0, 0, 0, 0, 0, 0], "zero quaternion"),
    ([0, 0, 0, 0, 0, 0, 1.0 + 2 * QUATERNION_NORM_TOLERANCE], "norm"),
    ([0, 0, 0, 0, 0, 0, 2.0], "norm"),
])
def test_bad_numbers_are_refused_naming_where_they_came_from(values, words):
    with pytest.raises(ValueError, match=f"where.*{words}"):
        extrinsic_from_ros(values, "where")


@pytest.mark.parametrize("values", [
    [0.1, 0.0, 0.2, 0.5, -0.5, 0.5, -0.5],
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.7071, 0.7071],
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0],
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
])
def test_the_node_parameters_and_the_replay_agree(values):
    """The same numbers give the same pose, or are refused, in both places."""
    try:
        expected = extrinsic_from_ros(values, "x")
    except ValueError:
        with pytest.raises(ReplayError, match="--camera-extrinsic"):
            _extrinsic(values)
        with pytest.raises(ValueError, match="'camera_extrinsic'"):
            P.regressor_settings({"camera_extrinsic": values}, default_weights=lambda: "w.safetensors")
        with pytest.raises(ValueError, match="'imu_extrinsic'"):
            P.fusion_settings({"imu_extrinsic": values})
        return
    for t, q in (_extrinsic(values),
                 P.regressor_settings({"camera_extrinsic": values},
                                      default_weights=lambda: "w.safetensors").camera_extrinsic,
                 P.fusion_settings({"imu_extrinsic": values}).config.base_T_imu):
        assert np.allclose(t, expected[0]) and np.allclose(q, expected[1])


def test_no_extrinsic_given_to_the_replay_is_none():
    assert _extrinsic(None) is None
