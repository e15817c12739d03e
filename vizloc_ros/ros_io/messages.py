"""ROS message <-> numpy, for rosbags messages and rclpy messages alike.

Why duck typing: the rosbags classes (bags, replay, tests) and the rclpy classes (live
nodes) have identical field names, so every function here only reads attributes and
builds messages through a :class:`MessageTypes` "factory". The same conversion code then
runs in the nodes, in replay and in the tests, and this module never imports rclpy
(DESIGN.md: ROS imports live under ``vizloc_ros/nodes/`` only).

Conventions (DESIGN.md):

* quaternions returned and accepted here are (w, x, y, z) with w >= 0; messages carry
  (x, y, z, w) and the order is changed only by :func:`vizloc_ros.geometry.ros_to_wxyz`
  / :func:`~vizloc_ros.geometry.wxyz_to_ros`;
* covariances are 6x6 in the ROS order (x, y, z, rot_x, rot_y, rot_z);
* stamps are header stamps; float seconds convert to ``(sec, nanosec)`` in
  :func:`sec_to_sec_nanosec` and back in :func:`stamp_to_sec` only. Where exactness
  matters (bags, long epochs) use integer nanoseconds: :func:`stamp_to_ns`,
  :func:`time_from_ns`.

Images: :func:`image_to_numpy` returns RGB (colour encodings are reordered, alpha is
dropped) or a 2-D array for mono; depth encodings go through
:func:`depth_image_to_numpy`. Every malformed message raises ``ValueError`` naming
what is wrong; an image larger than ``max_pixels`` raises :class:`ImageTooLarge` (a
``ValueError``) before any pixel is decoded.
"""
from __future__ import annotations

import array
import io
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from vizloc_ros.geometry import quat_hemisphere, ros_to_wxyz, wxyz_to_ros

#: tf2 refuses quaternions whose norm is further than this from 1 (TF_DENORMALIZED_QUATERNION);
#: we do the same instead of silently normalising garbage.
QUATERNION_NORM_TOLERANCE = 1e-2

#: the image message types the regressor reads
IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")

_NS_PER_S = 1_000_000_000


# --------------------------------------------------------------------------- factory

@dataclass(frozen=True)
class MessageTypes:
    """The message classes the builders instantiate, plus two array adapters.

    ``byte_array`` turns bytes / a uint8 array into what the ``uint8[]`` fields of the
    message implementation want (a numpy array for rosbags, ``array.array('B')`` for
    rclpy, whose setters check every element of anything else). ``float_sequence`` does
    the same for unbounded ``float64[]`` fields (CameraInfo.d).
    """

    Time: type
    Header: type
    Point: type
    Quaternion: type
    Vector3: type
    Pose: type
    PoseStamped: type
    PoseWithCovariance: type
    PoseWithCovarianceStamped: type
    Twist: type
    TwistWithCovariance: type
    Transform: type
    TransformStamped: type
    TFMessage: type
    Odometry: type
    Path: type
    Image: type
    CompressedImage: type
    CameraInfo: type
    RegionOfInterest: type
    Imu: type
    byte_array: Callable[[Any], Any]
    float_sequence: Callable[[Any], Any]


_TYPE_NAMES = {
    "Time": "builtin_interfaces/msg/Time",
    "Header": "std_msgs/msg/Header",
    "Point": "geometry_msgs/msg/Point",
    "Quaternion": "geometry_msgs/msg/Quaternion",
    "Vector3": "geometry_msgs/msg/Vector3",
    "Pose": "geometry_msgs/msg/Pose",
    "PoseStamped": "geometry_msgs/msg/PoseStamped",
    "PoseWithCovariance": "geometry_msgs/msg/PoseWithCovariance",
    "PoseWithCovarianceStamped": "geometry_msgs/msg/PoseWithCovarianceStamped",
    "Twist": "geometry_msgs/msg/Twist",
    "TwistWithCovariance": "geometry_msgs/msg/TwistWithCovariance",
    "Transform": "geometry_msgs/msg/Transform",
    "TransformStamped": "geometry_msgs/msg/TransformStamped",
    "TFMessage": "tf2_msgs/msg/TFMessage",
    "Odometry": "nav_msgs/msg/Odometry",
    "Path": "nav_msgs/msg/Path",
    "Image": "sensor_msgs/msg/Image",
    "CompressedImage": "sensor_msgs/msg/CompressedImage",
    "CameraInfo": "sensor_msgs/msg/CameraInfo",
    "RegionOfInterest": "sensor_msgs/msg/RegionOfInterest",
    "Imu": "sensor_msgs/msg/Imu",
}

_ROSBAGS_TYPES_CACHE: dict[int, tuple[object, MessageTypes]] = {}


@lru_cache(maxsize=1)
def rosbags_typestore():
    """The rosbags typestore every bag of this project is written with (ROS 2 Jazzy)."""
    from rosbags.typesys import Stores, get_typestore
    return get_typestore(Stores.ROS2_JAZZY)


def rosbags_types(typestore=None) -> MessageTypes:
    """Message classes from a rosbags typestore (default: ROS 2 Jazzy)."""
    typestore = typestore if typestore is not None else rosbags_typestore()
    key = id(typestore)  # the cache keeps the typestore alive, so the id stays unique
    if key not in _ROSBAGS_TYPES_CACHE:
        classes = {name: typestore.types[full] for name, full in _TYPE_NAMES.items()}
        _ROSBAGS_TYPES_CACHE[key] = typestore, MessageTypes(
            **classes,
            byte_array=lambda data: np.frombuffer(bytes(data), dtype=np.uint8)
            if not isinstance(data, np.ndarray) else np.ascontiguousarray(data, dtype=np.uint8).reshape(-1),
            float_sequence=lambda values: np.asarray(values, dtype=np.float64).reshape(-1),
        )
    return _ROSBAGS_TYPES_CACHE[key][1]


def message_types_from_modules(builtin_interfaces_msg, std_msgs_msg, geometry_msgs_msg,
                               nav_msgs_msg, sensor_msgs_msg, tf2_msgs_msg) -> MessageTypes:
    """Message classes from the rclpy message modules (called by the nodes).

    The nodes pass e.g. ``geometry_msgs.msg``; this module itself never imports them.
    """
    modules = {
        "builtin_interfaces": builtin_interfaces_msg, "std_msgs": std_msgs_msg,
        "geometry_msgs": geometry_msgs_msg, "nav_msgs": nav_msgs_msg,
        "sensor_msgs": sensor_msgs_msg, "tf2_msgs": tf2_msgs_msg,
    }
    classes = {}
    for name, full in _TYPE_NAMES.items():
        package = full.split("/")[0]
        classes[name] = getattr(modules[package], name)
    return MessageTypes(
        **classes,
        byte_array=lambda data: array.array("B", np.ascontiguousarray(data, dtype=np.uint8).tobytes()
                                            if isinstance(data, np.ndarray) else bytes(data)),
        float_sequence=lambda values: [float(v) for v in np.asarray(values, dtype=float).reshape(-1)],
    )


# --------------------------------------------------------------------------- time

def sec_to_sec_nanosec(t: float) -> tuple[int, int]:
    """Float seconds -> (sec, nanosec) with 0 <= nanosec < 1e9, rounded to the nanosecond.

    The whole seconds are split off first so the rounding happens on the fraction
    (exact), not on ``t * 1e9`` (which loses ~100 ns at today's epoch).
    """
    t = float(t)
    if not math.isfinite(t):
        raise ValueError(f"stamp {t!r} is not finite")
    sec = math.floor(t)
    nanosec = int(round((t - sec) * _NS_PER_S))
    if nanosec >= _NS_PER_S:
        sec, nanosec = sec + 1, nanosec - _NS_PER_S
    return int(sec), nanosec


def ns_to_sec_nanosec(ns: int) -> tuple[int, int]:
    """Integer nanoseconds -> (sec, nanosec) with 0 <= nanosec < 1e9."""
    sec, nanosec = divmod(int(ns), _NS_PER_S)
    return sec, nanosec


def stamp_to_ns(stamp) -> int:
    """A Time-like object (``sec``/``nanosec``, or rclpy ``Time.nanoseconds``) -> int ns."""
    if hasattr(stamp, "sec") and hasattr(stamp, "nanosec"):
        return int(stamp.sec) * _NS_PER_S + int(stamp.nanosec)
    if hasattr(stamp, "nanoseconds"):
        return int(stamp.nanoseconds)
    raise TypeError(f"not a time stamp: {type(stamp).__name__} (needs sec/nanosec)")


def stamp_to_sec(stamp) -> float:
    """A Time-like object -> float seconds (the only place this conversion is made)."""
    if hasattr(stamp, "sec") and hasattr(stamp, "nanosec"):
        return float(stamp.sec) + float(stamp.nanosec) * 1e-9
    return stamp_to_ns(stamp) * 1e-9


def header_stamp_sec(msg) -> float:
    """Float seconds of ``msg.header.stamp``."""
    return stamp_to_sec(_header(msg).stamp)


def header_stamp_ns(msg) -> int:
    """Integer nanoseconds of ``msg.header.stamp``."""
    return stamp_to_ns(_header(msg).stamp)


def time_from_ns(types: MessageTypes, ns: int):
    """builtin_interfaces/Time from integer nanoseconds."""
    sec, nanosec = ns_to_sec_nanosec(ns)
    return types.Time(sec=sec, nanosec=nanosec)


def make_time(types: MessageTypes, stamp):
    """builtin_interfaces/Time from float seconds or from any Time-like object (copied)."""
    if isinstance(stamp, (int, float, np.integer, np.floating)):
        sec, nanosec = sec_to_sec_nanosec(float(stamp))
        return types.Time(sec=sec, nanosec=nanosec)
    return time_from_ns(types, stamp_to_ns(stamp))


def _header(msg):
    header = getattr(msg, "header", None)
    if header is None:
        raise TypeError(f"{type(msg).__name__} has no header")
    return header


def make_header(types: MessageTypes, stamp, frame_id: str):
    """std_msgs/Header; ``stamp`` is float seconds or a Time-like object."""
    return types.Header(stamp=make_time(types, stamp), frame_id=str(frame_id))


# --------------------------------------------------------------------------- validation

def check_covariance(cov, size: int = 6, name: str = "covariance", require_psd: bool = False,
                     rtol: float = 1e-6) -> np.ndarray:
    """Validate a covariance (flat ``size*size`` or square) and return it symmetrised.

    Always checks shape, finiteness and symmetry (relative tolerance ``rtol`` of the
    largest entry). With ``require_psd`` it also checks a non-negative diagonal and
    eigenvalues >= -rtol * scale: builders use it so we never publish an impossible
    covariance; readers do not, because other drivers put odd values in theirs.
    """
    cov = np.asarray(cov, dtype=float)
    if cov.size != size * size:
        raise ValueError(f"{name}: expected {size * size} values ({size}x{size}), got {cov.size}")
    cov = cov.reshape(size, size)
    scale = float(np.max(np.abs(cov)))  # NaN if any entry is NaN
    if not math.isfinite(scale):
        raise ValueError(f"{name}: contains NaN or inf")
    scale = max(scale, 1e-300)
    asym = float(np.max(np.abs(cov - cov.T)))
    if asym > rtol * scale + 1e-12:
        raise ValueError(f"{name}: not symmetric (max |C - C^T| = {asym:.3g})")
    cov = 0.5 * (cov + cov.T)
    if require_psd:
        diagonal = np.diag(cov)
        if diagonal.min() < 0:
            raise ValueError(f"{name}: negative variance on the diagonal {diagonal}")
        # smallest eigenvalue >= -tol  <=>  C + tol I is positive definite: one Cholesky
        # factorisation instead of an eigen-decomposition (this runs for every pose built)
        tol = rtol * scale + 1e-12
        try:
            np.linalg.cholesky(cov + tol * np.eye(size))
        except np.linalg.LinAlgError:
            min_eig = float(np.min(np.linalg.eigvalsh(cov)))
            raise ValueError(f"{name}: not positive semi-definite (smallest eigenvalue {min_eig:.3g})") from None
    return cov


def _finite_vector(values, name: str, n: int) -> np.ndarray:
    v = np.asarray(values, dtype=float).reshape(-1)
    if v.size != n:
        raise ValueError(f"{name}: expected {n} values, got {v.size}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name}: contains NaN or inf: {v}")
    return v


def _checked_quaternion(q_wxyz, name: str = "orientation") -> np.ndarray:
    """Unit (w, x, y, z), w >= 0; refuses non-finite, zero and far-from-unit quaternions.

    Scalar arithmetic: this runs for every pose read or built (several per fused output),
    where numpy's per-call overhead on four numbers was most of the cost.
    """
    q = np.asarray(q_wxyz, dtype=float).reshape(-1)
    if q.size != 4:
        raise ValueError(f"{name}: a quaternion has 4 components, got {q.size}")
    w, x, y, z = q.tolist()
    if not (math.isfinite(w) and math.isfinite(x) and math.isfinite(y) and math.isfinite(z)):
        raise ValueError(f"{name}: quaternion contains NaN or inf: {q}")
    norm = math.sqrt(w * w + x * x + y * y + z * z)
    if norm < 1e-12:
        raise ValueError(f"{name}: zero quaternion (is the message uninitialised?)")
    if abs(norm - 1.0) > QUATERNION_NORM_TOLERANCE:
        raise ValueError(f"{name}: quaternion norm {norm:.6g} is not 1 "
                         f"(tolerance {QUATERNION_NORM_TOLERANCE})")
    if w < 0.0:  # the hemisphere w >= 0 (q and -q are the same rotation)
        norm = -norm
    return np.array([w / norm, x / norm, y / norm, z / norm])


def extrinsic_from_ros(values, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A mount pose written the ROS way, [x, y, z, qx, qy, qz, qw] -> (t (3,), q_wxyz (4,)).

    The one parser of a camera / IMU extrinsic given by hand: the nodes' ``camera_extrinsic``
    and ``imu_extrinsic`` parameters and ``vizloc-replay --camera-extrinsic``. ``name`` says
    where the numbers came from, for the error. The quaternion is normalised and taken with
    w >= 0.

    Tolerance: the quaternion's norm must be within :data:`QUATERNION_NORM_TOLERANCE` (1e-2,
    tf2's TF_DENORMALIZED_QUATERNION rule) of 1, as for every quaternion read from a message.
    Why not the replay's former "any non-zero quaternion": a norm far from 1 is a typo or
    Euler angles, not rounding (a quaternion copied with 3 decimals is well within 1e-2), and
    a mount given by hand should be refused where the same transform on /tf_static would be;
    the parameter tests require a quaternion of norm 2 to be refused, and no test relies on
    the replay normalising one.
    """
    v = _finite_vector(values, name, 7)
    return v[:3].copy(), _checked_quaternion(ros_to_wxyz(v[3:7]), name)


# --------------------------------------------------------------------------- reading poses

def _vec3(obj) -> np.ndarray:
    return np.array([float(obj.x), float(obj.y), float(obj.z)])


def _quat_xyzw(obj) -> np.ndarray:
    return np.array([float(obj.x), float(obj.y), float(obj.z), float(obj.w)])


def _position_and_orientation(msg):
    """Walk ``.transform`` / ``.pose`` until a (translation, rotation) pair is found."""
    current = msg
    for _ in range(4):
        if hasattr(current, "transform"):
            current = current.transform
        if hasattr(current, "translation") and hasattr(current, "rotation"):
            return current.translation, current.rotation
        if hasattr(current, "position") and hasattr(current, "orientation"):
            return current.position, current.orientation
        if not hasattr(current, "pose"):
            break
        current = current.pose
    raise TypeError(f"{type(msg).__name__} carries no pose (expected Pose, PoseStamped, "
                    f"PoseWithCovariance[Stamped], Odometry, Transform[Stamped])")


def pose_from_msg(msg) -> tuple[np.ndarray, np.ndarray]:
    """Pose / PoseStamped / PoseWithCovariance[Stamped] / Odometry / Transform[Stamped]
    -> (t (3,), q_wxyz (4,)) with a unit quaternion, w >= 0.

    Raises ``ValueError`` on NaN/inf, a zero quaternion or one whose norm is not ~1.
    """
    position, orientation = _position_and_orientation(msg)
    kind = type(msg).__name__
    t = _finite_vector(_vec3(position), f"{kind} position", 3)
    q = _checked_quaternion(ros_to_wxyz(_quat_xyzw(orientation)), f"{kind} orientation")
    return t, q


def _covariance_holder(msg, leaf: str):
    current = msg
    for _ in range(3):
        if hasattr(current, "covariance") and hasattr(current, leaf):
            return current
        if not hasattr(current, leaf):
            break
        current = getattr(current, leaf)
    raise TypeError(f"{type(msg).__name__} has no {leaf} covariance")


def pose_covariance_from_msg(msg) -> np.ndarray:
    """PoseWithCovariance[Stamped] / Odometry -> (6, 6) ROS order (x, y, z, rx, ry, rz)."""
    holder = _covariance_holder(msg, "pose")
    return check_covariance(holder.covariance, name=f"{type(msg).__name__} pose covariance")


def pose_with_covariance_from_msg(msg):
    """-> (t (3,), q_wxyz (4,), cov (6, 6))."""
    t, q = pose_from_msg(msg)
    return t, q, pose_covariance_from_msg(msg)


def twist_from_msg(msg) -> tuple[np.ndarray, np.ndarray]:
    """Odometry / Twist[WithCovariance][Stamped] -> (linear (3,), angular (3,))."""
    current = msg
    for _ in range(3):
        if hasattr(current, "linear") and hasattr(current, "angular"):
            kind = type(msg).__name__
            return (_finite_vector(_vec3(current.linear), f"{kind} linear velocity", 3),
                    _finite_vector(_vec3(current.angular), f"{kind} angular velocity", 3))
        if not hasattr(current, "twist"):
            break
        current = current.twist
    raise TypeError(f"{type(msg).__name__} carries no twist")


def twist_covariance_from_msg(msg) -> np.ndarray:
    """Odometry / TwistWithCovariance[Stamped] -> (6, 6) ROS order (vx, vy, vz, wx, wy, wz)."""
    holder = _covariance_holder(msg, "twist")
    return check_covariance(holder.covariance, name=f"{type(msg).__name__} twist covariance")


@dataclass(frozen=True)
class ImuReading:
    """One sensor_msgs/Imu in numpy form.

    Covariances follow sensor_msgs/Imu: ``None`` means "not known" (all zeros in the
    message) or "quantity not provided" (element 0 is -1, REP-145); in the latter case
    for the orientation, ``orientation_wxyz`` is ``None`` too.
    """

    stamp: float
    frame_id: str
    gyro: np.ndarray
    accel: np.ndarray
    gyro_cov: np.ndarray | None
    accel_cov: np.ndarray | None
    orientation_wxyz: np.ndarray | None
    orientation_cov: np.ndarray | None


def _imu_covariance(values, name: str) -> np.ndarray | None:
    flat = np.asarray(values, dtype=float).reshape(-1)
    if flat.size and flat[0] == -1.0:
        return None
    if flat.size == 9 and np.all(flat == 0.0):
        return None
    return check_covariance(flat, size=3, name=name)


def imu_from_msg(msg) -> ImuReading:
    """sensor_msgs/Imu -> :class:`ImuReading` (gyro rad/s, specific force m/s^2, IMU frame)."""
    gyro = _finite_vector(_vec3(msg.angular_velocity), "Imu angular_velocity", 3)
    accel = _finite_vector(_vec3(msg.linear_acceleration), "Imu linear_acceleration", 3)
    orientation_cov = _imu_covariance(msg.orientation_covariance, "Imu orientation_covariance")
    orientation_provided = float(np.asarray(msg.orientation_covariance, dtype=float).reshape(-1)[0]) != -1.0
    orientation = (_checked_quaternion(ros_to_wxyz(_quat_xyzw(msg.orientation)), "Imu orientation")
                   if orientation_provided else None)
    return ImuReading(
        stamp=header_stamp_sec(msg), frame_id=str(msg.header.frame_id), gyro=gyro, accel=accel,
        gyro_cov=_imu_covariance(msg.angular_velocity_covariance, "Imu angular_velocity_covariance"),
        accel_cov=_imu_covariance(msg.linear_acceleration_covariance, "Imu linear_acceleration_covariance"),
        orientation_wxyz=orientation, orientation_cov=orientation_cov if orientation_provided else None,
    )


def imu_motion_from_msg(msg) -> tuple[float, np.ndarray, np.ndarray]:
    """(stamp in s, gyro rad/s, specific force m/s^2) of a sensor_msgs/Imu, checked finite.

    What a preintegrating fusion uses of the message, without the covariance and
    orientation checks of :func:`imu_from_msg`: a fraction of its cost at IMU rates of kHz.
    """
    gyro = _finite_vector(_vec3(msg.angular_velocity), "Imu angular_velocity", 3)
    accel = _finite_vector(_vec3(msg.linear_acceleration), "Imu linear_acceleration", 3)
    return header_stamp_sec(msg), gyro, accel


# --------------------------------------------------------------------------- reading images

#: the most pixels (width x height) an image may have by default: above any camera a robot
#: carries (an 8K frame is 33 MP), far below what a corrupt header or a decompression bomb
#: (a 1 MB PNG of 20000x20000 is 400 MP, 1.2 GB decoded) would make the node allocate.
#: The regressor node's ``max_image_pixels`` parameter is defined with this default.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000


class ImageTooLarge(ValueError):
    """An image message whose header announces more pixels than allowed: refused before
    decoding, so its memory is never allocated (a separate class so that the regressor
    counts it apart from malformed images)."""


def _check_pixel_count(width: int, height: int, max_pixels: int, what: str) -> None:
    if width * height > max_pixels:
        raise ImageTooLarge(f"{what} of {width}x{height} = {width * height} pixels exceeds "
                            f"max_image_pixels = {max_pixels}; dropped before decoding")


# encoding -> (channels, bytes per channel, channel order); order None = not an RGB image
_COLOR_ENCODINGS = {
    "rgb8": (3, 1, (0, 1, 2)),
    "bgr8": (3, 1, (2, 1, 0)),
    "rgba8": (4, 1, (0, 1, 2)),
    "bgra8": (4, 1, (2, 1, 0)),
    "mono8": (1, 1, None),
    "8UC1": (1, 1, None),
    # mono16 is a 16-bit intensity image: scaled to 8 bits as cv_bridge does (see _to_8_bit).
    "mono16": (1, 2, None),
}
# Raw colour-filter-array images, as camera drivers publish them by default: encoding ->
# (bytes per pixel, OpenCV demosaicing code name). OpenCV names a pattern by the second
# row's second and third pixels, so ROS's rggb is OpenCV's BG (the mapping cv_bridge uses).
_BAYER_ENCODINGS = {f"bayer_{pattern}{bits}": (bits // 8, code)
                    for pattern, code in (("rggb", "BayerBG"), ("bggr", "BayerRG"),
                                          ("gbrg", "BayerGR"), ("grbg", "BayerGB"))
                    for bits in (8, 16)}
# Depth encodings (REP-118): 16UC1 in millimetres, 32FC1 in metres.
_DEPTH_ENCODINGS = {"16UC1": (1, 2), "mono16": (1, 2), "32FC1": (1, 4)}
SUPPORTED_IMAGE_ENCODINGS = tuple(_COLOR_ENCODINGS) + tuple(_BAYER_ENCODINGS)
SUPPORTED_DEPTH_ENCODINGS = tuple(_DEPTH_ENCODINGS)


def _bytes_of(data) -> np.ndarray:
    """uint8 view of a message's ``data`` (numpy array, array.array, bytes or list)."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except TypeError:
        return np.asarray(data, dtype=np.uint8).reshape(-1)


def _image_rows(msg, channels: int, bytes_per_channel: int, max_pixels: int) -> np.ndarray:
    """Validate the geometry of an Image and return its pixel bytes as (H, W*bpp).

    The header is checked before the data is touched: a width x height above
    ``max_pixels`` is :class:`ImageTooLarge`, and a step or size that disagrees with the
    data is a ``ValueError`` (Python integers: an absurd width x step cannot overflow).
    """
    encoding = str(msg.encoding)
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise ValueError(f"empty image: height={height}, width={width} (encoding {encoding!r})")
    _check_pixel_count(width, height, max_pixels, f"image ({encoding})")
    row_bytes = width * channels * bytes_per_channel
    if step < row_bytes:
        raise ValueError(f"wrong step: {step} bytes per row is less than width {width} x "
                         f"{channels * bytes_per_channel} bytes per pixel = {row_bytes} "
                         f"for encoding {encoding!r}")
    data = _bytes_of(msg.data)
    expected = step * height
    if data.size < expected:
        raise ValueError(f"truncated image data: {data.size} bytes, expected step x height = "
                         f"{step} x {height} = {expected} (encoding {encoding!r})")
    if data.size > expected:
        raise ValueError(f"image data has {data.size} bytes, expected step x height = "
                         f"{step} x {height} = {expected} (encoding {encoding!r})")
    return data.reshape(height, step)[:, :row_bytes]


def _unknown_encoding(encoding: str, supported: Iterable[str], hint: str = "") -> ValueError:
    return ValueError(f"unsupported image encoding {encoding!r}; supported: "
                      f"{', '.join(supported)}{hint}")


def image_to_numpy(msg, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """sensor_msgs/Image -> uint8 RGB (H, W, 3) or mono (H, W).

    rgb8/bgr8/rgba8/bgra8 come back as RGB (channels reordered, alpha dropped); mono8 /
    8UC1 as (H, W); mono16 as (H, W) uint8 scaled as cv_bridge scales it; the
    bayer_* encodings (8 and 16 bit) demosaiced to RGB. Depth
    encodings (16UC1, 32FC1) are refused here: they are distances, not appearance; use
    :func:`depth_image_to_numpy`. Raises ``ValueError`` for an unknown encoding, an empty
    image, a step smaller than a row, or data whose length is not step x height;
    :class:`ImageTooLarge` for more than ``max_pixels`` pixels.
    """
    encoding = str(msg.encoding)
    if encoding in _BAYER_ENCODINGS:
        return _demosaic(msg, *_BAYER_ENCODINGS[encoding], max_pixels)
    if encoding not in _COLOR_ENCODINGS:
        hint = ("; depth encodings go through depth_image_to_numpy()"
                if encoding in _DEPTH_ENCODINGS else "")
        raise _unknown_encoding(encoding, SUPPORTED_IMAGE_ENCODINGS, hint)
    channels, nbytes, order = _COLOR_ENCODINGS[encoding]
    rows = _image_rows(msg, channels, nbytes, max_pixels)
    height, width = int(msg.height), int(msg.width)
    if nbytes == 2:  # mono16
        big = bool(msg.is_bigendian)
        return _to_8_bit(rows.copy().view(">u2" if big else "<u2").reshape(height, width))
    pixels = rows.reshape(height, width, channels)
    if order is None:
        return pixels[:, :, 0].copy()
    if channels == 3 and order == (0, 1, 2):
        return pixels.copy()  # a plain memcpy; fancy indexing is ~20x slower on big frames
    # channel slices instead of fancy indexing: a strided copy, several times faster
    return np.ascontiguousarray(pixels[:, :, 2::-1] if order == (2, 1, 0) else pixels[:, :, :3])


def _to_8_bit(values: np.ndarray) -> np.ndarray:
    """16-bit intensities -> uint8 as cv_bridge converts them (``convertTo`` with scale
    255 / 65535, rounded to nearest): ``round(v / 257)``, in integers. The same numbers
    as cv_bridge, so a node or a replay sees what a cv_bridge-based tool shows
    (test/test_cv_bridge_parity.py)."""
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _demosaic(msg, nbytes: int, code: str, max_pixels: int) -> np.ndarray:
    """Bayer image -> RGB (H, W, 3) uint8 with OpenCV's bilinear demosaicing; 16-bit
    mosaics are demosaiced at 16 bit, then scaled like mono16 (cv_bridge's bayer -> rgb16
    -> rgb8)."""
    import cv2  # only for raw camera images: the nodes need not load it otherwise

    rows = _image_rows(msg, 1, nbytes, max_pixels)
    height, width = int(msg.height), int(msg.width)
    if height < 2 or width < 2:
        raise ValueError(f"a {msg.encoding} image needs at least 2x2 pixels, got {width}x{height}")
    if nbytes == 2:
        mosaic = rows.copy().view(">u2" if bool(msg.is_bigendian) else "<u2").reshape(height, width)
        return _to_8_bit(cv2.cvtColor(mosaic.astype(np.uint16), getattr(cv2, f"COLOR_{code}2RGB")))
    mosaic = np.ascontiguousarray(rows.reshape(height, width))
    return cv2.cvtColor(mosaic, getattr(cv2, f"COLOR_{code}2RGB"))


def image_to_rgb(msg, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Image or CompressedImage -> uint8 RGB (H, W, 3); mono is replicated to 3 channels.

    :class:`ImageTooLarge` for more than ``max_pixels`` pixels, ``ValueError`` for any
    other malformed message."""
    if hasattr(msg, "format") and not hasattr(msg, "encoding"):
        array_ = compressed_image_to_numpy(msg, max_pixels)
    else:
        array_ = image_to_numpy(msg, max_pixels)
    if array_.ndim == 2:
        array_ = np.repeat(array_[:, :, None], 3, axis=2)
    return array_


def depth_image_to_numpy(msg, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Depth Image -> float32 metres (H, W); invalid pixels are NaN.

    REP-118: 16UC1 (and mono16 used as depth) hold millimetres with 0 = invalid;
    32FC1 holds metres with NaN/inf/0 = invalid.
    """
    encoding = str(msg.encoding)
    if encoding not in _DEPTH_ENCODINGS:
        raise _unknown_encoding(encoding, SUPPORTED_DEPTH_ENCODINGS)
    channels, nbytes = _DEPTH_ENCODINGS[encoding]
    rows = _image_rows(msg, channels, nbytes, max_pixels)
    height, width = int(msg.height), int(msg.width)
    big = bool(msg.is_bigendian)
    if nbytes == 2:
        mm = rows.copy().view(">u2" if big else "<u2").reshape(height, width)
        depth = mm.astype(np.float32) / 1000.0
        depth[mm == 0] = np.nan
        return depth
    metres = rows.copy().view(">f4" if big else "<f4").reshape(height, width).astype(np.float32)
    metres[~np.isfinite(metres) | (metres <= 0)] = np.nan
    return metres


def compressed_image_to_numpy(msg, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg/png) -> uint8 RGB (H, W, 3) or mono (H, W).

    Decoded with Pillow. compressedDepth (image_transport's depth plugin) is refused.
    Raises ``ValueError`` for empty or corrupt data, :class:`ImageTooLarge` for more than
    ``max_pixels`` pixels: Pillow opens lazily, so the size in the file's header is
    checked before a pixel is decoded (a 1 MB PNG can announce 400 MP). Pillow's own
    decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, twice it is an error) is
    also reported as :class:`ImageTooLarge`; Pillow warns once between the two.
    """
    from PIL import Image as PILImage, UnidentifiedImageError

    fmt = str(getattr(msg, "format", ""))
    if "compresseddepth" in fmt.lower():
        raise ValueError(f"CompressedImage format {fmt!r}: compressedDepth is not supported")
    data = _bytes_of(msg.data)
    if data.size == 0:
        raise ValueError(f"empty CompressedImage (format {fmt!r})")
    try:
        with PILImage.open(io.BytesIO(data.tobytes())) as pil:
            _check_pixel_count(*pil.size, max_pixels, f"CompressedImage ({pil.format})")
            pil.load()
            if pil.format not in ("JPEG", "PNG"):
                raise ValueError(f"CompressedImage holds {pil.format}, expected jpeg or png")
            if pil.mode in ("L", "I;16", "I;16B", "I"):
                if pil.mode != "L":
                    raise ValueError(f"CompressedImage: {pil.mode} (16-bit) images are not supported")
                return np.asarray(pil, dtype=np.uint8).copy()
            return np.asarray(pil.convert("RGB"), dtype=np.uint8).copy()
    except PILImage.DecompressionBombError as exc:
        raise ImageTooLarge(f"CompressedImage (format {fmt!r}, {data.size} bytes) refused by Pillow: "
                            f"{exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"corrupt CompressedImage (format {fmt!r}, {data.size} bytes): {exc}") from None


# --------------------------------------------------------------------------- writing

def make_point(types: MessageTypes, t):
    x, y, z = _finite_vector(t, "position", 3)
    return types.Point(x=float(x), y=float(y), z=float(z))


def make_vector3(types: MessageTypes, v, name: str = "vector"):
    x, y, z = _finite_vector(v, name, 3)
    return types.Vector3(x=float(x), y=float(y), z=float(z))


def make_quaternion(types: MessageTypes, q_wxyz):
    """geometry_msgs/Quaternion (x, y, z, w order in the message) from (w, x, y, z)."""
    x, y, z, w = wxyz_to_ros(_checked_quaternion(q_wxyz))
    return types.Quaternion(x=float(x), y=float(y), z=float(z), w=float(w))


def make_pose(types: MessageTypes, t, q_wxyz):
    return types.Pose(position=make_point(types, t), orientation=make_quaternion(types, q_wxyz))


def make_pose_stamped(types: MessageTypes, stamp, frame_id: str, t, q_wxyz):
    return types.PoseStamped(header=make_header(types, stamp, frame_id), pose=make_pose(types, t, q_wxyz))


def _cov_field(cov, name: str) -> np.ndarray:
    return check_covariance(cov, name=name, require_psd=True).reshape(36).astype(np.float64)


def make_pose_with_covariance_stamped(types: MessageTypes, stamp, frame_id: str, t, q_wxyz, cov_ros):
    """PoseWithCovarianceStamped; ``cov_ros`` is 6x6 in ROS order (x, y, z, rx, ry, rz)."""
    return types.PoseWithCovarianceStamped(
        header=make_header(types, stamp, frame_id),
        pose=types.PoseWithCovariance(pose=make_pose(types, t, q_wxyz),
                                      covariance=_cov_field(cov_ros, "pose covariance")))


#: Twist covariance used when an Odometry carries no velocity: "unknown" in practice.
UNKNOWN_TWIST_VARIANCE = 1e6


def make_odometry(types: MessageTypes, stamp, frame_id: str, child_frame_id: str, t, q_wxyz,
                  pose_cov, linear=None, angular=None, twist_cov=None):
    """nav_msgs/Odometry: pose of ``child_frame_id`` in ``frame_id``; twist in the child frame.

    Without a twist, the velocities are zero with variance :data:`UNKNOWN_TWIST_VARIANCE`.
    """
    if linear is None and angular is None and twist_cov is None:
        twist_cov = np.eye(6) * UNKNOWN_TWIST_VARIANCE
    linear = np.zeros(3) if linear is None else linear
    angular = np.zeros(3) if angular is None else angular
    twist_cov = np.eye(6) * UNKNOWN_TWIST_VARIANCE if twist_cov is None else twist_cov
    return types.Odometry(
        header=make_header(types, stamp, frame_id), child_frame_id=str(child_frame_id),
        pose=types.PoseWithCovariance(pose=make_pose(types, t, q_wxyz),
                                      covariance=_cov_field(pose_cov, "odometry pose covariance")),
        twist=types.TwistWithCovariance(
            twist=types.Twist(linear=make_vector3(types, linear, "linear velocity"),
                              angular=make_vector3(types, angular, "angular velocity")),
            covariance=_cov_field(twist_cov, "odometry twist covariance")))


def make_transform_stamped(types: MessageTypes, stamp, frame_id: str, child_frame_id: str, t, q_wxyz):
    """TransformStamped: pose of ``child_frame_id`` in ``frame_id`` (tf2's parent -> child)."""
    x, y, z, w = wxyz_to_ros(_checked_quaternion(q_wxyz))
    return types.TransformStamped(
        header=make_header(types, stamp, frame_id), child_frame_id=str(child_frame_id),
        transform=types.Transform(translation=make_vector3(types, t, "translation"),
                                  rotation=types.Quaternion(x=float(x), y=float(y), z=float(z), w=float(w))))


def make_tf_message(types: MessageTypes, transforms: Sequence):
    """tf2_msgs/TFMessage from TransformStamped messages (/tf and /tf_static)."""
    return types.TFMessage(transforms=list(transforms))


def make_path(types: MessageTypes, stamp, frame_id: str, t, q_wxyz, stamps=None):
    """nav_msgs/Path from (N, 3) translations and (N, 4) quaternions; each pose gets its
    own stamp from ``stamps`` (float seconds or Time-like), else the path's stamp.

    The poses are validated once as arrays (finite, unit quaternions), not one by one: a
    path is re-published with thousands of poses, and per-pose checks made that
    quadratic cost dominate long replays.
    """
    t = np.asarray(t, dtype=float).reshape(-1, 3)
    q_wxyz = np.asarray(q_wxyz, dtype=float).reshape(-1, 4)
    if len(t) != len(q_wxyz) or (stamps is not None and len(stamps) != len(t)):
        raise ValueError("make_path: translations, quaternions and stamps differ in length")
    if not np.all(np.isfinite(t)):
        raise ValueError("make_path: a position contains NaN or inf")
    if len(q_wxyz):
        if not np.all(np.isfinite(q_wxyz)):
            raise ValueError("make_path: a quaternion contains NaN or inf")
        norms = np.linalg.norm(q_wxyz, axis=1)
        if norms.min() < 1e-12 or np.abs(norms - 1.0).max() > QUATERNION_NORM_TOLERANCE:
            raise ValueError(f"make_path: quaternion norms must be 1 (tolerance {QUATERNION_NORM_TOLERANCE}), "
                             f"got {norms.min():.6g}..{norms.max():.6g}")
        q_wxyz = quat_hemisphere(q_wxyz / norms[:, None])
    frame_id = str(frame_id)
    shared = make_time(types, stamp) if stamps is None else None
    poses = []
    for i, ((x, y, z), (qw, qx, qy, qz)) in enumerate(zip(t.tolist(), q_wxyz.tolist())):
        time = shared if shared is not None else make_time(types, stamps[i])
        poses.append(types.PoseStamped(
            header=types.Header(stamp=time, frame_id=frame_id),
            pose=types.Pose(position=types.Point(x=x, y=y, z=z),
                            orientation=types.Quaternion(x=qx, y=qy, z=qz, w=qw))))
    return types.Path(header=make_header(types, stamp, frame_id), poses=poses)


_ENCODING_FOR_SHAPE = {(3, np.dtype(np.uint8)): "rgb8", (4, np.dtype(np.uint8)): "rgba8",
                       (1, np.dtype(np.uint8)): "mono8", (1, np.dtype(np.uint16)): "16UC1",
                       (1, np.dtype(np.float32)): "32FC1"}
_LAYOUT_FOR_ENCODING = {"rgb8": (3, np.uint8), "bgr8": (3, np.uint8), "rgba8": (4, np.uint8),
                        "bgra8": (4, np.uint8), "mono8": (1, np.uint8), "8UC1": (1, np.uint8),
                        "mono16": (1, np.uint16), "16UC1": (1, np.uint16), "32FC1": (1, np.float32)}


def make_image(types: MessageTypes, stamp, frame_id: str, image, encoding: str | None = None):
    """sensor_msgs/Image from an array already laid out in ``encoding``.

    Default encoding from the array: (H, W, 3) uint8 -> rgb8, (H, W, 4) uint8 -> rgba8,
    (H, W) uint8 -> mono8, uint16 -> 16UC1 (mm), float32 -> 32FC1 (m). Little endian.
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3) or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"make_image: expected a non-empty (H, W) or (H, W, C) array, got {image.shape}")
    channels = 1 if image.ndim == 2 else image.shape[2]
    if encoding is None:
        encoding = _ENCODING_FOR_SHAPE.get((channels, image.dtype))
        if encoding is None:
            raise ValueError(f"make_image: no encoding for {channels} channels of {image.dtype}")
    if encoding not in _LAYOUT_FOR_ENCODING:
        raise _unknown_encoding(encoding, _LAYOUT_FOR_ENCODING)
    want_channels, want_dtype = _LAYOUT_FOR_ENCODING[encoding]
    if channels != want_channels or image.dtype != np.dtype(want_dtype):
        raise ValueError(f"make_image: encoding {encoding!r} needs {want_channels} channel(s) of "
                         f"{np.dtype(want_dtype)}, got {channels} of {image.dtype}")
    little = np.ascontiguousarray(image.astype(np.dtype(want_dtype).newbyteorder("<"), copy=False))
    height, width = image.shape[:2]
    return types.Image(
        header=make_header(types, stamp, frame_id), height=int(height), width=int(width),
        encoding=encoding, is_bigendian=0, step=int(width * channels * little.itemsize),
        data=types.byte_array(little.view(np.uint8).reshape(-1)))


def make_compressed_image(types: MessageTypes, stamp, frame_id: str, rgb, fmt: str = "jpeg",
                          quality: int = 90):
    """sensor_msgs/CompressedImage (jpeg or png) from uint8 RGB (H, W, 3) or mono (H, W)."""
    from PIL import Image as PILImage

    fmt = fmt.lower()
    if fmt not in ("jpeg", "png"):
        raise ValueError(f"make_compressed_image: format must be jpeg or png, not {fmt!r}")
    buffer = io.BytesIO()
    pil = PILImage.fromarray(np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8)))
    pil.save(buffer, format=fmt.upper(), **({"quality": int(quality)} if fmt == "jpeg" else {}))
    return types.CompressedImage(header=make_header(types, stamp, frame_id), format=fmt,
                                 data=types.byte_array(buffer.getvalue()))


def make_camera_info(types: MessageTypes, stamp, frame_id: str, width: int, height: int,
                     fx: float, fy: float, cx: float, cy: float, distortion=None):
    """sensor_msgs/CameraInfo of a pinhole camera (plumb_bob, zero distortion by default)."""
    d = np.zeros(5) if distortion is None else _finite_vector(distortion, "distortion", len(distortion))
    k = np.array([fx, 0.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0], dtype=np.float64)
    p = np.array([fx, 0.0, cx, 0.0, 0.0, fy, cy, 0.0, 0.0, 0.0, 1.0, 0.0], dtype=np.float64)
    if not np.all(np.isfinite(k)) or fx <= 0 or fy <= 0:
        raise ValueError(f"make_camera_info: bad intrinsics fx={fx} fy={fy} cx={cx} cy={cy}")
    return types.CameraInfo(
        header=make_header(types, stamp, frame_id), height=int(height), width=int(width),
        distortion_model="plumb_bob", d=types.float_sequence(d), k=k,
        r=np.eye(3, dtype=np.float64).reshape(9), p=p, binning_x=0, binning_y=0,
        roi=types.RegionOfInterest(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False))


def camera_info_to_intrinsics(msg) -> dict:
    """CameraInfo -> dict(width, height, fx, fy, cx, cy) from K (``k`` in ROS 2, ``K`` in
    ROS 1 bags)."""
    k = np.asarray(msg.k if hasattr(msg, "k") else msg.K, dtype=float).reshape(-1)
    if k.size != 9 or not np.all(np.isfinite(k)) or k[0] <= 0 or k[4] <= 0:
        raise ValueError(f"CameraInfo has an invalid K: {k}")
    return dict(width=int(msg.width), height=int(msg.height), fx=float(k[0]), fy=float(k[4]),
                cx=float(k[2]), cy=float(k[5]))


def _cov3_field(cov, name: str) -> np.ndarray:
    cov = np.asarray(cov, dtype=float)
    if cov.size == 3:
        cov = np.diag(cov.reshape(3))
    return check_covariance(cov, size=3, name=name, require_psd=True).reshape(9).astype(np.float64)


def make_imu(types: MessageTypes, stamp, frame_id: str, gyro, accel, gyro_cov, accel_cov,
             orientation_wxyz=None, orientation_cov=None):
    """sensor_msgs/Imu. Covariances are (3, 3) or 3 variances. Without an orientation the
    message says so the REP-145 way: identity quaternion and orientation_covariance[0] = -1."""
    if orientation_wxyz is None:
        orientation = types.Quaternion(x=0.0, y=0.0, z=0.0, w=1.0)
        orientation_cov_field = np.zeros(9)
        orientation_cov_field[0] = -1.0
    else:
        orientation = make_quaternion(types, orientation_wxyz)
        if orientation_cov is None:
            raise ValueError("make_imu: an orientation needs its covariance")
        orientation_cov_field = _cov3_field(orientation_cov, "orientation covariance")
    return types.Imu(
        header=make_header(types, stamp, frame_id), orientation=orientation,
        orientation_covariance=np.asarray(orientation_cov_field, dtype=np.float64),
        angular_velocity=make_vector3(types, gyro, "angular velocity"),
        angular_velocity_covariance=_cov3_field(gyro_cov, "angular velocity covariance"),
        linear_acceleration=make_vector3(types, accel, "linear acceleration"),
        linear_acceleration_covariance=_cov3_field(accel_cov, "linear acceleration covariance"))

