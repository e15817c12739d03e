"""messages.py: round trips through rosbags' CDR, ROS quaternion order, covariance
order, stamps, and a clear ValueError for every malformed input."""
from __future__ import annotations

import array
import io
import math
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage

from vizloc_ros.ros_io import messages as m
from vizloc_ros.geometry import quat_multiply, quat_normalize, rotation_angle

TYPES = m.rosbags_types()
STORE = m.rosbags_typestore()


def cdr_round_trip(msg):
    """Serialise and deserialise like a bag would."""
    return STORE.deserialize_cdr(STORE.serialize_cdr(msg, msg.__msgtype__), msg.__msgtype__)


def yaw_quat(angle):
    return np.array([math.cos(angle / 2), 0.0, 0.0, math.sin(angle / 2)])


# --------------------------------------------------------------------------- stamps

def test_seconds_to_sec_nanosec_splits_and_carries():
    assert m.sec_to_sec_nanosec(12.5) == (12, 500_000_000)
    assert m.sec_to_sec_nanosec(-0.25) == (-1, 750_000_000)
    assert m.sec_to_sec_nanosec(0.9999999999) == (1, 0)
    sec, nanosec = m.sec_to_sec_nanosec(1.7e9 + 0.123456)
    assert sec == 1_700_000_000 and abs(nanosec - 123_456_000) < 300  # float64 resolution at 1.7e9 s


def test_non_finite_stamp_is_rejected():
    with pytest.raises(ValueError, match="not finite"):
        m.sec_to_sec_nanosec(float("nan"))


def test_time_round_trip_integer_and_float():
    ns = 1_700_000_000_123_456_789
    time = m.time_from_ns(TYPES, ns)
    assert (time.sec, time.nanosec) == (1_700_000_000, 123_456_789)
    assert m.stamp_to_ns(cdr_round_trip(m.make_header(TYPES, time, "x")).stamp) == ns
    assert m.stamp_to_sec(m.make_time(TYPES, 3.25)) == 3.25
    # an rclpy.time.Time-like object (only .nanoseconds)
    assert m.stamp_to_ns(m.make_time(TYPES, SimpleNamespace(nanoseconds=5_000_000_001))) == 5_000_000_001


# --------------------------------------------------------------------------- poses

def test_quaternion_order_in_the_message_is_xyzw():
    msg = m.make_pose_stamped(TYPES, 1.0, "map", [1, 2, 3], yaw_quat(math.pi / 2))
    o = msg.pose.orientation
    assert o.z == pytest.approx(math.sin(math.pi / 4)) and o.w == pytest.approx(math.cos(math.pi / 4))
    assert o.x == 0.0 and o.y == 0.0
    t, q = m.pose_from_msg(cdr_round_trip(msg))
    np.testing.assert_allclose(t, [1, 2, 3])
    np.testing.assert_allclose(q, yaw_quat(math.pi / 2), atol=1e-12)


def test_negative_w_comes_back_in_the_w_positive_hemisphere():
    q = -yaw_quat(0.3)
    _, back = m.pose_from_msg(m.make_pose_stamped(TYPES, 0.0, "map", [0, 0, 0], q))
    assert back[0] > 0
    np.testing.assert_allclose(back, -q, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-50, 50), min_size=3, max_size=3),
       st.lists(st.floats(-1, 1), min_size=4, max_size=4).filter(lambda v: np.linalg.norm(v) > 0.1))
def test_every_pose_message_round_trips(t, q):
    q = quat_normalize(np.array(q))
    cov = np.diag([0.1, 0.2, 0.3, 0.01, 0.02, 0.03])
    cov[0, 1] = cov[1, 0] = 0.05
    built = [
        m.make_pose_stamped(TYPES, 1.0, "map", t, q),
        m.make_pose_with_covariance_stamped(TYPES, 1.0, "map", t, q, cov),
        m.make_odometry(TYPES, 1.0, "odom", "base_link", t, q, cov),
        m.make_transform_stamped(TYPES, 1.0, "map", "odom", t, q),
        m.make_pose(TYPES, t, q),
    ]
    for msg in built:
        t_back, q_back = m.pose_from_msg(cdr_round_trip(msg))
        np.testing.assert_allclose(t_back, t, atol=1e-12)
        assert rotation_angle(q_back, q) < 1e-6
        assert q_back[0] >= 0


def test_covariance_keeps_ros_order_and_round_trips():
    cov = np.diag([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    cov[0, 5] = cov[5, 0] = 0.5  # x with rot_z
    msg = cdr_round_trip(m.make_pose_with_covariance_stamped(TYPES, 2.0, "map", [0, 0, 0], [1, 0, 0, 0], cov))
    assert msg.pose.covariance[0] == 1.0 and msg.pose.covariance[35] == 6.0 and msg.pose.covariance[5] == 0.5
    np.testing.assert_array_equal(m.pose_covariance_from_msg(msg), cov)
    odom = cdr_round_trip(m.make_odometry(TYPES, 2.0, "odom", "base_link", [0, 0, 0], [1, 0, 0, 0], cov,
                                          linear=[0.5, 0, 0], angular=[0, 0, 0.1], twist_cov=np.eye(6) * 0.01))
    np.testing.assert_array_equal(m.pose_covariance_from_msg(odom), cov)
    np.testing.assert_array_equal(m.twist_covariance_from_msg(odom), np.eye(6) * 0.01)
    lin, ang = m.twist_from_msg(odom)
    np.testing.assert_allclose(lin, [0.5, 0, 0])
    np.testing.assert_allclose(ang, [0, 0, 0.1])
    assert odom.header.frame_id == "odom" and odom.child_frame_id == "base_link"


def test_odometry_without_twist_says_unknown():
    odom = m.make_odometry(TYPES, 0.0, "odom", "base_link", [0, 0, 0], [1, 0, 0, 0], np.eye(6))
    assert np.all(np.diag(m.twist_covariance_from_msg(odom)) == m.UNKNOWN_TWIST_VARIANCE)


@pytest.mark.parametrize("cov, message", [
    (np.full((6, 6), np.nan), "NaN"),
    (np.eye(6) + np.triu(np.ones((6, 6)), 1), "not symmetric"),
    (-np.eye(6), "negative variance"),
    (np.eye(5), "36 values"),
    (np.array([[1.0, 2.0], [2.0, 1.0]]).repeat(3, 0).repeat(3, 1), "positive semi-definite"),
])
def test_bad_covariances_are_refused_by_builders(cov, message):
    with pytest.raises(ValueError, match=message):
        m.make_pose_with_covariance_stamped(TYPES, 0.0, "map", [0, 0, 0], [1, 0, 0, 0], cov)


def test_check_covariance_symmetrises_within_tolerance():
    cov = np.eye(6)
    cov[0, 1], cov[1, 0] = 0.1, 0.1 + 1e-12
    out = m.check_covariance(cov)
    assert out[0, 1] == out[1, 0]


@pytest.mark.parametrize("orientation, message", [
    ((0.0, 0.0, 0.0, 0.0), "zero quaternion"),
    ((0.0, 0.0, float("nan"), 1.0), "NaN"),
    ((0.0, 0.0, 0.0, float("inf")), "NaN or inf"),
    ((0.0, 0.0, 0.0, 2.0), "norm"),
])
def test_bad_quaternions_in_messages_raise(orientation, message):
    msg = m.make_pose_stamped(TYPES, 0.0, "map", [0, 0, 0], [1, 0, 0, 0])
    o = msg.pose.orientation
    o.x, o.y, o.z, o.w = orientation
    with pytest.raises(ValueError, match=message):
        m.pose_from_msg(msg)


def test_non_finite_position_raises():
    msg = m.make_pose_stamped(TYPES, 0.0, "map", [0, 0, 0], [1, 0, 0, 0])
    msg.pose.position.y = float("inf")
    with pytest.raises(ValueError, match="position"):
        m.pose_from_msg(msg)
    with pytest.raises(ValueError, match="NaN or inf"):
        m.make_pose_stamped(TYPES, 0.0, "map", [0, float("nan"), 0], [1, 0, 0, 0])


def test_message_without_a_pose_is_a_type_error():
    with pytest.raises(TypeError, match="carries no pose"):
        m.pose_from_msg(m.make_time(TYPES, 1.0))


def test_path_and_tf_message():
    t = np.array([[0.0, 0, 0], [1, 0, 0], [2, 0, 0]])
    q = np.stack([yaw_quat(a) for a in (0.0, 0.1, 0.2)])
    path = cdr_round_trip(m.make_path(TYPES, 5.0, "map", t, q, stamps=[1.0, 2.0, 3.0]))
    assert path.header.frame_id == "map" and len(path.poses) == 3
    assert m.header_stamp_sec(path.poses[2]) == 3.0
    np.testing.assert_allclose(m.pose_from_msg(path.poses[1])[0], [1, 0, 0])
    tf = cdr_round_trip(m.make_tf_message(TYPES, [m.make_transform_stamped(TYPES, 0.0, "map", "odom", [1, 2, 3], q[2])]))
    assert tf.transforms[0].child_frame_id == "odom"
    np.testing.assert_allclose(m.pose_from_msg(tf.transforms[0])[1], q[2], atol=1e-12)


def test_path_checks_all_poses_at_once_and_refuses_bad_ones():
    t = np.zeros((3, 3))
    q = np.tile([-1.0, 0.0, 0.0, 0.0], (3, 1))  # w < 0: flipped into the w >= 0 hemisphere
    path = m.make_path(TYPES, 1.0, "map", t, q)
    assert all(p.pose.orientation.w == 1.0 for p in path.poses)
    assert all(m.header_stamp_sec(p) == 1.0 for p in path.poses)  # the path's stamp when none given
    bad_q = q.copy()
    bad_q[1] = [0.0, 0.0, 0.0, 0.0]
    bad_t = t.copy()
    bad_t[2, 0] = np.nan
    for args, match in (((t, bad_q), "quaternion norms"), ((bad_t, q), "NaN or inf"),
                        ((t, q[:2]), "differ in length"), ((t, q * 2.0), "quaternion norms")):
        with pytest.raises(ValueError, match=match):
            m.make_path(TYPES, 1.0, "map", *args)


# --------------------------------------------------------------------------- IMU and camera info

def test_imu_round_trip_and_rep145_orientation():
    msg = cdr_round_trip(m.make_imu(TYPES, 4.0, "base_link", [0.1, 0.2, 0.3], [0, 0, 9.81],
                                    [1e-4, 1e-4, 1e-4], np.eye(3) * 1e-2))
    reading = m.imu_from_msg(msg)
    np.testing.assert_allclose(reading.gyro, [0.1, 0.2, 0.3])
    np.testing.assert_allclose(reading.accel, [0, 0, 9.81])
    np.testing.assert_allclose(reading.gyro_cov, np.eye(3) * 1e-4)
    np.testing.assert_allclose(reading.accel_cov, np.eye(3) * 1e-2)
    assert msg.orientation_covariance[0] == -1.0
    assert reading.orientation_wxyz is None and reading.orientation_cov is None
    assert reading.stamp == 4.0 and reading.frame_id == "base_link"
    msg.angular_velocity_covariance = np.zeros(9)  # all zeros = "unknown"
    assert m.imu_from_msg(msg).gyro_cov is None
    with_orientation = m.make_imu(TYPES, 0.0, "imu", [0, 0, 0], [0, 0, 9.81], [1e-4] * 3, [1e-2] * 3,
                                  orientation_wxyz=yaw_quat(1.0), orientation_cov=[1e-3] * 3)
    np.testing.assert_allclose(m.imu_from_msg(with_orientation).orientation_wxyz, yaw_quat(1.0), atol=1e-12)


def test_camera_info_round_trip():
    msg = cdr_round_trip(m.make_camera_info(TYPES, 0.0, "cam", 320, 240, 277.0, 278.0, 159.5, 119.5))
    assert msg.distortion_model == "plumb_bob" and list(msg.d) == [0.0] * 5
    assert m.camera_info_to_intrinsics(msg) == dict(width=320, height=240, fx=277.0, fy=278.0, cx=159.5, cy=119.5)
    assert msg.p[0] == 277.0 and msg.p[10] == 1.0


# --------------------------------------------------------------------------- images

RGB = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)


def raw_image(encoding, data, height, width, step, big=0):
    return TYPES.Image(header=m.make_header(TYPES, 0.0, "cam"), height=height, width=width, encoding=encoding,
                       is_bigendian=big, step=step, data=np.frombuffer(bytes(data), dtype=np.uint8))


@pytest.mark.parametrize("encoding, layout", [
    ("rgb8", lambda rgb: rgb),
    ("bgr8", lambda rgb: rgb[:, :, ::-1]),
    ("rgba8", lambda rgb: np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], 2)),
    ("bgra8", lambda rgb: np.concatenate([rgb[:, :, ::-1], np.full(rgb.shape[:2] + (1,), 7, np.uint8)], 2)),
])
def test_colour_encodings_come_back_as_rgb(encoding, layout):
    msg = cdr_round_trip(m.make_image(TYPES, 0.0, "cam", np.ascontiguousarray(layout(RGB)), encoding))
    out = m.image_to_numpy(msg)
    assert out.dtype == np.uint8 and out.shape == (4, 5, 3)
    np.testing.assert_array_equal(out, RGB)


def test_mono8_and_padded_rows():
    mono = RGB[:, :, 0].copy()
    np.testing.assert_array_equal(m.image_to_numpy(m.make_image(TYPES, 0.0, "cam", mono)), mono)
    padded = np.zeros((4, 8), np.uint8)
    padded[:, :5] = mono  # 3 bytes of padding per row
    out = m.image_to_numpy(raw_image("mono8", padded.tobytes(), 4, 5, 8))
    np.testing.assert_array_equal(out, mono)
    np.testing.assert_array_equal(m.image_to_rgb(raw_image("mono8", padded.tobytes(), 4, 5, 8)),
                                  np.repeat(mono[:, :, None], 3, 2))


def test_mono16_scales_to_8_bit_like_cv_bridge_and_depth_encodings_convert():
    values = np.array([[0, 128, 129, 256, 32896, 65535]], dtype=np.uint16)
    mono16 = m.make_image(TYPES, 0.0, "cam", values, "mono16")
    # round(v * 255 / 65535), as cv_bridge's mono16 -> mono8 (test_cv_bridge_parity.py)
    np.testing.assert_array_equal(m.image_to_numpy(mono16), [[0, 0, 1, 1, 128, 255]])
    depth16 = cdr_round_trip(m.make_image(TYPES, 0.0, "cam", np.array([[0, 1500]], np.uint16)))
    assert depth16.encoding == "16UC1"
    out = m.depth_image_to_numpy(depth16)
    assert np.isnan(out[0, 0]) and out[0, 1] == pytest.approx(1.5)
    big = raw_image("16UC1", np.array([[1500]], ">u2").tobytes(), 1, 1, 2, big=1)
    assert m.depth_image_to_numpy(big)[0, 0] == pytest.approx(1.5)
    depth32 = m.make_image(TYPES, 0.0, "cam", np.array([[2.25, np.nan]], np.float32))
    out = m.depth_image_to_numpy(depth32)
    assert out[0, 0] == 2.25 and np.isnan(out[0, 1])


def _mosaic(rgb, pattern):
    """What a colour-filter-array sensor records: one channel per pixel, ``pattern`` naming
    the 2x2 cell's colours in row order (as the ROS encoding does)."""
    out = np.zeros(rgb.shape[:2], rgb.dtype)
    for (dy, dx), colour in zip(((0, 0), (0, 1), (1, 0), (1, 1)), pattern):
        out[dy::2, dx::2] = rgb[dy::2, dx::2, "rgb".index(colour)]
    return out


@pytest.mark.parametrize("pattern", ["rggb", "bggr", "gbrg", "grbg"])
@pytest.mark.parametrize("bits", [8, 16])
def test_bayer_images_are_demosaiced_to_rgb(pattern, bits):
    rows, cols = np.mgrid[0:12, 0:16]
    smooth = np.stack([40 + 8 * rows, 200 - 5 * cols, 90 + 2 * (rows + cols)], axis=2).astype(np.uint8)
    if bits == 8:
        data, step, big = _mosaic(smooth, pattern).tobytes(), 16, 0
    else:  # 16-bit, big-endian, values in the high byte
        data, step, big = (_mosaic(smooth, pattern).astype(np.uint16) << 8).astype(">u2").tobytes(), 32, 1
    out = m.image_to_rgb(cdr_round_trip(raw_image(f"bayer_{pattern}{bits}", data, 12, 16, step, big)))
    assert out.dtype == np.uint8 and out.shape == (12, 16, 3)
    # a linear image is reconstructed exactly by bilinear demosaicing, away from the border
    assert np.abs(out[2:-2, 2:-2].astype(int) - smooth[2:-2, 2:-2]).max() <= 1


def test_a_bayer_image_too_small_to_demosaic_is_refused():
    with pytest.raises(ValueError, match="at least 2x2"):
        m.image_to_numpy(raw_image("bayer_rggb8", b"\x01\x02", 1, 2, 2))


@pytest.mark.parametrize("msg, message", [
    (raw_image("rgb8", RGB.tobytes()[:-1], 4, 5, 15), "truncated"),
    (raw_image("rgb8", RGB.tobytes() + b"\0", 4, 5, 15), "expected step x height"),
    (raw_image("rgb8", RGB.tobytes(), 4, 5, 14), "wrong step"),
    (raw_image("yuv422", RGB.tobytes(), 4, 5, 15), "unsupported image encoding 'yuv422'"),
    (raw_image("rgb8", b"", 0, 0, 0), "empty image"),
    (raw_image("16UC1", b"\0" * 40, 4, 5, 10), "depth_image_to_numpy"),
    (raw_image("32FC1", b"\0" * 80, 4, 5, 20), "depth_image_to_numpy"),
])
def test_bad_images_raise_value_error(msg, message):
    with pytest.raises(ValueError, match=message):
        m.image_to_numpy(msg)


def test_depth_reader_rejects_colour_and_truncation():
    with pytest.raises(ValueError, match="unsupported image encoding 'rgb8'"):
        m.depth_image_to_numpy(raw_image("rgb8", RGB.tobytes(), 4, 5, 15))
    with pytest.raises(ValueError, match="truncated"):
        m.depth_image_to_numpy(raw_image("16UC1", b"\0" * 39, 4, 5, 10))


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_compressed_images_decode(fmt):
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:, :8] = (200, 30, 30)
    msg = cdr_round_trip(m.make_compressed_image(TYPES, 0.0, "cam", rgb, fmt))
    out = m.compressed_image_to_numpy(msg)
    assert out.shape == (16, 16, 3)
    assert np.abs(out.astype(int) - rgb).max() <= (0 if fmt == "png" else 40)
    np.testing.assert_array_equal(m.image_to_rgb(msg), out)
    grey = m.compressed_image_to_numpy(m.make_compressed_image(TYPES, 0.0, "cam", rgb[:, :, 0], "png"))
    assert grey.shape == (16, 16)


def test_corrupt_and_empty_compressed_images_raise():
    good = m.make_compressed_image(TYPES, 0.0, "cam", np.zeros((8, 8, 3), np.uint8), "jpeg")
    for data, message in [(b"", "empty"), (b"not an image at all", "corrupt"),
                          (bytes(good.data)[:40], "corrupt")]:
        msg = TYPES.CompressedImage(header=good.header, format="jpeg", data=np.frombuffer(data, np.uint8))
        with pytest.raises(ValueError, match=message):
            m.compressed_image_to_numpy(msg)
    depth = TYPES.CompressedImage(header=good.header, format="16UC1; compressedDepth", data=good.data)
    with pytest.raises(ValueError, match="compressedDepth"):
        m.compressed_image_to_numpy(depth)


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_a_compressed_image_above_max_pixels_is_refused_from_its_header(fmt):
    msg = m.make_compressed_image(TYPES, 0.0, "cam", np.zeros((120, 100, 3), np.uint8), fmt)
    with pytest.raises(m.ImageTooLarge, match=r"100x120 = 12000 pixels exceeds max_image_pixels = 11999"):
        m.image_to_rgb(msg, max_pixels=11_999)
    assert m.image_to_rgb(msg, max_pixels=12_000).shape == (120, 100, 3)


def test_pillows_own_decompression_bomb_limit_is_an_image_too_large(monkeypatch):
    """Pillow refuses an image above twice ``MAX_IMAGE_PIXELS`` when it opens it (a 1 MB PNG
    can announce 20000x20000; the fault catalogue has that file): the same drop."""
    from PIL import Image as PILImage

    msg = m.make_compressed_image(TYPES, 0.0, "cam", np.zeros((100, 100, 3), np.uint8), "png")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1_000)
    with pytest.raises(m.ImageTooLarge, match="refused by Pillow"):
        m.image_to_rgb(msg)
    assert issubclass(m.ImageTooLarge, ValueError)  # every caller that drops bad images drops it


def test_a_raw_image_with_an_absurd_size_is_refused_before_its_data_is_read():
    huge = raw_image("rgb8", b"\0" * 12, 100_000, 100_000, 300_000)
    with pytest.raises(m.ImageTooLarge, match="100000x100000"):
        m.image_to_rgb(huge)
    with pytest.raises(m.ImageTooLarge):
        m.image_to_rgb(raw_image("bayer_rggb8", b"\0" * 16, 4, 4, 4), max_pixels=15)
    with pytest.raises(m.ImageTooLarge):
        m.depth_image_to_numpy(raw_image("16UC1", b"\0" * 32, 4, 4, 8), max_pixels=15)
    # a step of 2**40 bytes per row is an error about the data, never an allocation
    with pytest.raises(ValueError, match="truncated image data"):
        m.image_to_rgb(raw_image("rgb8", b"\0" * 12, 2, 2, 2 ** 40))


def test_make_image_checks_the_layout():
    with pytest.raises(ValueError, match="needs 3 channel"):
        m.make_image(TYPES, 0.0, "cam", np.zeros((4, 4), np.uint8), "rgb8")
    with pytest.raises(ValueError, match="non-empty"):
        m.make_image(TYPES, 0.0, "cam", np.zeros((0, 4, 3), np.uint8))


# --------------------------------------------------------------------------- rclpy-style messages

class _Msg:
    """Stands in for an rclpy message class: keyword fields, plain attributes."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def _fake_rclpy_types():
    module = SimpleNamespace(**{name: type(name, (_Msg,), {}) for name in m._TYPE_NAMES})
    return m.message_types_from_modules(module, module, module, module, module, module)


def test_the_same_functions_work_with_rclpy_style_messages():
    types = _fake_rclpy_types()
    cov = np.diag([1.0, 2, 3, 4, 5, 6])
    msg = m.make_pose_with_covariance_stamped(types, 1.5, "map", [1, 2, 3], yaw_quat(0.4), cov)
    assert type(msg).__name__ == "PoseWithCovarianceStamped"
    t, q, back = m.pose_with_covariance_from_msg(msg)
    np.testing.assert_allclose(t, [1, 2, 3])
    np.testing.assert_allclose(q, yaw_quat(0.4), atol=1e-12)
    np.testing.assert_array_equal(back, cov)
    assert m.header_stamp_sec(msg) == 1.5
    image = m.make_image(types, 0.0, "cam", RGB)
    assert isinstance(image.data, array.array) and image.data.typecode == "B"
    np.testing.assert_array_equal(m.image_to_numpy(image), RGB)
    info = m.make_camera_info(types, 0.0, "cam", 5, 4, 10.0, 10.0, 2.0, 1.5)
    assert isinstance(info.d, list)
    buffer = io.BytesIO()
    PILImage.fromarray(RGB).save(buffer, format="PNG")
    compressed = types.CompressedImage(header=image.header, format="png", data=array.array("B", buffer.getvalue()))
    np.testing.assert_array_equal(m.compressed_image_to_numpy(compressed), RGB)


def test_quaternion_composition_sanity():
    # the package order (w, x, y, z) is what quat_multiply expects; the builders keep it
    q = quat_multiply(yaw_quat(0.2), yaw_quat(0.3))
    _, back = m.pose_from_msg(m.make_pose(TYPES, [0, 0, 0], q))
    np.testing.assert_allclose(back, yaw_quat(0.5), atol=1e-12)
