"""Preprocessing is shared by training and inference: check its arithmetic and its refusals."""
import numpy as np
import pytest
import torch

from vizloc_ros.localize.preprocess import InputSpec, preprocess, resized_shape, to_rgb_array


def test_resized_shape_keeps_aspect_and_short_side():
    assert resized_shape(240, 320, 120) == (120, 160)
    assert resized_shape(480, 240, 100) == (200, 100)


def test_preprocess_normalises_and_crops_centre():
    spec = InputSpec(resize=4, crop=(2, 2), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    img = np.zeros((4, 6, 3), dtype=np.uint8)
    img[1:3, 2:4] = 255  # the centre 2x2 block is white
    out = preprocess(torch.from_numpy(img[None]), spec)
    assert out.shape == (1, 3, 2, 2)
    assert torch.allclose(out, torch.ones_like(out))  # (1 - 0.5) / 0.5


def test_mono_is_replicated_and_bgr_is_swapped():
    mono = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = to_rgb_array(mono, "mono8")
    assert rgb.shape == (3, 4, 3) and np.all(rgb[..., 0] == mono) and np.all(rgb[..., 2] == mono)
    bgr = np.zeros((2, 2, 3), dtype=np.uint8)
    bgr[..., 0] = 7
    assert np.all(to_rgb_array(bgr, "bgr8")[..., 2] == 7)


@pytest.mark.parametrize("image, encoding, message", [
    (np.zeros((0, 4, 3), np.uint8), "rgb8", "empty"),
    (np.zeros((4, 4, 3), np.float32), "rgb8", "dtype"),
    (np.zeros((4, 4, 4), np.uint8), "rgb8", "shape"),
    (np.zeros((4, 4, 2), np.uint8), "rgb8", "shape"),
    (np.zeros((4, 4, 3), np.uint8), "yuv422", "encoding"),
    (np.zeros((4, 4), np.uint8), "rgb8", "single-channel"),
    (np.full((4, 4, 3), np.nan), "rgb8", "dtype"),
    ([[1, 2]], "rgb8", "numpy"),
])
def test_bad_images_raise_clear_value_errors(image, encoding, message):
    with pytest.raises(ValueError, match=message):
        to_rgb_array(image, encoding)


def test_image_smaller_than_crop_is_refused():
    with pytest.raises(ValueError, match="smaller than"):
        to_rgb_array(np.zeros((10, 10, 3), np.uint8), "rgb8", min_size=(224, 224))


def test_malformed_input_block_is_a_value_error():
    with pytest.raises(ValueError):
        InputSpec.from_meta({"resize": "big"})
    assert InputSpec.from_meta({"crop": 64}).crop == (64, 64)
