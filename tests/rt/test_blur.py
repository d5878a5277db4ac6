"""The blur is Pillow's GaussianBlur bit for bit (the numpy twin; the torch twin: tests/export/test_torch_twins.py)."""
import numpy as np
import pytest
from PIL import Image, ImageFilter

from zeropur_rt.blur import blur_uint8, box_blur_weights, quantize


def _pillow(img_hwc: np.ndarray, sigma: float) -> np.ndarray:
    return np.asarray(Image.fromarray(img_hwc).filter(ImageFilter.GaussianBlur(sigma)))


def test_sigma_1_8_weights_match_pillow_constants():
    w = box_blur_weights(1.8)
    assert (w.radius, w.ww, w.fw) == (1, 4898947, 1040187)
    assert abs(w.box_radius - 1.2123288) < 1e-6


@pytest.mark.parametrize("size,count", [((32, 32), 150), ((224, 224), 60)])
def test_blur_bit_exact_vs_pillow_random_images(size, count):
    rng = np.random.default_rng(size[0])
    imgs = rng.integers(0, 256, (count, *size, 3), dtype=np.uint8)
    ours = blur_uint8(imgs.transpose(0, 3, 1, 2), 1.8).transpose(0, 2, 3, 1)
    ref = np.stack([_pillow(im, 1.8) for im in imgs])
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("sigma", [0.3, 0.7, 1.0, 1.2, 1.5, 2.5, 3.0, 4.7])
def test_blur_bit_exact_for_any_sigma_including_sub_pixel_box_radius(sigma):
    # sigma 0.7 and 1.0 give a box radius below one: Pillow keeps its float32 arithmetic there too.
    rng = np.random.default_rng(int(sigma * 10))
    imgs = rng.integers(0, 256, (6, 23, 41, 3), dtype=np.uint8)
    ours = blur_uint8(imgs.transpose(0, 3, 1, 2), sigma).transpose(0, 2, 3, 1)
    assert np.array_equal(ours, np.stack([_pillow(im, sigma) for im in imgs]))



def test_quantize_truncates_in_float32_like_the_released_code():
    k = np.arange(256, dtype=np.float32)
    x = k / np.float32(255)
    assert np.array_equal(quantize(x), np.floor(x * np.float32(255)).astype(np.uint8))
    assert quantize(np.float32([0.0, 1.0, 0.999]))[-1] == 254


def test_blur_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        blur_uint8(np.zeros((1, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="sigma"):
        box_blur_weights(-1.0)
