"""The nodes' image conversion gives the arrays cv_bridge gives, for every supported encoding.

Why the nodes do not call cv_bridge (docs/ROS.md, "Images"): ``vizloc-replay`` and the
training read the same messages without ROS, so one ROS-free conversion
(:mod:`vizloc_ros.ros_io.messages`) serves the node and the replay. This test proves that
single path agrees with cv_bridge, pixel for pixel: rgb8, bgr8, rgba8, bgra8, mono8,
mono16, the four Bayer patterns at 8 and 16 bit, big-endian data, rows padded beyond the
width, and jpeg / png CompressedImage.

What cv_bridge is asked for is what the network gets from ours: RGB (alpha dropped) for
colour and Bayer, 8-bit mono for mono8 / mono16. A 16-bit Bayer image goes through
cv_bridge's own 16-bit chain (``rgb16``, then ``rgb16 -> rgb8``), because its direct
``bayer_*16 -> rgb8`` demosaics without converting the depth (16-bit values labelled rgb8).

Runs where cv_bridge is importable (a sourced ROS 2), like the rclpy tests. Skipped with
a mark, not ``pytest.importorskip`` at import: with ROS sourced, launch_testing's pytest
plugin imports every test module itself while collecting, and under pytest 8 a skip
raised there ends the collection of the whole ``test/`` folder (the suite would run
nothing and report "1 skipped").
"""
from __future__ import annotations

import sys

import numpy as np
import pytest

from vizloc_ros.ros_io import messages as m

try:
    import cv_bridge
    from sensor_msgs import msg as sensor_msgs
    MISSING = None
except ImportError as exc:  # no ROS 2 here
    MISSING = f"{exc.name or exc} is not importable"

pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"needs cv_bridge: {MISSING}")
BRIDGE = cv_bridge.CvBridge() if MISSING is None else None
HEIGHT, WIDTH = 8, 10
BAYER_PATTERNS = ("rggb", "bggr", "gbrg", "grbg")
#: cv_bridge's Python side byte-swaps big-endian data with ndarray.newbyteorder(), which
#: numpy 2 removed: there it is given the little-endian twin of the same pixel values
BRIDGE_READS_BIG_ENDIAN = hasattr(np.ndarray, "newbyteorder")


def _pixels(encoding: str, seed: int) -> np.ndarray:
    """Random pixels over the encoding's whole range (a fixed seed per case)."""
    rng = np.random.default_rng(seed)
    channels = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4}.get(encoding, 1)
    dtype = np.uint16 if encoding.endswith("16") else np.uint8
    shape = (HEIGHT, WIDTH, channels) if channels > 1 else (HEIGHT, WIDTH)
    return rng.integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)


def _image(encoding: str, pixels: np.ndarray, padding_pixels: int = 0, big: bool = False):
    """An rclpy sensor_msgs/Image holding ``pixels``, each row padded by whole pixels of
    filler (cv_bridge's Python side reads a step that is a multiple of the pixel size)."""
    height, width = pixels.shape[:2]
    rows = pixels.astype(pixels.dtype.newbyteorder(">" if big else "<")).reshape(height, -1)
    row_bytes = rows.view(np.uint8).reshape(height, -1)
    pixel_bytes = row_bytes.shape[1] // width
    filler = np.full((height, padding_pixels * pixel_bytes), 0xA5, np.uint8)
    data = np.concatenate([row_bytes, filler], axis=1)
    return sensor_msgs.Image(height=height, width=width, encoding=encoding, is_bigendian=int(big),
                             step=data.shape[1], data=data.tobytes())


def _bridge(encoding: str, pixels: np.ndarray, padding_pixels: int, big: bool) -> np.ndarray:
    """What cv_bridge makes of the image, in the form the nodes' conversion returns."""
    if big and not BRIDGE_READS_BIG_ENDIAN and sys.byteorder == "little":
        big = False  # the same pixel values, which cv_bridge reads on numpy 2 too
    msg = _image(encoding, pixels, padding_pixels, big)
    if encoding.startswith("bayer_") and encoding.endswith("16"):
        # cvtColor2 is the conversion imgmsg_to_cv2 runs (cv2_to_imgmsg would need the cv2
        # module's type numbers to match cv_bridge's OpenCV, which a pip OpenCV 5 does not)
        from cv_bridge.boost.cv_bridge_boost import cvtColor2

        return cvtColor2(BRIDGE.imgmsg_to_cv2(msg, "rgb16"), "rgb16", "rgb8")
    if encoding in ("mono8", "mono16"):
        return BRIDGE.imgmsg_to_cv2(msg, "mono8")
    return BRIDGE.imgmsg_to_cv2(msg, "rgb8")


CASES = [(encoding, big) for encoding in ("rgb8", "bgr8", "rgba8", "bgra8", "mono8") for big in (False,)]
CASES += [("mono16", False), ("mono16", True)]
CASES += [(f"bayer_{pattern}8", False) for pattern in BAYER_PATTERNS]
CASES += [(f"bayer_{pattern}16", big) for pattern in BAYER_PATTERNS for big in (False, True)]


@pytest.mark.parametrize("padding_pixels", [0, 2])
@pytest.mark.parametrize("encoding, big", CASES)
def test_raw_images_convert_like_cv_bridge(encoding, big, padding_pixels):
    pixels = _pixels(encoding, seed=sum(map(ord, encoding)) + big)
    ours = m.image_to_numpy(_image(encoding, pixels, padding_pixels, big))
    theirs = _bridge(encoding, pixels, padding_pixels, big)
    assert ours.dtype == theirs.dtype == np.uint8
    np.testing.assert_array_equal(ours, theirs)


def _compressed(fmt: str, bgr: np.ndarray):
    import cv2

    ok, encoded = cv2.imencode(f".{fmt}", bgr)  # what image_transport's compressed plugin sends
    assert ok
    return sensor_msgs.CompressedImage(format=f"bgr8; {fmt} compressed bgr8" if bgr.ndim == 3 else fmt,
                                       data=encoded.tobytes())


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_compressed_colour_images_decode_like_cv_bridge(fmt):
    rows, cols = np.mgrid[0:48, 0:64]
    # smooth gradients and noise: what a camera sends, and enough detail to stress the codec
    noise = np.random.default_rng(7).integers(0, 40, (48, 64, 3))
    bgr = (np.stack([3 * rows, 4 * cols, 2 * (rows + cols)], axis=2) + noise).clip(0, 255).astype(np.uint8)
    msg = _compressed(fmt, bgr)
    ours = m.image_to_rgb(msg)
    theirs = BRIDGE.compressed_imgmsg_to_cv2(msg, "rgb8")
    assert ours.shape == theirs.shape == (48, 64, 3)
    np.testing.assert_array_equal(ours, theirs)


def test_a_compressed_grey_png_decodes_like_cv_bridge():
    grey = np.random.default_rng(3).integers(0, 256, (12, 20), dtype=np.uint8)
    msg = _compressed("png", grey)
    np.testing.assert_array_equal(m.compressed_image_to_numpy(msg), BRIDGE.compressed_imgmsg_to_cv2(msg))
